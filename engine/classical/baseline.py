"""The classical pipeline, for comparison: a voxel reconstruction (SIRT with non-negativity, or FBP)
and atom tracing in it, as atomic electron tomography papers do it.

Low-dose counted data (whole counts, or counts times one quantum) are handled in counts: the
background of every projection is estimated away from the particle (which may touch the image edge;
`engine.measure.alignment.counts_background`), and with ``denoise = "bm3d"`` each projection is
first denoised (Anscombe transform, BM3D with σ = 1, exact unbiased inverse; `engine.classical.denoise`)
as the field does before reconstructing and tracing.

Tracing: local maxima of the volume, one per d_min (greedy, brightest first); the threshold is
chosen from the volume itself (Otsu's split of the peak heights into atoms and background); each
peak is refined to sub-voxel precision by a parabola through its neighbours along each axis;
species, when a list is given, by 1D k-means on the peak's integrated intensity (brighter = heavier).
"""

from __future__ import annotations

import numpy as np

from engine.core.settings import Schema, Setting, element_symbols, name_list, positive
from engine.io.atoms import UNKNOWN_SPECIES, Atoms
from engine.core.errors import InputError
from engine.io.tiltseries import TiltSeries
from engine.physics.chemistry import minimum_distance


BASELINE_SCHEMA = Schema("BaselineSettings", [
    Setting("method", str, "sirt", "volume reconstruction", choices=("sirt", "fbp")),
    Setting("denoise", str, "none", "denoise each projection first (counted data): bm3d = Anscombe transform, "
            "BM3D with sigma 1, exact unbiased inverse (needs the bm3d package)", choices=("none", "bm3d")),
    Setting("iters", int, 50, "SIRT iterations", check=positive),
    Setting("voxel", float, None, "voxel edge (not set: the pixel size)", "Å", check=positive),
    Setting("species", list, [], "expected elements, e.g. Pt,Ni (species by k-means)", parse=name_list),
    Setting("d_min", float, None, "minimum distance between traced atoms (not set: as the direct fit's)", "Å",
            check=positive),
])
BaselineSettings = BASELINE_SCHEMA.cls


def baseline_settings(values: dict | None = None, **overrides) -> BaselineSettings:
    """Checked baseline settings; element symbols normalised."""
    settings = BASELINE_SCHEMA.make(values, **overrides)
    settings.species = element_symbols(settings.species, "species")
    return settings


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """The split of ``values`` into two classes with the largest between-class variance."""
    hist, edges = np.histogram(values, bins=bins)
    centres = 0.5 * (edges[1:] + edges[:-1])
    weight = np.cumsum(hist)
    total = weight[-1]
    mean = np.cumsum(hist * centres)
    between = (mean[-1] * weight / total - mean) ** 2 / np.maximum(weight * (total - weight), 1)
    return float(centres[int(np.argmax(between[:-1]))])


