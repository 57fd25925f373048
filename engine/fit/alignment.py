"""Joint alignment refinement: Adam steps (`engine.kernels.adam`, the atoms' optimiser) on an
`engine.measure.alignment.Alignment`, taken on the device straight from the projector's and the
loss's alignment gradients, with the gauge kept fixed (see that module)."""


import numpy as np
import taichi as ti

from engine.core.geometry import TiltGeometry, tilt_rotation
from engine.kernels.adam import adam_direction
from engine.measure.alignment import Alignment, translation_gauge

# Per-projection parameters, in this order: shift x', shift y' (Å), tilt-angle offset (degrees),
# log intensity scale. The intensity offsets (the background) are the loss's, fitted in closed form
# (`engine.kernels.loss.FitTarget.fit_offsets`).
WIDTH = 4


@ti.data_oriented
class AlignmentRefiner:
    """The alignment of n projections as device parameters with their Adam moments; the host copy
    ``alignment`` is refreshed after every step (the geometry is composed on the host)."""

    def __init__(self, alignment: Alignment, angles_deg):
        self.angles = np.asarray(angles_deg, np.float64)
        n = len(self.angles)
        self.params = ti.Vector.field(WIDTH, ti.f32, n)
        self.m = ti.Vector.field(WIDTH, ti.f32, n)
        self.v = ti.Vector.field(WIDTH, ti.f32, n)
        self.age = ti.field(ti.i32, n)
        self.axis = ti.Vector.field(3, ti.f32, ())  # φ (degrees), its two moments
        self.axis_age = ti.field(ti.i32, ())
        self.alignment = alignment
        self._upload()

    def _upload(self) -> None:
        a = self.alignment
        self.params.from_numpy(np.column_stack([a.shifts, a.angle_offsets,
                                                np.log(a.intensity_scale)]).astype(np.float32))
        axis = self.axis.to_numpy()
        axis[0] = a.axis_angle
        self.axis.from_numpy(axis.astype(np.float32))

    def _download(self) -> None:
        p = self.params.to_numpy().astype(np.float64)
        a = self.alignment
        a.shifts, a.angle_offsets = p[:, :2].copy(), p[:, 2].copy()
        a.intensity_scale = np.exp(p[:, 3])
        a.axis_angle = float(self.axis.to_numpy()[0])

    def geometry(self) -> TiltGeometry:
        return self.alignment.geometry(self.angles)

    @ti.kernel
    def _step(self, grad_shift: ti.template(), grad_angle: ti.template(), grad_axis: ti.template(),
              grad_scale: ti.template(), batch: ti.template(), nb: ti.i32,
              lr_shift: ti.f32, lr_angle: ti.f32, lr_intensity: ti.f32):
        for b in range(nb):
            k = batch[b]
            self.age[k] += 1
            p = self.params[k]
            # d/dlog c = c dL/dc
            g = ti.Vector([grad_shift[k][0], grad_shift[k][1], grad_angle[k], grad_scale[k] * ti.exp(p[3])])
            step, m, v = adam_direction(g, self.m[k], self.v[k], self.age[k], ti.f32)
            self.m[k] = m
            self.v[k] = v
            self.params[k] = p - ti.Vector([lr_shift, lr_shift, lr_angle, lr_intensity]) * step
        for _ in range(1):  # φ is shared: its gradient is the batch's sum, in a fixed order
            total = 0.0
            for b in range(nb):
                total += grad_axis[batch[b]]
            self.axis_age[None] += 1
            a = self.axis[None]
            step, m, v = adam_direction(ti.Vector([total]), ti.Vector([a[1]]), ti.Vector([a[2]]),
                                        self.axis_age[None], ti.f32)
            self.axis[None] = ti.Vector([a[0] - lr_angle * step[0], m[0], v[0]])

    def step(self, projector, target, lr_shift: float, lr_angle: float, lr_intensity: float) -> None:
        """One Adam step of the projections in the projector's current batch (and of φ) from the
        gradients its last backward pass and the loss's last residual left on the device."""
        self._step(projector.grad_shift, projector.grad_angle, projector.grad_axis_angle, target.grad_scale,
                   projector.batch, projector.batch_size, lr_shift, lr_angle, lr_intensity)
        self._download()

    def fix_gauge(self) -> tuple[np.ndarray, np.ndarray, float]:
        """Remove the gauge directions from the alignment (`engine.measure.alignment`). Returns the
        atom transform that keeps every image unchanged: positions → G p + t, amplitudes × g."""
        a = self.alignment
        mean_offset = float(a.angle_offsets.mean())
        a.angle_offsets -= mean_offset
        turn = tilt_rotation(mean_offset, a.axis_angle)
        rotations = self.geometry().rotations
        t = translation_gauge(a.shifts, rotations)
        a.shifts -= np.einsum("kij,j->ki", rotations[:, :2, :], t)
        g = float(np.exp(np.mean(np.log(a.intensity_scale))))
        a.intensity_scale /= g
        self._upload()
        return turn, t, g

    def state(self) -> dict:
        """Parameters and Adam moments as arrays (for checkpoints)."""
        return {"params": self.params.to_numpy(), "m": self.m.to_numpy(), "v": self.v.to_numpy(),
                "age": self.age.to_numpy(), "axis": self.axis.to_numpy(), "axis_age": np.array(self.axis_age[None])}

    def load_state(self, state: dict) -> None:
        self.params.from_numpy(np.asarray(state["params"], np.float32))
        self.m.from_numpy(np.asarray(state["m"], np.float32))
        self.v.from_numpy(np.asarray(state["v"], np.float32))
        self.age.from_numpy(np.asarray(state["age"], np.int32))
        self.axis.from_numpy(np.asarray(state["axis"], np.float32))
        self.axis_age[None] = int(state["axis_age"])
        self._download()

