"""Differentiable parallel-beam projector for isotropic 3D Gaussians, with hand-written adjoints.

Model (additive, a projection is a line integral; no alpha blending):

    image_k(x', y') = Σ_g a_g / (2π s_g²) · exp(−|(x', y') − π_k(p_g)|² / (2 s_g²)),  s_g² = σ_g² + b²

p_g position (Å), a_g amplitude (integrated projected weight: image units · Å², independent of the
width), σ_g width (Å), b the microscope blur (Å), π_k the projection of `engine.geometry` (rotation,
then in-plane shift). Pixel values are point samples of that continuous image at pixel centres (no
integration over the pixel area, as abTEM's data are sampled); for s below ~0.5 px point sampling
aliases, so keep the blur at a realistic ≥ 0.5 px.

Each footprint is truncated at the radius where the Gaussian falls to 1e-4 of its peak (4.29 s), so
a pixel's value is off by at most 1e-4 of one Gaussian's peak. The exponential is separable: one
exp per footprint row and a two-multiply recurrence along the row,
e(x+1) = e(x) · q(x), q(x+1) = q(x) · exp(−1/s²).

Parallel decomposition: on the CPU each thread renders whole projections (plain adds, no atomics,
bit-identical run to run); on GPUs every (projection, Gaussian) pair is a thread and the forward
scatter uses atomic adds. The adjoint gathers per pair into a private slot and reduces per Gaussian
and per projection in fixed order, so it never needs atomics.
"""



import math

import numpy as np
import taichi as ti

from .backend import current_arch
from .geometry import TiltGeometry

# Footprint radius in units of s: exp(−R²/2) = 1e-4.
TRUNCATION_RADIUS_SIGMAS = math.sqrt(2.0 * math.log(1e4))
TRUNCATION_RELATIVE_ERROR = 1e-4


@ti.data_oriented
class GaussianCloud:
    """Device fields of N isotropic 3D Gaussians and their gradients.

    pos (Å, world frame), amp (integrated weight, image units · Å²), sigma (Å); grad_* hold dL/d·.
    Fields are allocated for ``capacity`` Gaussians; the first ``count`` are live.
    """

    def __init__(self, capacity: int):
        self.capacity = max(int(capacity), 1)
        self.count = 0
        self.pos = ti.Vector.field(3, ti.f32, self.capacity)
        self.amp = ti.field(ti.f32, self.capacity)
        self.sigma = ti.field(ti.f32, self.capacity)
        self.grad_pos = ti.Vector.field(3, ti.f32, self.capacity)
        self.grad_amp = ti.field(ti.f32, self.capacity)
        self.grad_sigma = ti.field(ti.f32, self.capacity)

    def set(self, positions, amplitudes, sigmas) -> None:
        """Upload N Gaussians (NumPy arrays: (N, 3) Å, (N,), (N,) Å); N must fit the capacity."""
        positions = np.asarray(positions, dtype=np.float32).reshape(-1, 3)
        n = len(positions)
        if n > self.capacity:
            raise ValueError(f"{n} Gaussians exceed the cloud's capacity {self.capacity}")
        pad = self.capacity - n
        self.pos.from_numpy(np.pad(positions, ((0, pad), (0, 0))))
        self.amp.from_numpy(np.pad(np.broadcast_to(np.asarray(amplitudes, np.float32), (n,)), (0, pad)))
        self.sigma.from_numpy(np.pad(np.broadcast_to(np.asarray(sigmas, np.float32), (n,)), (0, pad),
                                     constant_values=1.0))
        self.count = n

    def gradients(self) -> dict[str, np.ndarray]:
        n = self.count
        return {"pos": self.grad_pos.to_numpy()[:n].astype(np.float64),
                "amp": self.grad_amp.to_numpy()[:n].astype(np.float64),
                "sigma": self.grad_sigma.to_numpy()[:n].astype(np.float64)}


