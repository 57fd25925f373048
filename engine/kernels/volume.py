"""Voxel volumes and the classical tomography they take part in.

`VoxelProjector` is a matched pair: a voxel-driven parallel-beam projector (each voxel splats into
each projection with bilinear weights at its projected position, in the geometry of
`engine.geometry`) and its exact transpose, the bilinear back-projector. On top of them: filtered
back-projection (FBP, Hann-windowed ramp along x', perpendicular to the tilt axis +y) and SIRT with
non-negativity. The fit uses the same back-projector to seed atoms (FBP peaks of the data), to find
missing atoms (FBP peaks of the residual) and to bound the particle (the visual hull of the
thresholded projections).

Units: voxel values are projected-potential densities (image units per Å), so A·v is a line integral
in image units; voxel and pixel edges in Å.

Precision: ``dtype`` (ti.f32, the default, or ti.f64) types every field and kernel constant, as in
`engine.kernels.projector`.
"""

import math

import numpy as np
import taichi as ti

from engine.core.backend import current_arch, session_cache
from engine.core.geometry import TiltGeometry, centre_index
from engine.kernels.projector import CPU_TASK_SPREAD, float_types


FILTER_ROWS = 2048  # image rows ramp-filtered at once (`ramp_filter`)


@ti.data_oriented
class VoxelProjector:
    """Projects a voxel grid into n images and back-projects images onto the grid.

    grid_shape : (nx, ny, nz) voxels; origin : world position (Å) of voxel (0, 0, 0); voxel : edge (Å).
    Back-projection sums (the transpose of `project`); `hull` tests masks instead (a voxel is inside
    a visual hull only if every projection that sees it covers it) and counts the views.
    ``dtype``: ti.f32 (default) or ti.f64.
    """

    def __init__(self, n_proj: int, image_shape, pixel_size: float, grid_shape, origin, voxel: float,
                 dtype=ti.f32):
        self.dtype, self.np_dtype = float_types(dtype)
        self.n_proj = n_proj
        self.height, self.width = (int(v) for v in image_shape)
        self.pixel_size = float(pixel_size)
        self.grid_shape = tuple(int(v) for v in grid_shape)
        self.origin = np.asarray(origin, dtype=np.float64)
        self.voxel = float(voxel)
        # A voxel holds density × voxel³ of material, spread over pixel² of image.
        self.splat_scale = self.voxel**3 / self.pixel_size**2
        self.on_cpu = current_arch() == "cpu"
        self.rot = ti.Matrix.field(3, 3, self.dtype, n_proj)
        self.shift = ti.Vector.field(2, self.dtype, n_proj)
        self.images = ti.field(self.dtype, (n_proj, self.height, self.width))
        self.volume = ti.field(self.dtype, self.grid_shape)
        self.views = ti.field(ti.i32, self.grid_shape)  # projections that see each voxel (`hull`)
        self.region = ti.field(ti.i8, self.grid_shape)  # the voxels `backproject` computes
        self.region.fill(1)
        self._whole_region = True

    def set_geometry(self, geometry: TiltGeometry) -> None:
        self.rot.from_numpy(geometry.rotations.astype(self.np_dtype))
        self.shift.from_numpy(geometry.shifts.astype(self.np_dtype))

    @ti.func
    def _bilinear(self, k, i, j, l):
        """Pixel (x0, y0), fractions (fx, fy) of voxel (i, j, l)'s projection in image k, and whether
        it lands inside the image. The one place both directions take their weights from."""
        dt = self.dtype
        voxel, ps = dt(self.voxel), dt(self.pixel_size)
        p = ti.Vector([dt(self.origin[0]) + i * voxel, dt(self.origin[1]) + j * voxel, dt(self.origin[2]) + l * voxel])
        q = self.rot[k] @ p
        x = (q[0] + self.shift[k][0]) / ps + dt(ti.static(centre_index(self.width)))
        y = (q[1] + self.shift[k][1]) / ps + dt(ti.static(centre_index(self.height)))
        inside = 0.0 <= x <= self.width - 1 and 0.0 <= y <= self.height - 1
        x0 = ti.min(ti.max(ti.cast(ti.floor(x), ti.i32), 0), self.width - 2)
        y0 = ti.min(ti.max(ti.cast(ti.floor(y), ti.i32), 0), self.height - 2)
        return x0, y0, x - x0, y - y0, inside

    @ti.func
    def _splat_voxel(self, k, i, j, l):
        x0, y0, fx, fy, inside = self._bilinear(k, i, j, l)
        if inside:
            v = self.volume[i, j, l] * self.dtype(self.splat_scale)
            # Plain adds: one thread owns projection k (see `_project`).
            self.images[k, y0, x0] += (1 - fx) * (1 - fy) * v
            self.images[k, y0, x0 + 1] += fx * (1 - fy) * v
            self.images[k, y0 + 1, x0] += (1 - fx) * fy * v
            self.images[k, y0 + 1, x0 + 1] += fx * fy * v

    @ti.kernel
    def _project(self):
        for k, r, c in self.images:
            self.images[k, r, c] = 0.0
        if ti.static(self.on_cpu):
            # One task per projection, voxels in a fixed order: identical sums run to run.
            for item in range(self.n_proj * CPU_TASK_SPREAD):
                if item % CPU_TASK_SPREAD == 0:
                    k = item // CPU_TASK_SPREAD
                    for i, j, l in ti.ndrange(*self.grid_shape):
                        self._splat_voxel(k, i, j, l)
        else:
            for k, i, j, l in ti.ndrange(self.n_proj, *self.grid_shape):
                self._splat_voxel(k, i, j, l)

    @ti.func
    def _sample(self, k, i, j, l):
        """The bilinear sample of image k at voxel (i, j, l)'s projection, and whether it lands inside."""
        x0, y0, fx, fy, inside = self._bilinear(k, i, j, l)
        value = self.dtype(0.0)
        if inside:
            value = ((1 - fx) * (1 - fy) * self.images[k, y0, x0] + fx * (1 - fy) * self.images[k, y0, x0 + 1]
                     + (1 - fx) * fy * self.images[k, y0 + 1, x0] + fx * fy * self.images[k, y0 + 1, x0 + 1])
        return value, inside

    @ti.kernel
    def _backproject(self):
        for i, j, l in self.volume:
            acc = self.dtype(0.0)
            if self.region[i, j, l]:
                for k in range(self.n_proj):
                    value, _ = self._sample(k, i, j, l)
                    acc += value
            self.volume[i, j, l] = acc * self.dtype(self.splat_scale)

    @ti.kernel
    def _hull(self, threshold: ti.f32):
        for i, j, l in self.volume:
            covered = 1
            views = 0
            for k in range(self.n_proj):
                value, inside = self._sample(k, i, j, l)
                if inside:  # a projection that does not see the voxel says nothing about it
                    views += 1
                    if value <= threshold:
                        covered = 0
                        break  # outside the hull: its views are not needed
            self.views[i, j, l] = views if covered else -1

    def backproject(self, images: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
        """Aᵀ·images, the exact transpose of `project`; with ``region`` (a boolean grid), only at its
        voxels (0 elsewhere): the work is the region's share of the grid."""
        self.images.from_numpy(np.ascontiguousarray(images, dtype=self.np_dtype))
        if region is not None:
            self.region.from_numpy(np.asarray(region, dtype=np.int8))
            self._whole_region = False
        elif not self._whole_region:
            self.region.fill(1)
            self._whole_region = True
        self._backproject()
        return self.volume.to_numpy()

    def hull(self, masks: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        """The visual hull of ``masks`` (n, H, W), in one pass: per voxel, how many projections see
        it where every one of them covers it (its bilinear sample of the mask above ``threshold``),
        else −1 (outside the hull; a voxel no projection sees has 0 views)."""
        self.images.from_numpy(np.ascontiguousarray(masks, dtype=self.np_dtype))
        self._hull(threshold)
        return self.views.to_numpy()

    def project(self, volume: np.ndarray) -> np.ndarray:
        """A·v: the (n, H, W) projections of ``volume`` (nx, ny, nz) in image units."""
        self.volume.from_numpy(np.ascontiguousarray(volume, dtype=self.np_dtype))
        self._project()
        return self.images.to_numpy()

    def positions(self, index) -> np.ndarray:
        """World positions (Å) of voxel indices (M, 3)."""
        return self.origin + np.asarray(index, dtype=np.float64) * self.voxel

    def indices(self, positions) -> np.ndarray:
        """Nearest voxel indices (M, 3) of world positions (Å), clipped to the grid."""
        idx = np.rint((np.asarray(positions) - self.origin) / self.voxel).astype(int)
        return np.clip(idx, 0, np.array(self.grid_shape) - 1)

    def fbp(self, images: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
        """Filtered back-projection, density units (image units per Å); only at the voxels of
        ``region`` when given (`backproject`)."""
        filtered = ramp_filter(images, self.pixel_size, self.np_dtype)
        return self.backproject(filtered, region) * (np.pi / self.n_proj) / self.splat_scale

    def sirt(self, images: np.ndarray, iterations: int = 50, relaxation: float = 1.0, nonnegative: bool = True,
             callback=None) -> np.ndarray:
        """SIRT: v ← max(0, v + λ C Aᵀ R (b − A v)), R and C the inverse row and column sums of A.
        ``callback(iteration, volume, residual_norm)`` sees every step."""
        b = np.asarray(images, dtype=np.float64)
        row = self.project(np.ones(self.grid_shape)).astype(np.float64)
        col = self.backproject(np.ones(b.shape)).astype(np.float64)
        inv_row = np.where(row > 1e-6 * row.max(), 1.0 / np.maximum(row, 1e-30), 0.0)
        inv_col = np.where(col > 1e-6 * col.max(), 1.0 / np.maximum(col, 1e-30), 0.0)
        v = np.zeros(self.grid_shape)
        for it in range(iterations):
            residual = b - self.project(v)
            v = v + relaxation * inv_col * self.backproject(residual * inv_row)
            if nonnegative:
                v = np.maximum(v, 0.0)
            if callback is not None:
                callback(it, v, float(np.linalg.norm(residual)))
        return v.astype(self.np_dtype)


def ramp_filter(images: np.ndarray, pixel_size: float, dtype=np.float32) -> np.ndarray:
    """Filter each image row along x' (perpendicular to the tilt axis +y) with a Hann-windowed ramp
    |f| (f in cycles per Å), in ``dtype`` (float32 or float64)."""
    from scipy import fft  # numpy's FFT runs on one core; scipy's takes every one (`workers`)

    n = images.shape[-1]
    pad = 1 << int(math.ceil(math.log2(2 * n)))
    freq = np.fft.rfftfreq(pad, d=pixel_size)
    window = 0.5 * (1 + np.cos(np.pi * freq / freq[-1]))
    ramp = (freq * window).astype(dtype)
    # In the back-projector's precision and a few thousand rows at a time: the padded spectra of a
    # whole series are ~100 MB of temporaries, whose first touch costs more than the FFTs.
    rows = np.asarray(images, dtype).reshape(-1, n)
    out = np.empty(rows.shape, dtype)
    for start in range(0, len(rows), FILTER_ROWS):
        block = slice(start, start + FILTER_ROWS)
        out[block] = fft.irfft(fft.rfft(rows[block], n=pad, axis=-1, workers=-1) * ramp, n=pad, axis=-1,
                               workers=-1)[:, :n]
    return out.reshape(np.shape(images))


def projector_for(n_proj: int, image_shape, pixel_size: float, voxel: float, dtype=ti.f32,
                  x_margin: float = 0.0) -> VoxelProjector:
    """A cached `VoxelProjector` whose grid covers the field of view: x and z span the image width,
    y its height (Å), at ``voxel`` spacing, of ``dtype``; x reaches ``x_margin`` (Å) further on each
    side (an extended specimen's material that tilts into view)."""
    h, w = image_shape
    nz = int((w - 1) * pixel_size // voxel) + 1
    nx = nz + 2 * int(math.ceil(x_margin / voxel))
    ny = int((h - 1) * pixel_size // voxel) + 1
    ti_type, np_type = float_types(dtype)
    key = ("voxel projector", n_proj, tuple(image_shape), float(pixel_size), float(voxel), np_type.__name__, nx)
    cache = session_cache()
    if key not in cache:
        origin = (-(nx - 1) / 2 * voxel, -(ny - 1) / 2 * voxel, -(nz - 1) / 2 * voxel)
        cache[key] = VoxelProjector(n_proj, image_shape, pixel_size, (nx, ny, nz), origin, voxel, ti_type)
    return cache[key]


def peak_window(separation: float, voxel: float) -> int:
    """The side (voxels) of the cube within which a local maximum is the largest: ±separation/2 (Å)."""
    return max(3, 2 * int(separation / 2 / voxel) + 1)


def local_maxima(volume: np.ndarray, projector: VoxelProjector, separation: float, threshold: float,
                 mask: np.ndarray | None = None) -> tuple:
    """Voxels that are the maximum within ±separation/2 (Å), above ``threshold`` and inside ``mask``:
    their positions (Å) and values, brightest first."""
    from scipy import ndimage

    is_peak = (volume == ndimage.maximum_filter(volume, size=peak_window(separation, projector.voxel)))
    is_peak &= volume > threshold
    if mask is not None:
        is_peak &= mask
    idx = np.argwhere(is_peak)
    values = volume[tuple(idx.T)]
    order = np.argsort(-values, kind="stable")
    return projector.positions(idx[order]), values[order]


def suppress_close(positions: np.ndarray, values: np.ndarray, distance: float) -> tuple:
    """Greedy non-maximum suppression: drop every candidate within ``distance`` (Å) of a brighter kept
    one. Candidates must come brightest first."""
    from scipy.spatial import cKDTree

    pairs = cKDTree(positions).query_pairs(distance, output_type="ndarray") if len(positions) else np.zeros((0, 2), int)
    brighter, dimmer = pairs.min(axis=1), pairs.max(axis=1)
    # The greedy walk, brightest first, in array passes instead of a Python loop over candidates: an
    # undecided candidate none of whose brighter neighbours is kept or undecided is kept; one with a
    # kept brighter neighbour is dropped. The brightest undecided one is always settled, so it ends.
    UNDECIDED, KEPT, DROPPED = 0, 1, 2
    status = np.zeros(len(positions), np.int8)
    while (status == UNDECIDED).any():
        blocked = np.zeros(len(positions), bool)
        blocked[dimmer[status[brighter] != DROPPED]] = True
        status[(status == UNDECIDED) & ~blocked] = KEPT
        suppressed = dimmer[status[brighter] == KEPT]
        status[suppressed[status[suppressed] == UNDECIDED]] = DROPPED
    keep = status == KEPT
    return positions[keep], values[keep]
