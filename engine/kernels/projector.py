"""Differentiable parallel-beam projector for isotropic 3D Gaussians, with hand-written adjoints.

Model (additive, a projection is a line integral; no alpha blending):

    image_k(x', y') = Σ_g a_g / (2π s_g²) · exp(−|(x', y') − π_k(p_g)|² / (2 s_g²)),  s_g² = σ_g² + b²

p_g position (Å), a_g amplitude (integrated projected weight: image units · Å², independent of the
width), σ_g width (Å), b the microscope blur (Å), π_k the projection of `engine.geometry` (rotation,
then in-plane shift). Pixel values are point samples of that continuous image at pixel centres, as
abTEM's data are sampled; no integration over the pixel area. Below s ≈ 0.5 px point sampling
aliases, so keep the blur at a realistic ≥ 0.5 px.

Truncation: each footprint is the square |dx|, |dy| ≤ 4.80 s around the centre, where the Gaussian
has fallen to 1e-5 of its peak; a pixel's value is therefore off by at most 1e-5 of one Gaussian's
peak per overlapping Gaussian.

Speed: images are stored as rows of 8-pixel blocks (`LANES`), so every footprint row is a few SIMD
vector operations on every backend. The exponential is separable and is evaluated by a recurrence
that walks across the footprint from its edge, e(d + 1) = e(d) · q, q ← q · exp(−1/s²): a handful
of exp calls per (projection, Gaussian) pair instead of one per pixel. That is the CPU's way; GPUs
take one exp per footprint row and column instead (see `_gaussian`).

Parallel decomposition: on the CPU each thread renders whole projections with plain adds (no
atomics, bit-identical run to run); on GPUs every (projection, Gaussian) pair is a thread and the
forward scatter uses atomic adds. The adjoint gathers each pair into a private slot and reduces per
Gaussian and per projection in a fixed order, so it needs no atomics anywhere.

Precision: every class takes ``dtype`` (ti.f32, the default, or ti.f64; NumPy float types are
accepted too). Every field, kernel-local accumulator and constant follows it; Taichi would otherwise
type bare float literals and `ti.Vector([0.0, …])` as f32 whatever the fields are, so constants go
through ``self.dtype(value)``. Float64 runs on the CPU and CUDA backends; Vulkan has no 64-bit exp
(SPIR-V's GLSL.std.450 takes 16- and 32-bit floats only), so there it is refused (`supports_float64`).
Float64 is for checking the adjoint against finite differences with tight tolerances, not for fits.

Compiled kernels belong to their object (a data-oriented instance compiles its own), so objects worth
reusing are shared per Taichi session by `cached_cloud` and `cached_projector`, keyed by sizes and
dtype; the NumPy entry points `project_tilt_series` and `project_tilt_series_adjoint` go through them.
"""

import math

import numpy as np
import taichi as ti

from engine.core.backend import current_arch, session_cache
from engine.core.geometry import TiltGeometry, centre_index

TRUNCATION_RELATIVE_ERROR = 1e-5
# Footprint half-width in units of s: exp(−R²/2) = 1e-5.
TRUNCATION_RADIUS_SIGMAS = math.sqrt(2.0 * math.log(1.0 / TRUNCATION_RELATIVE_ERROR))
LANES = 8  # pixels per SIMD block along an image row
CHUNK_BLOCKS = 3  # blocks of one footprint row held in registers at once (wider footprints loop)
SUM_SLOTS = CHUNK_BLOCKS + 2  # adjoint scratch vectors per pair: column sums, then dy- and dy²-weighted
# Taichi's CPU backend hands out ≥ 512 consecutive loop iterations per task; spacing per-projection
# work items this far apart gives every projection a task of its own, so both cores get work.
CPU_TASK_SPREAD = 512


FLOAT64_UNSUPPORTED = ("float64 kernels need the CPU or CUDA backend: Vulkan has no 64-bit exp or log "
                       "(SPIR-V GLSL.std.450 takes 16- and 32-bit floats only)")


def float_types(dtype) -> tuple:
    """(Taichi type, NumPy type) of a float dtype given as ti.f32/ti.f64, np.float32/np.float64 or a name."""
    if isinstance(dtype, type(ti.f32)):
        if dtype == ti.f32:
            return ti.f32, np.float32
        if dtype == ti.f64:
            return ti.f64, np.float64
    elif dtype is not None:
        np_type = np.dtype(dtype).type
        if np_type is np.float32:
            return ti.f32, np.float32
        if np_type is np.float64:
            return ti.f64, np.float64
    raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")