@ti.data_oriented
class TiltSeriesProjector:
    """Renders (a mini-batch of) the projections of a `GaussianCloud` and back-propagates dL/dimage.

    geometry   : `TiltGeometry` of the n projections (rotations, shifts Å, tilt axes).
    shape      : (H, W) image size, pixels.
    pixel_size : Å per pixel.
    blur_sigma : microscope blur b (Å), added in quadrature to every Gaussian's width.
    capacity   : the largest number of Gaussians the adjoint buffers must hold.

    Fields: ``image`` (n, H, W) predicted projections, ``image_grad`` (n, H, W) dL/dimage (written by
    the caller or a loss kernel), ``grad_shift`` (n, 2) dL/dshift (per Å), ``grad_angle`` (n,)
    dL/d(tilt-angle offset) (per degree, about each projection's tilt axis).
    """

    def __init__(self, geometry: TiltGeometry, shape, pixel_size: float, blur_sigma: float = 0.0,
                 capacity: int = 1):
        self.n_proj = len(geometry)
        self.height, self.width = (int(v) for v in shape)
        self.pixel_size = float(pixel_size)
        self.blur_sigma = float(blur_sigma)
        # CPU: one thread per projection without atomics (deterministic); GPU: one per (projection, Gaussian).
        self.scatter_atomic = current_arch() != "cpu"
        self.rot = ti.Matrix.field(3, 3, ti.f32, self.n_proj)
        self.shift = ti.Vector.field(2, ti.f32, self.n_proj)
        self.axis = ti.Vector.field(2, ti.f32, self.n_proj)
        self.image = ti.field(ti.f32, (self.n_proj, self.height, self.width))
        self.image_grad = ti.field(ti.f32, (self.n_proj, self.height, self.width))
        self.grad_shift = ti.Vector.field(2, ti.f32, self.n_proj)
        self.grad_angle = ti.field(ti.f32, self.n_proj)
        self.batch = ti.field(ti.i32, self.n_proj)
        self.batch_size = 0
        self.pair_capacity = 0
        self.ensure_capacity(capacity)
        self.set_geometry(geometry)
        self.set_batch(np.arange(self.n_proj))

    def ensure_capacity(self, capacity: int) -> None:
        """(Re)allocate the per-(projection, Gaussian) adjoint buffer for at least ``capacity`` Gaussians."""
        if capacity > self.pair_capacity:
            self.pair_capacity = int(capacity)
            # dL/du, dL/dv (per Å), dL/da, dL/d(s²) (per Å²) of every (batch slot, Gaussian) pair.
            self.pair_grad = ti.Vector.field(4, ti.f32, (self.n_proj, self.pair_capacity))

    def set_geometry(self, geometry: TiltGeometry) -> None:
        arrays = geometry.kernel_arrays()
        self.rot.from_numpy(arrays["rotations"])
        self.shift.from_numpy(arrays["shifts"])
        self.axis.from_numpy(arrays["tilt_axes"])

    def set_batch(self, indices) -> None:
        """Choose which projections the next forward/backward pass renders (projection indices)."""
        indices = np.asarray(indices, dtype=np.int32).reshape(-1)
        if len(indices) == 0 or indices.min() < 0 or indices.max() >= self.n_proj:
            raise ValueError(f"batch indices must lie in [0, {self.n_proj}), got {indices}")
        padded = np.zeros(self.n_proj, np.int32)
        padded[: len(indices)] = indices
        self.batch.from_numpy(padded)
        self.batch_size = len(indices)

    # ---------------------------------------------------------------- shared per-pair geometry
    @ti.func
    def _footprint(self, k, p, sigma):
        """Centre (col, row) in pixels, s² in px², and the Gaussian's normalization 1/(2π s²) (Å⁻²)."""
        ps = ti.static(self.pixel_size)
        q = self.rot[k] @ p
        col = (q[0] + self.shift[k][0]) / ps + ti.static((self.width - 1) * 0.5)
        row = (q[1] + self.shift[k][1]) / ps + ti.static((self.height - 1) * 0.5)
        s2_a = sigma * sigma + ti.static(self.blur_sigma ** 2)
        return col, row, s2_a / (ps * ps), 1.0 / (2.0 * math.pi * s2_a), q[2]

    @ti.func
    def _rows(self, row, s2):
        radius = ti.static(TRUNCATION_RADIUS_SIGMAS) * ti.sqrt(s2)
        r0 = ti.max(ti.cast(ti.ceil(row - radius), ti.i32), 0)
        r1 = ti.min(ti.cast(ti.floor(row + radius), ti.i32), self.height - 1)
        return radius, r0, r1

    @ti.func
    def _cols(self, col, radius, dy):
        half = ti.sqrt(ti.max(radius * radius - dy * dy, 0.0))
        c0 = ti.max(ti.cast(ti.ceil(col - half), ti.i32), 0)
        c1 = ti.min(ti.cast(ti.floor(col + half), ti.i32), self.width - 1)
        return c0, c1

    # ---------------------------------------------------------------- forward
    @ti.func
    def _splat(self, k, p, a, sigma):
        col, row, s2, norm, _ = self._footprint(k, p, sigma)
        inv2s2 = 0.5 / s2
        step = ti.exp(-2.0 * inv2s2)
        radius, r0, r1 = self._rows(row, s2)
        for r in range(r0, r1 + 1):
            dy = r - row
            c0, c1 = self._cols(col, radius, dy)
            dx = c0 - col
            e = a * norm * ti.exp(-(dy * dy + dx * dx) * inv2s2)
            q = ti.exp(-(2.0 * dx + 1.0) * inv2s2)
            for c in range(c0, c1 + 1):
                if ti.static(self.scatter_atomic):
                    ti.atomic_add(self.image[k, r, c], e)
                else:
                    self.image[k, r, c] = self.image[k, r, c] + e
                e *= q
                q *= step

    @ti.kernel
    def _forward(self, cloud: ti.template(), n: ti.i32, nb: ti.i32):
        for b, r, c in ti.ndrange(nb, self.height, self.width):
            self.image[self.batch[b], r, c] = 0.0
        if ti.static(self.scatter_atomic):
            for b, g in ti.ndrange(nb, n):
                self._splat(self.batch[b], cloud.pos[g], cloud.amp[g], cloud.sigma[g])
        else:
            for b in range(nb):
                k = self.batch[b]
                for g in range(n):
                    self._splat(k, cloud.pos[g], cloud.amp[g], cloud.sigma[g])

    def forward(self, cloud: GaussianCloud) -> None:
        """Render the current batch of projections of ``cloud`` into ``image``."""
        self._forward(cloud, cloud.count, self.batch_size)

    # ---------------------------------------------------------------- adjoint
    @ti.func
    def _gather(self, k, p, a, sigma):
        """Σ over the footprint of dL/dimage times the Gaussian's partial derivatives."""
        col, row, s2, norm, _ = self._footprint(k, p, sigma)
        inv2s2 = 0.5 / s2
        step = ti.exp(-2.0 * inv2s2)
        radius, r0, r1 = self._rows(row, s2)
        a0 = 0.0  # Σ G E
        ax = 0.0  # Σ G E dx
        ay = 0.0  # Σ G E dy
        ar = 0.0  # Σ G E (dx² + dy²)
        for r in range(r0, r1 + 1):
            dy = r - row
            c0, c1 = self._cols(col, radius, dy)
            dx = c0 - col
            e = ti.exp(-dx * dx * inv2s2)
            q = ti.exp(-(2.0 * dx + 1.0) * inv2s2)
            s0 = 0.0
            s1 = 0.0
            s2x = 0.0
            for c in range(c0, c1 + 1):
                t = self.image_grad[k, r, c] * e
                s0 += t
                s1 += t * dx
                s2x += t * dx * dx
                e *= q
                q *= step
                dx += 1.0
            ey = ti.exp(-dy * dy * inv2s2)
            a0 += ey * s0
            ax += ey * s1
            ay += ey * dy * s0
            ar += ey * (s2x + dy * dy * s0)
        ps = ti.static(self.pixel_size)
        s2_a = s2 * ps * ps
        # Chain rule to Å: E = exp(−r_px² / (2 s_px²)), dE/du = E dx_px / (s_px² ps).
        return ti.Vector([a * norm * ax / (s2 * ps), a * norm * ay / (s2 * ps), norm * a0,
                          a * norm * (-a0 / s2_a + ar * ps * ps / (2.0 * s2_a * s2_a))])

    @ti.kernel
    def _backward_pairs(self, cloud: ti.template(), pairs: ti.template(), n: ti.i32, nb: ti.i32):
        for b, g in ti.ndrange(nb, n):
            pairs[b, g] = self._gather(self.batch[b], cloud.pos[g], cloud.amp[g], cloud.sigma[g])

    @ti.kernel
    def _reduce_per_gaussian(self, cloud: ti.template(), pairs: ti.template(), n: ti.i32, nb: ti.i32):
        for g in range(n):
            gp = ti.Vector([0.0, 0.0, 0.0])
            ga = 0.0
            gs2 = 0.0
            for b in range(nb):
                k = self.batch[b]
                d = pairs[b, g]
                gp += d[0] * ti.Vector([self.rot[k][0, 0], self.rot[k][0, 1], self.rot[k][0, 2]])
                gp += d[1] * ti.Vector([self.rot[k][1, 0], self.rot[k][1, 1], self.rot[k][1, 2]])
                ga += d[2]
                gs2 += d[3]
            cloud.grad_pos[g] = gp
            cloud.grad_amp[g] = ga
            cloud.grad_sigma[g] = gs2 * 2.0 * cloud.sigma[g]

    @ti.kernel
    def _reduce_per_projection(self, cloud: ti.template(), pairs: ti.template(), n: ti.i32, nb: ti.i32):
        for b in range(nb):
            k = self.batch[b]
            gsh = ti.Vector([0.0, 0.0])
            gang = 0.0
            for g in range(n):
                d = pairs[b, g]
                z = (self.rot[k] @ cloud.pos[g])[2]
                gsh += ti.Vector([d[0], d[1]])
                # Rotating by δ about the in-plane axis (a_x, a_y, 0) moves (u, v) by δ z' (a_y, −a_x).
                gang += z * (d[0] * self.axis[k][1] - d[1] * self.axis[k][0])
            self.grad_shift[k] = gsh
            self.grad_angle[k] = gang * ti.static(math.pi / 180.0)

    def backward(self, cloud: GaussianCloud, alignment: bool = True) -> None:
        """From ``image_grad`` of the current batch, write the cloud's grad_* fields and, with
        ``alignment``, ``grad_shift`` and ``grad_angle`` of the batch's projections."""
        self.ensure_capacity(cloud.capacity)
        args = (cloud, self.pair_grad, cloud.count, self.batch_size)
        self._backward_pairs(*args)
        self._reduce_per_gaussian(*args)
        if alignment:
            self._reduce_per_projection(*args)


