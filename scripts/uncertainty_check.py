"""Are the per-atom error bars honest? Fits every development set with its scene's settings and
compares the fitted positions with the truth, in units of their σ (atoms.xyz's sigma_x/y/z):

- calibration: the standard deviation of (fitted − true) / σ per axis over matched atoms (1 when
  the error bars are right) and the fraction of atoms inside their 95 % ellipsoid (eᵀ C⁻¹ e ≤ χ²₃
  95 %, C the atom's 3×3 covariance of atoms.xyz; beside it the axes' σ alone, Σ (e/σ)², as before
  the off-diagonal columns), and the matched atoms off by more than 4 σ on an axis;
- achieved against possible: the fit's RMSD beside the Cramér–Rao RMSD of `atomsplat plan` with the
  true structure and the data's conditions (`engine.api.plan`, ``like`` the series);
- cost: the seconds the uncertainties took as a share of the fit's wall time (same process), and
  beside them those of the profile correction (`engine.fit.profile_misfit`, a step of the fit);
- with ``--coupling``: what each atom's own Fisher block leaves out against the joint Fisher
  information of all atoms (an independent float64 NumPy sparse Jacobian of the fitted model), the
  joint Fisher σ against the written σ (the observed information of each atom with its nearest
  neighbours: the ratio holds both the coupling left out and observed against expected), and the
  calibration the joint Fisher σ would give;
- with ``--misfit``: the bias the fit's atom profile still leaves (`misfit_shift`, a stacked mean of
  the residual and the joint information of all atoms: after the fit's own profile correction, what
  that misses): how large against σ, how it correlates with the actual errors, and the calibration
  with it removed;
- with ``--reuse``: the fits already in ``--out`` are scored, not refitted.

    python scripts/uncertainty_check.py [--data ../shared/data] [--sets dev_au_cubo_small,...]
        [--out out/uncertainty_check] [--coupling] [--misfit] [--reuse] [--profile peng] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.api import load_series, plan, reconstruct  # noqa: E402
from engine.core.geometry import centre_index  # noqa: E402
from engine.evaluate.metrics import match_atoms  # noqa: E402
from engine.fit.uncertainty import covariance_of  # noqa: E402
from engine.io.atoms import read_atoms  # noqa: E402
from engine.kernels.projector import TRUNCATION_RADIUS_SIGMAS  # noqa: E402
from engine.scene import load_scene  # noqa: E402

SETS = ("dev_au_cubo_small", "dev_ptni_wedge", "dev_asi_dose14", "dev_asi_dose28", "dev_asi_dose140")
CHI2_3_95 = 7.814727903251178  # the 95 % quantile of χ² with 3 degrees of freedom


def calibration(errors: np.ndarray, sigma: np.ndarray, covariance: np.ndarray | None = None) -> dict:
    """Normalised errors' standard deviation per axis and the 95 % ellipsoid coverage: with the axes'
    σ alone (``coverage_95_diagonal``, Σ (e/σ)² ≤ χ²₃) and, given each atom's (N, 3, 3) Å²
    ``covariance``, with the whole matrix (``coverage_95``, eᵀ C⁻¹ e ≤ χ²₃: the atom's ellipsoid)."""
    z = errors / sigma
    diagonal = float(np.mean(np.sum(z ** 2, axis=1) <= CHI2_3_95))
    full = diagonal if covariance is None else float(np.mean(mahalanobis2(errors, covariance) <= CHI2_3_95))
    return {"std_z": {a: float(z[:, i].std()) for i, a in enumerate("xyz")},
            "coverage_95": full, "coverage_95_diagonal": diagonal}


def mahalanobis2(errors: np.ndarray, covariance: np.ndarray) -> np.ndarray:
    """eᵀ C⁻¹ e of each atom (errors (N, 3) Å, covariance (N, 3, 3) Å²): χ²₃ when C is honest."""
    return np.einsum("ni,ni->n", errors, np.linalg.solve(covariance, errors[..., None])[..., 0])


def outliers(errors: np.ndarray, sigma: np.ndarray, index: np.ndarray, fitted, truth, limit: float = 4.0) -> dict:
    """The matched atoms off by more than ``limit`` σ on some axis, and whether they look like real
    positional errors or mismatches: how far the fitted atom is from its second-nearest true atom
    and its nearest other fitted atom (a duplicate or a split atom sits near another fitted one)."""
    from scipy.spatial import cKDTree

    far = np.flatnonzero(np.max(np.abs(errors / sigma), axis=1) > limit)
    to_truth, _ = cKDTree(truth.positions).query(fitted.positions[index[far]], k=2)
    to_fitted, _ = cKDTree(fitted.positions).query(fitted.positions[index[far]], k=2)
    return {"count": int(len(far)), "limit_sigma": limit,
            "atoms": [{"index": int(index[f]), "error_pm": [round(float(v) * 100, 2) for v in errors[f]],
                       "error_sigma": [round(float(v), 2) for v in errors[f] / sigma[f]],
                       "second_truth_A": round(float(t[1]), 3), "nearest_fitted_A": round(float(o[1]), 3)}
                      for f, t, o in zip(far, to_truth.reshape(-1, 2), to_fitted.reshape(-1, 2))]}


def matched(atoms, truth):
    pairs = np.asarray(match_atoms(atoms.positions, truth.positions, 1.0).pairs).reshape(-1, 2)
    return pairs[:, 0], atoms.positions[pairs[:, 0]] - truth.positions[pairs[:, 1]]


def footprints(atoms, series, variances):
    """Each fitted atom's footprint in each projection, as the projector truncates it: (atom i,
    flat pixel indices over (projection, row, column), dx, dy Å from the projected centre), for
    atoms of image variances ``variances`` (N, components) Å² (width², profile and blur)."""
    g, (n, h, w), ps = series.get_geometry(), series.projections.shape, series.pixel_size
    for i, pos in enumerate(atoms.positions):
        radius = TRUNCATION_RADIUS_SIGMAS * np.sqrt(variances[i].max()) / ps
        for k in range(n):
            q = g.rotations[k] @ pos
            col = (q[0] + g.shifts[k][0]) / ps + centre_index(w)
            row = (q[1] + g.shifts[k][1]) / ps + centre_index(h)
            c0, c1 = max(int(np.ceil(col - radius)), 0), min(int(np.floor(col + radius)), w - 1)
            r0, r1 = max(int(np.ceil(row - radius)), 0), min(int(np.floor(row + radius)), h - 1)
            if c0 > c1 or r0 > r1:
                continue
            rr, cc = np.mgrid[r0:r1 + 1, c0:c1 + 1]
            yield i, k, (k * h * w + rr * w + cc).ravel(), (cc - col) * ps, (rr - row) * ps


def jacobian(atoms, series, variances, weights, free_shape, amplitude_factor):
    """Sparse d(image)/d(x, y, z[, log a, log σ]) of every fitted atom (float64, the projector's
    footprints) and the atoms' image, flattened over (projection, row, column)."""
    import scipy.sparse as sp

    g, (n, h, w) = series.get_geometry(), series.projections.shape
    per = 5 if free_shape else 3
    rows, cols, vals, image = [], [], [], np.zeros(n * h * w)
    amp, width = atoms.columns["amplitude"] * amplitude_factor, atoms.columns["width"]
    for i, k, pixels, dx, dy in footprints(atoms, series, variances):
        d2 = dx ** 2 + dy ** 2
        c, radial, widening = np.zeros(dx.shape), np.zeros(dx.shape), np.zeros(dx.shape)
        for wj, s2j in zip(weights, variances[i]):
            cj = amp[i] * wj / (2 * np.pi * s2j) * np.exp(-d2 / (2 * s2j))
            c, radial, widening = c + cj, radial + cj / s2j, widening + cj * (d2 / (2 * s2j ** 2) - 1 / s2j)
        grads = [radial * (dx * g.rotations[k][0, a] + dy * g.rotations[k][1, a]) for a in range(3)]
        if free_shape:
            grads += [c, widening * 2 * width[i] ** 2]
        image[pixels] += c.ravel()
        for a, grad in enumerate(grads):
            rows.append(pixels)
            cols.append(np.full(pixels.size, i * per + a))
            vals.append(grad.ravel())
    matrix = sp.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                           shape=(n * h * w, len(atoms) * per))
    return matrix, image, per