def supports_float64(arch: str | None = None) -> bool:
    """Whether the backend (default: the running one) can run the float64 projector and loss kernels."""
    return (arch or current_arch()) != "vulkan"


def _check_dtype(dtype):
    ti_type, np_type = float_types(dtype)
    if ti_type == ti.f64 and not supports_float64():
        raise ValueError(FLOAT64_UNSUPPORTED)
    return ti_type, np_type


def blocks_per_row(width: int) -> int:
    return (int(width) + LANES - 1) // LANES


def pack_images(images: np.ndarray, dtype=np.float32) -> np.ndarray:
    """(n, H, W) → (n, H, W/8 rounded up, 8) of ``dtype``, zero-padded: the device layout of images
    (a field of shape (n, H, W/8) of LANES-vectors)."""
    np_type = float_types(dtype)[1]
    images = np.asarray(images, dtype=np_type)
    n, h, w = images.shape
    padded = np.zeros((n, h, blocks_per_row(w) * LANES), np_type)
    padded[:, :, :w] = images
    return padded.reshape(n, h, -1, LANES)


def unpack_images(blocks: np.ndarray, width: int) -> np.ndarray:
    """Inverse of `pack_images`: (n, H, WB, 8) → (n, H, W)."""
    n, h = blocks.shape[:2]
    return blocks.reshape(n, h, -1)[:, :, :width]


