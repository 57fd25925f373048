"""Reconstruction: fit atoms (3D Gaussians) directly to a tilt series, with an adaptive atom count.

The stages, each in its own module:
1. the data model (`engine.measure.datamodel`): background, scale, noise, hot pixels, gain;
2. pre-alignment when the alignment is refined (`engine.measure.alignment`);
3. seeding (`engine.fit.seeding`): support, filtered back-projection, atoms at its peaks;
4. the training loop (`engine.fit.trainer`) stepping the device problem (`engine.fit.problem`)
   with the density-control strategy (`engine.fit.strategy`);
5. chemistry: species (`engine.physics.chemistry`) and B-factors with a fitter of their own
   (`engine.fit.calibration`);
6. outputs (`engine.fit.outputs`), predicted with the one forward model (`engine.physics.forward`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from engine.core.errors import InputError
from engine.fit.alignment import AlignmentRefiner
from engine.fit.model_selection import select_alignment
from engine.fit.calibration import calibrate_b_factors
from engine.fit.problem import FitProblem, with_moments
from engine.fit.seeding import SeedVolumes, extended_margin, initial_atoms, warm_start
from engine.fit.settings import FitSettings, requested_noise
from engine.fit.strategy import DensityControl
from engine.fit.trainer import CHECKPOINT, Trainer, data_fingerprint
from engine.fit.uncertainty import correction_summary, per_atom_fit_uncertainty, summary
from engine.io.atoms import UNKNOWN_SPECIES, Atoms
from engine.io.tiltseries import TiltSeries
from engine.measure.alignment import prealign, require_single_axis
from engine.measure.datamodel import NoiseModel, choose_noise_model, estimate_data_model, remove_hot_pixels
from engine.physics.chemistry import assign_species, minimum_distance
from engine.physics.forward import ForwardModel
from engine.physics.profile import atom_profile

__all__ = ["CHECKPOINT", "Reconstruction", "create_fit"]


def create_fit(series: TiltSeries, settings: FitSettings, out_dir, progress: bool = True,
               noise: NoiseModel | None = None):
    """The fit for these data and settings: counted data of one element (or none named) with the
    one-Gaussian profile, no alignment refinement and no ``per_atom_shape`` go to the tied-atom
    evidence fit (`engine.fit.counted`); everything else to the per-atom `Reconstruction`.
    ``noise``: the noise model when already chosen (`choose_noise_model`, which checks the data
    against it before any work)."""
    from engine.fit.counted import CountedFit

    noise = noise or choose_noise_model(series, requested_noise(settings), settings.gain)
    if (noise.kind == "poisson" and not settings.per_atom_shape and not settings.refine_alignment
            and len(settings.species) <= 1 and settings.profile == "gaussian"):
        return CountedFit(series, settings, out_dir, noise.gain, noise.reason, progress)
    return Reconstruction(series, settings, out_dir, progress, noise)


class Reconstruction:
    """One fit of ``series`` with ``settings`` (`engine.fit.settings`), checkpoints in ``out_dir``.

    A running fit can be watched: `run` calls ``observer(self)`` after every step and once at the
    end; an observer may read `iteration`, `history`, `geometry`, `atoms()` and
    `projection_images(k)`, and may block, but must not change the fit."""

    def __init__(self, series: TiltSeries, settings: FitSettings, out_dir, progress: bool = True,
                 noise: NoiseModel | None = None):
        t0 = time.perf_counter()
        self.series, self.settings, self.out_dir = series, settings, Path(out_dir)
        self.source = series.source or "tilt series"
        self.noise = noise or choose_noise_model(series, requested_noise(settings), settings.gain)
        self.loss = "poisson" if self.noise.kind == "poisson" else "huber" if settings.robust else "l2"
        self.data = estimate_data_model(series, settings.blur)
        # What the loss sees: every pixel. What seeds, spawns and aligns: with the robust loss, the
        # images without isolated hot pixels (a back-projection would smear each into a streak).
        screened = None
        if self.loss == "huber":
            screened = remove_hot_pixels(series.projections, self.data.background, self.data.noise * self.data.scale)
            self.data = estimate_data_model(series, settings.blur, screened)
        self.normalised = (series.projections.astype(np.float64) - self.data.background) / self.data.scale
        self.screened = (self.normalised if screened is None  # one array, not a copy, for the usual losses
                         else (screened - self.data.background) / self.data.scale)
        self.d_min = minimum_distance(settings.species, settings.d_min)
        self.gain = self.noise.gain
        refiner, geometry = None, series.get_geometry()
        if settings.refine_alignment:
            require_single_axis(series)
            try:
                prealigned = prealign(self.screened, series.angles, series.pixel_size, self.data.noise)
            except InputError as err:  # the measurement names the data generically; the user knows the file
                raise InputError(self.source, err.problem) from None
            refiner = AlignmentRefiner(prealigned, series.angles)
            geometry = refiner.geometry()
        self.profile = atom_profile(settings.profile, settings.species, self.data.blur)
        self.problem = FitProblem(self.normalised, geometry, series.pixel_size, self.data, self.loss, self.gain,
                                  self.profile, self.d_min, settings.repulsion, refiner)
        rng = np.random.default_rng(settings.seed)
        self.extended = (settings.extended == "on" or settings.extended == "auto" and self.data.sides_hold_specimen)
        margin = extended_margin(series.angles, series.shape, series.pixel_size) if self.extended else None
        volumes = SeedVolumes(self.screened, self.data.noise, geometry, series.pixel_size, settings.voxel, self.d_min,
                              margin)
        self.strategy = DensityControl(settings, volumes, self.d_min, rng, self.data.blur)
        self.trainer = Trainer(self.problem, self.strategy, settings, out_dir, rng, progress,
                               fingerprint=lambda: data_fingerprint(series))
        self.b_factors = None  # per-atom B (Å²), in the model's order, once calibrated
        self.uncertainty = None  # per-atom σ and significance (`engine.fit.uncertainty`), model order, at the end
        self.uncertainty_noise, self.uncertainty_seconds = None, None
        self.profile_correction = None  # what the profile correction did (`correction_summary`), at the end
        self.alignment_selection = None  # with refinement: whether the refined alignment was kept, and why
        self.thermal_seconds = None
        self.started = False  # atoms on the device: seeded, resumed or given
        self.prepare_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------ what an observer reads
    @property
    def iteration(self) -> int:
        return self.trainer.iteration

    @property
    def history(self) -> dict:
        return self.trainer.history

    @property
    def geometry(self):
        return self.problem.geometry

    @property
    def refiner(self) -> AlignmentRefiner | None:
        return self.problem.refiner

    @property
    def phase_seconds(self) -> dict:
        thermal = {} if self.thermal_seconds is None else {"thermal": self.thermal_seconds}
        uncertainty = {} if self.uncertainty_seconds is None else {"uncertainty": self.uncertainty_seconds}
        if self.profile_correction is not None:
            uncertainty["profile_correction"] = self.profile_correction["seconds"]
        return {"prepare": self.prepare_seconds, **self.trainer.phase_seconds, **thermal, **uncertainty}

    def report_extra(self) -> dict:
        return {"model": "per-atom", "noise_model": {"kind": self.noise.kind, "gain": self.gain,
                                                     "reason": self.noise.reason},
                "extended": self.extended, "alignment_selection": self.alignment_selection,
                "stopped": {"reason": self.trainer.stop_reason, "iteration": self.iteration,
                            "density_rounds": self.trainer.schedule["rounds"]},
                "uncertainty": None if self.uncertainty is None else summary(self.atoms(), self.uncertainty_noise),
                "profile_correction": self.profile_correction}

    # ------------------------------------------------------------------ running
    def resume(self, checkpoint) -> None:
        """Continue from ``checkpoint`` (a `Trainer` checkpoint of the same data and settings)."""
        self.trainer.load_checkpoint(checkpoint)
        self.started = True

    def start_from(self, state: dict) -> None:
        """Start from these atoms instead of seeding: pos (N, 3) Å, amp (N,) normalised units · Å²,
        sigma (N,) Å (a warm start, or a test's hand-made state)."""
        self.problem.upload(with_moments({k: np.asarray(state[k], np.float64) for k in ("pos", "amp", "sigma")}))
        self.started = True

    def seeds(self) -> dict:
        """The atoms the fit starts from: those of the ``init`` file (a warm start), else the peaks of
        the back-projection (`engine.fit.seeding.initial_atoms`)."""
        if self.settings.init is not None:
            return warm_start(self.settings.init, self.screened, self.series.pixel_size, self.data.scale)
        return initial_atoms(self.strategy.volumes, self.source)

    def run(self, observer=None) -> Atoms:
        """Seed or warm-start (unless resumed), train, calibrate B-factors; return the fitted atoms."""
        if not self.started:
            self.start_from(self.seeds())
            if self.settings.init is not None:
                self.strategy.round(self.problem)
        self.trainer.run(None if observer is None else lambda: observer(self))
        if self.refiner is not None:
            if self.trainer.progress:
                print("[atomsplat] testing the refined alignment against the nominal geometry (a refit of the "
                      "same atoms)", file=sys.stderr)
            self.alignment_selection, nominal = select_alignment(self)
            if nominal is not None:
                self.problem = nominal
            else:  # the alignment file records the fitted background too
                self.refiner.alignment.intensity_offset = self.problem.target.offsets()
        s = self.settings
        if s.species and s.thermal_refits > 0:
            if self.trainer.progress:
                print(f"[atomsplat] calibrating B-factors (at most {s.thermal_refits} steps per refit)", file=sys.stderr)
            t0 = time.perf_counter()
            state = self.problem.state()
            species = self._species(state["amp"] * self.data.scale, state["sigma"])[0]
            self.b_factors = calibrate_b_factors(self.problem, state, species, self.series, self.normalised,
                                                 self.data, s)
            self.thermal_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        state = self.problem.state()
        self.uncertainty, self.uncertainty_noise, correction = per_atom_fit_uncertainty(self, state)
        if correction is not None:  # the same atom order: the columns stay theirs
            state["pos"] = state["pos"] + correction["shift"]
            self.problem.upload(state, sort=False)
        self.profile_correction = correction_summary(correction)
        self.uncertainty_seconds = time.perf_counter() - t0 - (0.0 if correction is None else correction["seconds"])
        if observer is not None:
            observer(self)
        return self.atoms()

    # ------------------------------------------------------------------ results
    def _species(self, amplitude: np.ndarray, width: np.ndarray):
        s = self.settings
        return assign_species(amplitude, width, s.species, self.series.pixel_size, self.data.blur,
                              s.composition or None, profile=self.profile)

    def atoms(self) -> Atoms:
        """The fitted atoms: positions (Å), amplitude in data units · Å², width σ (Å); with the expected
        species given, each atom's element (and its probability when there are several) and its
        Debye–Waller B in Å² (`engine.physics.chemistry`)."""
        state = self.problem.state()
        order = np.lexsort(state["pos"].T[::-1])
        amplitude = state["amp"][order] * self.data.scale
        columns = {"amplitude": amplitude, "width": state["sigma"][order]}
        if self.extended:  # 1: seen by every projection (the window), 0: in the margin only some views see
            columns["inside"] = np.all(self.geometry.views(state["pos"][order], self.series.shape,
                                                           self.series.pixel_size), axis=0).astype(np.int64)
        if self.settings.species:
            species, probability, _ = self._species(amplitude, columns["width"])
            if len(self.settings.species) > 1:
                columns["species_prob"] = probability
            if self.b_factors is not None:
                columns["b_factor"] = self.b_factors[order]
        else:
            species = np.full(len(order), UNKNOWN_SPECIES)
        if self.uncertainty is not None and len(self.uncertainty["sigma_x"]) == len(order):
            columns.update({name: values[order] for name, values in self.uncertainty.items()})
        return Atoms(species, state["pos"][order], columns)

    def forward_model(self) -> ForwardModel:
        """The forward model of the fit as it stands (refined geometry and intensities included)."""
        offsets = self.problem.target.offsets()
        model = ForwardModel(self.series.get_geometry(), self.series.shape, self.series.pixel_size, self.data.blur,
                             self.profile, self.data.background, self.data.scale, None, offsets)
        if self.refiner is not None:
            model = model.aligned(self.refiner.alignment, self.series.angles)
            model.intensity_offset = offsets
        return model

    def predicted(self, indices=None) -> np.ndarray:
        """Predicted projections ``indices`` (default all), data units, from the current atoms: the
        device's rendering of `forward_model()` (the same model; tests hold the two together)."""
        indices = np.arange(self.series.n_tilts) if indices is None else indices
        return self.problem.predicted(indices) * self.data.scale + self.data.background

    def projection_images(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Measured and predicted projection ``index`` (H, W) in the data's own units."""
        return self.series.projections[index].astype(np.float64), self.predicted([index])[0]
