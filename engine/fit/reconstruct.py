"""Reconstruction: fit atoms (3D Gaussians) directly to a tilt series, with an adaptive atom count.

Pipeline:
1. Normalise the data with a background and an intensity scale estimated from the data (the median
   and spread of the empty image frame, a high percentile of the signal); estimate the noise level
   the same way and the particle support as the visual hull of the thresholded projections.
2. Seed atoms at the peaks of a filtered back-projection inside the support.
3. Adam on positions, log-amplitudes and log-widths against an L2 (noise-weighted) or Poisson loss,
   over all projections or random mini-batches, with a cosine learning-rate schedule.
4. Every `densify_every` iterations during the first `densify_until` of the run, adaptive density
   control on a neighbour grid: cull faint or stray atoms, merge atoms closer than d_min, split atoms
   grown much wider than the rest, and spawn atoms at peaks of the back-projected residual that
   have no atom within d_min. The rest of the run is pure refinement.
5. Write atoms.xyz, report.json, projections.png, loss.png; checkpoints on the way and on Ctrl-C.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from engine.io.atoms import Atoms, UNKNOWN_SPECIES, write_atoms
from engine.core.errors import InputError
from engine.core.files import write_atomically
from engine.io.tiltseries import TiltSeries

CHECKPOINT = "checkpoint.npz"


@dataclass
class ReconstructionConfig:
    """Settings of a fit; one default for every dataset. Lengths in Å."""

    iters: int = 800                  # optimisation steps
    batch: int = 0                    # projections per step (0: all)
    lr_pos: float = 0.02              # Å per step at the start
    lr_amp: float = 0.05              # natural-log units per step
    lr_sigma: float = 0.02            # natural-log units per step
    lr_final: float = 0.02            # final learning rates as a fraction of the first (cosine decay)
    densify_every: int = 100          # steps between density-control rounds
    densify_until: float = 0.6        # fraction of the run with count changes; the rest only refines
    species: list = field(default_factory=list)  # expected elements, e.g. ["Pt", "Ni"] (sets d_min)
    composition: dict = field(default_factory=dict)  # optional expected fractions, e.g. {"Pt": 0.6, "Ni": 0.4}
    d_min: float = 0.0                # minimum interatomic distance, Å (0: 0.7 × shortest bond)
    cull_fraction: float = 0.3        # cull atoms fainter than this fraction of the median amplitude
    spawn_fraction: float = 0.35      # spawn at residual peaks above this fraction of a typical atom's
    split_width: float = 1.8          # split atoms wider than this multiple of the median width
    repulsion: float = 0.0            # soft penalty Σ (d_min − d)² on close pairs, in noise-weighted
                                      # data-term units (0: off)
    loss: str = "l2"                  # "l2" (noise-weighted least squares), "huber" (robust to outlier
                                      # pixels) or "poisson" (counted data)
    gain: float = 0.0                 # Poisson: counts per data unit (0: read off whole-count data)
    refine_alignment: bool = False    # fit per-projection shifts, tilt-angle offsets, intensity scale and
                                      # offset, and the tilt-axis angle, jointly with the atoms
    align_start: float = 0.1          # fraction of the run before the alignment moves (atoms settle first)
    lr_shift: float = 0.005           # Å per step
    lr_angle: float = 0.01            # degrees per step (tilt-angle offsets and the axis angle)
    lr_intensity: float = 0.002       # log-scale and normalised-offset units per step
    atom_profile: str = "gaussian"    # "gaussian" (one per atom) or "peng" (core + tail from the expected
                                      # species' scattering factors; see engine.profile)
    blur: float = -1.0                # microscope blur σ, Å (< 0: from the file, else 0)
    voxel: float = 0.5                # back-projection grid for seeding and spawning, Å
    checkpoint_every: int = 200       # steps between checkpoints
    seed: int = 0
    thermal_refits: int = 150         # steps of each B-calibration refit (0: no B-factors)

    @classmethod
    def scene_keys(cls) -> dict:
        """Allowed [reconstruct] keys of a scene file and their types."""
        kinds = {int: int, float: (int, float), str: str, bool: bool, list: list, dict: dict}
        return {f.name: kinds[type(getattr(cls(), f.name))] for f in fields(cls)}

    @classmethod
    def from_dict(cls, values: dict, source="reconstruction settings") -> "ReconstructionConfig":
        known = {f.name for f in fields(cls)}
        for key in values:
            if key not in known:
                raise InputError(source, f"unknown setting {key!r} (known: {', '.join(sorted(known))})")
        config = cls(**values)
        config.validate(source)
        return config

    def validate(self, source="reconstruction settings") -> None:
        from engine.core.elements import normalize_symbol

        self.species = [normalize_symbol(s, source) for s in self.species]
        self.composition = {normalize_symbol(s, source): float(v) for s, v in self.composition.items()}
        if self.composition and set(self.composition) != set(self.species):
            raise InputError(source, "composition must give a fraction for each expected species and no other")
        from engine.kernels.loss import LOSSES

        if self.loss not in LOSSES:
            raise InputError(source, f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.atom_profile not in ("gaussian", "peng"):
            raise InputError(source, f"atom_profile must be 'gaussian' or 'peng', got {self.atom_profile!r}")
        if self.atom_profile == "peng" and not self.species:
            raise InputError(source, "the 'peng' atom profile needs the expected species")
        if self.iters < 1 or self.densify_every < 1 or self.checkpoint_every < 1 or self.voxel <= 0:
            raise InputError(source, "iters, densify_every, checkpoint_every and voxel must be positive")

    def minimum_distance(self) -> float:
        """d_min (Å): as set, else 0.7 × the shortest nearest-neighbour distance of the expected
        species, else 0.7 × 2.45 Å (about the shortest bond among the common metals)."""
        from engine.physics.structures import nearest_neighbour_distance

        if self.d_min > 0:
            return self.d_min
        bond = min((nearest_neighbour_distance(s) for s in self.species), default=2.45)
        return 0.7 * bond


@contextmanager
def _deferred_interrupt():
    """Ctrl-C during a step is held until the step is done, so a checkpoint never holds half a step.
    Yields a function telling whether an interrupt is pending (outside the main thread: never)."""
    pending = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = signal.signal(signal.SIGINT, lambda *_: pending.append(True))
    try:
        yield lambda: bool(pending)
    finally:
        signal.signal(signal.SIGINT, previous)


class Reconstructor:
    """Owns the device state of one fit: data, projector, model, loss; runs the schedule."""

    def __init__(self, series: TiltSeries, config: ReconstructionConfig, out_dir, progress: bool = True):
        from engine.fit.alignment import AlignmentRefiner
        from engine.measure.alignment import prealign, require_single_axis
        from engine.measure.datamodel import estimate_data_model
        from engine.kernels.loss import FitTarget
        from engine.measure.datamodel import estimate_counts_gain
        from engine.kernels.atommodel import AtomModel
        from engine.kernels.neighbours import NeighbourGrid
        from engine.physics.profile import atom_profile
        from engine.kernels.projector import TiltSeriesProjector
        from engine.kernels.volume import projector_for

        self.series = series
        self.config = config
        self.out_dir = Path(out_dir)
        self.progress = progress
        self.geometry = series.get_geometry()
        self.data = estimate_data_model(series, config.blur)
        # What the loss sees: every pixel. What seeds, spawns and aligns: with the robust loss, the
        # images without isolated hot pixels (a back-projection would smear each into a streak).
        screened = None
        if config.loss == "huber":
            from engine.measure.datamodel import remove_hot_pixels

            screened = remove_hot_pixels(series.projections, self.data.background, self.data.noise * self.data.scale)
            self.data = estimate_data_model(series, config.blur, screened)
        self.normalised = (series.projections.astype(np.float64) - self.data.background) / self.data.scale
        self.screened = (self.normalised if screened is None  # one array, not a copy, for the usual losses
                         else (screened - self.data.background) / self.data.scale)
        self.d_min = config.minimum_distance()
        self.rng = np.random.default_rng(config.seed)
        self.history = {"iteration": [], "loss": [], "atoms": []}
        self.phase_seconds = {"prepare": 0.0, "densify": 0.0, "refine": 0.0, "output": 0.0}
        self.iteration = 0
        self.b_factors = None  # per-atom B (Å²), in the model's order, once calibrated
        t0 = time.perf_counter()
        self.refiner = None
        if config.refine_alignment:
            require_single_axis(series)
            self.refiner = AlignmentRefiner(prealign(self.screened, series.angles, series.pixel_size,
                                                     self.data.noise), series.angles)
            self.geometry = self.refiner.geometry()
        self.gain = config.gain
        if config.loss == "poisson" and not self.gain > 0:
            self.gain = estimate_counts_gain(series.projections, series.source or "tilt series")
        self.projector = TiltSeriesProjector(self.geometry, series.shape, series.pixel_size, self.data.blur)
        self.target = FitTarget(self.projector, self.normalised, config.loss, self.data, self.gain)
        self.volume_projector = projector_for(series.n_tilts, series.shape, series.pixel_size, config.voxel)
        self.volume_projector.set_geometry(self.geometry)
        self.support = self._support()
        self.data_fbp = self._fbp(self.screened)
        self.profile = atom_profile(config.atom_profile, config.species, self.data.blur)
        self.model = AtomModel(256, self.profile)
        self.grid = NeighbourGrid(self.d_min, capacity=256)
        self.phase_seconds["prepare"] += time.perf_counter() - t0

    # ------------------------------------------------------------------ volumes
    def _fbp(self, images: np.ndarray) -> np.ndarray:
        return self.volume_projector.fbp(images)

    def _support(self) -> np.ndarray:
        """Visual hull: voxels whose projection lands on signal (the image smoothed over 2 px, above
        5 σ of its noise and 8 % of its maximum) in every projection, dilated by d_min."""
        from scipy import ndimage

        smooth = ndimage.gaussian_filter(self.screened, sigma=(0, 2, 2))
        smoothed_noise = self.data.noise / (2 * math.sqrt(math.pi) * 2)  # white noise after a σ = 2 px blur
        mask = smooth > max(5 * smoothed_noise, 0.08 * smooth.max())
        mask = ndimage.binary_dilation(mask, iterations=int(math.ceil(self.d_min / self.series.pixel_size)),
                                       structure=ndimage.generate_binary_structure(3, 1)[1:2])
        hull = self.volume_projector.backproject(mask.astype(np.float32), reduction="min") > 0.5
        return hull

    def _in_support(self, positions: np.ndarray) -> np.ndarray:
        bp = self.volume_projector
        inside = np.all(np.abs((positions - bp.origin) / bp.voxel - (np.array(bp.grid_shape) - 1) / 2)
                        <= (np.array(bp.grid_shape) - 1) / 2 + 0.5, axis=1)
        return inside & self.support[tuple(bp.indices(positions).T)]

    def _peaks(self, volume: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """Local maxima (one per d_min) above ``threshold`` inside the support: positions (Å), values."""
        from engine.kernels.volume import local_maxima, suppress_close

        positions, values = local_maxima(volume, self.volume_projector, self.d_min, threshold, self.support)
        return suppress_close(positions, values, self.d_min)

    def _sample(self, volume: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return volume[tuple(self.volume_projector.indices(positions).T)]

    # ------------------------------------------------------------------ atoms
    def initial_atoms(self) -> dict:
        """Seeds at FBP peaks brighter than a third of the typical bright peak, one per d_min."""
        positions, values = self._peaks(self.data_fbp, 0.0)
        if len(values) == 0:
            raise InputError(self.series.source or "tilt series", "no signal peaks inside the particle support")
        bright = np.median(values[: max(1, len(values) // 10)])
        keep = values > bright / 3.0
        positions, values = positions[keep], values[keep]
        total = float(np.mean(self.screened.sum(axis=(1, 2)))) * self.series.pixel_size ** 2
        amp = np.full(len(positions), total / len(positions))
        return {"pos": positions, "amp": amp, "sigma": np.full(len(positions), 0.35)}

    def _upload(self, state: dict, sort: bool = True) -> None:
        from engine.kernels.atommodel import AtomModel

        if sort:  # along the tilt axis: consecutive atoms splat into the same image rows
            order = np.argsort(state["pos"][:, 1], kind="stable")
            state = {k: np.asarray(v)[order] for k, v in state.items()}
        n = len(state["pos"])
        if n > self.model.capacity:
            self.model = AtomModel(1 << (n - 1).bit_length(), self.profile)
        self.model.set_state(state)
        self.projector.ensure_capacity(self.model.cloud.capacity)

    def densify(self) -> dict:
        """One round of cull, merge, split and spawn; returns how many atoms each step changed."""
        if self.refiner is not None:  # the volumes follow the refined geometry
            self.volume_projector.set_geometry(self.geometry)
            self.support = self._support()
            self.data_fbp = self._fbp(self.screened)
        state = self.model.get_state()
        n0 = len(state["pos"])
        changes = {}
        amp_median = np.median(state["amp"])
        keep = (state["amp"] > self.config.cull_fraction * amp_median) & self._in_support(state["pos"])
        changes["culled"] = int(n0 - keep.sum())
        state = {k: v[keep] for k, v in state.items()}

        grid = self.grid
        grid.build(state["pos"])
        pairs = grid.pairs()
        if len(pairs):
            d = np.linalg.norm(state["pos"][pairs[:, 0]] - state["pos"][pairs[:, 1]], axis=1)
            alive = np.ones(len(state["pos"]), bool)
            for (i, j) in pairs[np.argsort(d, kind="stable")]:
                if alive[i] and alive[j]:
                    w = state["amp"][[i, j]] / state["amp"][[i, j]].sum()
                    state["pos"][i] = w @ state["pos"][[i, j]]
                    state["sigma"][i] = w @ state["sigma"][[i, j]]
                    state["amp"][i] = state["amp"][[i, j]].sum()
                    state["m"][i] = 0
                    state["v"][i] = 0
                    state["age"][i] = 0
                    alive[j] = False
            changes["merged"] = int((~alive).sum())
            state = {k: v[alive] for k, v in state.items()}

        wide = state["sigma"] > self.config.split_width * np.median(state["sigma"])
        changes["split"] = int(wide.sum())
        if wide.any():
            # Two halves 1.2 σ apart along a random direction; the fit then pulls them onto atoms.
            parent = {k: v[wide] for k, v in state.items()}
            direction = self.rng.normal(size=(len(parent["pos"]), 3))
            offset = direction / np.linalg.norm(direction, axis=1, keepdims=True) * 0.6 * parent["sigma"][:, None]
            halves = [self._with_moments({"pos": parent["pos"] + sign * offset, "amp": 0.5 * parent["amp"],
                                          "sigma": 0.8 * parent["sigma"]}) for sign in (1, -1)]
            state = {k: np.concatenate([state[k][~wide]] + [h[k] for h in halves]) for k in state}

        self._upload(state)  # the residual that guides spawning is that of the atoms kept so far
        spawned = self._spawn(state, grid)
        changes["spawned"] = len(spawned["pos"])
        if len(spawned["pos"]):
            kept = self.model.get_state()
            self._upload({k: np.concatenate([kept[k], spawned[k]]) for k in kept})
        return changes

    def _spawn(self, state: dict, grid) -> dict:
        """New atoms at peaks of the back-projected residual with no atom within d_min."""
        residual = self.screened - self._predicted(np.arange(self.series.n_tilts))
        volume = self._fbp(residual)
        typical = float(np.median(self._sample(self.data_fbp, state["pos"]))) if len(state["pos"]) else 1.0
        positions, values = self._peaks(volume, self.config.spawn_fraction * typical)
        if len(positions) and len(state["pos"]):
            grid.build(state["pos"])
            distance, _ = grid.nearest(positions)
            free = distance > self.d_min
            positions, values = positions[free], values[free]
        n = len(positions)
        amp = np.median(state["amp"]) if len(state["amp"]) else 1.0
        sigma = np.median(state["sigma"]) if len(state["sigma"]) else 0.35
        return self._with_moments({"pos": positions, "amp": np.full(n, amp) * np.clip(values / typical, 0.2, 1.0),
                                   "sigma": np.full(n, sigma)})

    # ------------------------------------------------------------------ optimisation
    def learning_rate_factor(self, it: int, steps: int) -> float:
        """Cosine decay from 1 to lr_final over ``steps``."""
        c = self.config
        return c.lr_final + (1 - c.lr_final) * 0.5 * (1 + math.cos(math.pi * it / steps))

    def step(self, lr_factor: float, refine_alignment: bool = False) -> None:
        """One optimisation step at ``lr_factor`` times the configured learning rates; with
        ``refine_alignment``, of the alignment too."""
        c = self.config
        n = self.series.n_tilts
        if 0 < c.batch < n:
            self.projector.set_batch(np.sort(self.rng.choice(n, c.batch, replace=False)))
        elif self.projector.batch_size != n:
            self.projector.set_batch(np.arange(n))
        cloud = self.model.cloud
        self.projector.forward(cloud)
        self.target.residual(self.projector.batch_size, n / self.projector.batch_size)
        self.projector.backward(cloud, alignment=refine_alignment)
        if c.repulsion > 0:  # positions moved since the last step: rebuild the grid on the device
            self.grid.build_from_field(cloud.pos, self.model.count)
            self.grid.repulsion_gradient(cloud.pos, self.model.count, self.d_min, c.repulsion * self.target.weight,
                                         cloud.grad_pos)
        self.model.adam_step(c.lr_pos * lr_factor, c.lr_amp * lr_factor, c.lr_sigma * lr_factor)
        if refine_alignment:
            self._alignment_step(lr_factor)
        self.iteration += 1

    def _alignment_step(self, lr_factor: float) -> None:
        c, p = self.config, self.projector
        grads = {"shift": p.grad_shift.to_numpy().astype(np.float64), "angle": p.grad_angle.to_numpy().astype(np.float64),
                 "axis_angle": p.grad_axis_angle.to_numpy().astype(np.float64),
                 "scale": self.target.grad_scale.to_numpy().astype(np.float64),
                 "offset": self.target.grad_offset.to_numpy().astype(np.float64)}
        # Counted data have no background to drift: empty pixels hold zero counts, and an offset there
        # would sit on the edge of the Poisson likelihood's domain (λ ≥ 0).
        self.refiner.step(grads, p.batch_numpy(), c.lr_shift * lr_factor, c.lr_angle * lr_factor,
                          c.lr_intensity * lr_factor, fit_offsets=c.loss != "poisson")
        if self.iteration % 10 == 0:
            turn, translation, gain = self.refiner.fix_gauge()
            self.model.transform(turn, translation, math.log(gain))
        self._apply_alignment()

    def _apply_alignment(self) -> None:
        a = self.refiner.alignment
        self.geometry = self.refiner.geometry()
        self.projector.set_geometry(self.geometry)
        self.target.set_intensity(a.intensity_scale, a.intensity_offset)

    def _predicted(self, indices: np.ndarray) -> np.ndarray:
        """Predicted projections ``indices`` in normalised units: the rendered atoms with each
        projection's intensity scale and offset."""
        batch = self.projector.batch_numpy()
        self.projector.set_batch(indices)
        self.projector.forward(self.model.cloud)
        images = self.projector.images_numpy()[indices]
        self.projector.set_batch(batch)
        if self.refiner is not None:
            a = self.refiner.alignment
            images = images * a.intensity_scale[indices, None, None] + a.intensity_offset[indices, None, None]
        return images

    def run(self, resume: bool = False, observer=None) -> Atoms:
        """Run the schedule to `config.iters` steps and return the fitted atoms.

        ``observer``, if given, is called as ``observer(self)`` after every step and once more at the
        end; it may read the model (`model.get_state`, `projection_images`) and may block (a paused
        viewer), but must not change the fit's state."""
        from tqdm import tqdm

        c = self.config
        if not resume:
            self._upload(self._with_moments(self.initial_atoms()))
        densify_end = int(c.densify_until * c.iters)
        align_begin = int(c.align_start * c.iters) if self.refiner is not None else c.iters
        bar = tqdm(total=c.iters, initial=self.iteration, disable=not self.progress, unit="it",
                   file=sys.stderr, dynamic_ncols=True)
        with _deferred_interrupt() as interrupted:
            while self.iteration < c.iters:
                if interrupted():
                    bar.close()
                    self.save_checkpoint()  # the last completed step
                    raise KeyboardInterrupt
                t0 = time.perf_counter()
                counting = self.iteration < densify_end
                if counting and self.iteration > 0 and self.iteration % c.densify_every == 0:
                    self.densify()
                self.step(self.learning_rate_factor(self.iteration, c.iters), self.iteration >= align_begin)
                self.phase_seconds["densify" if counting else "refine"] += time.perf_counter() - t0
                if self.iteration % 10 == 0 or self.iteration == c.iters:
                    loss = self.target.loss_value()
                    self.history["iteration"].append(self.iteration)
                    self.history["loss"].append(loss)
                    self.history["atoms"].append(self.model.count)
                    bar.set_postfix(loss=f"{loss:.4g}", atoms=self.model.count, refresh=False)
                bar.update(1)
                if self.iteration % c.checkpoint_every == 0:
                    self.save_checkpoint()
                if observer is not None:
                    observer(self)
        bar.close()
        self.save_checkpoint()
        if self.config.species and self.config.thermal_refits > 0:
            t0 = time.perf_counter()
            self.b_factors = self.calibrate_b_factors()
            self.phase_seconds["thermal"] = time.perf_counter() - t0
        if observer is not None:
            observer(self)
        return self.atoms()

    def calibrate_b_factors(self) -> np.ndarray:
        """B (Å²) of every atom, in the model's order: the fitted structure (positions, elements) is
        simulated without noise at B = 0 and 1 Å² in the data's geometry and refitted, from the fitted
        atoms and without count changes, for `thermal_refits` steps; the widths are then compared
        (`engine.physics.chemistry.b_factors_from_calibration`). The fit's own state is restored afterwards."""
        from engine.physics.chemistry import assign_species, b_factors_from_calibration
        from engine.physics.simulate import simulate_tilt_series

        state = self.model.get_state()
        species, _, _ = assign_species(state["amp"] * self.data.scale, state["sigma"], self.config.species,
                                       self.series.pixel_size, self.data.blur, self.config.composition or None,
                                       profile=self.profile)
        structure = Atoms(species, state["pos"])
        iteration, steps = self.iteration, self.config.thermal_refits
        n = self.series.n_tilts
        self.target.set_intensity(np.ones(n), np.zeros(n))  # the simulations have none to fit
        widths_at = {}
        for b in (0.0, 1.0):
            clean = simulate_tilt_series(structure, self.series.angles, self.series.pixel_size, self.series.shape,
                                         blur_sigma=self.data.blur, b_factor=b, geometry=self.geometry)
            self.target.set_measured((clean.projections - self.data.background) / self.data.scale)
            self.model.set_state({k: state[k] for k in ("pos", "amp", "sigma")})
            for i in range(steps):
                self.step(self.learning_rate_factor(i, steps))
            widths_at[b] = self.model.get_state()["sigma"]
        self.target.set_measured(self.normalised)
        if self.refiner is not None:
            self._apply_alignment()
        self.model.set_state(state)
        self.iteration = iteration
        return b_factors_from_calibration(state["sigma"], widths_at)

    @staticmethod
    def _with_moments(state: dict) -> dict:
        n = len(state["pos"])
        return {**state, "m": np.zeros((n, 5)), "v": np.zeros((n, 5)), "age": np.zeros(n, np.int64)}

    # ------------------------------------------------------------------ results
    def atoms(self) -> Atoms:
        """The fitted atoms: positions (Å), amplitude in data units · Å², width σ (Å); with the expected
        species given, each atom's element (and its probability when there are several) and its
        Debye–Waller B in Å² (`engine.chemistry`)."""
        from engine.physics.chemistry import assign_species

        state = self.model.get_state()
        order = np.lexsort(state["pos"].T[::-1])
        amplitude = state["amp"][order] * self.data.scale
        columns = {"amplitude": amplitude, "width": state["sigma"][order]}
        if self.config.species:
            species, probability, _ = assign_species(amplitude, columns["width"], self.config.species,
                                                     self.series.pixel_size, self.data.blur,
                                                     self.config.composition or None, profile=self.profile)
            if len(self.config.species) > 1:
                columns["species_prob"] = probability
            if self.b_factors is not None:
                columns["b_factor"] = self.b_factors[order]
        else:
            species = np.full(len(order), UNKNOWN_SPECIES)
        return Atoms(species, state["pos"][order], columns)

    def projection_images(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Measured and predicted projection ``index`` (H, W) in the data's own units, the prediction
        from the current atoms in the current (refined) geometry."""
        predicted = self._predicted(np.array([index]))[0] * self.data.scale + self.data.background
        return self.series.projections[index].astype(np.float64), predicted

    def save_checkpoint(self) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = self.model.get_state()
        payload = {f"state_{k}": v for k, v in state.items()}
        if self.refiner is not None:
            payload.update({f"align_{k}": v for k, v in self.refiner.state().items()})
        payload["meta"] = np.array(json.dumps({
            "iteration": self.iteration, "config": asdict(self.config), "history": self.history,
            "phase_seconds": self.phase_seconds, "rng": self.rng.bit_generator.state}))
        path = self.out_dir / CHECKPOINT
        write_atomically(path, lambda tmp: np.savez(tmp, **payload))
        return path

    def load_checkpoint(self, path) -> None:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as f:
                state = {k[len("state_"):]: f[k] for k in f.files if k.startswith("state_")}
                alignment = {k[len("align_"):]: f[k] for k in f.files if k.startswith("align_")}
                meta = json.loads(str(f["meta"]))
        except (OSError, ValueError, KeyError) as err:
            raise InputError(path, f"not a readable atomsplat checkpoint ({err})") from err
        self.iteration = int(meta["iteration"])
        self.history = meta["history"]
        self.phase_seconds = meta["phase_seconds"]
        self.rng.bit_generator.state = meta["rng"]
        if self.refiner is not None and alignment:
            self.refiner.load_state(alignment)
            self._apply_alignment()
            self.volume_projector.set_geometry(self.geometry)
        self._upload(state, sort=False)  # the order the run had: same sums, same results

    def write_outputs(self, atoms: Atoms, arch: str, wall_seconds: float, extra: dict | None = None) -> dict:
        from engine.io.plots import line_plot, projection_panel

        t0 = time.perf_counter()
        out = self.out_dir
        out.mkdir(parents=True, exist_ok=True)
        write_atoms(atoms, out / "atoms.xyz", overwrite=True)
        predicted = self._predicted(np.arange(self.series.n_tilts)) * self.data.scale + self.data.background
        measured = self.series.projections.astype(np.float64)
        nrmse = float(np.linalg.norm(predicted - measured) / np.linalg.norm(measured - self.data.background))
        projection_panel(self.series.projections, predicted, self.series.angles, path=out / "projections.png")
        it = np.asarray(self.history["iteration"], float)
        line_plot({"loss": (it, np.asarray(self.history["loss"], float))}, path=out / "loss.png",
                  title="LOSS", xlabel="ITERATION", logy=True)
        alignment = None
        if self.refiner is not None:
            from engine.measure.alignment import misalignment_summary, write_alignment

            write_alignment(self.refiner.alignment, out, self.series.angles, self.series.pixel_size, self.data.scale)
            alignment = misalignment_summary(self.refiner.alignment, self.series.pixel_size)
            del alignment["refine_advised"]
        self.phase_seconds["output"] += time.perf_counter() - t0
        report = {"alignment": alignment, "gain": self.gain, "source": self.series.source, "arch": arch, "config": asdict(self.config),
                  "data_model": asdict(self.data), "d_min_A": self.d_min, "iterations": self.iteration,
                  "final_loss": self.history["loss"][-1] if self.history["loss"] else None,
                  "projection_nrmse": nrmse, "n_atoms": len(atoms), "history": self.history,
                  "phase_seconds": self.phase_seconds,
                  "wall_seconds": wall_seconds}
        report.update(extra or {})
        write_atomically(out / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
        return report