@ti.data_oriented
class GaussianCloud:
    """Device fields of N isotropic 3D Gaussians and their gradients.

    pos (Å, world frame), amp (integrated weight, image units · Å²), sigma (Å); grad_* hold dL/d·.
    Fields are allocated for ``capacity`` Gaussians of ``dtype`` (ti.f32 or ti.f64); the first
    ``count`` are live.
    """

    def __init__(self, capacity: int, dtype=ti.f32):
        self.capacity = max(int(capacity), 1)
        self.count = 0
        self.dtype, self.np_dtype = _check_dtype(dtype)
        self.pos = ti.Vector.field(3, self.dtype, self.capacity)
        self.amp = ti.field(self.dtype, self.capacity)
        self.sigma = ti.field(self.dtype, self.capacity)
        self.grad_pos = ti.Vector.field(3, self.dtype, self.capacity)
        self.grad_amp = ti.field(self.dtype, self.capacity)
        self.grad_sigma = ti.field(self.dtype, self.capacity)

    def set(self, positions, amplitudes, sigmas) -> None:
        """Upload N Gaussians (NumPy arrays: (N, 3) Å, (N,), (N,) Å); N must fit the capacity."""
        dt = self.np_dtype
        positions = np.asarray(positions, dtype=dt).reshape(-1, 3)
        n = len(positions)
        if n > self.capacity:
            raise ValueError(f"{n} Gaussians exceed the cloud's capacity {self.capacity}")
        pad = self.capacity - n
        self.pos.from_numpy(np.pad(positions, ((0, pad), (0, 0))))
        self.amp.from_numpy(np.pad(np.broadcast_to(np.asarray(amplitudes, dt), (n,)), (0, pad)))
        self.sigma.from_numpy(np.pad(np.broadcast_to(np.asarray(sigmas, dt), (n,)), (0, pad),
                                     constant_values=1.0))
        self.count = n

    def gradients(self) -> dict:
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
    capacity   : the largest number of Gaussians the adjoint buffer must hold (grows on demand).
    dtype      : ti.f32 (default) or ti.f64, of every field and kernel; clouds must match it.

    Training path: `set_batch` chooses the projections, `forward` renders them into ``image``, the
    caller (or a loss kernel) writes ``image_grad``, `backward` fills the gradients. `render` draws any
    projections into NumPy through fields of its own, leaving all of that untouched.

    Fields (images in the packed layout of `pack_images`: shape (n, H, W/8 rounded up) of LANES-vectors,
    indexed by projection): ``image`` predicted projections, ``image_grad`` dL/dimage (written by the
    caller or a loss kernel; padding lanes must stay 0), ``batch`` (n,) i32 the current batch's
    projection indices in its first ``batch_size`` entries, ``grad_shift`` (n, 2) dL/dshift per Å,
    ``grad_angle`` (n,) dL/d(tilt-angle offset) per degree about each projection's tilt axis,
    ``grad_axis_angle`` (n,) each projection's share of dL/dφ per degree, φ the in-plane tilt-axis
    angle of a single-axis series (`geometry.tilt_rotation`).
    """

    def __init__(self, geometry: TiltGeometry, shape, pixel_size: float, blur_sigma: float = 0.0,
                 capacity: int = 1, dtype=ti.f32):
        self.dtype, self.np_dtype = _check_dtype(dtype)
        self.n_proj = len(geometry)
        self.height, self.width = (int(v) for v in shape)
        self.row_blocks = blocks_per_row(self.width)
        self.pixel_size = float(pixel_size)
        self.blur_sigma = float(blur_sigma)
        self.on_cpu = current_arch() == "cpu"
        self.rot = ti.Matrix.field(3, 3, self.dtype, self.n_proj)
        self.shift = ti.Vector.field(2, self.dtype, self.n_proj)
        self.axis = ti.Vector.field(2, self.dtype, self.n_proj)
        image_shape = (self.n_proj, self.height, self.row_blocks)
        self.image = ti.Vector.field(LANES, self.dtype, image_shape)
        self.image_grad = ti.Vector.field(LANES, self.dtype, image_shape)
        self.grad_shift = ti.Vector.field(2, self.dtype, self.n_proj)
        self.grad_angle = ti.field(self.dtype, self.n_proj)
        self.grad_axis_angle = ti.field(self.dtype, self.n_proj)
        self.batch = ti.field(ti.i32, self.n_proj)
        self.batch_size = 0
        self._render_fields = None  # (image, batch) of `render`, allocated on its first call
        self.pair_capacity = 0
        self.ensure_capacity(capacity)
        self.set_geometry(geometry)
        self.set_batch(np.arange(self.n_proj))

    def ensure_capacity(self, capacity: int) -> None:
        """(Re)allocate the per-(projection, Gaussian) adjoint buffer for at least ``capacity`` Gaussians."""
        if capacity > self.pair_capacity:
            self.pair_capacity = int(capacity)
            # dL/du, dL/dv (per Å), dL/da, dL/d(s²) (per Å²) of every (batch slot, Gaussian) pair.
            self.pair_grad = ti.Vector.field(4, self.dtype, (self.n_proj, self.pair_capacity))
            # Scratch per-column sums of the adjoint, one slot per pair of a slab of Gaussians; slabs
            # bound the scratch to ~32 MiB however many Gaussians there are.
            slot_bytes = SUM_SLOTS * LANES * np.dtype(self.np_dtype).itemsize
            self.slab = int(max(1, min(self.pair_capacity, (32 << 20) // (slot_bytes * self.n_proj))))
            self.column_sums = ti.Vector.field(LANES, self.dtype, (self.n_proj, self.slab, SUM_SLOTS))

    def set_geometry(self, geometry: TiltGeometry) -> None:
        if len(geometry) != self.n_proj:
            raise ValueError(f"the projector holds {self.n_proj} projections, the geometry {len(geometry)}")
        self.rot.from_numpy(geometry.rotations.astype(self.np_dtype))
        self.shift.from_numpy(geometry.shifts.astype(self.np_dtype))
        self.axis.from_numpy(geometry.tilt_axes.astype(self.np_dtype))

    def _indices(self, indices) -> np.ndarray:
        indices = np.asarray(indices).reshape(-1)
        if (len(indices) == 0 or not np.issubdtype(indices.dtype, np.integer) or indices.min() < 0
                or indices.max() >= self.n_proj):
            raise ValueError(f"projection indices must be integers in [0, {self.n_proj}), got {indices}")
        return indices.astype(np.int32)

    def _upload_batch(self, field, indices: np.ndarray) -> None:
        padded = np.zeros(self.n_proj, np.int32)
        padded[: len(indices)] = indices
        field.from_numpy(padded)

    def set_batch(self, indices) -> None:
        """Choose which projections (indices into the series) the next forward/backward pass covers."""
        indices = self._indices(indices)
        if len(indices) > self.n_proj:
            raise ValueError(f"a batch holds at most {self.n_proj} projections, got {len(indices)}")
        self._upload_batch(self.batch, indices)
        self.batch_size = len(indices)
        self._batch_host = indices.copy()

    def batch_numpy(self) -> np.ndarray:
        """The current batch's projection indices."""
        return self._batch_host.copy()

    def images_numpy(self, field=None) -> np.ndarray:
        """A packed image field (default ``image``) as an (n, H, W) NumPy array."""
        return unpack_images((self.image if field is None else field).to_numpy(), self.width)

    def alignment_gradients(self, indices=None) -> dict:
        """'shift' (m, 2) per Å, 'angle' (m,) and 'axis_angle' (m,) per degree of projections ``indices``
        (default: all n) from the last `backward` with ``alignment``, as float64."""
        sel = slice(None) if indices is None else self._indices(indices)
        return {"shift": self.grad_shift.to_numpy()[sel].astype(np.float64),
                "angle": self.grad_angle.to_numpy()[sel].astype(np.float64),
                "axis_angle": self.grad_axis_angle.to_numpy()[sel].astype(np.float64)}

    def _check_cloud(self, cloud: GaussianCloud) -> None:
        if cloud.dtype != self.dtype:
            raise ValueError(f"the cloud holds {cloud.np_dtype.__name__}, the projector {self.np_dtype.__name__}")

    # ------------------------------------------------------------------ footprint of one pair
    @ti.func
    def _footprint(self, k, p, sigma):
        """Centre (col, row) and s² in pixels, 1/(2π s²) in Å⁻², z' (Å), and the pixel ranges."""
        ps = self.dtype(self.pixel_size)
        q = self.rot[k] @ p
        col = (q[0] + self.shift[k][0]) / ps + self.dtype(ti.static(centre_index(self.width)))
        row = (q[1] + self.shift[k][1]) / ps + self.dtype(ti.static(centre_index(self.height)))
        s2_a = sigma * sigma + self.dtype(self.blur_sigma ** 2)
        s2 = s2_a / (ps * ps)
        radius = self.dtype(TRUNCATION_RADIUS_SIGMAS) * ti.sqrt(s2)
        c_lo = ti.max(ti.cast(ti.ceil(col - radius), ti.i32), 0)
        c_hi = ti.min(ti.cast(ti.floor(col + radius), ti.i32), self.width - 1)
        r_lo = ti.max(ti.cast(ti.ceil(row - radius), ti.i32), 0)
        r_hi = ti.min(ti.cast(ti.floor(row + radius), ti.i32), self.height - 1)
        return col, row, s2, 1.0 / (self.dtype(2.0 * math.pi) * s2_a), q[2], c_lo, c_hi, r_lo, r_hi

    @ti.func
    def _gaussian(self, d, inv2s2, e):
        """exp(−d²/2s²) at offset d (pixels), given e, its value by recurrence. The CPU takes e: libm's
        exp is its bottleneck and exact to 0.5 ulp, so the walk stays within 1e-6 in float32 (a few
        1e-15 in float64: the walk is the same, with the type's rounding). GPUs evaluate the exp
        directly: their exp is cheap, but its few-ulp error compounds along a walk."""
        value = e
        if ti.static(not self.on_cpu):
            value = ti.exp(-d * d * inv2s2)
        return value

    @ti.func
    def _walk_start(self, d0, inv2s2):
        """Start of the recurrence over offsets d0, d0 + 1, …: e = exp(−d0²/2s²) and the first factor
        q = exp(−(2 d0 + 1)/2s²); each next factor is the last times exp(−1/s²). Walks start at the
        footprint's edge, where e ≥ 1e-5 of the peak, so nothing underflows. (Literals here are
        small integers and halves, exact in either float type.)"""
        return ti.exp(-d0 * d0 * inv2s2), ti.exp(-(2.0 * d0 + 1.0) * inv2s2)

    @ti.func
    def _walk_setup(self, row, s2, r_lo):
        """Per-pair constants of the footprint walk: 1/2s², the factor step exp(−1/s²), and the row
        recurrence's start at the footprint's first row."""
        inv2s2 = 0.5 / s2
        ey0, qy0 = self._walk_start(r_lo - row, inv2s2)
        return inv2s2, ti.exp(-2.0 * inv2s2), ey0, qy0

    @ti.func
    def _chunk(self, blk, col, inv2s2, step, c_lo, c_hi):
        """Column chunk starting at block ``blk``: its number of blocks and its column profile and
        offsets (`_chunk_profile`)."""
        x0 = blk * LANES
        profile, dx = self._chunk_profile(col, inv2s2, step, x0, ti.max(c_lo, x0),
                                          ti.min(c_hi, x0 + LANES * CHUNK_BLOCKS - 1))
        return ti.min(CHUNK_BLOCKS, c_hi // LANES - blk + 1), profile, dx

    @ti.func
    def _chunk_profile(self, col, inv2s2, step, x0, lo, hi):
        """exp(−(x − col)² / 2s²) for the 8·CHUNK_BLOCKS pixels x0.. (zero outside [lo, hi]), as blocks
        of LANES, plus the matching offsets x − col."""
        ex = ti.Vector.zero(self.dtype, LANES * CHUNK_BLOCKS)
        e, q = self._walk_start(lo - col, inv2s2)
        for x in range(lo, hi + 1):
            ex[x - x0] = self._gaussian(x - col, inv2s2, e)
            e *= q
            q *= step
        blocks = ti.Matrix([[ex[LANES * j + l] for l in ti.static(range(LANES))]
                            for j in ti.static(range(CHUNK_BLOCKS))])
        offsets = ti.Matrix([[x0 + LANES * j + l - col for l in ti.static(range(LANES))]
                             for j in ti.static(range(CHUNK_BLOCKS))])
        return blocks, offsets

    # ------------------------------------------------------------------ forward
    @ti.func
    def _splat_row(self, image, k, r, blk0, nblk, weight, blocks):
        for j in ti.static(range(CHUNK_BLOCKS)):
            if j < nblk:
                v = weight * ti.Vector([blocks[j, l] for l in ti.static(range(LANES))])
                if ti.static(self.on_cpu):
                    image[k, r, blk0 + j] = image[k, r, blk0 + j] + v
                else:
                    ti.atomic_add(image[k, r, blk0 + j], v)

    @ti.func
    def _splat(self, image, k, p, a, sigma):
        col, row, s2, norm, _, c_lo, c_hi, r_lo, r_hi = self._footprint(k, p, sigma)
        if c_lo <= c_hi and r_lo <= r_hi:
            inv2s2, step, ey0, qy0 = self._walk_setup(row, s2, r_lo)
            blk = c_lo // LANES
            while blk * LANES <= c_hi:
                nblk, blocks, _ = self._chunk(blk, col, inv2s2, step, c_lo, c_hi)
                e, q = ey0, qy0
                for r in range(r_lo, r_hi + 1):
                    self._splat_row(image, k, r, blk, nblk, a * norm * self._gaussian(r - row, inv2s2, e), blocks)
                    e *= q
                    q *= step
                blk += CHUNK_BLOCKS

    @ti.kernel
    def _forward(self, cloud: ti.template(), image: ti.template(), batch: ti.template(), n: ti.i32, nb: ti.i32):
        """Renders projections batch[0..nb) into ``image`` (packed, indexed by projection). The GPU path
        takes one thread per (projection, Gaussian) pair on purpose: Taichi 1.7.4 on Mesa's lavapipe
        loses atomics issued in loops nested inside parallel loops, so the atomics must sit in the
        pair's own thread, not in a loop over Gaussians."""
        if ti.static(self.on_cpu):
            for item in range(nb * CPU_TASK_SPREAD):
                if item % CPU_TASK_SPREAD == 0:
                    self.render_projection(cloud, image, batch[item // CPU_TASK_SPREAD], n)
        else:
            for b, r, c in ti.ndrange(nb, self.height, self.row_blocks):
                image[batch[b], r, c] = ti.Vector.zero(self.dtype, LANES)
            for b, g in ti.ndrange(nb, n):
                self._splat(image, batch[b], cloud.pos[g], cloud.amp[g], cloud.sigma[g])

    @ti.func
    def render_projection(self, cloud: ti.template(), image: ti.template(), k, n):
        """Projection k of the first n Gaussians into ``image``, by one thread (plain adds, a fixed order)."""
        for r, c in ti.ndrange(self.height, self.row_blocks):
            image[k, r, c] = ti.Vector.zero(self.dtype, LANES)
        for g in range(n):
            self._splat(image, k, cloud.pos[g], cloud.amp[g], cloud.sigma[g])

    def forward(self, cloud: GaussianCloud) -> None:
        """Render the current batch of projections of ``cloud`` into ``image``."""
        self._check_cloud(cloud)
        self._forward(cloud, self.image, self.batch, cloud.count, self.batch_size)

    def render(self, cloud: GaussianCloud, indices) -> np.ndarray:
        """Projections ``indices`` of ``cloud`` as NumPy (len(indices), H, W) of the projector's dtype.

        Renders through an image and a batch field of its own, so the training state (``batch``,
        ``image``, ``image_grad``, the gradients) is left exactly as it was."""
        self._check_cloud(cloud)
        indices = self._indices(indices)
        unique, inverse = np.unique(indices, return_inverse=True)
        if self._render_fields is None:
            self._render_fields = (ti.Vector.field(LANES, self.dtype, self.image.shape), ti.field(ti.i32, self.n_proj))
        image, batch = self._render_fields
        self._upload_batch(batch, unique)
        self._forward(cloud, image, batch, cloud.count, len(unique))
        return unpack_images(image.to_numpy()[unique], self.width)[inverse.reshape(-1)]

    # ------------------------------------------------------------------ adjoint
    @ti.func
    def _gather_rows(self, k, ra, rb, dya, dyb, ea, eb, blk0, profile, b, g):
        """Adds two footprint rows ra, rb of dL/dimage (weights ea, eb at offsets dya, dyb) to the pair's
        sums in ``column_sums``: per column Σ_y ey G (CHUNK_BLOCKS slots), and per lane Σ_y ey dy G ex
        and Σ_y ey dy² G ex (2 slots).

        Blocks past the footprint are read at a clamped index: their profile lanes are zero, so what
        they hold drops out. The sums live in memory on purpose: loop-carried vector registers defeat
        LLVM's SLP vectorizer, while load-add-store of 8 contiguous floats becomes one SIMD
        operation; taking rows in pairs halves those read-modify-writes."""
        profile_a = ti.Vector.zero(self.dtype, LANES)
        profile_b = ti.Vector.zero(self.dtype, LANES)
        for j in ti.static(range(CHUNK_BLOCKS)):
            blk = ti.min(blk0 + j, ti.static(self.row_blocks - 1))
            va = self.image_grad[k, ra, blk]
            vb = self.image_grad[k, rb, blk]
            self.column_sums[b, g, j] = self.column_sums[b, g, j] + ea * va + eb * vb
            pj = ti.Vector([profile[j, l] for l in ti.static(range(LANES))])
            profile_a += va * pj
            profile_b += vb * pj
        n = ti.static(CHUNK_BLOCKS)
        self.column_sums[b, g, n] = self.column_sums[b, g, n] + (ea * dya) * profile_a + (eb * dyb) * profile_b
        self.column_sums[b, g, n + 1] = (self.column_sums[b, g, n + 1] + (ea * dya * dya) * profile_a
                                         + (eb * dyb * dyb) * profile_b)

    @ti.func
    def _gather(self, k, p, a, sigma, b, g):
        """(dL/du, dL/dv per Å, dL/da, dL/ds² per Å²) of one pair from dL/dimage over its footprint;
        (b, g) is the pair's slot in ``column_sums``.

        Separable: Σ_xy G E f(dx) h(dy) = Σ_x ex(x) f(dx) Σ_y ey(y) h(dy) G(x, y), so rows only
        accumulate column sums and the column profile is applied once per chunk."""
        col, row, s2, norm, _, c_lo, c_hi, r_lo, r_hi = self._footprint(k, p, sigma)
        a0 = self.dtype(0.0)  # Σ G E
        ax = self.dtype(0.0)  # Σ G E dx
        ay = self.dtype(0.0)  # Σ G E dy
        ar = self.dtype(0.0)  # Σ G E (dx² + dy²)
        if c_lo <= c_hi and r_lo <= r_hi:
            inv2s2, step, ey0, qy0 = self._walk_setup(row, s2, r_lo)
            blk = c_lo // LANES
            while blk * LANES <= c_hi:
                _, profile, dx = self._chunk(blk, col, inv2s2, step, c_lo, c_hi)
                for j in ti.static(range(SUM_SLOTS)):
                    self.column_sums[b, g, j] = ti.Vector.zero(self.dtype, LANES)
                e, q = ey0, qy0
                for i in range((r_hi - r_lo + 2) // 2):
                    ra = r_lo + 2 * i
                    rb = ti.min(ra + 1, r_hi)  # a lone last row pairs with itself at weight 0
                    ea = self._gaussian(ra - row, inv2s2, e)
                    e *= q
                    q *= step
                    eb = self._gaussian(rb - row, inv2s2, e) if ra < r_hi else self.dtype(0.0)
                    e *= q
                    q *= step
                    self._gather_rows(k, ra, rb, ra - row, rb - row, ea, eb, blk, profile, b, g)
                for j in ti.static(range(CHUNK_BLOCKS)):
                    pj = ti.Vector([profile[j, l] for l in ti.static(range(LANES))])
                    dxj = ti.Vector([dx[j, l] for l in ti.static(range(LANES))])
                    weighted = pj * self.column_sums[b, g, j]
                    a0 += weighted.sum()
                    ax += (weighted * dxj).sum()
                    ar += (weighted * dxj * dxj).sum()
                ay += self.column_sums[b, g, CHUNK_BLOCKS].sum()
                ar += self.column_sums[b, g, CHUNK_BLOCKS + 1].sum()
                blk += CHUNK_BLOCKS
        ps = self.dtype(self.pixel_size)
        s2_a = s2 * ps * ps
        # Chain rule to Å: E = exp(−r_px² / (2 s_px²)), dE/du = E dx_px / (s_px² ps).
        return ti.Vector([a * norm * ax / (s2 * ps), a * norm * ay / (s2 * ps), norm * a0,
                          a * norm * (-a0 / s2_a + ar * ps * ps / (2.0 * s2_a * s2_a))])

    @ti.kernel
    def _backward_pairs(self, cloud: ti.template(), pairs: ti.template(), g0: ti.i32, ng: ti.i32, nb: ti.i32):
        """Each (projection, Gaussian) pair's gradient from dL/dimage, for Gaussians g0..g0+ng (a slab)."""
        for b, i in ti.ndrange(nb, ng):
            g = g0 + i
            pairs[b, g] = self._gather(self.batch[b], cloud.pos[g], cloud.amp[g], cloud.sigma[g], b, i)

    @ti.func
    def gather_projection(self, cloud: ti.template(), pairs: ti.template(), b, n):
        """`_backward_pairs`' pairs of batch slot b and the first n Gaussians (one slab), by one thread."""
        for g in range(n):
            pairs[b, g] = self._gather(self.batch[b], cloud.pos[g], cloud.amp[g], cloud.sigma[g], b, g)

    @ti.kernel
    def _reduce_per_gaussian(self, cloud: ti.template(), pairs: ti.template(), n: ti.i32, nb: ti.i32):
        """The pairs' gradients summed per Gaussian, in the world frame, into the cloud's grad_* fields."""
        for g in range(n):
            self.reduce_gaussian(cloud, pairs, g, nb)

    @ti.func
    def reduce_gaussian(self, cloud: ti.template(), pairs: ti.template(), g, nb):
        """Gaussian g's pairs of the batch's nb projections summed, in the world frame, into grad_*[g]."""
        gp = ti.Vector.zero(self.dtype, 3)
        ga = self.dtype(0.0)
        gs2 = self.dtype(0.0)
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

    @ti.func
    def _reduce_projection(self, cloud, pairs, n, b):
        k = self.batch[b]
        gsh = ti.Vector.zero(self.dtype, 2)
        gang = self.dtype(0.0)
        gphi = self.dtype(0.0)
        for g in range(n):
            d = pairs[b, g]
            p = cloud.pos[g]
            q = self.rot[k] @ p
            gsh += ti.Vector([d[0], d[1]])
            # Rotating by δ about the in-plane axis (a_x, a_y, 0) moves (u, v) by δ z' (a_y, −a_x).
            gang += q[2] * (d[0] * self.axis[k][1] - d[1] * self.axis[k][0])
            # R = R_z(φ) R_y(θ) R_z(−φ): dR/dφ p = J R p − R J p, J the generator about z (J r = (−r_y, r_x, 0)).
            rjp = self.rot[k] @ ti.Vector([-p[1], p[0], self.dtype(0.0)])
            gphi += d[0] * (-q[1] - rjp[0]) + d[1] * (q[0] - rjp[1])
        self.grad_shift[k] = gsh
        self.grad_angle[k] = gang * self.dtype(math.pi / 180.0)
        self.grad_axis_angle[k] = gphi * self.dtype(math.pi / 180.0)

    @ti.kernel
    def _reduce_per_projection(self, cloud: ti.template(), pairs: ti.template(), n: ti.i32, nb: ti.i32):
        if ti.static(self.on_cpu):
            for item in range(nb * CPU_TASK_SPREAD):
                if item % CPU_TASK_SPREAD == 0:
                    self._reduce_projection(cloud, pairs, n, item // CPU_TASK_SPREAD)
        else:
            for b in range(nb):
                self._reduce_projection(cloud, pairs, n, b)

    def backward(self, cloud: GaussianCloud, alignment: bool = True) -> None:
        """From ``image_grad`` of the current batch, write the cloud's grad_* fields and, with
        ``alignment``, ``grad_shift``, ``grad_angle`` and ``grad_axis_angle`` of the batch's projections."""
        self._check_cloud(cloud)
        self.ensure_capacity(cloud.capacity)
        for g0 in range(0, cloud.count, self.slab):
            self._backward_pairs(cloud, self.pair_grad, g0, min(self.slab, cloud.count - g0), self.batch_size)
        args = (cloud, self.pair_grad, cloud.count, self.batch_size)
        self._reduce_per_gaussian(*args)
        if alignment:
            self._reduce_per_projection(*args)


def cached_cloud(capacity: int, dtype=ti.f32) -> GaussianCloud:
    """A `GaussianCloud` of at least ``capacity`` (rounded up to a power of two), shared for the Taichi
    session: a new object would mean compiling the kernels that take it again."""
    ti_type, np_type = float_types(dtype)
    capacity = 1 << max(int(capacity) - 1, 0).bit_length()
    key = ("gaussian cloud", capacity, np_type.__name__)
    cache = session_cache()
    if key not in cache:
        cache[key] = GaussianCloud(capacity, ti_type)
    return cache[key]


def cached_projector(geometry: TiltGeometry, shape, pixel_size: float, blur_sigma: float = 0.0,
                     dtype=ti.f32, capacity: int = 1) -> TiltSeriesProjector:
    """A `TiltSeriesProjector` for len(geometry) projections of ``shape``, ``pixel_size`` and
    ``blur_sigma`` at ``dtype``, shared for the Taichi session (its kernels compile once), set to
    ``geometry`` and with room for ``capacity`` Gaussians. Its batch and fields belong to whoever
    called last: take results out before the next call."""
    ti_type, np_type = float_types(dtype)
    key = ("tilt projector", len(geometry), tuple(int(v) for v in shape), float(pixel_size), float(blur_sigma),
           np_type.__name__)
    cache = session_cache()
    if key not in cache:
        cache[key] = TiltSeriesProjector(geometry, shape, pixel_size, blur_sigma, capacity, ti_type)
    projector = cache[key]
    projector.set_geometry(geometry)
    projector.ensure_capacity(capacity)
    return projector


def _prepare(positions, amplitudes, sigmas, geometry, shape, pixel_size, blur_sigma, indices, dtype):
    """The session's cloud (holding the Gaussians) and projector for one NumPy call, and the indices."""
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    cloud = cached_cloud(len(positions), dtype)
    cloud.set(positions, amplitudes, sigmas)
    projector = cached_projector(geometry, shape, pixel_size, blur_sigma, dtype, cloud.capacity)
    indices = np.arange(len(geometry)) if indices is None else np.asarray(indices).reshape(-1)
    return cloud, projector, indices


def project_tilt_series(positions, amplitudes, sigmas, geometry: TiltGeometry, shape, pixel_size: float,
                        blur_sigma: float = 0.0, indices=None, dtype=np.float32) -> np.ndarray:
    """Projections (len(indices), H, W) of Gaussians at ``positions`` (N, 3) Å with amplitudes (N,)
    (image units · Å²) and widths ``sigmas`` (N,) Å, blurred by ``blur_sigma`` Å, computed and returned
    in ``dtype`` (np.float32 or np.float64). NumPy in, NumPy out; the engine keeps its data on the
    device and calls `TiltSeriesProjector` directly."""
    cloud, projector, indices = _prepare(positions, amplitudes, sigmas, geometry, shape, pixel_size,
                                         blur_sigma, indices, dtype)
    return projector.render(cloud, indices)


def project_tilt_series_adjoint(positions, amplitudes, sigmas, geometry: TiltGeometry, shape, pixel_size: float,
                                image_grad, blur_sigma: float = 0.0, indices=None, dtype=np.float32) -> dict:
    """Gradients of L given dL/dimage (len(indices), H, W), computed in ``dtype`` and returned as
    float64: 'pos' (N, 3) per Å, 'amp' (N,), 'sigma' (N,) per Å, 'shift' (len(indices), 2) per Å,
    'angle' (len(indices),) per degree, 'axis_angle' (len(indices),) per degree (each projection's
    share of dL/dφ). ``indices`` must not repeat a projection."""
    cloud, projector, indices = _prepare(positions, amplitudes, sigmas, geometry, shape, pixel_size,
                                         blur_sigma, indices, dtype)
    if len(np.unique(indices)) != len(indices):
        raise ValueError(f"indices must not repeat a projection, got {indices}")
    projector.set_batch(indices)
    full = np.zeros((projector.n_proj, projector.height, projector.width), projector.np_dtype)
    full[indices] = np.asarray(image_grad, dtype=np.float64)
    projector.image_grad.from_numpy(pack_images(full, projector.np_dtype))
    projector.backward(cloud)
    grads = cloud.gradients()
    grads.update(projector.alignment_gradients(indices))
    return grads
