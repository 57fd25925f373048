"""A small Taichi rasteriser for the atom cloud: shaded spheres and 3D line segments, depth-tested,
seen through an orthographic orbit camera.

It runs on whatever backend the fit runs on (it shares its Taichi runtime) and needs no display, so
the live window and headless frames draw the same pixels. Every sphere is splatted as a disc in
screen space; a depth pass keeps the nearest surface per pixel (atomic min of a quantised depth),
an owner pass picks the sphere that made it, a shading pass lights that sphere (ambient + Lambert).

View frame (as the tilt series' beam frame): x right, y down, z into the screen. A camera with
rotation R shows what the detector of a projection with the same rotation sees, with image rows
along y and columns along x.
"""

import math
from dataclasses import dataclass, field

import numpy as np
import taichi as ti

from engine.core.backend import current_arch, session_cache
from engine.core.geometry import rotation_about_y

BACKGROUND = (0.09, 0.10, 0.12)
"""RGB of empty pixels in the 3D view."""
AMBIENT, DIFFUSE = 0.35, 0.65
"""Lit colour = colour × (AMBIENT + DIFFUSE × max(0, n·l)): a surface facing the light gets the full colour."""
LIGHT = tuple(np.array([-0.35, -0.45, -0.82]) / np.linalg.norm([-0.35, -0.45, -0.82]))
"""Unit direction towards the light in the view frame: upper left, in front of the screen."""
DEPTH_LEVELS = 1 << 22
"""Quantisation of depth over the scene's depth range; coarse enough that recomputing a depth in a
later pass lands on the same or a neighbouring level."""
DEPTH_TOLERANCE = 2
"""Levels by which a recomputed depth may miss the stored one and still own the pixel."""
MAX_SEGMENTS = 32
LINE_WIDTH = 2  # px
_CAMERA_PARAMS = 17  # rotation 9, target 3, px per Å, half width and height px, depth near Å, levels per Å


def rotation_about_x(angle_deg: float) -> np.ndarray:
    """Active rotation by ``angle_deg`` (degrees) about +x."""
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


@dataclass
class OrbitCamera:
    """Orthographic camera orbiting ``target``.

    rotation : world → view rotation (3, 3); view x right, y down, z into the screen.
    target   : the world point (Å) at the centre of the view.
    extent   : Å shown across the view's height (zoom).
    """

    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))
    target: np.ndarray = field(default_factory=lambda: np.zeros(3))
    extent: float = 20.0

    def set_angles(self, azimuth_deg: float, elevation_deg: float) -> None:
        """Turn the world by ``azimuth_deg`` about its y axis (the tilt axis), then tip it by
        ``elevation_deg`` about the screen's x axis. (0, 0) looks along +z, the beam at zero tilt."""
        self.rotation = rotation_about_x(elevation_deg) @ rotation_about_y(azimuth_deg)

    def align_to(self, rotation) -> None:
        """Look along the beam of a projection whose world → beam rotation is ``rotation``."""
        self.rotation = np.array(rotation, dtype=np.float64)

    def orbit(self, d_azimuth_deg: float, d_elevation_deg: float) -> None:
        """Turntable: spin the world about its y axis, then tip it about the screen's x axis."""
        self.rotation = rotation_about_x(d_elevation_deg) @ self.rotation @ rotation_about_y(d_azimuth_deg)

    def pan(self, d_col_px: float, d_row_px: float, view_height_px: int) -> None:
        """Move the scene with the cursor by (d_col, d_row) pixels of a view ``view_height_px`` high."""
        shift_view = np.array([d_col_px, d_row_px, 0.0]) * self.extent / view_height_px
        self.target = self.target - self.rotation.T @ shift_view

    def zoom(self, factor: float) -> None:
        """Magnify by ``factor`` (> 1 zooms in)."""
        self.extent = float(np.clip(self.extent / factor, 0.5, 1e5))

    def frame(self, positions, radii, margin: float = 1.15) -> None:
        """Centre the view on the atoms' bounding box and zoom so the whole cloud fits at any rotation."""
        positions = np.asarray(positions, np.float64).reshape(-1, 3)
        if len(positions) == 0:
            return
        self.target = 0.5 * (positions.min(axis=0) + positions.max(axis=0))
        reach = np.max(np.linalg.norm(positions - self.target, axis=1) + np.asarray(radii, np.float64))
        self.extent = float(max(2 * reach * margin, 1.0))

    def to_view(self, points) -> np.ndarray:
        """World points (N, 3) Å → view-frame coordinates (N, 3) Å relative to the target."""
        return (np.asarray(points, np.float64).reshape(-1, 3) - self.target) @ self.rotation.T

    def to_pixels(self, points, shape) -> np.ndarray:
        """World points (N, 3) Å → (row, col) (N, 2) in pixels of an image of ``shape`` (H, W); pixel
        (r, c) covers [r, r + 1) × [c, c + 1)."""
        h, w = shape
        v = self.to_view(points) * (h / self.extent)
        return np.stack([v[:, 1] + h / 2, v[:, 0] + w / 2], axis=1)

    def kernel_params(self, shape, depth_near: float, depth_span: float) -> np.ndarray:
        """The float32 array `AtomRenderer` kernels read."""
        h, w = shape
        return np.concatenate([self.rotation.ravel(), self.target, [h / self.extent, w / 2, h / 2, depth_near,
                                                                    DEPTH_LEVELS / depth_span]]).astype(np.float32)