def refine_subvoxel(volume: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Sub-voxel offsets (in voxels, within ±0.5) of peaks at ``index`` (M, 3): the vertex of the
    parabola through each peak and its two neighbours, axis by axis."""
    offsets = np.zeros(index.shape, dtype=np.float64)
    shape = np.array(volume.shape)
    for axis in range(3):
        step = np.eye(3, dtype=int)[axis]
        lo = np.clip(index - step, 0, shape - 1)
        hi = np.clip(index + step, 0, shape - 1)
        vm, v0, vp = volume[tuple(lo.T)], volume[tuple(index.T)], volume[tuple(hi.T)]
        curvature = vm - 2 * v0 + vp
        with np.errstate(divide="ignore", invalid="ignore"):
            offsets[:, axis] = np.where(curvature < 0, 0.5 * (vm - vp) / curvature, 0.0)
    return np.clip(offsets, -0.5, 0.5)


def classify_species(intensity: np.ndarray, species: list[str]) -> np.ndarray:
    """1D k-means of integrated intensities into len(species) classes; the brightest class gets the
    heaviest element."""
    from engine.core.elements import atomic_number

    by_z = sorted(species, key=atomic_number)
    k = len(by_z)
    centres = np.quantile(intensity, (np.arange(k) + 0.5) / k)
    for _ in range(100):
        label = np.argmin(np.abs(intensity[:, None] - centres[None, :]), axis=1)
        new = np.array([intensity[label == c].mean() if np.any(label == c) else centres[c] for c in range(k)])
        if np.allclose(new, centres):
            break
        centres = new
    rank = np.argsort(np.argsort(centres))
    return np.array(by_z)[rank[label]]


def trace_atoms(volume: np.ndarray, projector, d_min: float, species: list[str]) -> Atoms:
    """Atoms traced in ``volume`` (on ``projector``'s grid): positions (Å), 'intensity' column."""
    from engine.kernels.volume import local_maxima, suppress_close

    positions, values = local_maxima(volume, projector, d_min, 0.0)
    if len(values) == 0:
        raise InputError("volume", "no peaks in the reconstructed volume")
    threshold = otsu_threshold(values)
    positions, values = suppress_close(positions[values > threshold], values[values > threshold], d_min)
    index = projector.indices(positions)
    positions = projector.positions(index + refine_subvoxel(volume, index))
    # Integrated intensity: the 3×3×3 neighbourhood's sum (voxel units).
    shape = np.array(volume.shape)
    intensity = np.zeros(len(index))
    for offset in np.ndindex(3, 3, 3):
        intensity += volume[tuple(np.clip(index + np.array(offset) - 1, 0, shape - 1).T)]
    labels = classify_species(intensity, species) if len(species) > 1 else np.full(
        len(index), species[0] if species else UNKNOWN_SPECIES)
    return Atoms(labels, positions, {"intensity": intensity})


def volume_grid(series: TiltSeries, voxel: float) -> tuple[int, int]:
    """(nx, ny) voxels of the volume (nx, ny, nx) that covers the images' field of view (as
    `run_baseline` makes it)."""
    h, w = series.shape
    return int((w - 1) * series.pixel_size // voxel) + 1, int((h - 1) * series.pixel_size // voxel) + 1


BYTES_PER_VOXEL = 64  # the volume, SIRT's weights and updates in float64, the device field


def check_baseline_size(series: TiltSeries, config: BaselineSettings) -> None:
    """Refuse, before any work, a voxel grid that would not fit in memory (InputError naming --voxel)."""
    from engine.core.memory import require_memory

    voxel = config.voxel or series.pixel_size
    nx, ny = volume_grid(series, voxel)
    require_memory(float(nx) * ny * nx * BYTES_PER_VOXEL, "--voxel",
                   f"{voxel:g} Å voxels make a {nx} x {ny} x {nx} volume, which",
                   f"use larger voxels (default: the pixel size, {series.pixel_size:g} Å)")


def baseline_images(series: TiltSeries, config: BaselineSettings, details: dict | None = None) -> np.ndarray:
    """The background-subtracted projections (data units) the volume is reconstructed from. Counted
    data: background per projection from the counts (`counts_background`), optionally denoised
    (``config.denoise``); other data: the data model's background. ``details`` (a dict) receives what
    was found: whether the data are counts, the gain, the mean background, the denoising time."""
    import time

    from engine.measure.alignment import counts_background, counts_gain_or_none
    from engine.measure.datamodel import estimate_data_model

    details = {} if details is None else details
    gain = counts_gain_or_none(series.projections)
    details.update(counted=gain is not None, gain=gain, denoise=config.denoise)
    if gain is None:
        if config.denoise != "none":
            raise InputError(series.source or "tilt series", f"--denoise {config.denoise} needs counted data (whole "
                             "counts, or counts times one constant); these are not")
        data = estimate_data_model(series, blur=0.0)
        details["background"] = data.background
        return series.projections.astype(np.float64) - data.background
    counts = np.round(series.projections.astype(np.float64) * gain)
    background = counts_background(counts)
    details["background"] = float(background.mean()) / gain
    if config.denoise == "bm3d":
        from engine.classical.denoise import denoise_counts_bm3d

        t0 = time.perf_counter()
        counts = denoise_counts_bm3d(counts)
        details["denoise_seconds"] = time.perf_counter() - t0
    return (counts - background[:, None, None]) / gain


def run_baseline(series: TiltSeries, config: BaselineSettings, details: dict | None = None,
                 callback=None) -> tuple[Atoms, np.ndarray, object]:
    """Reconstruct a volume and trace atoms in it. Returns (atoms, volume (nx, ny, nz), projector);
    ``details`` as in `baseline_images`; ``callback(iteration, volume, residual_norm)``: called after
    every SIRT iteration (progress)."""
    from engine.kernels.volume import VoxelProjector

    images = baseline_images(series, config, details)
    voxel = config.voxel or series.pixel_size
    nx, ny = volume_grid(series, voxel)
    origin = (-(nx - 1) / 2 * voxel, -(ny - 1) / 2 * voxel, -(nx - 1) / 2 * voxel)
    projector = VoxelProjector(series.n_tilts, series.shape, series.pixel_size, (nx, ny, nx), origin, voxel)
    projector.set_geometry(series.get_geometry())
    volume = projector.sirt(images, config.iters, callback=callback) if config.method == "sirt" else projector.fbp(images)
    d_min = minimum_distance(config.species, config.d_min)
    return trace_atoms(volume, projector, d_min, list(config.species)), volume, projector


def write_volume_mrc(volume: np.ndarray, voxel: float, path, overwrite: bool = False) -> None:
    """Write a (nx, ny, nz) volume as MRC (sections along z, rows along y), voxel size in Å."""
    import mrcfile

    from engine.core.files import write_atomically
    from pathlib import Path

    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(path, "already exists; pass --overwrite to replace it")

    def write(tmp):
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(np.transpose(volume, (2, 1, 0)), dtype=np.float32))
            mrc.voxel_size = voxel

    write_atomically(path, write)
