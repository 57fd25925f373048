"""The Python API, for notebooks and scripts; the command line is a thin layer over it.

    from engine import load_series, reconstruct
    series = load_series("series.npz")
    result = reconstruct(series, species=["Au"], out_dir="out/au")
    result.atoms.positions, result.report["n_atoms"], result.to_ase()

Lengths in Å, angles in degrees.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.core.backend import init_backend
from engine.core.errors import InputError
from engine.core.files import write_atomically
from engine.io.atoms import Atoms, read_atoms
from engine.io.tiltseries import TiltSeries, read_tilt_series, require_tomography


@dataclass
class ReconstructionResult:
    """What a fit gives: the atoms (positions Å, amplitude, width Å, species, …), the report (the
    contents of report.json), the refined `engine.measure.alignment.Alignment` (None unless the
    alignment was refined), the metrics against a truth (None without one) and the output folder."""

    atoms: Atoms
    report: dict
    alignment: object
    metrics: dict | None
    out_dir: Path

    def to_ase(self):
        """The atoms as an `ase.Atoms`."""
        return self.atoms.to_ase()


def load_series(path, pixel_size: float | None = None, angles_file=None, mat_key: str | None = None,
                layout: str | None = None) -> TiltSeries:
    """A tilt series from .npz, MRC/ST (angles from a .tlt/.rawtlt beside it), TIFF or MATLAB .mat;
    ``pixel_size`` (Å) for files that carry none; ``mat_key``, ``layout`` and ``angles_file`` (a file,
    or a .mat variable) as `engine.io.tiltseries.read_tilt_series`."""
    return read_tilt_series(path, pixel_size=pixel_size, angles_file=angles_file, mat_key=mat_key, layout=layout)


def reconstruct(series, settings: dict | None = None, *, out_dir=None, arch: str = "auto", resume: bool = False,
                overwrite: bool = False, truth=None, progress: bool = True, observer=None,
                **overrides) -> ReconstructionResult:
    """Fit atoms to ``series`` (a `TiltSeries` or a file path).

    settings  : the fit's settings (`engine.fit.settings`) as a dict; keyword ``overrides`` on top,
                e.g. ``reconstruct(series, species=["Pt", "Ni"], iters=400)``; ``init="atoms.xyz"``
                starts from those atoms instead of seeding (a warm start).
    out_dir   : where atoms.xyz, report.json, the figures and checkpoints go (default: a new
                temporary folder). A folder holding an earlier fit needs ``resume`` (continue its
                checkpoint: the same data, its settings unless given, the same where given) or
                ``overwrite`` (its outputs are removed before the fit starts).
    truth     : atoms (a file or `Atoms`) to score the result against once it is written; a file is
                read and checked before the fit, which never sees it.
    arch      : Taichi backend: auto, cpu, cuda or vulkan.
    observer  : called as ``observer(fit)`` after every step (see `engine.fit.reconstruct`).
    Everything is checked before any work: a bad input raises InputError (or SettingError) and
    leaves the folder as it was.
    """
    from dataclasses import asdict

    from engine.core.files import make_folder
    from engine.evaluate.metrics import evaluate_atoms
    from engine.fit.outputs import check_output_folder, clear_outputs, write_outputs
    from engine.fit.reconstruct import CHECKPOINT, Reconstruction, create_fit
    from engine.measure.datamodel import choose_noise_model
    from engine.fit.settings import fit_settings, requested_noise
    from engine.fit.trainer import check_checkpoint, data_fingerprint, resumed_settings

    if resume and out_dir is None:
        raise InputError("resume", "needs the out_dir holding the checkpoint")
    meta = None if out_dir is None else check_output_folder(out_dir, resume, overwrite)
    values = {**(settings or {}), **overrides}
    checked = fit_settings(resumed_settings(meta, values) if meta is not None else values)
    if not isinstance(series, TiltSeries):
        series = load_series(series)
    require_tomography(series)
    noise = choose_noise_model(series, requested_noise(checked), checked.gain)  # refuses data the model cannot take
    truth_atoms = truth if truth is None or isinstance(truth, Atoms) else read_atoms(truth)
    if checked.init is not None:
        read_atoms(checked.init)  # a missing, unreadable or empty file stops before any work
    if meta is not None:
        check_checkpoint(Path(out_dir) / CHECKPOINT, meta, data_fingerprint(series), asdict(checked))
    out_dir = make_folder(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="atomsplat-"))
    if overwrite and not resume:
        clear_outputs(out_dir, keep=(series.source, truth if isinstance(truth, (str, Path)) else None))
    actual = init_backend(arch, verbose=progress)
    t0 = time.perf_counter()
    if progress:
        print(f"[atomsplat] noise model: {noise.kind} ({noise.reason})", file=sys.stderr)
        print(f"[atomsplat] preparing the fit of {series.n_tilts} projections of {series.shape[0]} x "
              f"{series.shape[1]} px (data model, seeds)", file=sys.stderr)
    fit = create_fit(series, checked, out_dir, progress=progress, noise=noise)
    if resume:
        if not isinstance(fit, Reconstruction):
            raise InputError(out_dir, "the tied-atom fit of counted data keeps no checkpoint to resume "
                                      "(start it again, or fit with per_atom_shape)")
        fit.resume(out_dir / CHECKPOINT)
    atoms = fit.run(observer=observer)
    report = write_outputs(fit, atoms, actual, time.perf_counter() - t0)
    metrics = None
    if truth_atoms is not None:
        metrics = evaluate_atoms(atoms, truth_atoms, radius=1.0, radii_extra=(0.5,))
        write_atomically(out_dir / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2)))
    alignment = fit.refiner.alignment if fit.refiner is not None else None
    return ReconstructionResult(atoms, report, alignment, metrics, out_dir)


def simulate(structure, tilts, pixel_size: float, shape=None, blur: float = 0.4, noise: float = 0.0,
             peak_counts: float | None = None, b_factor: float = 0.0, seed: int = 0, arch: str = "auto") -> TiltSeries:
    """A simulated tilt series of ``structure`` (`Atoms`, `ase.Atoms` or a file) at ``tilts``
    (degrees: an array or 'START:STOP:STEP'), ``pixel_size`` Å, ``shape`` (H, W) px (default: the
    particle fits at every tilt with 6 Å to spare), blur σ Å, Gaussian ``noise`` (fraction of the
    clean maximum) or Poisson noise (``peak_counts`` at the brightest pixel), Debye–Waller B Å²."""
    from engine.physics.simulate import auto_shape, parse_tilt_range, simulate_tilt_series

    if not isinstance(structure, Atoms):
        structure = read_atoms(structure) if isinstance(structure, (str, Path)) else Atoms.from_ase(structure)
    angles = parse_tilt_range(tilts) if isinstance(tilts, str) else np.asarray(tilts, np.float64)
    init_backend(arch)
    return simulate_tilt_series(structure, angles, pixel_size, shape or auto_shape(structure, pixel_size),
                                blur_sigma=blur, b_factor=b_factor, noise=noise, peak_counts=peak_counts, seed=seed)


def score(atoms, truth, radius: float = 1.0) -> dict:
    """Precision, recall, F1 and RMSD (pm) of ``atoms`` against ``truth`` (`Atoms` or files) by optimal
    one-to-one matching within ``radius`` Å."""
    from engine.evaluate.metrics import evaluate_atoms

    atoms = atoms if isinstance(atoms, Atoms) else read_atoms(atoms)
    truth = truth if isinstance(truth, Atoms) else read_atoms(truth)
    return evaluate_atoms(atoms, truth, radius=radius, radii_extra=(0.5,))


def plan(structure, like=None, *, tilts=None, pixel_size: float | None = None, shape=None, blur: float | None = None,
         counts_per_atom: float | None = None, background: float = 0.0, noise: float | None = None,
         target_pm: float | None = None, b_factor: float = 0.0, arch: str = "auto") -> dict:
    """The Cramér–Rao bound of every atom of ``structure`` (`Atoms`, `ase.Atoms` or a file) in an
    experiment (`engine.fit.plan`): the conditions of the tilt series ``like`` (a `TiltSeries` or a
    file: geometry, image size, pixel size, blur and dose or noise), or ``tilts`` (degrees: an array or
    'START:STOP:STEP'), ``pixel_size`` Å, ``shape`` (H, W) px (default: the particle fits), ``blur``
    σ Å and ``counts_per_atom`` (per projection, with ``background`` counts per pixel) or ``noise``
    (σ, fraction of the clean maximum); a dose or noise given overrides the series'. Returns the
    expected RMSD (pm, overall and per axis), a table against dose (or noise), per-atom σ (Å) and,
    with ``target_pm``, the dose (or noise) that reaches it."""
    from engine.core.geometry import TiltGeometry
    from engine.fit.plan import conditions_like, plan_table
    from engine.physics.simulate import auto_shape, check_image_shape, parse_tilt_range

    if not isinstance(structure, Atoms):
        structure = read_atoms(structure) if isinstance(structure, (str, Path)) else Atoms.from_ase(structure)
    if len(structure) == 0:
        raise InputError("structure", "has no atoms")
    for name, value, strict in (("--pixel", pixel_size, True), ("--blur", blur, False),
                                ("--counts-per-atom", counts_per_atom, True), ("--background", background, False),
                                ("--noise", noise, True), ("--target", target_pm, True), ("--b-factor", b_factor, False)):
        if value is not None and not (np.isfinite(value) and (value > 0 if strict else value >= 0)):
            raise InputError(name, f"must be a finite number {'>' if strict else '>='} 0, got {value!r}")
    if counts_per_atom is not None and noise is not None:
        raise InputError("--noise", "give --counts-per-atom (counted data) or --noise (Gaussian), not both")
    if like is not None:
        if tilts is not None or pixel_size is not None or shape is not None:
            raise InputError("--like", "takes the tilts, pixel size and image size from the series; "
                                       "drop --tilts, --pixel and --shape")
        series = like if isinstance(like, TiltSeries) else load_series(like)
        require_tomography(series)
        init_backend(arch)
        conditions = conditions_like(series, structure, blur)
    else:
        missing = [flag for flag, v in (("--tilts", tilts), ("--pixel", pixel_size)) if v is None]
        if missing or (counts_per_atom is None and noise is None):
            what = missing or ["--counts-per-atom or --noise"]
            raise InputError(what[0], "needed without --like (or give --like SERIES)")
        angles = parse_tilt_range(tilts) if isinstance(tilts, str) else np.asarray(tilts, np.float64)
        shape = check_image_shape(tuple(shape)) if shape is not None else auto_shape(structure, pixel_size)
        init_backend(arch)
        conditions = {"geometry": TiltGeometry.from_tilt_angles(angles), "shape": shape,
                      "pixel_size": float(pixel_size), "blur": 0.4 if blur is None else float(blur)}
    if counts_per_atom is not None:
        conditions.pop("noise", None)
        conditions.update(counts_per_atom=float(counts_per_atom), background=float(background))
    elif noise is not None:
        conditions.pop("counts_per_atom", None)
        conditions.pop("background", None)
        conditions["noise"] = float(noise)
    return plan_table(structure, conditions, target_pm, b_factor)