@ti.data_oriented
class SphereList:
    """Device copy of the spheres to draw: centre (Å, world), radius (Å), colour (RGB 0..1), and
    where the camera puts them, ``screen`` = (col px, row px, depth Å, radius px)."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self.centre = ti.Vector.field(3, ti.f32, self.capacity)
        self.radius = ti.field(ti.f32, self.capacity)
        self.colour = ti.Vector.field(3, ti.f32, self.capacity)
        self.screen = ti.Vector.field(4, ti.f32, self.capacity)

    def set(self, centres, radii, colours) -> None:
        n = len(centres)
        pad = self.capacity - n
        self.centre.from_numpy(np.pad(np.asarray(centres, np.float32).reshape(-1, 3), ((0, pad), (0, 0))))
        self.radius.from_numpy(np.pad(np.asarray(radii, np.float32).reshape(-1), (0, pad)))
        self.colour.from_numpy(np.pad(np.asarray(colours, np.float32).reshape(-1, 3), ((0, pad), (0, 0))))


@ti.data_oriented
class AtomRenderer:
    """Renders spheres and line segments into an (H, W) RGB image. Use `renderer_for` to share one
    per image size, since each new renderer compiles its kernels again."""

    def __init__(self, shape, capacity: int = 256):
        self.height, self.width = (int(v) for v in shape)
        self.image = ti.field(ti.i32, (self.height, self.width))  # RGB packed as 0xBBGGRR: small, any backend
        self.depth = ti.field(ti.i32, (self.height, self.width))
        self.owner = ti.field(ti.i32, (self.height, self.width))
        self.camera = ti.field(ti.f32, _CAMERA_PARAMS)
        self.segment_ends = ti.Vector.field(3, ti.f32, (MAX_SEGMENTS, 2))
        self.segment_colour = ti.Vector.field(3, ti.f32, MAX_SEGMENTS)
        self.spheres = SphereList(max(int(capacity), 1))
        self.span = 8 if current_arch() == "cpu" else 1  # pixels per thread in the sphere passes

    # ------------------------------------------------------------------ device helpers
    @ti.func
    def _to_view(self, p):
        """World point (Å) → (col px, row px, depth Å) with depth measured into the screen."""
        q = p - ti.Vector([self.camera[9], self.camera[10], self.camera[11]])
        v = ti.Vector([0.0, 0.0, 0.0])
        for a in ti.static(range(3)):
            v[a] = self.camera[3 * a] * q[0] + self.camera[3 * a + 1] * q[1] + self.camera[3 * a + 2] * q[2]
        return ti.Vector([v[0] * self.camera[12] + self.camera[13], v[1] * self.camera[12] + self.camera[14], v[2]])

    @ti.func
    def _pack(self, rgb):
        """RGB 0..1 → 0xBBGGRR (8 bits each, rounded)."""
        c = ti.cast(ti.math.clamp(rgb, 0.0, 1.0) * 255.0 + 0.5, ti.i32)
        return c[0] | (c[1] << 8) | (c[2] << 16)

    @ti.func
    def _level(self, z):
        return ti.cast(ti.math.clamp((z - self.camera[15]) * self.camera[16], 0.0, DEPTH_LEVELS), ti.i32)

    @ti.func
    def _disc(self, spheres: ti.template(), i):
        """Screen centre (col, row), depth (Å) and radius (px) of sphere i, and the top-left pixel of
        its bounding box."""
        s = spheres.screen[i]
        v = ti.Vector([s[0], s[1], s[2]])
        return v, s[3], ti.cast(ti.floor(v[1] - s[3]), ti.i32), ti.cast(ti.floor(v[0] - s[3]), ti.i32)

    @ti.func
    def _surface_level(self, v, r, row, col):
        """Depth level of the sphere's front surface at pixel (row, col); -1 outside the disc or the image."""
        dx = col + 0.5 - v[0]
        dy = row + 0.5 - v[1]
        d2 = dx * dx + dy * dy
        level = -1
        if d2 <= r * r and 0 <= row < self.height and 0 <= col < self.width:
            level = self._level(v[2] - ti.sqrt(r * r - d2) / self.camera[12])
        return level

    # ------------------------------------------------------------------ passes
    # The sphere passes run one thread per (sphere, run of `span` pixels in a row of its box x box
    # square), the run unrolled: atomics inside a per-sphere pixel loop are lost on Vulkan (Taichi
    # 1.7.4, seen on lavapipe), so GPUs take one pixel per thread; the CPU takes 8, 4x faster there.
    @ti.kernel
    def _clear(self):
        for row, col in self.image:
            self.image[row, col] = self._pack(ti.Vector(BACKGROUND))
            self.depth[row, col] = DEPTH_LEVELS + DEPTH_TOLERANCE + 1
            self.owner[row, col] = -1

    @ti.kernel
    def _project(self, spheres: ti.template(), n: ti.i32):
        for i in range(n):
            v = self._to_view(spheres.centre[i])
            spheres.screen[i] = ti.Vector([v[0], v[1], v[2], spheres.radius[i] * self.camera[12]])

    @ti.kernel
    def _sphere_pass(self, spheres: ti.template(), n: ti.i32, box: ti.i32, runs: ti.i32, claim: ti.template()):
        """Over every pixel of every sphere's disc: the depth pass (``claim`` False) keeps the nearest
        surface level per pixel; the owner pass (``claim`` True) gives the pixel to the sphere at
        that depth, exact ties to the higher index."""
        for i, a, run in ti.ndrange(n, box, runs):
            v, r, row0, col0 = self._disc(spheres, i)
            for k in ti.static(range(self.span)):
                col = col0 + run * self.span + k
                level = self._surface_level(v, r, row0 + a, col)
                if level >= 0:  # nested, not `and`: Taichi evaluates both operands; the read needs a valid pixel
                    if ti.static(claim):
                        if level <= self.depth[row0 + a, col] + DEPTH_TOLERANCE:
                            ti.atomic_max(self.owner[row0 + a, col], i)
                    else:
                        ti.atomic_min(self.depth[row0 + a, col], level)

    @ti.kernel
    def _shade(self, spheres: ti.template()):
        light = ti.Vector(LIGHT)
        for row, col in self.owner:
            i = self.owner[row, col]
            if i >= 0:
                v, r, _, _ = self._disc(spheres, i)
                dx = (col + 0.5 - v[0]) / r
                dy = (row + 0.5 - v[1]) / r
                normal = ti.Vector([dx, dy, -ti.sqrt(ti.max(1.0 - dx * dx - dy * dy, 0.0))])
                self.image[row, col] = self._pack(spheres.colour[i] * (AMBIENT + DIFFUSE * ti.max(normal.dot(light), 0.0)))

    @ti.kernel
    def _draw_segments(self, m: ti.i32):
        """Lines LINE_WIDTH px wide, hidden where a sphere is in front."""
        for s in range(m):
            a = self._to_view(self.segment_ends[s, 0])
            b = self._to_view(self.segment_ends[s, 1])
            steps = ti.cast(ti.max(ti.abs(b[0] - a[0]), ti.abs(b[1] - a[1])), ti.i32) + 1
            for k in range(steps + 1):
                p = a + (b - a) * (k / steps)
                for dr, dc in ti.static(ti.ndrange(LINE_WIDTH, LINE_WIDTH)):
                    row = ti.cast(ti.floor(p[1] - 0.5), ti.i32) + dr
                    col = ti.cast(ti.floor(p[0] - 0.5), ti.i32) + dc
                    if 0 <= row < self.height and 0 <= col < self.width:
                        if self._level(p[2]) < self.depth[row, col]:
                            self.image[row, col] = self._pack(self.segment_colour[s])

    # ------------------------------------------------------------------ host side
    def render(self, camera: OrbitCamera, centres, radii, colours, segments=()) -> np.ndarray:
        """Draw spheres (centres (N, 3) Å, radii (N,) Å, colours (N, 3) RGB 0..1) and ``segments``
        (a list of (start (3,) Å, end (3,) Å, RGB)) as seen by ``camera``; returns (H, W, 3) uint8."""
        centres = np.asarray(centres, np.float64).reshape(-1, 3)
        radii = np.asarray(radii, np.float64).reshape(-1)
        n, m = len(centres), len(segments)
        if m > MAX_SEGMENTS:
            raise ValueError(f"at most {MAX_SEGMENTS} segments, got {m}")
        if n > self.spheres.capacity:
            self.spheres = SphereList(1 << (n - 1).bit_length())
        if n:
            self.spheres.set(centres, radii, colours)
        ends = np.zeros((MAX_SEGMENTS, 2, 3), np.float32)
        seg_colours = np.zeros((MAX_SEGMENTS, 3), np.float32)
        for s, (start, end, colour) in enumerate(segments):
            ends[s] = start, end
            seg_colours[s] = colour
        self.segment_ends.from_numpy(ends)
        self.segment_colour.from_numpy(seg_colours)
        # Depth levels span everything drawn, front to back.
        reach = [np.abs(camera.to_view(centres)[:, 2]).max() + radii.max()] if n else [1.0]
        if m:
            reach.append(np.abs(camera.to_view(ends[:m].reshape(-1, 3))[:, 2]).max())
        depth = max(reach) + 1.0
        self.camera.from_numpy(camera.kernel_params((self.height, self.width), -depth, 2 * depth))
        self._clear()
        if n:
            box = int(math.ceil(2 * radii.max() * self.height / camera.extent)) + 2  # px, covers every disc
            runs = -(-box // self.span)
            self._project(self.spheres, n)
            self._sphere_pass(self.spheres, n, box, runs, False)
            self._sphere_pass(self.spheres, n, box, runs, True)
            self._shade(self.spheres)
        if m:
            self._draw_segments(m)
        packed = self.image.to_numpy().astype("<i4")
        return packed.view(np.uint8).reshape(self.height, self.width, 4)[..., :3]


def renderer_for(shape) -> AtomRenderer:
    """The renderer for images of ``shape`` (H, W) on the running backend, made once per backend."""
    cache = session_cache()
    key = ("atom_renderer", tuple(int(v) for v in shape))
    if key not in cache:
        cache[key] = AtomRenderer(shape)
    return cache[key]
