"""Are the per-atom error bars honest? Fits every development set with its scene's settings and
compares the fitted positions with the truth, in units of their σ (atoms.xyz's sigma_x/y/z):

- calibration: the standard deviation of (fitted − true) / σ per axis over matched atoms (1 when
  the error bars are right) and the fraction of atoms inside their 95 % ellipsoid (axes σ, χ²₃ 95 %);
- achieved against possible: the fit's RMSD beside the Cramér–Rao RMSD of `atomsplat plan` with the
  true structure and the data's conditions (`engine.api.plan`, ``like`` the series);
- cost: the seconds the uncertainties took as a share of the fit's wall time (same process);
- with ``--coupling``: what the written σ (each atom with its nearest neighbours) and each atom's
  own Fisher block leave out, against the joint Fisher information of all atoms (an independent
  float64 NumPy sparse Jacobian of the fitted model): median ratios of the joint σ to those, and the
  calibration the joint σ would give.

    python scripts/uncertainty_check.py [--data ../shared/data] [--sets dev_au_cubo_small,...]
        [--out out/uncertainty_check] [--coupling] [--profile peng] [--json FILE]
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


def jacobian(atoms, series, blur, weights, extras, free_shape, amplitude_factor):
    """Sparse d(image)/d(x, y, z[, log a, log σ]) of every fitted atom (float64, the projector's
    footprints) and the atoms' image, flattened over (projection, row, column)."""
    import scipy.sparse as sp

    g, (n, h, w), ps = series.get_geometry(), series.projections.shape, series.pixel_size
    per = 5 if free_shape else 3
    rows, cols, vals, image = [], [], [], np.zeros(n * h * w)
    amp, width = atoms.columns["amplitude"] * amplitude_factor, atoms.columns["width"]
    for i, pos in enumerate(atoms.positions):
        s2 = width[i] ** 2 + np.asarray(extras) + blur ** 2
        radius = TRUNCATION_RADIUS_SIGMAS * np.sqrt(s2.max()) / ps
        for k in range(n):
            q = g.rotations[k] @ pos
            col = (q[0] + g.shifts[k][0]) / ps + centre_index(w)
            row = (q[1] + g.shifts[k][1]) / ps + centre_index(h)
            c0, c1 = max(int(np.ceil(col - radius)), 0), min(int(np.floor(col + radius)), w - 1)
            r0, r1 = max(int(np.ceil(row - radius)), 0), min(int(np.floor(row + radius)), h - 1)
            if c0 > c1 or r0 > r1:
                continue
            rr, cc = np.mgrid[r0:r1 + 1, c0:c1 + 1]
            dx, dy = (cc - col) * ps, (rr - row) * ps
            d2 = dx ** 2 + dy ** 2
            c, radial, widening = np.zeros(dx.shape), np.zeros(dx.shape), np.zeros(dx.shape)
            for wj, s2j in zip(weights, s2):
                cj = amp[i] * wj / (2 * np.pi * s2j) * np.exp(-d2 / (2 * s2j))
                c, radial, widening = c + cj, radial + cj / s2j, widening + cj * (d2 / (2 * s2j ** 2) - 1 / s2j)
            grads = [radial * (dx * g.rotations[k][0, a] + dy * g.rotations[k][1, a]) for a in range(3)]
            if free_shape:
                grads += [c, widening * 2 * width[i] ** 2]
            pixels = (k * h * w + rr * w + cc).ravel()
            image[pixels] += c.ravel()
            for a, grad in enumerate(grads):
                rows.append(pixels)
                cols.append(np.full(pixels.size, i * per + a))
                vals.append(grad.ravel())
    matrix = sp.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                           shape=(n * h * w, len(atoms) * per))
    return matrix, image, per


def joint_sigma(atoms, series, report) -> tuple[np.ndarray, np.ndarray]:
    """(joint σ, per-atom-block σ) (N, 3) Å of the fitted model, from J^T W J in float64."""
    import scipy.sparse as sp

    n, h, w = series.projections.shape
    model = report["forward_model"]
    if report.get("model") == "tied":
        gain = report["noise_model"]["gain"]
        jac, image, per = jacobian(atoms, series, 0.0, [1.0], [0.0], False, gain)
        weight = 1.0 / (np.repeat(np.asarray(report["background_counts"]), h * w) + image)
    else:
        jac, image, per = jacobian(atoms, series, model["blur_A"], model["profile"]["weights"],
                                   model["profile"]["extra_var_A2"], True, 1.0)
        residual = series.projections.astype(np.float64).ravel() - image - model["background"]
        weight = np.repeat(1.0 / np.mean(residual.reshape(n, -1) ** 2, axis=1), h * w)
    fisher = (jac.T @ sp.diags(weight) @ jac).toarray()
    inverse = np.linalg.inv(fisher)
    joint, block = [], []
    for i in range(len(atoms)):
        part = slice(i * per, (i + 1) * per)
        joint.append(np.diag(inverse[part, part])[:3])
        block.append(np.diag(np.linalg.inv(fisher[part, part]))[:3])
    return np.sqrt(np.array(joint)), np.sqrt(np.array(block))


