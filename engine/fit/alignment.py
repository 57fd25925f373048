"""Joint alignment refinement: gradient steps on an `engine.measure.alignment.Alignment` from the
projector's and the loss's alignment gradients, with the gauge kept fixed (see that module)."""

from __future__ import annotations

import numpy as np

from engine.core.geometry import TiltGeometry, tilt_rotation
from engine.measure.alignment import Alignment, translation_gauge


class _Adam:
    """Adam on a small host array (the alignment has a few numbers per projection), one step count
    per row, so that projections outside a mini-batch neither move nor age."""

    def __init__(self, shape):
        self.m = np.zeros(shape)
        self.v = np.zeros(shape)
        self.t = np.zeros(self.m.shape[:1])

    def step(self, grad: np.ndarray, lr: float, rows=Ellipsis) -> np.ndarray:
        """The update of the parameters for ``grad``; only ``rows`` (default all) change."""
        self.t[rows] += 1
        self.m[rows] = 0.9 * self.m[rows] + 0.1 * grad[rows]
        self.v[rows] = 0.999 * self.v[rows] + 0.001 * grad[rows] ** 2
        t = self.t.reshape(self.t.shape + (1,) * (self.m.ndim - self.t.ndim))
        update = np.zeros_like(self.m)
        update[rows] = (-lr * (self.m / (1 - 0.9**np.maximum(t, 1))) /
                        (np.sqrt(self.v / (1 - 0.999**np.maximum(t, 1))) + 1e-12))[rows]
        return update


class AlignmentRefiner:
    """Gradient steps on an `Alignment` from the projector's and the loss's alignment gradients."""

    def __init__(self, alignment: Alignment, angles_deg):
        self.alignment = alignment
        self.angles = np.asarray(angles_deg, np.float64)
        n = len(self.angles)
        self.adam = {"angle_offsets": _Adam(n), "shifts": _Adam((n, 2)), "axis_angle": _Adam(()),
                     "log_scale": _Adam(n), "intensity_offset": _Adam(n)}

    def geometry(self) -> TiltGeometry:
        return self.alignment.geometry(self.angles)

    def step(self, grads: dict, batch: np.ndarray, lr_shift: float, lr_angle: float, lr_intensity: float,
             fit_offsets: bool = True) -> None:
        """One Adam step of the projections in ``batch`` (and of φ) from ``grads``: 'shift' (n, 2) per Å,
        'angle' (n,) and 'axis_angle' (n,) per degree, 'scale' (n,), 'offset' (n,) per normalised unit.
        Without ``fit_offsets`` the intensity offsets stay as they are."""
        a = self.alignment
        a.shifts += self.adam["shifts"].step(grads["shift"], lr_shift, batch)
        a.angle_offsets += self.adam["angle_offsets"].step(grads["angle"], lr_angle, batch)
        a.axis_angle = float(a.axis_angle + self.adam["axis_angle"].step(np.sum(grads["axis_angle"][batch]), lr_angle))
        a.intensity_scale *= np.exp(self.adam["log_scale"].step(grads["scale"] * a.intensity_scale, lr_intensity,
                                                                batch))
        if fit_offsets:
            a.intensity_offset += self.adam["intensity_offset"].step(grads["offset"], lr_intensity, batch)

    def fix_gauge(self) -> tuple[np.ndarray, np.ndarray, float]:
        """Remove the gauge directions from the alignment (module docstring). Returns the atom
        transform that keeps every image unchanged: positions → G p + t, amplitudes × g."""
        a = self.alignment
        mean_offset = float(a.angle_offsets.mean())
        a.angle_offsets -= mean_offset
        turn = tilt_rotation(mean_offset, a.axis_angle)
        rotations = self.geometry().rotations
        t = translation_gauge(a.shifts, rotations)
        a.shifts -= np.einsum("kij,j->ki", rotations[:, :2, :], t)
        g = float(np.exp(np.mean(np.log(a.intensity_scale))))
        a.intensity_scale /= g
        return turn, t, g

    def state(self) -> dict:
        """Parameters and Adam moments as arrays (for checkpoints)."""
        a = self.alignment
        out = {"angle_offsets": a.angle_offsets, "shifts": a.shifts, "axis_angle": np.array(a.axis_angle),
               "intensity_scale": a.intensity_scale, "intensity_offset": a.intensity_offset}
        for name, adam in self.adam.items():
            out[f"m_{name}"], out[f"v_{name}"], out[f"t_{name}"] = adam.m, adam.v, adam.t
        return out

    def load_state(self, state: dict) -> None:
        a = self.alignment
        a.angle_offsets, a.shifts = np.array(state["angle_offsets"]), np.array(state["shifts"])
        a.axis_angle = float(state["axis_angle"])
        a.intensity_scale, a.intensity_offset = np.array(state["intensity_scale"]), np.array(state["intensity_offset"])
        for name, adam in self.adam.items():
            adam.m, adam.v, adam.t = (np.array(state[f"m_{name}"]), np.array(state[f"v_{name}"]),
                                      np.array(state[f"t_{name}"]))
