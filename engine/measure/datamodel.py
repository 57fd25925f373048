"""The data model: what is estimated from a measured tilt series before any fit, never from a truth
file. The background (data units), the intensity scale (data units per normalised unit), the noise
level (normalised units) and the blur (Å); the detector gain of counted data (counts per data unit);
and a copy of the images without isolated hot pixels for the volumes that seed atoms.

The fit, the classical baseline, `atomsplat info` and the viewer all use this one module.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.core.errors import InputError
from engine.io.tiltseries import TiltSeries
from engine.kernels.loss import HUBER_DELTA


# A strip of the image edge whose spread exceeds this many times the pixel-to-pixel noise holds
# structure (specimen), not noise: under noise alone the ratio is 1 within a few per cent (thousands of
# pixels), and a specimen's contrast is many noise σ.
STRUCTURE_RATIO = 2.0
EDGE_PX = 3  # width of the image edge strips (px)


@dataclass
class DataModel:
    """What is estimated from the data before fitting (never from a truth file).

    background : data units, subtracted (the starting level where a fit refines one per projection)
    scale      : data units per normalised unit
    noise      : noise σ in normalised units
    blur       : Å
    frame_empty: whether the image edges hold only background and noise (an isolated specimen)
    sides_hold_specimen : whether the edges across the tilt axis (first and last columns) hold
                 specimen: material there moves in and out of view as the specimen tilts
    """

    background: float
    scale: float
    noise: float
    blur: float
    frame_empty: bool = True
    sides_hold_specimen: bool = False


def pixel_noise(images: np.ndarray) -> float:
    """The noise σ of single pixels (data units) from the pixel-to-pixel variation: the RMS of the
    images filtered by the 3 × 3 kernel [[1,-2,1],[-2,4,-2],[1,-2,1]], which cancels any level and
    gradient and has gain 36 on white noise (Immerkær 1996); smooth specimen structure adds little and
    sharp structure is clipped, so no empty region is needed."""
    p = np.asarray(images, np.float64)
    second = (p[:, :-2, :-2] - 2 * p[:, :-2, 1:-1] + p[:, :-2, 2:]
              - 2 * (p[:, 1:-1, :-2] - 2 * p[:, 1:-1, 1:-1] + p[:, 1:-1, 2:])
              + p[:, 2:, :-2] - 2 * p[:, 2:, 1:-1] + p[:, 2:, 2:])
    # σ-clipped RMS: atoms sharp enough to pass the filter make outliers, not the bulk; the RMS of a
    # Gaussian cut at ±3σ is 0.9866 σ.
    values = second.ravel()
    rms = float(np.sqrt(np.mean(values ** 2)))
    for _ in range(10):
        kept = values[np.abs(values) <= 3 * rms]
        if kept.size == 0:
            break
        clipped = float(np.sqrt(np.mean(kept ** 2))) / 0.9866
        if clipped >= rms * (1 - 1e-3):
            break
        rms = clipped
    return rms / 6


def _holds_structure(strip: np.ndarray, noise: float) -> bool:
    """Whether edge pixels ``strip`` spread by more than noise can: their standard deviation, with
    values beyond 5 σ of their median clipped (isolated hot pixels), against STRUCTURE_RATIO σ."""
    centre = float(np.median(strip))
    clipped = np.clip(strip, centre - 5 * noise, centre + 5 * noise)
    return bool(np.std(clipped) > STRUCTURE_RATIO * noise)


def estimate_data_model(series: TiltSeries, blur: float | None, projections: np.ndarray | None = None) -> DataModel:
    """Background and noise of the data; scale from the 99.9th percentile of the background-subtracted
    signal. ``projections`` replaces the series' own images (e.g. without hot pixels).

    An empty image frame (the outer EDGE_PX pixels spread no more than noise) gives the background
    (its median) and the noise (its spread). A frame that holds specimen (a film, a particle on a
    support, a needle crossing the edge) says nothing about either: the noise is then the pixel-to-
    pixel noise (`pixel_noise`) and the background the lowest level the images reach (the median over
    projections of the 1st percentile of each image smoothed over 2 px), a start that fits refine per
    projection (`engine.kernels.loss.FitTarget.fit_offsets`)."""
    from scipy import ndimage

    p = np.asarray(series.projections if projections is None else projections, np.float64)
    e = EDGE_PX
    sides = np.concatenate([p[:, :, :e].ravel(), p[:, :, -e:].ravel()])
    frame = np.concatenate([p[:, :e].ravel(), p[:, -e:].ravel(), sides])
    noise = pixel_noise(p)
    sides_hold_specimen = _holds_structure(sides, noise)
    frame_empty = not (sides_hold_specimen or _holds_structure(frame, noise))
    if frame_empty:
        background = float(np.median(frame))
        spread = 1.4826 * float(np.median(np.abs(frame - background)))
        noise = spread if spread > 0 else noise  # whole counts near zero: the median deviation can be 0
    else:
        smooth = ndimage.gaussian_filter(p, sigma=(0, 2, 2))
        background = float(np.median(np.percentile(smooth.reshape(len(p), -1), 1, axis=1)))
    scale = float(np.percentile(p - background, 99.9))
    if not scale > 0:
        raise InputError(series.source or "tilt series", "the projections hold no positive signal above the background")
    if blur is None:  # not given: the file's, else none
        blur = series.blur_sigma if series.blur_sigma is not None else 0.0
    return DataModel(background=background, scale=scale, noise=max(noise / scale, 1e-6), blur=float(blur),
                     frame_empty=frame_empty, sides_hold_specimen=sides_hold_specimen)


@dataclass
class NoiseModel:
    """The likelihood a fit uses: 'poisson' (counted data, ``gain`` counts per data unit) or
    'gaussian'; ``reason`` says why it was chosen (for the log and report.json)."""

    kind: str
    gain: float | None
    reason: str


def choose_noise_model(series: TiltSeries, requested: str = "auto", gain: float | None = None) -> NoiseModel:
    """The noise model for ``series``: 'auto' takes whole-number, non-negative data as raw counts
    (Poisson, gain 1), data on a lattice of whole counts times a constant as scaled counts (Poisson,
    the gain read off the lattice), anything else as Gaussian; 'gaussian' and 'poisson' force it (a
    ``gain`` in counts per data unit skips reading it off). Poisson data must not be negative."""
    source = series.source or "tilt series"
    p = np.asarray(series.projections)
    if requested == "gaussian":
        return NoiseModel("gaussian", None, "asked for (--noise gaussian)")
    finite = p[np.isfinite(p)]
    negative = finite.size and float(finite.min()) < 0
    if requested == "poisson":
        if negative:
            raise InputError(source, "has negative values, which counted (Poisson) data cannot have; "
                                     "use --noise gaussian for background-subtracted data")
        if gain is not None:
            return NoiseModel("poisson", float(gain), "asked for (--noise poisson), gain given")
        return NoiseModel("poisson", estimate_counts_gain(p, source), "asked for (--noise poisson)")
    if not negative and finite.size and np.all(finite == np.round(finite)):
        return NoiseModel("poisson", 1.0 if gain is None else float(gain), "whole-number data: raw counts")
    if not negative and finite.size:
        try:
            found = estimate_counts_gain(p, source)
        except InputError:
            pass
        else:
            return NoiseModel("poisson", found if gain is None else float(gain),
                              f"the data are whole counts times {1 / found:.6g}: scaled counts")
    return NoiseModel("gaussian", None, "not whole counts: Gaussian noise, σ from the data")


def estimate_counts_gain(projections: np.ndarray, source: str = "tilt series") -> float:
    """Counts per data unit of counted (Poisson) data: such data are whole counts times one quantum
    1/g, so g is the inverse of the smallest step between distinct values, provided every pixel
    lies on that lattice. Raises when the data are not on a lattice (gain-normalised or
    interpolated images): the gain must then be given."""
    values = np.asarray(projections, np.float64)
    values = values[np.isfinite(values)]
    distinct = np.unique(values)
    steps = np.diff(distinct)
    steps = steps[steps > 1e-6 * max(float(np.abs(distinct).max()), 1e-30)]
    if len(steps) == 0:
        raise InputError(source, "cannot estimate the detector gain from constant data; pass --gain")
    # The smallest step between small values (where float32 rounding is negligible), then least squares
    # over all pixels.
    small_steps = np.diff(distinct[np.abs(distinct) <= 64 * steps.min()])
    small_steps = small_steps[small_steps > 0.5 * steps.min()]
    counts = np.round(values / (small_steps.min() if len(small_steps) else steps.min()))
    quantum = float(np.sum(values * counts) / np.sum(counts * counts))
    # Off the lattice by more than rounding: float32 data hold whole counts to about 1e-7 of their size.
    off_lattice = np.abs(values / quantum - counts) > 1e-3 + 1e-6 * np.abs(counts)
    if np.mean(off_lattice) > 0.01:
        raise InputError(source, "the data are not whole counts times a constant, so the gain (counts per data "
                                 "unit) cannot be read off them; pass --gain")
    return 1.0 / quantum


def remove_hot_pixels(images: np.ndarray, background: float, noise_sigma: float) -> np.ndarray:
    """A copy of ``images`` (n, H, W) with isolated hot pixels (hot detector pixels, cosmic rays, specks
    of dust) replaced by the median of their 8 neighbours: pixels whose signal above ``background``
    exceeds twice the largest of their neighbours' by over HUBER_DELTA noise σ (``noise_sigma``, image
    units). Atoms never qualify: even the sharpest atom image (σ ≥ 1 px) keeps its neighbours above
    60 % of its peak. The volumes that seed and spawn atoms use this; the loss sees every pixel."""
    from scipy import ndimage

    signal = np.asarray(images, np.float64) - background
    ring = np.ones((1, 3, 3), bool)
    ring[0, 1, 1] = False
    highest = ndimage.maximum_filter(signal, footprint=ring, mode="nearest")
    hot = signal > 2 * np.maximum(highest, 0) + HUBER_DELTA * noise_sigma
    cleaned = np.array(images, np.float64)
    cleaned[hot] = ndimage.median_filter(signal, footprint=ring, mode="nearest")[hot] + background
    return cleaned
