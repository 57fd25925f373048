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


@dataclass
class DataModel:
    """What is estimated from the data before fitting (never from a truth file)."""

    background: float      # data units, subtracted
    scale: float           # data units per normalised unit
    noise: float           # noise σ in normalised units
    blur: float            # Å


def estimate_data_model(series: TiltSeries, blur: float | None, projections: np.ndarray | None = None) -> DataModel:
    """Background and noise from the outer 3-pixel frame of every projection (AET images keep the
    particle inside the field of view); scale from the 99.9th percentile of the background-subtracted
    signal. ``projections`` replaces the series' own images (e.g. without hot pixels)."""
    p = series.projections if projections is None else projections
    frame = np.concatenate([p[:, :3].ravel(), p[:, -3:].ravel(), p[:, :, :3].ravel(), p[:, :, -3:].ravel()])
    background = float(np.median(frame))
    spread = 1.4826 * float(np.median(np.abs(frame - background)))
    scale = float(np.percentile(p - background, 99.9))
    if not scale > 0:
        raise InputError(series.source or "tilt series", "the projections hold no positive signal above the background")
    if blur is None:  # not given: the file's, else none
        blur = series.blur_sigma if series.blur_sigma is not None else 0.0
    return DataModel(background=background, scale=scale, noise=max(spread / scale, 1e-6), blur=float(blur))


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
