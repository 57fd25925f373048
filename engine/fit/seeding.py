"""Seeding: the volumes in which atoms are placed (a filtered back-projection of the data inside the
particle support) and the first atoms, at its peaks. Density control spawns atoms in the same way
from the back-projected residual."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
from scipy import fft

from engine.core.errors import InputError
from engine.core.geometry import centre_index
from engine.kernels.volume import local_maxima, peak_window, projector_for, suppress_close


# An extended specimen's atom outside the always-visible window must be seen by at least this many
# projections: one view fixes no depth at all.
MIN_VIEWS = 2


def extended_margin(angles_deg, shape, pixel_size: float) -> float:
    """How far (Å) beyond the image's half-width a single-axis series still sees material at least
    MIN_VIEWS times, for a specimen no thicker than the image is wide (the depth the grid spans):
    |x cos θ + z sin θ| ≤ W/2 with |z| ≤ W/2 at the MIN_VIEWS-th most tilted angle; at most twice the
    image width (beyond that the views are too oblique to place anything)."""
    half = centre_index(shape[1]) * pixel_size  # the outermost pixel centre (Å)
    tilts = np.sort(np.abs(np.deg2rad(np.asarray(angles_deg, np.float64))))
    theta = tilts[-min(MIN_VIEWS, len(tilts))]
    reach = half * (1 + math.sin(theta)) / max(math.cos(theta), 1e-6) - half
    return float(min(max(reach, 0.0), 4 * half))


class SeedVolumes:
    """A voxel grid over the field of view (``voxel`` Å) in the data's geometry, with the particle
    support and the filtered back-projection of the (screened, normalised) images.

    images   : (n, H, W) normalised images, background 0, hot pixels removed where the loss is robust.
    noise    : their noise σ (normalised units).
    d_min    : the shortest distance between atoms (Å): one peak per d_min.
    x_margin : None for a specimen inside the field of view; for one larger than it, how far (Å) the
               grid reaches beyond the image's half-width (`extended_margin`): atoms seen by MIN_VIEWS
               projections may sit there.
    """

    def __init__(self, images: np.ndarray, noise: float, geometry, pixel_size: float, voxel: float, d_min: float,
                 x_margin: float | None = None):
        self.images, self.noise, self.pixel_size, self.d_min = images, noise, pixel_size, d_min
        self.extended = x_margin is not None
        self.projector = projector_for(len(images), images.shape[1:], pixel_size, voxel, x_margin=x_margin or 0.0)
        self.set_geometry(geometry)

    def set_geometry(self, geometry) -> None:
        """Recompute the support and the data's back-projection in ``geometry`` (after alignment moved)."""
        from scipy import ndimage

        self.projector.set_geometry(geometry)
        self.support = self._support()
        # Back-projections are read inside the support only (peaks, samples at atoms); the peak test
        # also looks a peak window beyond it, so they are computed there too and nowhere else.
        self.region = ndimage.maximum_filter(self.support, size=peak_window(self.d_min, self.projector.voxel))
        self.data_fbp = self.fbp(self.images)

    def fbp(self, images: np.ndarray) -> np.ndarray:
        """The filtered back-projection of ``images`` in the support and a peak window around it (0
        elsewhere)."""
        return self.projector.fbp(images, self.region)

    def _support(self) -> np.ndarray:
        """Visual hull: voxels whose projection lands on signal (the image smoothed over 2 px, above
        5 σ of its noise and 8 % of its maximum) in every projection that sees them, dilated by d_min;
        seen by every projection, or by MIN_VIEWS for an extended specimen."""
        from scipy import ndimage

        smooth = ndimage.gaussian_filter(self.images, sigma=(0, 2, 2))
        smoothed_noise = self.noise / (2 * math.sqrt(math.pi) * 2)  # white noise after a σ = 2 px blur
        mask = smooth > max(5 * smoothed_noise, 0.08 * smooth.max())
        mask = ndimage.binary_dilation(mask, iterations=int(math.ceil(self.d_min / self.pixel_size)),
                                       structure=ndimage.generate_binary_structure(3, 1)[1:2])
        views = self.projector.hull(mask.astype(np.float32))
        # An atom's back-projection grows with the views that see it: peaks are compared per view
        # (inside the hull; outside it, where no peak is taken, as if every view saw it).
        self.view_fraction = np.where(views > 0, views, len(mask)) / len(mask)
        needed = MIN_VIEWS if self.extended else len(mask)
        return views >= needed

    def in_support(self, positions: np.ndarray) -> np.ndarray:
        bp = self.projector
        inside = np.all(np.abs((positions - bp.origin) / bp.voxel - (np.array(bp.grid_shape) - 1) / 2)
                        <= (np.array(bp.grid_shape) - 1) / 2 + 0.5, axis=1)
        return inside & self.support[tuple(bp.indices(positions).T)]

    def reference(self, positions: np.ndarray) -> np.ndarray:
        """Which atoms at ``positions`` (Å) every view sees (all of them unless none is): the atoms
        whose amplitudes and back-projections set what a typical atom is."""
        index = tuple(self.projector.indices(positions).T)
        seen = self.view_fraction[index] > 1 - 0.5 / len(self.images)
        return seen if seen.any() else np.ones(len(positions), bool)

    def significant(self, state: dict, predicted: np.ndarray, blur: float) -> np.ndarray:
        """Which atoms of ``state`` (pos Å, amp normalised units · Å², sigma Å) stand out of what the
        fit leaves unexplained, given ``predicted`` images (normalised units): each amplitude against
        its standard error, with more significance asked the larger the support (one false atom in
        it, `significance_level`). The residual stands for the noise, model error included, through
        its variance and its correlation area (`residual_dispersion`), so the rule holds for denoised
        or otherwise filtered measured data, where the pixel noise says little."""
        dispersion, area = residual_dispersion(self.images - predicted)
        index = tuple(self.projector.indices(state["pos"]).T)
        views = self.view_fraction[index] * len(self.images)
        # Fisher information of an amplitude a: Σ_pixels (∂image/∂a)² / (φ A), the atom's unit image a
        # Gaussian of variance s² = σ² + blur² (Å²) sampled on pixel² cells: Σ ≈ views / (4π s² pixel²).
        width2 = state["sigma"] ** 2 + blur ** 2
        error = np.sqrt(dispersion * area * 4 * math.pi * width2 * self.pixel_size ** 2 / views)
        return state["amp"] / error > self.one_in_the_support()

    def one_in_the_support(self) -> float:
        """z that noise exceeds, on average, once among the support's atom sites (`significance_level`)."""
        return significance_level(float(self.support.sum()) * self.projector.voxel ** 3, self.d_min)

    def artifact_level(self) -> float:
        """The data's back-projection (per view, as `peaks` reads it) that noise and reconstruction
        artifacts reach, on average, once in the support (`significance_level`): z times their σ,
        measured in the peak window just beyond the support, where no atom sits (the median absolute
        deviation: robust to the odd atom there). The streaks of a sparse tilt series grow with the
        particle's projected thickness; beside a large particle they rise to a third of an atom's
        peak, where the rule of a third alone would seed them."""
        outside = self.region & ~self.support
        if not outside.any():
            return 0.0
        values = self.data_fbp[outside] / self.view_fraction[outside]
        sigma = 1.4826 * float(np.median(np.abs(values - np.median(values))))  # σ of a normal from its MAD
        return self.one_in_the_support() * sigma

    def peaks(self, volume: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """Local maxima (one per d_min) above ``threshold`` inside the support: positions (Å), values;
        a back-projected ``volume`` is taken per view (what a voxel seen by every view would show)."""
        positions, values = local_maxima(volume / self.view_fraction, self.projector, self.d_min, threshold,
                                         self.support)
        return suppress_close(positions, values, self.d_min)

    def sample(self, volume: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """A back-projected ``volume`` per view (see `peaks`) at ``positions`` (Å)."""
        index = tuple(self.projector.indices(positions).T)
        return volume[index] / self.view_fraction[index]


def residual_dispersion(residual: np.ndarray, max_lag: int = 4) -> tuple[float, float]:
    """The variance φ of residual images (n, H, W) and their correlation area A (px): the sum of the
    mean normalised autocorrelation over lags up to ``max_lag`` px each way (1 for white noise). A
    least-squares statistic over correlated pixels varies A times more than over independent ones."""
    centred = residual - residual.mean(axis=(1, 2), keepdims=True)
    variance = float(np.mean(centred ** 2))
    if not variance > 0:
        return 0.0, 1.0
    # Zero-padded by the largest lag (to a fast FFT length): no wrap-around at the lags used.
    padded = tuple(fft.next_fast_len(size + max_lag, real=True) for size in residual.shape[1:])
    spectrum = fft.rfft2(centred.astype(np.float64), s=padded, workers=-1)
    power = (spectrum.real ** 2 + spectrum.imag ** 2).sum(axis=0)  # summed over images before the inverse
    autocorrelation = fft.irfft2(power, s=padded, workers=-1)
    autocorrelation /= autocorrelation[0, 0]
    lags = np.r_[0:max_lag + 1, -max_lag:0]
    return variance, float(max(autocorrelation[np.ix_(lags, lags)].sum(), 1.0))


def significance_level(volume_A3: float, d_min: float) -> float:
    """The z an amplitude must reach for one false atom, on average, in ``volume_A3`` (Å³) holding at
    most one atom per d_min³: the one-sided normal quantile of 1 / (volume / d_min³). (The standard
    library's quantile: importing scipy.stats for it took longer than a whole density round.)"""
    trials = max(volume_A3 / d_min ** 3, 2.0)
    return -NormalDist().inv_cdf(1.0 / trials)


def projected_mass(images: np.ndarray, pixel_size: float) -> float:
    """The mean projected mass of normalised ``images`` (normalised units · Å²): what the atoms share."""
    return float(np.mean(images.sum(axis=(1, 2)))) * pixel_size ** 2


def initial_atoms(volumes: SeedVolumes, source: str) -> dict:
    """Seeds at FBP peaks, one per d_min, brighter than a third of the typical bright peak and than
    the back-projection's noise and artifacts (`SeedVolumes.artifact_level`); each with an equal
    share of the mean projected mass (amplitude, normalised units · Å²) and σ 0.35 Å."""
    positions, values = volumes.peaks(volumes.data_fbp, 0.0)
    if len(values) == 0:
        raise InputError(source, "no signal peaks inside the particle support")
    bright = np.median(values[: max(1, len(values) // 10)])
    keep = values > max(bright / 3.0, volumes.artifact_level())
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
    half = centre_index(shape[1]) * pixel_size  # the outermost pixel centre (Å)
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
