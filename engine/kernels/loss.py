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

Interface: the loss reads and writes images only through fields handed to `FitTarget`, in the packed
layout of `engine.kernels.projector` (`pack_images`): ``image`` (the rendered atoms I_k, read) and
``image_grad`` (dL/dimage, written) of shape (n, H, ⌈W/8⌉) of LANES-vectors, indexed by projection,
and ``batch``, an i32 field whose first nb entries are the projection indices of the current batch.
A `TiltSeriesProjector`'s ``image``, ``image_grad`` and ``batch`` are such fields. The float type of
every field and kernel is that of ``image``. The kernels come from `_kernels`, built once per float
type and given the target and the fields as template arguments.
"""

import functools

import numpy as np
import taichi as ti

from engine.core.backend import current_arch
from engine.kernels.projector import (CPU_TASK_SPREAD, FLOAT64_UNSUPPORTED, LANES, blocks_per_row, float_types,
                                      pack_images, supports_float64)

LOSSES = ("l2", "huber", "poisson")
# The data model's constants of the loss kernels, in the order of `FitTarget.constants`.
CONSTANTS = ("gain", "scale", "background", "gain_scale", "root_weight", "weight", "half_weight")
GAIN, SCALE, BACKGROUND, GAIN_SCALE, ROOT_WEIGHT, WEIGHT, HALF_WEIGHT = range(len(CONSTANTS))
HUBER_DELTA = 3.0  # noise σ: residuals beyond 3 σ are rare under Gaussian noise (0.3 %), so only outliers are tempered


@ti.data_oriented
class FitTarget:
    """Measured (normalised) projections (n, H, W) in the packed image layout, and the per-projection
    intensity scale and offset applied to the predictions in ``image``.

    image, image_grad : packed image fields (n, H, ⌈W/8⌉) of LANES-vectors, read and written by
                        `residual` (see the module docstring); their float type is the target's.
    batch             : i32 field of ≥ nb projection indices: the batch `residual` and `loss_value` cover.

    After `residual`: ``image_grad`` of the batch's projections, and ``grad_scale``, ``grad_offset``
    (n,) dL/dc_k and dL/db_k of the batch's projections.
    """

    def __init__(self, normalised: np.ndarray, loss: str, data_model, gain: float, *, image, image_grad, batch):
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r} (known: {', '.join(LOSSES)})")
        if loss == "poisson" and not (gain is not None and gain > 0):
            raise ValueError("the Poisson loss needs the detector gain (counts per data unit)")
        self.dtype, self.np_dtype = float_types(image.dtype)
        if self.dtype == ti.f64 and not supports_float64():
            raise ValueError(FLOAT64_UNSUPPORTED)
        self.n_proj, self.height, self.width = np.shape(normalised)
        self.row_blocks = blocks_per_row(self.width)
        packed = (self.n_proj, self.height, self.row_blocks)
        for name, field in (("image", image), ("image_grad", image_grad)):
            if tuple(field.shape) != packed or getattr(field, "n", None) != LANES or field.dtype != self.dtype:
                raise ValueError(f"{name} must be a field of shape {packed} of {LANES}-vectors of "
                                 f"{self.np_dtype.__name__} for images of shape {np.shape(normalised)}")
        if batch.dtype != ti.i32 or len(batch.shape) != 1:
            raise ValueError("batch must be a 1-D i32 field")
        self.image, self.image_grad, self.batch = image, image_grad, batch
        self.on_cpu = current_arch() == "cpu"
        self.loss = loss
        # The data model's constants are read by the kernels at run time, so one target (and its
        # compiled kernels) serves any data of its shape and loss (`engine.fit.problem`'s reuse).
        self.constants = ti.field(self.dtype, len(CONSTANTS))
        self.set_data_model(data_model, gain)
        self.measured = ti.Vector.field(LANES, self.dtype, packed)
        self.set_measured(normalised)
        lanes = np.zeros((self.row_blocks, LANES), self.np_dtype)
        lanes.reshape(-1)[: self.width] = 1.0
        self.lane_mask = ti.Vector.field(LANES, self.dtype, self.row_blocks)
        self.lane_mask.from_numpy(lanes)
        n = self.n_proj
        self.loss_per_projection = ti.field(self.dtype, n)
        self.intensity_scale = ti.field(self.dtype, n)
        self.intensity_offset = ti.field(self.dtype, n)
        self.grad_scale = ti.field(self.dtype, n)   # dL/dc_k of the last `residual`
        self.grad_offset = ti.field(self.dtype, n)  # dL/db_k of the last `residual`
        self.rendered_sum = ti.field(self.dtype, n)  # Σ_p of the rendered atoms I_k at the last `residual`
        self.set_intensity(np.ones(n), np.zeros(n))

    def set_data_model(self, data_model, gain) -> None:
        """The noise σ_n, scale and background of ``data_model`` and the detector ``gain`` (counts per
        data unit; the Poisson loss alone uses it and the scale and background)."""
        self.weight = 1.0 / data_model.noise**2
        self.root_weight = float(np.sqrt(self.weight))
        self.gain = float(gain) if gain is not None else 0.0
        self.scale = float(data_model.scale)
        self.background = float(data_model.background)
        values = {"gain": self.gain, "scale": self.scale, "background": self.background,
                  "gain_scale": self.gain * self.scale, "root_weight": self.root_weight, "weight": self.weight,
                  "half_weight": 0.5 * self.weight}
        self.constants.from_numpy(np.array([values[name] for name in CONSTANTS], self.np_dtype))

    def set_measured(self, normalised: np.ndarray) -> None:
        """Replace the measured projections (n, H, W), normalised units."""
        if np.shape(normalised) != (self.n_proj, self.height, self.width):
            raise ValueError(f"measured projections must have shape {(self.n_proj, self.height, self.width)}, "
                             f"got {np.shape(normalised)}")
        self.measured.from_numpy(pack_images(normalised, self.np_dtype))

    def set_intensity(self, scale: np.ndarray, offset: np.ndarray | None = None) -> None:
        """Per-projection intensity scale c_k and offset b_k (normalised units) of the predictions
        (offset None: kept)."""
        self.intensity_scale.from_numpy(np.asarray(scale, self.np_dtype))
        if offset is not None:
            self.intensity_offset.from_numpy(np.asarray(offset, self.np_dtype))

    def offsets(self) -> np.ndarray:
        """The per-projection offsets b_k (normalised units), float64."""
        return self.intensity_offset.to_numpy().astype(np.float64)

    def fit_offsets(self, nb: int, batch_scale: float) -> None:
        """Move the batch's offsets b_k to the least-squares optimum for the rendering of the last
        `residual` (called with the same ``batch_scale``): a Newton step with the exact curvature of the
        L2 loss, w · H · W per projection; for Huber the same step, a bound on its curvature, never
        overshoots. The background of data whose images are never empty (films, supports) is fitted
        this way, exactly and without a learning rate, on the device."""
        if self.loss == "poisson":
            raise ValueError("offsets are fitted in closed form for the Gaussian losses only")
        _kernels(self.np_dtype.__name__)[2](self, self.batch, nb, self.offset_curvature(batch_scale))

    def offset_curvature(self, batch_scale: float) -> float:
        """The curvature of the loss in one projection's offset (`fit_offsets`)."""
        return self.weight * self.height * self.width * batch_scale

    @ti.func
    def _terms(self, image, k, r, c):
        """(dL/dpred, L) per lane of one pixel block, and the rendered atoms there; padding lanes give 0.
        Constants go through ``self.dtype``: a bare float literal would be float32."""
        rendered = image[k, r, c]
        pred = self.intensity_scale[k] * rendered + self.intensity_offset[k]
        meas = self.measured[k, r, c]
        mask = self.lane_mask[c]
        grad = ti.Vector.zero(self.dtype, LANES)
        loss = ti.Vector.zero(self.dtype, LANES)
        if ti.static(self.loss == "poisson"):
            g, s, b = self.constants[GAIN], self.constants[SCALE], self.constants[BACKGROUND]
            floor = self.dtype(1e-6)
            expected = g * (s * pred + b)
            lam = ti.max(expected, floor)
            y = g * (s * meas + b)
            grad = ti.select(expected > floor, self.constants[GAIN_SCALE] * (1.0 - y / lam), 0.0)  # flat where clamped
            loss = lam - y * ti.log(lam)
        elif ti.static(self.loss == "huber"):
            root_w = self.constants[ROOT_WEIGHT]
            r_sigma = (pred - meas) * root_w
            inside = ti.abs(r_sigma) <= HUBER_DELTA
            grad = ti.select(inside, r_sigma, HUBER_DELTA * ti.math.sign(r_sigma)) * root_w
            loss = ti.select(inside, 0.5 * r_sigma * r_sigma, HUBER_DELTA * ti.abs(r_sigma) - 0.5 * HUBER_DELTA**2)
        else:
            d = pred - meas
            grad = self.constants[WEIGHT] * d
            loss = self.constants[HALF_WEIGHT] * d * d
        return grad * mask, loss * mask, rendered

    @ti.func
    def _residual_block(self, image, image_grad, k, r, c, batch_scale):
        """Writes dL/dimage of one block; returns its shares of dL/dc_k, dL/db_k and Σ I_k."""
        grad, _, rendered = self._terms(image, k, r, c)
        image_grad[k, r, c] = grad * (self.intensity_scale[k] * batch_scale)
        return (grad * rendered).sum() * batch_scale, grad.sum() * batch_scale, (rendered * self.lane_mask[c]).sum()

    def residual(self, nb: int, batch_scale: float) -> None:
        """dL/dimage of the batch's first ``nb`` projections into ``image_grad``, scaled by
        ``batch_scale`` (n_proj / batch size for a mini-batch), and their dL/dc_k, dL/db_k in
        ``grad_scale``, ``grad_offset`` (scaled alike)."""
        _kernels(self.np_dtype.__name__)[0](self, self.image, self.image_grad, self.batch, nb, batch_scale)

    def loss_value(self, nb: int) -> float:
        """The loss of the batch's first ``nb`` projections per pixel (χ²/2 per pixel for L2)."""
        _kernels(self.np_dtype.__name__)[1](self, self.image, self.batch, nb)
        per = self.loss_per_projection.to_numpy()[:nb].astype(np.float64)
        return float(per.sum() / (nb * self.height * self.width))

    def intensity_gradients(self) -> dict:
        """'scale' and 'offset' (n,): dL/dc_k and dL/db_k of the last `residual`, and 'rendered' (n,):
        Σ_p I_k of the atoms then rendered, as float64 (entries outside its batch are stale)."""
        return {"scale": self.grad_scale.to_numpy().astype(np.float64),
                "offset": self.grad_offset.to_numpy().astype(np.float64),
                "rendered": self.rendered_sum.to_numpy().astype(np.float64)}


