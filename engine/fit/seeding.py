"""Seeding: the volumes in which atoms are placed (a filtered back-projection of the data inside the
particle support) and the first atoms, at its peaks. Density control spawns atoms in the same way
from the back-projected residual."""

from __future__ import annotations

import math

import numpy as np

from engine.core.errors import InputError
from engine.kernels.volume import local_maxima, projector_for, suppress_close


class SeedVolumes:
    """A voxel grid over the field of view (``voxel`` Å) in the data's geometry, with the particle
    support and the filtered back-projection of the (screened, normalised) images.

    images : (n, H, W) normalised images, background 0, hot pixels removed where the loss is robust.
    noise  : their noise σ (normalised units).
    d_min  : the shortest distance between atoms (Å): one peak per d_min.
    """

    def __init__(self, images: np.ndarray, noise: float, geometry, pixel_size: float, voxel: float, d_min: float):
        self.images, self.noise, self.pixel_size, self.d_min = images, noise, pixel_size, d_min
        self.projector = projector_for(len(images), images.shape[1:], pixel_size, voxel)
        self.set_geometry(geometry)

    def set_geometry(self, geometry) -> None:
        """Recompute the support and the data's back-projection in ``geometry`` (after alignment moved)."""
        self.projector.set_geometry(geometry)
        self.support = self._support()
        self.data_fbp = self.fbp(self.images)

    def fbp(self, images: np.ndarray) -> np.ndarray:
        return self.projector.fbp(images)

    def _support(self) -> np.ndarray:
        """Visual hull: voxels whose projection lands on signal (the image smoothed over 2 px, above
        5 σ of its noise and 8 % of its maximum) in every projection, dilated by d_min."""
        from scipy import ndimage

        smooth = ndimage.gaussian_filter(self.images, sigma=(0, 2, 2))
        smoothed_noise = self.noise / (2 * math.sqrt(math.pi) * 2)  # white noise after a σ = 2 px blur
        mask = smooth > max(5 * smoothed_noise, 0.08 * smooth.max())
        mask = ndimage.binary_dilation(mask, iterations=int(math.ceil(self.d_min / self.pixel_size)),
                                       structure=ndimage.generate_binary_structure(3, 1)[1:2])
        return self.projector.backproject(mask.astype(np.float32), reduction="min") > 0.5

    def in_support(self, positions: np.ndarray) -> np.ndarray:
        bp = self.projector
        inside = np.all(np.abs((positions - bp.origin) / bp.voxel - (np.array(bp.grid_shape) - 1) / 2)
                        <= (np.array(bp.grid_shape) - 1) / 2 + 0.5, axis=1)
        return inside & self.support[tuple(bp.indices(positions).T)]

    def peaks(self, volume: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """Local maxima (one per d_min) above ``threshold`` inside the support: positions (Å), values."""
        positions, values = local_maxima(volume, self.projector, self.d_min, threshold, self.support)
        return suppress_close(positions, values, self.d_min)

    def sample(self, volume: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return volume[tuple(self.projector.indices(positions).T)]


def projected_mass(images: np.ndarray, pixel_size: float) -> float:
    """The mean projected mass of normalised ``images`` (normalised units · Å²): what the atoms share."""
    return float(np.mean(images.sum(axis=(1, 2)))) * pixel_size ** 2


def initial_atoms(volumes: SeedVolumes, source: str) -> dict:
    """Seeds at FBP peaks brighter than a third of the typical bright peak, one per d_min; each
    with an equal share of the mean projected mass (amplitude, normalised units · Å²) and σ 0.35 Å."""
    positions, values = volumes.peaks(volumes.data_fbp, 0.0)
    if len(values) == 0:
        raise InputError(source, "no signal peaks inside the particle support")
    bright = np.median(values[: max(1, len(values) // 10)])
    keep = values > bright / 3.0
    positions = positions[keep]
    total = projected_mass(volumes.images, volumes.pixel_size)
    return {"pos": positions, "amp": np.full(len(positions), total / len(positions)),
            "sigma": np.full(len(positions), 0.35)}


def warm_start(path, images: np.ndarray, pixel_size: float, scale: float) -> dict:
    """The atoms of the file at ``path`` (a warm start) as a fit's state: positions (Å); the file's
    amplitudes (data units · Å²) divided by the data ``scale`` and its widths σ (Å) where it has
    them, else `initial_atoms`' equal share of the projected mass of ``images`` and σ 0.35 Å."""
    from engine.io.atoms import read_atoms

    atoms = read_atoms(path)  # refuses a file without atoms
    n = len(atoms)
    share = projected_mass(images, pixel_size) / n
    amp = atoms.columns["amplitude"] / scale if "amplitude" in atoms.columns else np.full(n, share)
    sigma = atoms.columns.get("width", np.full(n, 0.35))
    return {"pos": atoms.positions, "amp": amp, "sigma": sigma}


def visible_everywhere(projector, shape, pixel_size: float) -> np.ndarray:
    """Voxels of ``projector``'s grid that project inside every image of a single-axis series: the
    cylinder |(x, z)| ≤ half the image width (Å), the grid's full height."""
    nx, ny, nz = projector.grid_shape
    x = projector.origin[0] + np.arange(nx) * projector.voxel
    z = projector.origin[2] + np.arange(nz) * projector.voxel
    half = (shape[1] - 1) / 2 * pixel_size
    return np.broadcast_to(((x[:, None] ** 2 + z[None, :] ** 2) <= half ** 2)[:, None, :], (nx, ny, nz)).copy()


def mlem_with_background(counts: np.ndarray, projector, support: np.ndarray, iterations: int):
    """Maximum-likelihood EM for counts λ_k = B_k + (P x)_k with x ≥ 0 on the ``support`` voxels and a
    background B_k ≥ 0 per projection (counts per pixel). The background is one more 'voxel' that
    projects uniformly, so its EM update is B_k ← B_k · mean_p(y/λ): no empty image frame is needed,
    and it stays right when the specimen touches the image edge. Returns (x, B)."""
    n = len(counts)
    sensitivity = projector.backproject(np.ones_like(counts, np.float32)).astype(np.float64)
    sensitivity = np.where(support, np.maximum(sensitivity, 1e-12), 1.0)
    mean = counts.mean(axis=(1, 2))
    background = 0.5 * mean  # any positive start; EM moves it
    footprint = projector.project(support.astype(np.float32)).astype(np.float64)
    signal = (mean - background).sum() / n * counts[0].size
    x = support * (signal / max(footprint.sum() / n, 1e-12))
    for _ in range(iterations):
        ratio = counts / np.maximum(background[:, None, None] + projector.project(x.astype(np.float32)), 1e-9)
        x = x * projector.backproject(ratio.astype(np.float32)) / sensitivity * support
        background = background * ratio.mean(axis=(1, 2))
    return x, background
