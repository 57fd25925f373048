"""A fit's output folder: atoms.xyz, report.json (settings, data model, forward model, history,
timings), projections.png, loss.png and, when the alignment was refined, alignment.json and .xf;
and the rules that keep a result from being lost: a folder holding a fit needs ``resume`` or
``overwrite`` (`check_output_folder`), and overwriting removes every output of the earlier fit first
(`clear_outputs`), so nothing stale is left beside the new one."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from engine.core.errors import InputError
from engine.core.files import writable_folder, write_atomically
from engine.io.atoms import Atoms, write_atoms
from engine.io.plots import line_plot, projection_panel
from engine.measure.alignment import misalignment_summary, write_alignment


OUTPUTS = ("atoms.xyz", "report.json", "projections.png", "loss.png", "metrics.json", "checkpoint.npz",
           "alignment.json", "alignment.xf",
           "frames/frame_*.png", "fit.gif", "fit.mp4", "screenshot_*.png", "alignment_errors.json")
"""A fit's files in its output folder (patterns relative to it): the fit's own, then what the viewer
(frames, movie, screenshots) and `atomsplat run` (the refined alignment scored against the truth)
leave beside it."""
EARLIER_FIT = ("atoms.xyz", "report.json", "checkpoint.npz")
"""Any of these marks a folder as holding a fit (finished or interrupted)."""


def check_output_folder(out_dir, resume: bool = False, overwrite: bool = False) -> dict | None:
    """Check, before any work, that a fit may write into ``out_dir``; creates nothing.

    resume    : the folder must hold an unfinished fit's checkpoint; returns its bookkeeping (iteration,
                settings, data fingerprint: `engine.fit.trainer.read_checkpoint_meta`). A finished fit
                (atoms.xyz written after its last iteration) is refused: there is nothing to resume.
    otherwise : the folder must be writable, and one holding a fit (`EARLIER_FIT`) needs ``overwrite``.
    Raises InputError naming the folder."""
    from engine.fit.trainer import CHECKPOINT, read_checkpoint_meta

    out_dir = Path(out_dir)
    if resume:
        if not out_dir.is_dir():
            raise InputError(out_dir, "no such folder to resume" if not out_dir.exists() else "is a file, not a folder")
        if not (out_dir / CHECKPOINT).exists():
            raise InputError(out_dir, f"has no {CHECKPOINT} to resume from")
        meta = read_checkpoint_meta(out_dir / CHECKPOINT)
        iters = meta["settings"].get("iters")
        if (out_dir / "atoms.xyz").exists() and iters is not None and meta["iteration"] >= iters:
            raise InputError(out_dir, f"holds a finished fit ({meta['iteration']} iterations, atoms.xyz); nothing "
                                      f"to resume (to fit again, give it as the output folder with --overwrite)")
        writable_folder(out_dir)
        return meta
    writable_folder(out_dir)
    found = [name for name in EARLIER_FIT if (out_dir / name).exists()]
    if found and not overwrite:
        hint = " or --resume to continue it" if found == ["checkpoint.npz"] else ""
        raise InputError(out_dir, f"holds an earlier fit ({', '.join(found)}); pass --overwrite to replace it{hint}")
    return None


def clear_outputs(out_dir, patterns=OUTPUTS, keep=()) -> list[Path]:
    """Remove the files matching ``patterns`` in ``out_dir`` (an earlier run's outputs, before a run
    that replaces them), except those in ``keep`` (input files that happen to lie there). Returns
    what was removed."""
    out_dir = Path(out_dir)
    kept = {Path(p).resolve() for p in keep if p is not None}
    removed = []
    for pattern in patterns:
        for path in sorted(out_dir.glob(pattern)):
            if path.is_file() and path.resolve() not in kept:
                try:
                    path.unlink()
                except OSError as err:
                    raise InputError(path, f"cannot remove the earlier output ({err.strerror or err})") from None
                removed.append(path)
    return removed


def _window_counts(atoms: Atoms) -> dict:
    """For an extended specimen: how many atoms lie inside the always-visible window and outside it."""
    if "inside" not in atoms.columns:
        return {}
    inside = int(np.sum(atoms.columns["inside"] == 1))
    return {"n_atoms_inside": inside, "n_atoms_outside": len(atoms) - inside}


def write_outputs(fit, atoms: Atoms, arch: str, wall_seconds: float, extra: dict | None = None) -> dict:
    """Write the results of ``fit`` (an `engine.fit.reconstruct.Reconstruction`) and return the report."""
    t0 = time.perf_counter()
    out, series = fit.out_dir, fit.series
    out.mkdir(parents=True, exist_ok=True)
    write_atoms(atoms, out / "atoms.xyz", overwrite=True)
    predicted = fit.predicted()
    measured = series.projections.astype(np.float64)
    signal = np.linalg.norm(measured - fit.data.background)
    nrmse = float(np.linalg.norm(predicted - measured) / signal) if signal > 0 else None
    projection_panel(series.projections, predicted, series.angles, path=out / "projections.png",
                     pixel_size=series.pixel_size)
    history = fit.history
    it = np.asarray(history["iteration"], float)
    loss = np.array([np.nan if v is None else v for v in history["loss"]], float)
    line_plot({"loss": (it, loss)}, path=out / "loss.png", title="Loss", xlabel="iteration", logy=True)
    alignment = None
    if fit.refiner is not None:
        write_alignment(fit.refiner.alignment, out, series.angles, series.pixel_size, fit.data.scale)
        alignment = misalignment_summary(fit.refiner.alignment, series.pixel_size)
        del alignment["refine_advised"]
    phase_seconds = {**fit.phase_seconds, "output": time.perf_counter() - t0}
    report = {"alignment": alignment, "gain": fit.gain, "source": series.source, "arch": arch,
              "settings": asdict(fit.settings), "loss": fit.loss, "data_model": asdict(fit.data),
              "forward_model": fit.forward_model().as_dict(), "d_min_A": fit.d_min, "iterations": fit.iteration,
              "final_loss": history["loss"][-1] if history["loss"] else None, "projection_nrmse": nrmse,
              "n_atoms": len(atoms), **_window_counts(atoms), "history": history, "phase_seconds": phase_seconds,
              "wall_seconds": wall_seconds, **fit.report_extra(), **(extra or {})}
    write_atomically(out / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
    return report
