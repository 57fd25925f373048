"""Where frames come from: a running fit (`fit_snapshot`) or saved files (`SavedResult`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from engine.io.atoms import UNKNOWN_SPECIES, Atoms
from engine.core.errors import InputError
from engine.io.tiltseries import TiltSeries

from .frame import Snapshot


def saved_report(atoms_path) -> dict:
    """The `report.json` beside an atoms file ({} when there is none or it is unreadable: the
    history and forward model in it are what a fit adds, never a reason to fail)."""
    try:
        report = json.loads(Path(atoms_path).with_name("report.json").read_text())
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def nearest_zero_tilt(angles) -> int:
    """Index of the projection whose tilt angle (degrees) is closest to 0."""
    return int(np.argmin(np.abs(np.asarray(angles, np.float64)))) if len(angles) else 0


def default_colour_mode(atoms: Atoms) -> str:
    """'species' when any element is known, else 'amplitude' when fitted amplitudes are there."""
    if np.any(atoms.species != UNKNOWN_SPECIES) or "amplitude" not in atoms.columns:
        return "species"
    return "amplitude"


def fit_snapshot(rec, tilt: int, rate: float | None = None, status: str = "") -> Snapshot:
    """The state of a running `engine.fit.reconstruct.Reconstruction` (read only): its atoms, projection
    ``tilt`` measured and predicted in the current geometry, and its history."""
    measured, predicted = rec.projection_images(tilt)
    geometry = rec.geometry  # read every time: the fit may refine it
    return Snapshot(atoms=rec.atoms(), rotations=geometry.rotations, tilt_axes=geometry.tilt_axes,
                    angles=rec.series.angles, tilt=tilt, measured=measured, predicted=predicted,
                    history=rec.history, iteration=rec.iteration, iterations=rec.settings.iters, rate=rate,
                    status=status)


class SavedResult:
    """Fitted atoms from a file, optionally with the tilt series they were fitted to and the fit's
    report (report.json: its "history" and "forward_model").

    With a series, the predicted projections are the one forward model (`engine.physics.forward`)
    of the atoms' 'amplitude' (data units · Å²) and 'width' (σ, Å) columns: the fit's saved profile,
    blur and background, in the series' nominal geometry or the refined ``alignment`` (an
    `engine.measure.alignment.Alignment`) when the fit wrote one. Without a saved forward model
    (atoms from elsewhere): one Gaussian per atom, the series' blur and the background estimated
    from the data as the fit does it.
    """

    def __init__(self, atoms: Atoms, label: str, series: TiltSeries | None = None, atoms_source: str = "atoms",
                 report: dict | None = None, alignment=None, alignment_source: str = "alignment"):
        from engine.measure.datamodel import estimate_data_model
        from engine.physics.forward import ForwardModel

        self.atoms = atoms
        self.label = label
        self.series = series
        report = report or {}
        self.history = report.get("history") if isinstance(report.get("history"), dict) else {}
        if series is not None:
            missing = [c for c in ("amplitude", "width") if c not in atoms.columns]
            if missing:
                raise InputError(atoms_source, f"has no {' or '.join(missing)} column, so its projections cannot "
                                               f"be predicted (--data needs atoms written by atomsplat reconstruct)")
            try:
                self.model = ForwardModel.from_dict(report["forward_model"], series.get_geometry(), series.shape,
                                                    series.pixel_size)
            except (KeyError, TypeError, ValueError):
                data = estimate_data_model(series, blur=None)
                self.model = ForwardModel(series.get_geometry(), series.shape, series.pixel_size, data.blur,
                                          background=data.background, scale=data.scale)
            if alignment is not None:
                if len(alignment.shifts) != series.n_tilts:
                    raise InputError(alignment_source, f"aligns {len(alignment.shifts)} projections, the series has "
                                                       f"{series.n_tilts}")
                self.model = self.model.aligned(alignment, series.angles)

    @property
    def n_tilts(self) -> int:
        return 0 if self.series is None else self.series.n_tilts

    def default_tilt(self) -> int:
        return 0 if self.series is None else nearest_zero_tilt(self.series.angles)

    def snapshot(self, tilt: int) -> Snapshot:
        if self.series is None:
            return Snapshot(atoms=self.atoms, label=self.label, history=self.history)
        a = self.atoms
        predicted = self.model.predict(a.positions, a.columns["amplitude"], a.columns["width"], [tilt])[0]
        geometry = self.model.geometry
        return Snapshot(atoms=a, rotations=geometry.rotations, tilt_axes=geometry.tilt_axes,
                        angles=self.series.angles, tilt=tilt, measured=self.series.projections[tilt].astype(np.float64),
                        predicted=predicted.astype(np.float64), history=self.history, label=self.label)
