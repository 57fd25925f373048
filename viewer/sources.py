"""Where frames come from: a running fit (`fit_snapshot`) or saved files (`SavedResult`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from engine.io.atoms import UNKNOWN_SPECIES, Atoms
from engine.core.errors import InputError
from engine.io.tiltseries import TiltSeries

from .frame import Snapshot


def fit_history(atoms_path) -> dict:
    """The fit's history from the `report.json` beside an atoms file ({} when there is none or it
    is unreadable: the history is a nicety, never a reason to fail)."""
    report = Path(atoms_path).with_name("report.json")
    try:
        history = json.loads(report.read_text()).get("history", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return history if isinstance(history, dict) else {}


def nearest_zero_tilt(angles) -> int:
    """Index of the projection whose tilt angle (degrees) is closest to 0."""
    return int(np.argmin(np.abs(np.asarray(angles, np.float64)))) if len(angles) else 0


def default_colour_mode(atoms: Atoms) -> str:
    """'species' when any element is known, else 'amplitude' when fitted amplitudes are there."""
    if np.any(atoms.species != UNKNOWN_SPECIES) or "amplitude" not in atoms.columns:
        return "species"
    return "amplitude"


def fit_snapshot(rec, tilt: int, rate: float | None = None, status: str = "") -> Snapshot:
    """The state of a running `engine.fit.reconstruct.Reconstructor` (read only): its atoms, projection
    ``tilt`` measured and predicted in the current geometry, and its history."""
    measured, predicted = rec.projection_images(tilt)
    geometry = rec.geometry  # read every time: the fit may refine it
    return Snapshot(atoms=rec.atoms(), rotations=geometry.rotations, tilt_axes=geometry.tilt_axes,
                    angles=rec.series.angles, tilt=tilt, measured=measured, predicted=predicted,
                    history=rec.history, iteration=rec.iteration, iterations=rec.config.iters, rate=rate,
                    status=status)


class SavedResult:
    """Fitted atoms from a file, optionally with the tilt series they were fitted to and the fit's
    history (`report.json`'s "history").

    With a series, the predicted projections are rendered from the atoms' 'amplitude' (data units ·
    Å²) and 'width' (σ, Å) columns with the series' blur and its nominal geometry, or the refined
    ``alignment`` (an `engine.measure.alignment.Alignment`: geometry, intensity scale and offset) when the fit
    wrote one, plus the background estimated from the data as the fit does it.
    """

    def __init__(self, atoms: Atoms, label: str, series: TiltSeries | None = None, atoms_source: str = "atoms",
                 history: dict | None = None, alignment=None, alignment_source: str = "alignment"):
        from engine.measure.datamodel import estimate_data_model

        self.atoms = atoms
        self.label = label
        self.series = series
        self.history = history or {}
        if series is not None:
            missing = [c for c in ("amplitude", "width") if c not in atoms.columns]
            if missing:
                raise InputError(atoms_source, f"has no {' or '.join(missing)} column, so its projections cannot "
                                               f"be predicted (--data needs atoms written by atomsplat reconstruct)")
            self.data = estimate_data_model(series, blur=-1.0)
            self.geometry = series.get_geometry()
            self.intensity_scale, self.intensity_offset = np.ones(series.n_tilts), np.zeros(series.n_tilts)
            if alignment is not None:
                if len(alignment.shifts) != series.n_tilts:
                    raise InputError(alignment_source, f"aligns {len(alignment.shifts)} projections, the series has "
                                                       f"{series.n_tilts}")
                self.geometry = alignment.geometry(series.angles)
                self.intensity_scale = alignment.intensity_scale
                self.intensity_offset = alignment.intensity_offset * self.data.scale

    @property
    def n_tilts(self) -> int:
        return 0 if self.series is None else self.series.n_tilts

    def default_tilt(self) -> int:
        return 0 if self.series is None else nearest_zero_tilt(self.series.angles)

    def snapshot(self, tilt: int) -> Snapshot:
        if self.series is None:
            return Snapshot(atoms=self.atoms, label=self.label, history=self.history)
        from engine.kernels.projector import project_tilt_series

        a = self.atoms
        rendered = project_tilt_series(a.positions, a.columns["amplitude"], a.columns["width"], self.geometry,
                                       self.series.shape, self.series.pixel_size, self.data.blur, indices=[tilt])[0]
        predicted = self.intensity_scale[tilt] * rendered + self.intensity_offset[tilt] + self.data.background
        return Snapshot(atoms=a, rotations=self.geometry.rotations, tilt_axes=self.geometry.tilt_axes,
                        angles=self.series.angles, tilt=tilt, measured=self.series.projections[tilt].astype(np.float64),
                        predicted=predicted.astype(np.float64), history=self.history, label=self.label)
