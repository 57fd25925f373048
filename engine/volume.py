"""Voxel back-projection: filtered back-projection (FBP) volumes and projection-mask support.

Used to seed atoms (peaks of a quick FBP of the data), to find where atoms are missing (peaks of the
FBP of the residual), and to bound the particle (the visual hull of thresholded projections). The
tilt geometry comes from `engine.geometry`; images are sampled bilinearly at each voxel's projected
position (Å → pixels by the contract's pixel-centre convention).
"""

import math

import numpy as np
import taichi as ti

from .backend import session_cache
from .geometry import TiltGeometry


@ti.data_oriented
class BackProjector:
    """Back-projects stacks of (n, H, W) images onto a regular voxel grid.

    grid_shape : (nx, ny, nz) voxels; origin : world position (Å) of voxel (0, 0, 0); voxel : edge (Å).
    Reduction 'sum' adds the bilinear samples of all projections (back-projection); 'min' keeps the
    smallest (a voxel is inside a visual hull only if every projection's mask covers it).
    """

    def __init__(self, n_proj: int, image_shape, pixel_size: float, grid_shape, origin, voxel: float):
        self.n_proj = n_proj
        self.height, self.width = (int(v) for v in image_shape)
        self.pixel_size = float(pixel_size)
        self.grid_shape = tuple(int(v) for v in grid_shape)
        self.origin = np.asarray(origin, dtype=np.float64)
        self.voxel = float(voxel)
        self.rot = ti.Matrix.field(3, 3, ti.f32, n_proj)
        self.shift = ti.Vector.field(2, ti.f32, n_proj)
        self.images = ti.field(ti.f32, (n_proj, self.height, self.width))
        self.volume = ti.field(ti.f32, self.grid_shape)

    @ti.func
    def _sample(self, k, p):
        """Bilinear sample of image k at the projection of world point p (Å); 0 outside the image."""
        q = self.rot[k] @ p
        x = (q[0] + self.shift[k][0]) / self.pixel_size + (self.width - 1) * 0.5
        y = (q[1] + self.shift[k][1]) / self.pixel_size + (self.height - 1) * 0.5
        value = 0.0
        if 0.0 <= x <= self.width - 1 and 0.0 <= y <= self.height - 1:
            x0 = ti.min(ti.cast(ti.floor(x), ti.i32), self.width - 2)
            y0 = ti.min(ti.cast(ti.floor(y), ti.i32), self.height - 2)
            fx = x - x0
            fy = y - y0
            value = ((1 - fx) * (1 - fy) * self.images[k, y0, x0] + fx * (1 - fy) * self.images[k, y0, x0 + 1]
                     + (1 - fx) * fy * self.images[k, y0 + 1, x0] + fx * fy * self.images[k, y0 + 1, x0 + 1])
        return value

    @ti.kernel
    def _backproject(self, ox: ti.f32, oy: ti.f32, oz: ti.f32, voxel: ti.f32, use_min: ti.template()):
        for i, j, l in self.volume:
            p = ti.Vector([ox + i * voxel, oy + j * voxel, oz + l * voxel])
            acc = 0.0
            if ti.static(use_min):
                acc = 1e30
            for k in range(self.n_proj):
                if ti.static(use_min):
                    acc = ti.min(acc, self._sample(k, p))
                else:
                    acc += self._sample(k, p)
            self.volume[i, j, l] = acc

    def __call__(self, images, geometry: TiltGeometry, reduction: str = "sum") -> np.ndarray:
        arrays = geometry.kernel_arrays()
        self.rot.from_numpy(arrays["rotations"])
        self.shift.from_numpy(arrays["shifts"])
        self.images.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        self._backproject(*[float(v) for v in self.origin], self.voxel, reduction == "min")
        return self.volume.to_numpy()

    def positions(self, index) -> np.ndarray:
        """World positions (Å) of voxel indices (M, 3)."""
        return self.origin + np.asarray(index, dtype=np.float64) * self.voxel


def ramp_filter(images: np.ndarray, pixel_size: float) -> np.ndarray:
    """Filter each image row along x' (perpendicular to the tilt axis +y) with a Hann-windowed ramp,
    scaled so that back-projecting over n angles spread across 180° approximates the volume."""
    n = images.shape[-1]
    pad = 1 << int(math.ceil(math.log2(2 * n)))
    freq = np.fft.rfftfreq(pad, d=pixel_size)  # cycles per Å
    window = 0.5 * (1 + np.cos(np.pi * freq / freq[-1]))
    filtered = np.fft.irfft(np.fft.rfft(images, n=pad, axis=-1) * (2 * freq * window), n=pad, axis=-1)
    return filtered[..., :n] * pixel_size


def backprojector_for(n_proj: int, image_shape, pixel_size: float, voxel: float) -> BackProjector:
    """A cached `BackProjector` whose grid covers the field of view: x and z span the image width, y
    its height (Å), at ``voxel`` spacing."""
    h, w = image_shape
    half_x = (w - 1) / 2 * pixel_size
    half_y = (h - 1) / 2 * pixel_size
    nx = int(2 * half_x // voxel) + 1
    ny = int(2 * half_y // voxel) + 1
    key = ("backprojector", n_proj, tuple(image_shape), float(pixel_size), float(voxel))
    cache = session_cache()
    if key not in cache:
        origin = (-(nx - 1) / 2 * voxel, -(ny - 1) / 2 * voxel, -(nx - 1) / 2 * voxel)
        cache[key] = BackProjector(n_proj, image_shape, pixel_size, (nx, ny, nx), origin, voxel)
    return cache[key]