@ti.func
def residual_projection(target: ti.template(), image: ti.template(), image_grad: ti.template(), k, batch_scale):
    """dL/dimage of projection k and its dL/dc_k, dL/db_k and Σ I_k, by one thread (the residual
    kernel's CPU task, and the fused step's: `engine.kernels.step`)."""
    gc = target.dtype(0.0)
    gb = target.dtype(0.0)
    total = target.dtype(0.0)
    for r, c in ti.ndrange(target.height, target.row_blocks):
        dc, db, ds = target._residual_block(image, image_grad, k, r, c, batch_scale)
        gc += dc
        gb += db
        total += ds
    target.grad_scale[k] = gc
    target.grad_offset[k] = gb
    target.rendered_sum[k] = total


@ti.func
def offset_step(target: ti.template(), k, curvature):
    """The `FitTarget.fit_offsets` Newton step of projection k's offset."""
    target.intensity_offset[k] -= target.grad_offset[k] / curvature


@functools.lru_cache(maxsize=None)
def _kernels(dtype_name: str):
    """The residual and loss kernels for one float type ('float32' or 'float64'). Taichi fixes a
    kernel's scalar argument types when it is defined, hence one pair per type; the target and its
    fields are template arguments, so every target shares them (compiled once per target)."""
    dtype = float_types(dtype_name)[0]

    @ti.kernel
    def residual(target: ti.template(), image: ti.template(), image_grad: ti.template(), batch: ti.template(),
                 nb: ti.i32, batch_scale: dtype):
        if ti.static(target.on_cpu):
            # One task per projection: the intensity gradients are sums over its pixels in a fixed
            # order (identical run to run, no atomics).
            for item in range(nb * CPU_TASK_SPREAD):
                if item % CPU_TASK_SPREAD == 0:
                    residual_projection(target, image, image_grad, batch[item // CPU_TASK_SPREAD], batch_scale)
        else:  # GPUs: a thread per block, sums by atomics (issued by the block's own thread, not in a nested loop)
            for b in range(nb):
                target.grad_scale[batch[b]] = 0.0
                target.grad_offset[batch[b]] = 0.0
                target.rendered_sum[batch[b]] = 0.0
            for b, r, c in ti.ndrange(nb, target.height, target.row_blocks):
                k = batch[b]
                dc, db, ds = target._residual_block(image, image_grad, k, r, c, batch_scale)
                ti.atomic_add(target.grad_scale[k], dc)
                ti.atomic_add(target.grad_offset[k], db)
                ti.atomic_add(target.rendered_sum[k], ds)

    @ti.kernel
    def loss(target: ti.template(), image: ti.template(), batch: ti.template(), nb: ti.i32):
        # One task per projection and a fixed summation order: identical values run to run.
        for item in range(nb * CPU_TASK_SPREAD):
            if item % CPU_TASK_SPREAD == 0:
                b = item // CPU_TASK_SPREAD
                k = batch[b]
                total = dtype(0.0)
                for r, c in ti.ndrange(target.height, target.row_blocks):
                    _, value, _ = target._terms(image, k, r, c)
                    total += value.sum()
                target.loss_per_projection[b] = total

    @ti.kernel
    def newton_offsets(target: ti.template(), batch: ti.template(), nb: ti.i32, curvature: dtype):
        for b in range(nb):
            offset_step(target, batch[b], curvature)

    return residual, loss, newton_offsets
