"""The device side of one fit: the atom model, the projector, the loss against the measured images
and, when refined, the alignment; one optimisation step over a batch of projections."""

from __future__ import annotations

import math

import numpy as np

from engine.core.backend import leased
from engine.fit.alignment import AlignmentRefiner
from engine.kernels.atommodel import AtomModel
from engine.kernels.loss import FitTarget
from engine.kernels.neighbours import NeighbourGrid
from engine.kernels.projector import TiltSeriesProjector
from engine.kernels.step import fused_step


def with_moments(state: dict) -> dict:
    """Atoms (pos, amp, sigma) with fresh optimiser state: zero Adam moments, no steps taken."""
    n = len(state["pos"])
    return {**state, "m": np.zeros((n, 5)), "v": np.zeros((n, 5)), "age": np.zeros(n, np.int64)}


class FitProblem:
    """Atoms fitted to ``normalised`` images (n, H, W; background 0, normalised units) under ``loss``.

    geometry  : the starting `TiltGeometry` (the refiner's, when ``refiner`` is given).
    data      : the `engine.measure.datamodel.DataModel` (noise, scale, background, blur).
    profile   : the `AtomProfile` every atom is rendered with.
    repulsion : strength of the soft d_min repulsion in noise-weighted data-term units (0: off).
    """

    def __init__(self, normalised: np.ndarray, geometry, pixel_size: float, data, loss: str, gain, profile,
                 d_min: float, repulsion: float = 0.0, refiner: AlignmentRefiner | None = None):
        self.n_tilts = len(normalised)
        self.refiner = refiner
        self.geometry = geometry
        self.d_min, self.repulsion = d_min, repulsion
        self.profile = profile
        # The device objects come from earlier fits of the same configuration in this session where
        # there are any: new ones would mean instantiating and compiling their kernels again.
        shape = tuple(int(v) for v in normalised.shape)
        configuration = ("fit projector and target", shape, float(pixel_size), float(data.blur), loss)
        self.projector, self.target = leased(configuration, lambda: self._device_data(normalised, geometry, pixel_size,
                                                                                    data, loss, gain), self)
        self.projector.set_geometry(geometry)
        self.projector.set_batch(np.arange(self.n_tilts))
        self.target.set_data_model(data, gain)
        self.target.set_measured(normalised)
        self.target.set_intensity(np.ones(self.n_tilts), np.zeros(self.n_tilts))
        self.model = self._atom_model(256)
        self.grid = NeighbourGrid(d_min, capacity=256) if repulsion > 0 else None

    @staticmethod
    def _device_data(normalised, geometry, pixel_size, data, loss, gain):
        projector = TiltSeriesProjector(geometry, normalised.shape[1:], pixel_size, data.blur)
        target = FitTarget(normalised, loss, data, gain, image=projector.image, image_grad=projector.image_grad,
                           batch=projector.batch)
        return projector, target

    def _atom_model(self, capacity: int) -> AtomModel:
        return leased(("atom model", capacity, self.profile), lambda: AtomModel(capacity, self.profile), self)

    def upload(self, state: dict, sort: bool = True) -> None:
        """Replace the atoms (and their optimiser state) with ``state``; ``sort`` orders them along the
        tilt axis, so consecutive atoms splat into the same image rows."""
        if sort:
            order = np.argsort(state["pos"][:, 1], kind="stable")
            state = {k: np.asarray(v)[order] for k, v in state.items()}
        n = len(state["pos"])
        if n > self.model.capacity:
            self.model = self._atom_model(1 << (n - 1).bit_length())
        self.model.set_state(state)
        self.projector.ensure_capacity(self.model.cloud.capacity)

    def state(self) -> dict:
        return self.model.get_state()

    def step(self, lr: dict, batch: np.ndarray, align: bool, fit_offsets: bool, fix_gauge: bool) -> None:
        """One Adam step over the projections ``batch`` with learning rates ``lr`` (keys as the
        settings' lr_*, already scaled by the schedule); with ``fit_offsets`` the batch's background
        offsets move to their optimum (Gaussian losses); with ``align``, a step of the alignment too,
        and with ``fix_gauge`` its gauge directions are then moved onto the atoms."""
        if self.projector.batch_size != len(batch) or not np.array_equal(self.projector.batch_numpy(), batch):
            self.projector.set_batch(batch)
        cloud = self.model.cloud
        self.projector.ensure_capacity(cloud.capacity)
        batch_scale = self.n_tilts / self.projector.batch_size
        if self._fusable(align):
            curvature = self.target.offset_curvature(batch_scale) if fit_offsets else 1.0
            fused_step(self.projector, self.target, self.model, cloud, self.projector.pair_grad, cloud.count,
                       self.model.count, self.projector.batch_size, batch_scale,
                       self.projector.batch_size if fit_offsets else 0, curvature,
                       lr["lr_position"], lr["lr_amplitude"], lr["lr_width"])
            return
        self.projector.forward(cloud)
        self.target.residual(self.projector.batch_size, batch_scale)
        if fit_offsets:
            self.target.fit_offsets(self.projector.batch_size, batch_scale)
        self.projector.backward(cloud, alignment=align)
        if self.grid is not None:  # positions moved since the last step: rebuild the grid on the device
            self.grid.build_from_field(cloud.pos, self.model.count)
            self.grid.repulsion_gradient(cloud.pos, self.model.count, self.d_min,
                                         self.repulsion * self.target.weight, cloud.grad_pos)
        self.model.adam_step(lr["lr_position"], lr["lr_amplitude"], lr["lr_width"])
        if align:
            self.refiner.step(self.projector, self.target, lr["lr_shift"], lr["lr_angle"], lr["lr_intensity"])
            if fix_gauge:
                turn, translation, gain = self.refiner.fix_gauge()
                self.model.transform(turn, translation, math.log(gain))
            self.apply_alignment()

    def _fusable(self, align: bool) -> bool:
        """Whether `step` can run as one kernel (`engine.kernels.step`): on the CPU (where launches
        cost most; Taichi 1.7.4's SPIR-V code generator fails on the fused kernel), float32, no
        alignment step, no repulsion, and every Gaussian in one slab of the adjoint scratch."""
        return (self.projector.on_cpu and not align and self.grid is None and self.projector.np_dtype == np.float32
                and self.model.cloud.count <= self.projector.slab)

    def apply_alignment(self) -> None:
        """Take the refiner's alignment into the projector's geometry and the loss's intensity scales."""
        self.geometry = self.refiner.geometry()
        self.projector.set_geometry(self.geometry)
        self.target.set_intensity(self.refiner.alignment.intensity_scale)

    def predicted(self, indices) -> np.ndarray:
        """Predicted projections ``indices`` (normalised units): the atoms rendered in the current
        geometry, with each projection's intensity scale and offset."""
        indices = np.asarray(indices).reshape(-1)
        # Through the training fields: a step renders its batch afresh, so nothing in them outlives a
        # step, and `render`'s fields of its own would mean compiling the forward kernel again.
        unique, inverse = np.unique(indices, return_inverse=True)
        self.projector.set_batch(unique)
        self.projector.forward(self.model.cloud)
        images = self.projector.images_numpy()[unique][inverse.reshape(-1)]
        if self.refiner is not None:
            images = images * self.refiner.alignment.intensity_scale[indices, None, None]
        return images + self.target.offsets()[indices, None, None]

    def data_state(self) -> dict:
        """The fitted data-model parameters (for checkpoints): the per-projection offsets."""
        return {"offsets": self.target.offsets()}

    def load_data_state(self, state: dict) -> None:
        if "offsets" in state:
            self.target.intensity_offset.from_numpy(np.asarray(state["offsets"], self.target.np_dtype))

    def projection_losses(self) -> np.ndarray:
        """The loss of each projection in nats (its pixels' sum) at the atoms as they stand."""
        self.series_loss(fresh=True)  # every projection, in order, through the loss kernel
        return self.target.loss_per_projection.to_numpy()[: self.n_tilts].astype(np.float64)

    def loss_value(self) -> float:
        return self.target.loss_value(self.projector.batch_size)

    def free_parameters(self) -> int:
        """The atoms' free parameters: a position, an amplitude and a width each (the convergence
        test's scale, `engine.fit.convergence`)."""
        return 5 * self.model.count

    def series_loss(self, fresh: bool = False) -> float:
        """The loss of the whole series in nats (per-pixel loss × pixels) at the atoms of the last
        forward pass (``fresh``: at the atoms as they stand); a mini-batch fit renders every
        projection for it first."""
        if fresh or self.projector.batch_size < self.n_tilts:
            self.projector.set_batch(np.arange(self.n_tilts))
            self.projector.forward(self.model.cloud)
        t = self.target
        return self.loss_value() * t.n_proj * t.height * t.width
