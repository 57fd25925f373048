"""The fit of counted (Poisson) data with tied atoms: every atom of the element shares one amplitude A
(expected counts per projection) and one footprint width s (Å, atom and blur together), so each
atom has 3 free parameters, its position; each projection has its own background B_k (expected
counts per pixel). Expected counts:

    λ_kp = B_k + Σ_i A · N₂(p; π_k(r_i), s²)

1. Seeds: maximum-likelihood EM of a voxel volume plus the backgrounds (`engine.fit.seeding`), atoms
   at its peaks (one per d_min); A from the signal counts shared among them, then EM of A and B_k.
2. Refinement: Adam (`engine.kernels.adam`) on positions and log s, EM updates of A and B_k.
3. Cycles of refine → remove → refine → add by the evidence rule (`engine.fit.evidence`) until no
   atom comes or goes, then the pair-merge test, a final refinement with learning rates stepped down
   on plateaus, a last removal and merge. Every refinement stops when converged
   (`engine.fit.convergence`); its step count is only a cap.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np

from engine.fit.convergence import CAPPED, CHECK_EVERY, CONVERGED, Convergence
from engine.fit.evidence import EvidenceSelection, visible_volume
from engine.fit.profile_misfit import footprint_radius_px
from engine.fit.seeding import mlem_with_background, visible_everywhere, warm_start
from engine.fit.uncertainty import (COUPLING_PER_D_MIN, atom_columns, correction_summary, finish_correction,
                                    joint_information, profile_correction, summary)
from engine.io.atoms import UNKNOWN_SPECIES, Atoms
from engine.kernels.adam import SharedParameters
from engine.kernels.atommodel import AtomModel, AtomProfile
from engine.kernels.evidence import LikelihoodGain
from engine.kernels.loss import FitTarget
from engine.kernels.projector import TiltSeriesProjector, cached_cloud
from engine.kernels.volume import local_maxima, projector_for, suppress_close
from engine.measure.datamodel import DataModel
from engine.physics.chemistry import minimum_distance
from engine.physics.forward import ForwardModel
from engine.physics.structures import nearest_neighbour_distance

SEED_VOXEL = 0.5          # Å: the ML-EM grid for seeds and candidates
SEED_EM_ITERATIONS = 12   # enough to separate atoms from the background; more sharpens noise too
START_WIDTH = 0.6         # Å: a light atom with a typical blur; the fit moves it
WIDTH_RATE = 0.005        # Adam rate of the shared log width: its gradient sums over all atoms, and a
                          # faster width lets pairs of atoms fuse into one double atom
CYCLE_STEPS = 60          # at most this many refinement steps before each removal pass
MAX_CYCLES = 15
FINAL_STEPS = 200         # at most, in the final refinement
FINAL_RATE = 0.05         # its lowest learning rate, as a fraction of its first


class CountedFit:
    """Fit of ``series`` (counts = data × ``gain``) with ``settings``; same results interface as
    `engine.fit.reconstruct.Reconstruction` (atoms, predicted, forward_model, history, …)."""

    def __init__(self, series, settings, out_dir, gain: float, reason: str, progress: bool = True):
        t0 = time.perf_counter()
        self.series, self.settings, self.out_dir = series, settings, Path(out_dir)
        self.progress, self.gain, self.loss = progress, float(gain), "poisson"
        self.noise_reason = reason
        self.counts = np.asarray(series.projections, np.float64) * self.gain
        self.n, self.height, self.width = self.counts.shape
        self.pixel_size = float(series.pixel_size)
        self.geometry = series.get_geometry()
        self.refiner = None
        self.d_min = minimum_distance(settings.species, settings.d_min)
        bond = min((nearest_neighbour_distance(s) for s in settings.species), default=self.d_min / 0.7)
        self.projector = TiltSeriesProjector(self.geometry, (self.height, self.width), self.pixel_size, 0.0)
        self.target = FitTarget(self.counts, "poisson", DataModel(background=0.0, scale=1.0, noise=1.0, blur=0.0), 1.0,
                                image=self.projector.image, image_grad=self.projector.image_grad,
                                batch=self.projector.batch)
        self.model = AtomModel(256, AtomProfile())
        self.volumes = projector_for(self.n, (self.height, self.width), self.pixel_size, SEED_VOXEL)
        self.volumes.set_geometry(self.geometry)
        self.support = visible_everywhere(self.volumes, (self.height, self.width), self.pixel_size)
        gain_kernel = LikelihoodGain(self.projector)
        gain_kernel.set_counts(self.counts)
        self.selection = EvidenceSelection(gain_kernel, visible_volume(self.counts.shape[1:], self.pixel_size),
                                           self.in_support, self.d_min, max(bond, self.d_min))
        self.amplitude, self.shape_width = 0.0, START_WIDTH
        self.shared_width = SharedParameters([math.log(START_WIDTH)])  # one compile for every refinement
        self.background = np.zeros(self.n)
        self.iteration, self.reason, self.stop = 0, None, None
        self.profile_correction = None  # what the profile correction did (`correction_summary`), once done
        self.error_bars = None  # per-atom σ, significance (`engine.fit.uncertainty`) once done, `positions` order
        self.information_used = None  # which information gave σ (`atom_columns`), once done
        self.history = {"iteration": [], "loss": [], "atoms": []}
        self.phase_seconds = {"prepare": time.perf_counter() - t0}
        self.data = DataModel(background=0.0, scale=1.0 / self.gain, noise=0.0, blur=0.0)

    # ------------------------------------------------------------------ model
    def in_support(self, pos: np.ndarray) -> np.ndarray:
        """The prior's support: the volume every projection sees (|(x, z)| ≤ half width, |y| ≤ half height)."""
        half_w, half_h = (self.width - 1) / 2 * self.pixel_size, (self.height - 1) / 2 * self.pixel_size
        return (pos[:, 0] ** 2 + pos[:, 2] ** 2 <= half_w ** 2) & (np.abs(pos[:, 1]) <= half_h)

    def _upload(self, pos: np.ndarray) -> None:
        n = len(pos)
        if n > self.model.capacity:
            self.model = AtomModel(1 << (n - 1).bit_length(), AtomProfile())
        self.model.set_state({"pos": pos, "amp": np.full(n, self.amplitude * self.pixel_size ** 2),
                              "sigma": np.full(n, self.shape_width)})
        self.projector.ensure_capacity(self.model.cloud.capacity)

    def positions(self) -> np.ndarray:
        return self.model.get_state()["pos"]

    def render(self, pos: np.ndarray | None = None) -> np.ndarray:
        """Expected atom counts (n, H, W) of ``pos`` (default: the model's atoms)."""
        if pos is None:
            if not self.model.count:
                return np.zeros_like(self.counts)
            return self.projector.render(self.model.cloud, np.arange(self.n)).astype(np.float64)
        probe = cached_cloud(len(pos))
        probe.set(pos, np.full(len(pos), self.amplitude * self.pixel_size ** 2), np.full(len(pos), self.shape_width))
        return self.projector.render(probe, np.arange(self.n)).astype(np.float64)

    def expected(self) -> np.ndarray:
        return self.background[:, None, None] + self.render()

    def _em_scalars(self, atoms: np.ndarray, iterations: int) -> None:
        """EM updates of the amplitude and the backgrounds, positions and width fixed; ``atoms`` the
        atoms' expected counts at the current amplitude."""
        unit = atoms / max(self.amplitude, 1e-30)
        for _ in range(iterations):
            ratio = self.counts / np.maximum(self.background[:, None, None] + self.amplitude * unit, 1e-12)
            total = float(unit.sum())
            if total > 0:
                self.amplitude *= float(np.sum(unit * ratio)) / total
            self.background *= ratio.mean(axis=(1, 2))

    def refine(self, steps: int, lr_position: float, decay: bool = False, observer=None) -> None:
        """Until converged (`engine.fit.convergence`), at most ``steps`` steps: Adam on positions and the
        shared log width, EM of amplitude and backgrounds, the Poisson residual and its sums on the
        device (the loss kernel with λ = I_k + B_k). With ``decay`` the rates step down on plateaus to
        ``FINAL_RATE`` of the first; without, the refinement ends at its first plateau."""
        if self.model.count == 0:
            return
        self._upload(self.positions())  # fresh Adam moments for this refinement
        self.shared_width.reset([math.log(self.shape_width)])
        pixels = self.height * self.width
        convergence = Convergence(FINAL_RATE if decay else 1.0)
        for _ in range(steps):
            factor = convergence.factor
            self.target.set_intensity(np.ones(self.n), self.background)
            self.projector.forward(self.model.cloud)
            self.target.residual(self.n, 1.0)
            self.projector.backward(self.model.cloud, alignment=False)
            width_grad = float(self.model.cloud.grad_sigma.to_numpy()[:self.model.count].sum()) * self.shape_width  # d/dlog s
            self.model.adam_step(lr_position * factor, 0.0, 0.0)
            self.shape_width = math.exp(self.shared_width.step([width_grad], [WIDTH_RATE * factor])[0])
            # EM: with g = dL/dλ = 1 − y/λ, Σ_p y/λ = N_p − Σ_p g and Σ_p I y/λ = Σ_p I − Σ_p g I.
            sums = self.target.intensity_gradients()
            rendered = float(sums["rendered"].sum())
            if rendered > 0:
                self.amplitude *= (rendered - float(sums["scale"].sum())) / rendered
            self.background *= 1.0 - sums["offset"] / pixels
            self.model.set_shape(self.amplitude * self.pixel_size ** 2, self.shape_width)
            self.iteration += 1
            if self.iteration % CHECK_EVERY == 0:
                loss = self._record() * pixels * self.n  # nats, the whole series
                # A refinement between detection rounds ends when the atoms wander within their error
                # bars (free: each position and the shared width; amplitude and backgrounds by EM);
                # the final one when nothing improves by ½ nat.
                parameters = 1 if decay else 3 * self.model.count + 1
                if (convergence.settled(loss, self.model.largest_step(), parameters)
                        and not convergence.step_down()):
                    break
        if observer is not None:
            observer(self)

    def _record(self) -> float:
        """Append the loss (per pixel, at the current atoms) to the history and return it."""
        self.target.set_intensity(np.ones(self.n), self.background)
        self.projector.forward(self.model.cloud)
        loss = self.target.loss_value(self.n) if self.model.count else None
        self.history["iteration"].append(self.iteration)
        self.history["loss"].append(loss)
        self.history["atoms"].append(self.model.count)
        return loss

    # ------------------------------------------------------------------ the schedule
    def seed(self) -> np.ndarray:
        """Atom positions to start from: the ``init`` file's (a warm start; the backgrounds start at
        half the mean counts and EM moves them), else the peaks of the ML-EM volume."""
        if self.settings.init is not None:
            pos = warm_start(self.settings.init, self.counts, self.pixel_size, 1.0)["pos"]
            pos = pos[self.in_support(pos)]
            self.background = 0.5 * self.counts.mean(axis=(1, 2))
        else:
            volume, self.background = mlem_with_background(self.counts, self.volumes, self.support, SEED_EM_ITERATIONS)
            pos, values = local_maxima(volume, self.volumes, self.d_min, 0.0, self.support)
            pos, _ = suppress_close(pos, values, self.d_min)
        signal = float(np.mean(self.counts.sum(axis=(1, 2)) - self.background * self.height * self.width))
        self.amplitude = max(signal, 1e-6) / max(len(pos), 1)
        return pos

    def run(self, observer=None) -> Atoms:
        from tqdm import tqdm

        t0 = time.perf_counter()
        if not np.any(self.counts > 0):
            self.reason = "the series holds no counts"
            self._upload(np.zeros((0, 3)))
            return self.finish()
        self._upload(self.seed())
        self._em_scalars(self.render(), 10)
        self._upload(self.positions())
        bar = tqdm(total=MAX_CYCLES, disable=not self.progress, unit="cycle", desc="detect", file=sys.stderr)
        for cycle in range(MAX_CYCLES):
            self.refine(CYCLE_STEPS, self.settings.lr_position, observer=observer)
            drop = self.selection.remove(self.expected(), self.positions(), self.amplitude, self.shape_width)
            self._upload(self.positions()[~drop])
            if drop.any():
                self.refine(CYCLE_STEPS // 3, self.settings.lr_position, observer=observer)
            pos = self.positions()
            added = self.selection.add(self.counts, self.expected(), pos, self.amplitude, self.shape_width,
                                       self.volumes, self.support)
            self._upload(np.concatenate([pos, added]) if len(added) else pos)
            bar.update(1)
            bar.set_postfix(atoms=self.model.count, removed=int(drop.sum()), added=len(added), refresh=False)
            if not drop.any() and not len(added):
                self.stop = CONVERGED
                break
        else:
            self.stop = f"{CAPPED}: {MAX_CYCLES} evidence cycles"
        bar.close()
        self._merge()
        self.refine(FINAL_STEPS, 0.5 * self.settings.lr_position, decay=True, observer=observer)
        drop = self.selection.remove(self.expected(), self.positions(), self.amplitude, self.shape_width)
        self._upload(self.positions()[~drop])
        if self._merge():
            self.refine(FINAL_STEPS // 4, 0.25 * self.settings.lr_position, decay=True, observer=observer)
        self._record()
        self.phase_seconds["detect"] = time.perf_counter() - t0
        if self.model.count == 0:
            self.reason = "no atom passes the evidence rule: the data support none"
        atoms = self.finish()
        if observer is not None:
            observer(self)
        return atoms

    def _merge(self) -> int:
        pos, merged = self.selection.merge(self.counts, self.expected(), self.render, self.positions(),
                                           self.amplitude, self.shape_width)
        self._upload(pos)
        return merged

    # ------------------------------------------------------------------ results
    def atoms(self) -> Atoms:
        """Positions (Å), amplitude (data units · Å², shared), width (the footprint σ, Å, blur
        included), species when given; once the fit is done, each atom's error bars and significance
        (log-likelihood gain over its penalty, nats; `finish`)."""
        pos = self.positions()
        order = np.lexsort(pos.T[::-1]) if len(pos) else np.zeros(0, int)
        n = len(pos)
        columns = {"amplitude": np.full(n, self.amplitude * self.pixel_size ** 2 / self.gain),
                   "width": np.full(n, self.shape_width)}
        if self.error_bars is not None and len(self.error_bars["sigma_x"]) == n:
            columns.update({name: values[order] for name, values in self.error_bars.items()})
        species = self.settings.species[0] if self.settings.species else UNKNOWN_SPECIES
        return Atoms(np.full(n, species), pos[order], columns)

    def finish(self) -> Atoms:
        """The fitted atoms with their error bars: one pass of the evidence kernel that decides
        detection, which also gives the position covariance (once, at the end: not per frame of a
        live view)."""
        pos = self.positions()
        if len(pos):
            t0 = time.perf_counter()
            kernel, amplitude = self.selection.gain, self.amplitude * self.pixel_size ** 2
            kernel.set_model(self.expected())
            correction = None
            if self.settings.profile_correction:
                correction = profile_correction(kernel.data - kernel.model, self.geometry, pos, np.ones((len(pos), 1)),
                                                footprint_radius_px(self.shape_width, AtomProfile(), 0.0,
                                                                    self.pixel_size), self.pixel_size)
            information = joint_information(kernel, pos, amplitude, self.shape_width, COUPLING_PER_D_MIN * self.d_min)
            self.error_bars, self.information_used = atom_columns(information, self.selection.volume)
            if correction is not None:  # the columns keep the atoms' order
                self._upload(pos + finish_correction(correction, kernel, pos, amplitude, self.shape_width, information))
                self.phase_seconds["profile_correction"] = correction["seconds"]
            self.profile_correction = correction_summary(correction)
            self.phase_seconds["uncertainty"] = time.perf_counter() - t0 - (0.0 if correction is None
                                                                          else correction["seconds"])
        return self.atoms()

    def forward_model(self) -> ForwardModel:
        """Data units: the backgrounds as per-projection offsets (B_k / gain)."""
        return ForwardModel(self.geometry, (self.height, self.width), self.pixel_size, 0.0, AtomProfile(), 0.0,
                            1.0 / self.gain, np.ones(self.n), self.background)

    def predicted(self, indices=None) -> np.ndarray:
        indices = np.arange(self.n) if indices is None else np.asarray(indices).reshape(-1)
        return self.expected()[indices] / self.gain

    def projection_images(self, index: int):
        return self.series.projections[index].astype(np.float64), self.predicted([index])[0]

    def report_extra(self) -> dict:
        return {"model": "tied", "noise_model": {"kind": "poisson", "gain": self.gain, "reason": self.noise_reason},
                "amplitude_counts": self.amplitude, "footprint_width_A": self.shape_width,
                "background_counts": self.background.tolist(), "empty_reason": self.reason,
                "stopped": {"reason": self.stop, "iteration": self.iteration},
                "uncertainty": summary(self.atoms(), {"kind": "poisson", "gain": self.gain,
                                                      "information": self.information_used}),
                "profile_correction": self.profile_correction}