def fitted_model(atoms, series, report, free_shape: bool):
    """The fitted model's Jacobian (`jacobian`), parameters per atom, the image variances of its
    atoms (N, components) Å², its residual (data − model) and the likelihood's weight per pixel
    (1/λ for counts, 1/(mean r²) of each projection for Gaussian data), flattened."""
    n, h, w = series.projections.shape
    model = report["forward_model"]
    width2 = atoms.columns["width"][:, None] ** 2
    if report.get("model") == "tied":
        gain = report["noise_model"]["gain"]
        variances = width2 + np.zeros((1, 1))
        jac, image, per = jacobian(atoms, series, variances, [1.0], free_shape, gain)
        expected = np.repeat(np.asarray(report["background_counts"]), h * w) + image
        return jac, per, variances, series.projections.astype(np.float64).ravel() * gain - expected, 1.0 / expected
    variances = width2 + np.asarray(model["profile"]["extra_var_A2"])[None] + model["blur_A"] ** 2
    jac, image, per = jacobian(atoms, series, variances, model["profile"]["weights"], free_shape, 1.0)
    residual = series.projections.astype(np.float64).ravel() - image - model["background"]
    return jac, per, variances, residual, np.repeat(1.0 / np.mean(residual.reshape(n, -1) ** 2, axis=1), h * w)


