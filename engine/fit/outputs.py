"""A fit's output folder: atoms.xyz, report.json (settings, data model, forward model, history,
timings), projections.png, loss.png and, when the alignment was refined, alignment.json and .xf."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from engine.core.files import write_atomically
from engine.io.atoms import Atoms, write_atoms
from engine.io.plots import line_plot, projection_panel
from engine.measure.alignment import misalignment_summary, write_alignment


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
              "n_atoms": len(atoms), "history": history, "phase_seconds": phase_seconds,
              "wall_seconds": wall_seconds, **fit.report_extra(), **(extra or {})}
    write_atomically(out / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
    return report
