"""The data term of a fit: measured projections on the device, the residual → dL/dimage kernel and
the loss value.

The prediction of projection k is c_k I_k + b_k: the rendered atoms I_k times an intensity scale
c_k plus a background offset b_k (normalised units; 1 and 0 unless alignment refinement fits them,
for drifting beam current and background). Losses, over the batch's pixels:
- l2:      L = ½ Σ r², r = (pred − D)/σ_n (σ_n the estimated noise); reported as χ²/2 per pixel,
           ≈ 0.5 when only noise is left.
- huber:   L = Σ ρ(r) with ρ(r) = ½ r² for |r| ≤ HUBER_DELTA and δ|r| − ½δ² beyond: Gaussian noise with
           outlier pixels (hot pixels, dust, stitching seams) that should pull linearly, not quadratically.
- poisson: L = Σ λ − y log λ with λ = g (s pred + β) and y = g (s D + β) the expected and measured
           counts (g counts per data unit, s and β the estimated scale and background); per pixel.
"""


import numpy as np
import taichi as ti

from engine.core.errors import InputError
from engine.kernels.projector import CPU_TASK_SPREAD, LANES, TiltSeriesProjector, pack_images

LOSSES = ("l2", "huber", "poisson")
HUBER_DELTA = 3.0  # noise σ: residuals beyond 3 σ are rare under Gaussian noise (0.3 %), so only outliers are tempered


@ti.data_oriented
class FitTarget:
    """Measured (normalised) projections aligned with a projector's packed image layout, and the
    per-projection intensity scale and offset applied to its predictions."""

    def __init__(self, projector: TiltSeriesProjector, normalised: np.ndarray, loss: str, data_model, gain: float):
        if loss not in LOSSES:
            raise InputError("--noise", f"unknown loss {loss!r} (known: {', '.join(LOSSES)})")
        if loss == "poisson" and not gain > 0:
            raise InputError("--gain", "the Poisson loss needs the detector gain (counts per data unit)")
        self.projector = projector
        self.loss = loss
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
        n = projector.n_proj
        self.loss_per_projection = ti.field(ti.f32, n)
        self.intensity_scale = ti.field(ti.f32, n)
        self.intensity_offset = ti.field(ti.f32, n)
        self.grad_scale = ti.field(ti.f32, n)   # dL/dc_k of the last `residual`
        self.grad_offset = ti.field(ti.f32, n)  # dL/db_k of the last `residual`
        self.set_intensity(np.ones(n), np.zeros(n))

    def set_measured(self, normalised: np.ndarray) -> None:
        """Replace the measured projections (n, H, W), normalised units."""
        self.measured.from_numpy(pack_images(normalised))

    def set_intensity(self, scale: np.ndarray, offset: np.ndarray) -> None:
        """Per-projection intensity scale c_k and offset b_k (normalised units) of the predictions."""
        self.intensity_scale.from_numpy(np.asarray(scale, np.float32))
        self.intensity_offset.from_numpy(np.asarray(offset, np.float32))

    @ti.func
    def _terms(self, k, r, c):
        """(dL/dpred, L) per lane of one pixel block, and the rendered atoms there; padding lanes give 0."""
        rendered = self.projector.image[k, r, c]
        pred = self.intensity_scale[k] * rendered + self.intensity_offset[k]
        meas = self.measured[k, r, c]
        mask = self.lane_mask[c]
        grad = ti.Vector.zero(ti.f32, LANES)
        loss = ti.Vector.zero(ti.f32, LANES)
        if ti.static(self.loss == "poisson"):
            g, s, b = ti.static(self.gain, self.scale, self.background)
            expected = g * (s * pred + b)
            lam = ti.max(expected, 1e-6)
            y = g * (s * meas + b)
            grad = ti.select(expected > 1e-6, g * s * (1.0 - y / lam), 0.0)  # flat where clamped
            loss = lam - y * ti.log(lam)
        elif ti.static(self.loss == "huber"):
            root_w = ti.static(float(np.sqrt(self.weight)))
            r_sigma = (pred - meas) * root_w
            inside = ti.abs(r_sigma) <= HUBER_DELTA
            grad = ti.select(inside, r_sigma, HUBER_DELTA * ti.math.sign(r_sigma)) * root_w
            loss = ti.select(inside, 0.5 * r_sigma * r_sigma, HUBER_DELTA * ti.abs(r_sigma) - 0.5 * HUBER_DELTA**2)
        else:
            d = pred - meas
            grad = ti.static(self.weight) * d
            loss = ti.static(0.5 * self.weight) * d * d
        return grad * mask, loss * mask, rendered

    @ti.func
    def _residual_block(self, k, r, c, batch_scale):
        """Writes dL/dimage of one block; returns its shares of dL/dc_k and dL/db_k."""
        grad, _, rendered = self._terms(k, r, c)
        self.projector.image_grad[k, r, c] = grad * (self.intensity_scale[k] * batch_scale)
        return (grad * rendered).sum() * batch_scale, grad.sum() * batch_scale

    @ti.kernel
    def _residual(self, nb: ti.i32, batch_scale: ti.f32):
        if ti.static(self.projector.on_cpu):
            # One task per projection: the intensity gradients are sums over its pixels in a fixed
            # order (identical run to run, no atomics).
            for item in range(nb * CPU_TASK_SPREAD):
                if item % CPU_TASK_SPREAD == 0:
                    k = self.projector.batch[item // CPU_TASK_SPREAD]
                    gc = 0.0
                    gb = 0.0
                    for r, c in ti.ndrange(self.projector.height, self.projector.row_blocks):
                        dc, db = self._residual_block(k, r, c, batch_scale)
                        gc += dc
                        gb += db
                    self.grad_scale[k] = gc
                    self.grad_offset[k] = gb
        else:  # GPUs: a thread per block, sums by atomics
            for b in range(nb):
                self.grad_scale[self.projector.batch[b]] = 0.0
                self.grad_offset[self.projector.batch[b]] = 0.0
            for b, r, c in ti.ndrange(nb, self.projector.height, self.projector.row_blocks):
                k = self.projector.batch[b]
                dc, db = self._residual_block(k, r, c, batch_scale)
                ti.atomic_add(self.grad_scale[k], dc)
                ti.atomic_add(self.grad_offset[k], db)

    def residual(self, nb: int, batch_scale: float) -> None:
        """dL/dimage of the projector's current batch, scaled by n_proj / batch size, and dL/dc_k,
        dL/db_k of its projections in ``grad_scale``, ``grad_offset``."""
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
                    _, loss, _ = self._terms(k, r, c)
                    total += loss.sum()
                self.loss_per_projection[b] = total

    def loss_value(self) -> float:
        """The loss of the projector's current batch per pixel (χ²/2 per pixel for L2)."""
        nb = self.projector.batch_size
        self._loss(nb)
        per = self.loss_per_projection.to_numpy()[:nb].astype(np.float64)
        return float(per.sum() / (nb * self.projector.height * self.projector.width))