def joint_sigma(atoms, series, report) -> tuple[np.ndarray, np.ndarray]:
    """(joint σ, per-atom-block σ) (N, 3) Å of the fitted model, from J^T W J in float64."""
    import scipy.sparse as sp

    jac, per, _, _, weight = fitted_model(atoms, series, report, report.get("model") != "tied")
    fisher = (jac.T @ sp.diags(weight) @ jac).toarray()
    inverse = np.linalg.inv(fisher)
    joint, block = [], []
    for i in range(len(atoms)):
        part = slice(i * per, (i + 1) * per)
        joint.append(np.diag(inverse[part, part])[:3])
        block.append(np.diag(np.linalg.inv(fisher[part, part]))[:3])
    return np.sqrt(np.array(joint)), np.sqrt(np.array(block))


MISFIT_BINS = 40  # radial bins of the stacked residual, out to the footprint's truncation radius


def misfit_shift(atoms, series, report) -> np.ndarray:
    """(N, 3) Å: how far each atom would move if the fit's atom profile were right, to first order.
    The profile's misfit is read off the data: the fit's residual stacked around every atom over all
    projections, as a mean against the distance from the atom's projected centre (one profile per
    species; neighbours' and noise average out). Rendered at every atom it is the image the fitted
    model lacks; the Gauss–Newton step of the joint information (all atoms, amplitude and width
    free) towards it, −F⁻¹ Jᵀ W m, is the bias the misfit of each atom's neighbours leaves in its
    position (its own misfit is even about it and pulls it nowhere)."""
    import scipy.sparse as sp

    jac, per, variances, residual, weight = fitted_model(atoms, series, report, True)
    species = np.unique(atoms.species, return_inverse=True)[1]
    edges = np.linspace(0.0, TRUNCATION_RADIUS_SIGMAS * np.sqrt(variances.max()), MISFIT_BINS + 1)
    walked = [(i, pixels, np.digitize(np.hypot(dx, dy).ravel(), edges) - 1)
              for i, _, pixels, dx, dy in footprints(atoms, series, variances)]
    sums, counts = np.zeros((species.max() + 1, MISFIT_BINS + 1)), np.zeros((species.max() + 1, MISFIT_BINS + 1))
    for i, pixels, b in walked:
        np.add.at(sums[species[i]], b, residual[pixels])
        np.add.at(counts[species[i]], b, 1)
    profile = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
    profile[:, MISFIT_BINS:] = 0.0  # the footprints' corners beyond the truncation radius
    misfit = np.zeros_like(residual)
    for i, pixels, b in walked:
        np.add.at(misfit, pixels, profile[species[i], b])
    fisher = (jac.T @ sp.diags(weight) @ jac).toarray()
    step = -np.linalg.solve(fisher, jac.T @ (weight * misfit))
    return np.stack([step[i * per:i * per + 3] for i in range(len(atoms))])


