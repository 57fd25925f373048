"""Half-set validation: how well a fit reproduces itself, the check that needs no truth.

The projections, in order of tilt angle, are split into two interleaved halves (even and odd
ranks), so both cover the full angular range (and the same missing wedge) at twice the step. Each
half is fitted alone with the same settings (`engine.api.reconstruct`), the two atom sets are
matched one-to-one (`engine.evaluate.metrics`), and the half-to-half displacements give the
precision:

- each half holds half the dose, so where noise limits the precision a half's error per axis is
  σ_half ≈ √2 σ_full, and the difference of two independent halves has σ_diff = √2 σ_half = 2 σ_full;
- the half-to-half RMSD divided by √2 is therefore the precision of one half's fit, and divided by 2
  the precision expected of a fit to all projections (the number to compare with a full fit's error);
- errors the two halves share (a wrong atom model or profile, the geometry, what the missing wedge
  hides from both) cancel in the difference, so both are lower bounds where such errors matter.

A 95 % interval for each precision follows from the χ² distribution of a sum of squared Gaussian
differences (M matched atoms: M degrees of freedom per axis, 3M in 3D).
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.api import ReconstructionResult, reconstruct
from engine.core.errors import InputError
from engine.core.files import make_folder, writable_folder, write_atomically
from engine.evaluate.metrics import PM_PER_ANGSTROM, evaluate_atoms, match_atoms
from engine.io.atoms import Atoms, read_atoms
from engine.io.tiltseries import TiltSeries, read_tilt_series, require_tomography

HALVES = ("even", "odd")
SUMMARY = "validation.json"
PER_ATOM = "reproducibility.csv"
OUTPUTS = (SUMMARY, PER_ATOM)
"""validate's own files in its output folder; each half's fit goes to the subfolders `HALVES`."""
SCALES = {"half": np.sqrt(2.0), "full": 2.0}
"""Half-to-half RMS divided by these: the precision of one half's fit, and of a fit to all the data."""


@dataclass
class ValidationResult:
    """The summary (validation.json's contents), the two half fits and the output folder."""

    summary: dict
    even: ReconstructionResult
    odd: ReconstructionResult
    out_dir: Path


def split_halves(series: TiltSeries) -> dict[str, np.ndarray]:
    """Projection indices of the even and odd halves: every other projection in order of tilt
    angle (a stable sort, so a series in acquisition order splits the same way as a sorted one)."""
    order = np.argsort(series.angles, kind="stable")
    return {"even": np.sort(order[0::2]), "odd": np.sort(order[1::2])}