def _prepare(positions, amplitudes, sigmas, geometry, shape, pixel_size, blur_sigma, indices):
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    cloud = GaussianCloud(len(positions))
    cloud.set(positions, amplitudes, sigmas)
    projector = TiltSeriesProjector(geometry, shape, pixel_size, blur_sigma, capacity=cloud.capacity)
    indices = np.arange(len(geometry)) if indices is None else np.asarray(indices).reshape(-1)
    projector.set_batch(indices)
    return cloud, projector, indices


def project_tilt_series(positions, amplitudes, sigmas, geometry: TiltGeometry, shape, pixel_size: float,
                        blur_sigma: float = 0.0, indices=None) -> np.ndarray:
    """Projections (len(indices), H, W) of Gaussians at ``positions`` (N, 3) Å with amplitudes (N,)
    (image units · Å²) and widths ``sigmas`` (N,) Å, blurred by ``blur_sigma`` Å. NumPy in, NumPy out;
    the engine keeps its data on the device and calls `TiltSeriesProjector` directly."""
    cloud, projector, indices = _prepare(positions, amplitudes, sigmas, geometry, shape, pixel_size,
                                         blur_sigma, indices)
    projector.forward(cloud)
    return projector.image.to_numpy()[indices]


def project_tilt_series_adjoint(positions, amplitudes, sigmas, geometry: TiltGeometry, shape, pixel_size: float,
                                image_grad, blur_sigma: float = 0.0, indices=None) -> dict[str, np.ndarray]:
    """Gradients of L given dL/dimage (len(indices), H, W): 'pos' (N, 3) per Å, 'amp' (N,),
    'sigma' (N,) per Å, 'shift' (len(indices), 2) per Å, 'angle' (len(indices),) per degree."""
    cloud, projector, indices = _prepare(positions, amplitudes, sigmas, geometry, shape, pixel_size,
                                         blur_sigma, indices)
    full = np.zeros((projector.n_proj, projector.height, projector.width), np.float32)
    full[indices] = np.asarray(image_grad, dtype=np.float32)
    projector.image_grad.from_numpy(full)
    projector.backward(cloud)
    grads = cloud.gradients()
    grads["shift"] = projector.grad_shift.to_numpy()[indices].astype(np.float64)
    grads["angle"] = projector.grad_angle.to_numpy()[indices].astype(np.float64)
    return grads