def blur_of(series) -> float | None:
    """The series' blur σ (Å): the file's, else what its description says ("blur 0.35 A")."""
    if series.blur_sigma is not None:
        return series.blur_sigma
    found = re.search(r"blur ([0-9.]+) ?(?:A|Å)", getattr(series, "description", "") or "")
    return float(found.group(1)) if found else None


def check(name: str, data: Path, out: Path, coupling: bool, overrides: dict) -> dict:
    scene = load_scene(ROOT / "scenes" / f"{name}.toml")
    series = load_series(data / f"{name}.npz")
    truth = read_atoms(data / f"{name}_truth.xyz")
    result = reconstruct(series, {**scene.reconstruct, **overrides}, out_dir=out / name, overwrite=True, truth=truth, arch="cpu",
                         progress=False)
    atoms, report = result.atoms, result.report
    index, errors = matched(atoms, truth)
    sigma = np.column_stack([atoms.columns[f"sigma_{a}"] for a in "xyz"])[index]
    covariance = covariance_of(atoms.columns)[index]
    (out / name).mkdir(parents=True, exist_ok=True)
    np.savez(out / name / "calibration.npz", index=index, errors=errors, covariance=covariance)
    bound = plan(truth, series, blur=blur_of(series), arch="cpu")
    row = {"set": name, "atoms": len(atoms), "matched": len(index), **calibration(errors, sigma, covariance),
           "outliers": outliers(errors, sigma, index, atoms, truth),
           "median_sigma_pm": {a: float(np.median(sigma[:, i]) * 100) for i, a in enumerate("xyz")},
           "rmsd_pm": result.metrics["rmsd_pm"], "rmsd_z_pm": result.metrics["rmsd_axis_pm"]["z"],
           "bound_rmsd_pm": bound["rmsd_pm"], "bound_rmsd_z_pm": bound["rmsd_axis_pm"]["z"],
           "uncertainty_seconds": report["phase_seconds"].get("uncertainty"), "fit_seconds": report["wall_seconds"]}
    row["achieved_over_bound"] = row["rmsd_pm"] / row["bound_rmsd_pm"]
    row["cost_share"] = row["uncertainty_seconds"] / row["fit_seconds"]
    if coupling:
        joint, block = joint_sigma(atoms, series, report)
        written = np.column_stack([atoms.columns[f"sigma_{a}"] for a in "xyz"])
        for key, ratio in (("joint_over_block_median", joint / block), ("joint_over_written_median", joint / written)):
            row[key] = {a: float(np.median(ratio[:, i])) for i, a in enumerate("xyz")}
        row["joint"] = calibration(errors, joint[index])
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "uncertainty_check")
    parser.add_argument("--coupling", action="store_true", help="also the joint Fisher information (slow)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows as JSON")
    parser.add_argument("--profile", default=None, help="fit with this atom profile instead of the scene's")
    args = parser.parse_args()
    overrides = {} if args.profile is None else {"profile": args.profile}
    rows = []
    for name in args.sets.split(","):
        rows.append(check(name, args.data, args.out, args.coupling, overrides))
        print(f"done {name}", file=sys.stderr)
    print("| set | matched | std z (x, y, z) | 95 % coverage, axes σ only | 95 % coverage, full 3×3 | > 4 σ "
          "| median σ pm (x, y, z) | uncertainty s / fit s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        z, s = r["std_z"], r["median_sigma_pm"]
        print(f"| {r['set']} | {r['matched']} | {z['x']:.2f}, {z['y']:.2f}, {z['z']:.2f} "
              f"| {100 * r['coverage_95_diagonal']:.1f} % | {100 * r['coverage_95']:.1f} % | {r['outliers']['count']} | "
              f"{s['x']:.3g}, {s['y']:.3g}, {s['z']:.3g} | {r['uncertainty_seconds']:.2f} / {r['fit_seconds']:.1f} "
              f"({100 * r['cost_share']:.1f} %) |")
    print("\n| set | RMSD pm (z) | Cramér–Rao RMSD pm (z) | ratio |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['set']} | {r['rmsd_pm']:.3g} ({r['rmsd_z_pm']:.3g}) | {r['bound_rmsd_pm']:.3g} "
              f"({r['bound_rmsd_z_pm']:.3g}) | {r['achieved_over_bound']:.2f} |")
    if args.coupling:
        print("\n| set | joint σ / own-block σ (x, y, z) | joint σ / written σ (x, y, z) | std z with joint σ "
              "| 95 % coverage with joint σ |")
        print("| --- | --- | --- | --- | --- |")
        for r in rows:
            q, w, z = r["joint_over_block_median"], r["joint_over_written_median"], r["joint"]["std_z"]
            print(f"| {r['set']} | {q['x']:.3f}, {q['y']:.3f}, {q['z']:.3f} | {w['x']:.3f}, {w['y']:.3f}, {w['z']:.3f} "
                  f"| {z['x']:.2f}, {z['y']:.2f}, {z['z']:.2f} | {100 * r['joint']['coverage_95']:.1f} % |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