def validate(series, settings: dict | None = None, *, out_dir=None, arch: str = "auto", overwrite: bool = False,
             truth=None, radius: float = 1.0, progress: bool = True, **overrides) -> ValidationResult:
    """Fit the even and the odd projections of ``series`` (a `TiltSeries` or a file) separately
    and measure how well the two atom sets agree.

    settings, overrides : the fit's settings, as `engine.api.reconstruct` (the same for both halves).
    out_dir   : the halves' fits go to ``out_dir/even`` and ``out_dir/odd``, the summary to
                validation.json and each atom's reproducibility to reproducibility.csv (default: a
                new temporary folder). Earlier results there need ``overwrite``.
    truth     : atoms (a file or `Atoms`) to score each half against as well (never shown to the fits).
    radius    : matching radius [Å] between the halves (and against the truth).
    Everything is checked before the first fit starts. Returns the summary (see README, Half-set
    validation) with the two half fits.
    """
    import tempfile

    from engine.fit.outputs import check_output_folder, clear_outputs

    if not (np.isfinite(radius) and radius > 0):
        raise InputError("radius", f"must be a positive number of Å, got {radius}")
    if not isinstance(series, TiltSeries):
        series = read_tilt_series(series)
    require_tomography(series)
    halves = {name: series.subset(indices) for name, indices in split_halves(series).items()}
    for name, half in halves.items():
        try:
            require_tomography(half)
        except InputError as err:
            raise InputError(series.source or "tilt series", f"the {name} half cannot be fitted alone: "
                                                              f"{err.problem}") from None
    truth_atoms = truth if truth is None or isinstance(truth, Atoms) else read_atoms(truth)
    if out_dir is not None:
        out_dir = Path(out_dir)
        writable_folder(out_dir)
        found = [name for name in OUTPUTS if (out_dir / name).exists()]
        if found and not overwrite:
            raise InputError(out_dir, f"holds an earlier validation ({', '.join(found)}); pass --overwrite to "
                                      "replace it")
        for name in HALVES:
            check_output_folder(out_dir / name, overwrite=overwrite)
        make_folder(out_dir)
        if overwrite:
            clear_outputs(out_dir, OUTPUTS, keep=(series.source,))
    else:
        out_dir = Path(tempfile.mkdtemp(prefix="atomsplat-validate-"))

    fits = {}
    for number, (name, half) in enumerate(halves.items(), start=1):
        if progress:
            print(f"[atomsplat] half {number}/2: the {name} projections ({half.n_tilts} of {series.n_tilts}, "
                  f"{half.angles.min():g}..{half.angles.max():g} deg)", file=sys.stderr)
        fits[name] = reconstruct(half, settings, out_dir=out_dir / name, arch=arch, overwrite=overwrite,
                                 truth=truth_atoms, progress=progress, **overrides)
    summary = compare_halves(fits["even"].atoms, fits["odd"].atoms, radius)
    summary = {"source": series.source, "n_projections": series.n_tilts,
               "halves": {name: {"n_projections": halves[name].n_tilts, "n_atoms": len(fits[name].atoms),
                                 "out_dir": str(out_dir / name),
                                 **({"truth": fits[name].metrics} if truth_atoms is not None else {})}
                          for name in HALVES},
               **summary}
    write_atomically(out_dir / SUMMARY, lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
    write_atomically(out_dir / PER_ATOM, lambda tmp: _write_per_atom(tmp, fits["even"].atoms, fits["odd"].atoms,
                                                                     radius))
    return ValidationResult(summary, fits["even"], fits["odd"], out_dir)


def compare_halves(even: Atoms, odd: Atoms, radius: float = 1.0) -> dict:
    """The agreement of two fits of independent halves of one series (positions Å, results pm):
    atoms matched one-to-one within ``radius`` Å, the reproduced fraction 2M / (N_even + N_odd),
    the half-to-half RMSD (3D and per axis) and the precision it implies for one half's fit (÷√2)
    and for a fit to all the data (÷2), each with a 95 % χ² interval. JSON-able."""
    from scipy.stats import chi2

    agreement = evaluate_atoms(even, odd, radius=radius, radii_extra=())
    matched = agreement["n_matched"]
    summary = {
        "radius_A": radius,
        "n_matched": matched,
        "reproduced_fraction": agreement["f1"],
        "reproduced_fraction_even": agreement["precision"],
        "reproduced_fraction_odd": agreement["recall"],
        "species_agreement": agreement["species_accuracy"],
        "half_to_half_rmsd_pm": agreement["rmsd_pm"],
        "half_to_half_rmsd_axis_pm": agreement["rmsd_axis_pm"],
        "mean_offset_pm": agreement["mean_offset_pm"],
        "scaling": "precision_half = half-to-half / sqrt(2) (one half's fit); precision_full = half-to-half / 2 "
                   "(a fit to all projections, noise-limited: half the dose per half)",
    }
    rms = {"3d": agreement["rmsd_pm"], **agreement["rmsd_axis_pm"]} if matched else None
    dof = {"3d": 3 * matched, "x": matched, "y": matched, "z": matched}
    for name, scale in SCALES.items():
        summary[f"precision_{name}_pm"] = None if rms is None else {
            axis: float(value / scale) for axis, value in rms.items()}
        # M r² / σ² ~ χ²(M): σ lies in r √(M / χ²_0.975) .. r √(M / χ²_0.025) with 95 % probability
        summary[f"precision_{name}_interval_pm"] = None if rms is None else {
            axis: [float(value / scale * np.sqrt(dof[axis] / chi2.ppf(q, dof[axis]))) for q in (0.975, 0.025)]
            for axis, value in rms.items()}
    return summary


def _write_per_atom(path: Path, even: Atoms, odd: Atoms, radius: float) -> None:
    """One row per atom pair (matched in both halves) or lone atom: where it is (the pair's mean
    position, Å), the displacement even − odd and its length (pm)."""
    match = match_atoms(even.positions, odd.positions, radius)
    rows = []
    for (i, j), distance in zip(match.pairs, match.distances):
        delta = (even.positions[i] - odd.positions[j]) * PM_PER_ANGSTROM
        rows.append(["both", i, j, even.species[i], odd.species[j],
                     *(0.5 * (even.positions[i] + odd.positions[j])), *delta, distance * PM_PER_ANGSTROM])
    for name, atoms, side in (("even", even, 0), ("odd", odd, 1)):
        for index in np.setdiff1d(np.arange(len(atoms)), match.pairs[:, side]):
            rows.append([f"{name} only", index if side == 0 else "", index if side == 1 else "",
                         atoms.species[index] if side == 0 else "", atoms.species[index] if side == 1 else "",
                         *atoms.positions[index], "", "", "", ""])
    with open(path, "x", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["found_in", "index_even", "index_odd", "species_even", "species_odd", "x_A", "y_A", "z_A",
                         "dx_pm", "dy_pm", "dz_pm", "distance_pm"])
        writer.writerows([f"{v:.4f}" if isinstance(v, float) else v for v in row] for row in rows)


def format_summary(summary: dict) -> str:
    """The summary as a few lines of text (pm)."""
    def xyz(values) -> str:
        return "n/a" if values is None else (f"{values['3d']:.2f} pm (x {values['x']:.2f}, y {values['y']:.2f}, "
                                             f"z {values['z']:.2f})")

    halves = summary["halves"]
    rmsd = summary["half_to_half_rmsd_axis_pm"]
    lines = [
        f"half-set validation of {summary['source']}: {summary['n_projections']} projections, even "
        f"{halves['even']['n_projections']} and odd {halves['odd']['n_projections']}",
        f"atoms             even {halves['even']['n_atoms']}, odd {halves['odd']['n_atoms']}, matched "
        f"{summary['n_matched']} within {summary['radius_A']:g} Å: {100 * summary['reproduced_fraction']:.1f} % "
        "reproduced",
        "half-to-half      " + ("n/a" if rmsd is None else xyz({"3d": summary["half_to_half_rmsd_pm"], **rmsd})),
        "precision, half  " + " " + xyz(summary["precision_half_pm"]) + "  (half-to-half / √2)",
        "precision, full  " + " " + xyz(summary["precision_full_pm"]) + "  (half-to-half / 2: all projections)",
    ]
    interval = summary["precision_full_interval_pm"]
    if interval is not None:
        lines.append(f"                  95 % interval of the full-data 3D precision {interval['3d'][0]:.2f}.."
                     f"{interval['3d'][1]:.2f} pm")
    for name in ("even", "odd"):
        metrics = halves[name].get("truth")
        if metrics is not None and metrics["rmsd_pm"] is not None:
            lines.append(f"truth, {name} half".ljust(18) + f"F1 {metrics['f1']:.3f}, RMSD {metrics['rmsd_pm']:.2f} pm")
    return "\n".join(lines)
