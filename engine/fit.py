"""The data term of a fit: measured projections on the device, the residual → dL/dimage kernel and
the loss value.

L2: L = ½ Σ (I − D)² / σ_n² over the batch's pixels (normalised units, σ_n the estimated noise);
the reported value is χ² per pixel, ≈ 1 when only noise is left.
Poisson: L = Σ λ − y log λ with λ = g (c I + β) and y = g (c D + β) the expected and measured counts
(g counts per data unit, c and β the estimated scale and background); reported per pixel.
"""


import numpy as np
import taichi as ti

from .errors import InputError
from .projector import CPU_TASK_SPREAD, LANES, TiltSeriesProjector, pack_images


@ti.data_oriented
class FitTarget:
    """Measured (normalised) projections aligned with a projector's packed image layout."""

    def __init__(self, projector: TiltSeriesProjector, normalised: np.ndarray, loss: str, data_model, gain: float):
        if loss == "poisson" and not gain > 0:
            raise InputError("--gain", "the Poisson loss needs the detector gain (counts per data unit)")
        self.projector = projector
        self.poisson = loss == "poisson"
        self.weight = 1.0 / data_model.noise**2
        self.gain = float(gain)
        self.scale = float(data_model.scale)
        self.background = float(data_model.background)
        shape = projector.image.shape
        self.measured = ti.Vector.field(LANES, ti.f32, shape)
        self.set_measured(normalised)
        lanes = np.zeros((projector.row_blocks, LANES), np.float32)
        lanes.reshape(-1)[: projector.width] = 1.0
        self.lane_mask = ti.Vector.field(LANES, ti.f32, projector.row_blocks)
        self.lane_mask.from_numpy(lanes)
        self.loss_per_projection = ti.field(ti.f32, projector.n_proj)

    def set_measured(self, normalised: np.ndarray) -> None:
        """Replace the measured projections (n, H, W), normalised units."""
        self.measured.from_numpy(pack_images(normalised))

    @ti.func
    def _terms(self, k, r, c):
        """(dL/dI, L) per lane of one pixel block."""
        pred = self.projector.image[k, r, c]
        meas = self.measured[k, r, c]
        mask = self.lane_mask[c]
        grad = ti.Vector.zero(ti.f32, LANES)
        loss = ti.Vector.zero(ti.f32, LANES)
        if ti.static(self.poisson):
            g, s, b = ti.static(self.gain, self.scale, self.background)
            lam = ti.max(g * (s * pred + b), 1e-6)
            y = g * (s * meas + b)
            grad = g * s * (1.0 - y / lam) * mask
            loss = (lam - y * ti.log(lam)) * mask
        else:
            d = pred - meas
            grad = ti.static(self.weight) * d
            loss = ti.static(0.5 * self.weight) * d * d
        return grad, loss

    @ti.kernel
    def _residual(self, nb: ti.i32, batch_scale: ti.f32):
        for b, r, c in ti.ndrange(nb, self.projector.height, self.projector.row_blocks):
            k = self.projector.batch[b]
            grad, _ = self._terms(k, r, c)
            self.projector.image_grad[k, r, c] = grad * batch_scale

    def residual(self, nb: int, batch_scale: float) -> None:
        """dL/dimage of the projector's current batch, scaled by n_proj / batch size."""
        self._residual(nb, batch_scale)

    @ti.kernel
    def _loss(self, nb: ti.i32):
        # One task per projection and a fixed summation order: identical values run to run.
        for item in range(nb * CPU_TASK_SPREAD):
            if item % CPU_TASK_SPREAD == 0:
                b = item // CPU_TASK_SPREAD
                k = self.projector.batch[b]
                total = 0.0
                for r, c in ti.ndrange(self.projector.height, self.projector.row_blocks):
                    _, loss = self._terms(k, r, c)
                    total += loss.sum()
                self.loss_per_projection[b] = total

    def loss_value(self) -> float:
        """The loss of the projector's current batch per pixel (χ²/2 per pixel for L2)."""
        nb = self.projector.batch_size
        self._loss(nb)
        per = self.loss_per_projection.to_numpy()[:nb].astype(np.float64)
        return float(per.sum() / (nb * self.projector.height * self.projector.width))