def blur_of(series) -> float | None:
    """The series' blur σ (Å): the file's, else what its description says ("blur 0.35 A")."""
    if series.blur_sigma is not None:
        return series.blur_sigma
    found = re.search(r"blur ([0-9.]+) ?(?:A|Å)", getattr(series, "description", "") or "")
    return float(found.group(1)) if found else None


def check(name: str, data: Path, out: Path, coupling: bool, misfit: bool, reuse: bool, overrides: dict) -> dict:
    scene = load_scene(ROOT / "scenes" / f"{name}.toml")
    series = load_series(data / f"{name}.npz")
    truth = read_atoms(data / f"{name}_truth.xyz")
    if reuse:  # the fit already in out/NAME
        atoms, report = read_atoms(out / name / "atoms.xyz"), json.loads((out / name / "report.json").read_text())
        metrics = json.loads((out / name / "metrics.json").read_text())
    else:
        result = reconstruct(series, {**scene.reconstruct, **overrides}, out_dir=out / name, overwrite=True, truth=truth,
                             arch="cpu", progress=False)
        atoms, report, metrics = result.atoms, result.report, result.metrics
    index, errors = matched(atoms, truth)
    sigma = np.column_stack([atoms.columns[f"sigma_{a}"] for a in "xyz"])[index]
    covariance = covariance_of(atoms.columns)[index]
    bound = plan(truth, series, blur=blur_of(series), arch="cpu")
    row = {"set": name, "atoms": len(atoms), "matched": len(index), **calibration(errors, sigma, covariance),
           "outliers": outliers(errors, sigma, index, atoms, truth),
           "median_sigma_pm": {a: float(np.median(sigma[:, i]) * 100) for i, a in enumerate("xyz")},
           "rmsd_pm": metrics["rmsd_pm"], "rmsd_z_pm": metrics["rmsd_axis_pm"]["z"],
           "bound_rmsd_pm": bound["rmsd_pm"], "bound_rmsd_z_pm": bound["rmsd_axis_pm"]["z"],
           "uncertainty_seconds": report["phase_seconds"].get("uncertainty"), "fit_seconds": report["wall_seconds"],
           "correction_seconds": report["phase_seconds"].get("profile_correction", 0.0),
           "correction_shift_pm": (report.get("profile_correction") or {}).get("shift_pm")}
    row["achieved_over_bound"] = row["rmsd_pm"] / row["bound_rmsd_pm"]
    row["cost_share"] = row["uncertainty_seconds"] / row["fit_seconds"]
    if coupling:
        joint, block = joint_sigma(atoms, series, report)
        written = np.column_stack([atoms.columns[f"sigma_{a}"] for a in "xyz"])
        for key, ratio in (("joint_over_block_median", joint / block), ("joint_over_written_median", joint / written)):
            row[key] = {a: float(np.median(ratio[:, i])) for i, a in enumerate("xyz")}
        row["joint"] = calibration(errors, joint[index])
    if misfit:
        shift = misfit_shift(atoms, series, report)[index]
        row["misfit_shift_over_sigma_rms"] = {a: float(np.sqrt(np.mean((shift[:, i] / sigma[:, i]) ** 2)))
                                              for i, a in enumerate("xyz")}
        row["misfit_shift_error_correlation"] = {a: float(np.corrcoef(-shift[:, i], errors[:, i])[0, 1])
                                                 for i, a in enumerate("xyz")}
        row["misfit_removed"] = calibration(errors + shift, sigma, covariance)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "uncertainty_check")
    parser.add_argument("--coupling", action="store_true", help="also the joint Fisher information (slow)")
    parser.add_argument("--misfit", action="store_true",
                        help="also the bias the atom profile's misfit leaves (stacked residual, slow)")
    parser.add_argument("--reuse", action="store_true", help="score the fits already in --out instead of fitting")
    parser.add_argument("--json", type=Path, default=None, help="write the rows as JSON")
    parser.add_argument("--profile", default=None, help="fit with this atom profile instead of the scene's")
    args = parser.parse_args()
    overrides = {} if args.profile is None else {"profile": args.profile}
    rows = []
    for name in args.sets.split(","):
        rows.append(check(name, args.data, args.out, args.coupling, args.misfit, args.reuse, overrides))
        print(f"done {name}", file=sys.stderr)
    print("| set | matched | std z (x, y, z) | 95 % coverage, axes σ only | 95 % coverage, full 3×3 | > 4 σ "
          "| median σ pm (x, y, z) | uncertainty s / fit s | profile correction s, median shift pm |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        z, s = r["std_z"], r["median_sigma_pm"]
        print(f"| {r['set']} | {r['matched']} | {z['x']:.2f}, {z['y']:.2f}, {z['z']:.2f} "
              f"| {100 * r['coverage_95_diagonal']:.1f} % | {100 * r['coverage_95']:.1f} % | {r['outliers']['count']} | "
              f"{s['x']:.3g}, {s['y']:.3g}, {s['z']:.3g} | {r['uncertainty_seconds']:.2f} / {r['fit_seconds']:.1f} "
              f"({100 * r['cost_share']:.1f} %) | {r['correction_seconds']:.2f}, "
              f"{(r['correction_shift_pm'] or {}).get('median', 0.0):.3g} |")
    print("\n| set | RMSD pm (z) | Cramér–Rao RMSD pm (z) | ratio |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['set']} | {r['rmsd_pm']:.3g} ({r['rmsd_z_pm']:.3g}) | {r['bound_rmsd_pm']:.3g} "
              f"({r['bound_rmsd_z_pm']:.3g}) | {r['achieved_over_bound']:.2f} |")
    if args.coupling:
        print("\n| set | joint Fisher σ / own-block σ (x, y, z) | joint Fisher σ / written σ (x, y, z) "
              "| std z with joint Fisher σ | 95 % coverage with joint Fisher σ |")
        print("| --- | --- | --- | --- | --- |")
        for r in rows:
            q, w, z = r["joint_over_block_median"], r["joint_over_written_median"], r["joint"]["std_z"]
            print(f"| {r['set']} | {q['x']:.3f}, {q['y']:.3f}, {q['z']:.3f} | {w['x']:.3f}, {w['y']:.3f}, {w['z']:.3f} "
                  f"| {z['x']:.2f}, {z['y']:.2f}, {z['z']:.2f} | {100 * r['joint']['coverage_95']:.1f} % |")
    if args.misfit:
        print("\n| set | profile-misfit shift / σ, rms (x, y, z) | corr(−shift, error) (x, y, z) | std z, shift removed "
              "| 95 % coverage (full 3×3), shift removed |")
        print("| --- | --- | --- | --- | --- |")
        for r in rows:
            q, c, m = r["misfit_shift_over_sigma_rms"], r["misfit_shift_error_correlation"], r["misfit_removed"]
            print(f"| {r['set']} | {q['x']:.2f}, {q['y']:.2f}, {q['z']:.2f} | {c['x']:.2f}, {c['y']:.2f}, {c['z']:.2f} "
                  f"| {m['std_z']['x']:.2f}, {m['std_z']['y']:.2f}, {m['std_z']['z']:.2f} | {100 * m['coverage_95']:.1f} % |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
