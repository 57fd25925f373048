"""Alignment of a single-axis tilt series: coarse pre-alignment from the images alone, and the
parameters the fit refines jointly with the atoms.

Model of projection k (lengths in Å, angles in degrees): the specimen rotates by
R_k = R_z(φ) R_y(θ_k + δ_k) R_z(−φ) (`geometry.tilt_rotation`: tilt axis turned by φ in the image
plane), is shifted in the image plane by s_k, and imaged with intensity c_k I + b_k.

Gauge: the images do not change if the atoms move by t and every s_k by −P R_k t (P drops z'), if
every δ_k changes by the same amount and the atoms turn about the tilt axis by it, or if every c_k
is divided by g and the atoms' amplitudes multiplied by g. `AlignmentRefiner.fix_gauge` removes
these directions from the alignment (s ⊥ {P R_k t}, mean δ = 0, geometric-mean c = 1) and hands
the compensating atom transform to the caller, so the refined alignment cannot drift as a whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.core.errors import InputError
from engine.core.files import write_atomically
from engine.core.geometry import TiltGeometry, centre_index


@dataclass
class Alignment:
    """Per-projection alignment of a single-axis series of n projections.

    angle_offsets    : (n,) δ_k, degrees, added to the nominal tilt angles.
    shifts           : (n, 2) s_k, Å, added to the projected (x', y').
    axis_angle       : φ, degrees: the tilt axis is turned from +y towards −x by φ.
    intensity_scale  : (n,) c_k, dimensionless.
    intensity_offset : (n,) b_k, normalised data units (× the data scale for data units).
    """

    angle_offsets: np.ndarray
    shifts: np.ndarray
    axis_angle: float
    intensity_scale: np.ndarray
    intensity_offset: np.ndarray

    @classmethod
    def identity(cls, n: int) -> "Alignment":
        return cls(np.zeros(n), np.zeros((n, 2)), 0.0, np.ones(n), np.zeros(n))

    def geometry(self, angles_deg) -> TiltGeometry:
        """The tilt geometry this alignment gives the nominal tilt angles."""
        return TiltGeometry.from_tilt_angles(np.asarray(angles_deg, np.float64) + self.angle_offsets, self.shifts,
                                             self.axis_angle)


def require_single_axis(series) -> None:
    """Alignment is modelled for single-axis series; an explicit other geometry is refused."""
    if series.geometry is None:
        return
    nominal = TiltGeometry.from_tilt_angles(series.angles)
    if not np.allclose(series.geometry.rotations, nominal.rotations, atol=1e-6):
        raise InputError(series.source or "tilt series", "alignment refinement supports single-axis tilt series "
                                                         "(rotations about +y) only")


def translation_gauge(shifts: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    """The 3D translation t (Å) whose image shifts P R_k t best explain ``shifts`` (least squares)."""
    design = rotations[:, :2, :].reshape(-1, 3)
    t, *_ = np.linalg.lstsq(design, shifts.reshape(-1), rcond=None)
    return t


def misalignment_from(values, source, angles_deg, pixel_size: float, seed: int = 0) -> Alignment:
    """`random_misalignment` from the user's [SHIFT_PX, ANGLE_DEG, AXIS_DEG(, DRIFT)] (a command-line
    option or a scene key named by ``source``); only the axis angle may be negative."""
    try:
        values = [float(v) for v in values]
        if len(values) not in (3, 4) or min(values[:2] + values[3:]) < 0:
            raise ValueError
    except (TypeError, ValueError):
        raise InputError(source, f"expected SHIFT_PX, ANGLE_DEG, AXIS_DEG[, DRIFT] (all but the axis angle >= 0), "
                                 f"got {values!r}") from None
    return random_misalignment(angles_deg, pixel_size, *values, seed=seed)


def random_misalignment(angles_deg, pixel_size: float, max_shift_px: float, max_angle_error_deg: float,
                        axis_angle_deg: float, intensity_drift: float = 0.0, seed: int = 0) -> Alignment:
    """A random, gauge-free misalignment for simulations: shifts with every component within
    ±``max_shift_px`` pixels and no part a specimen translation could explain, zero-mean tilt-angle
    errors within ±``max_angle_error_deg``, the given axis angle, and intensity scales
    exp(U(±intensity_drift)) with geometric mean 1."""
    rng = np.random.default_rng(seed)
    angles = np.asarray(angles_deg, np.float64)
    n = len(angles)
    a = Alignment.identity(n)
    a.axis_angle = float(axis_angle_deg)
    offsets = rng.uniform(-1, 1, n)
    offsets -= offsets.mean()
    a.angle_offsets = offsets * max_angle_error_deg / np.abs(offsets).max() if max_angle_error_deg > 0 else np.zeros(n)
    shifts = rng.uniform(-1, 1, (n, 2))
    rotations = a.geometry(angles).rotations
    shifts -= np.einsum("kij,j->ki", rotations[:, :2, :], translation_gauge(shifts, rotations))
    a.shifts = shifts * (max_shift_px * pixel_size / np.abs(shifts).max())
    log_scale = rng.uniform(-intensity_drift, intensity_drift, n)
    a.intensity_scale = np.exp(log_scale - log_scale.mean())
    return a


def alignment_errors(estimate: Alignment, truth: Alignment, pixel_size: float) -> dict:
    """How far a refined alignment is from the true one: shifts (pixels), tilt-angle offsets and the
    axis angle (degrees), intensity scales (relative). Both must be gauge-free (as refined ones and
    `random_misalignment`'s are)."""
    shifts = (estimate.shifts - truth.shifts) / pixel_size
    scale = estimate.intensity_scale / truth.intensity_scale - 1
    return {"shift_rmse_px": float(np.sqrt(np.mean(shifts**2))), "shift_max_px": float(np.abs(shifts).max()),
            "angle_rmse_deg": float(np.sqrt(np.mean((estimate.angle_offsets - truth.angle_offsets) ** 2))),
            "axis_error_deg": float(estimate.axis_angle - truth.axis_angle),
            "scale_rmse": float(np.sqrt(np.mean(scale**2)))}


# ---------------------------------------------------------------------- coarse pre-alignment
def _axis_coordinates(shape, axis_angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (pixels from the image centre) across and along the tilt axis turned by φ."""
    h, w = shape
    phi = np.deg2rad(axis_angle)
    yy, xx = np.mgrid[0:h, 0:w]
    x, y = xx - centre_index(w), yy - centre_index(h)
    return x * np.cos(phi) + y * np.sin(phi), -x * np.sin(phi) + y * np.cos(phi)


def _axis_bins(shape, axis_angle: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Linear binning of every pixel onto a 1-pixel grid along the tilt axis turned by φ (degrees):
    the lower bin of each pixel (flattened), its weight in the upper bin, and the number of bins."""
    h, w = shape
    _, coordinate = _axis_coordinates((h, w), axis_angle)
    half = int(np.ceil(np.hypot(h, w) / 2)) + 1
    position = coordinate.ravel() + half
    lo = np.floor(position).astype(int)
    return lo, position - lo, 2 * half + 2


def _axis_binning(images: np.ndarray, axis_angle: float) -> np.ndarray:
    """Sums of every image over lines across the tilt axis turned by φ (degrees): (n, L) profiles on a
    1-pixel grid along the axis, linear binning."""
    n = len(images)
    lo, frac, length = _axis_bins(images.shape[1:], axis_angle)
    flat = images.reshape(n, -1)
    profiles = np.zeros((n, length))
    for k in range(n):
        profiles[k] = np.bincount(lo, flat[k] * (1 - frac), length) + np.bincount(lo + 1, flat[k] * frac, length)
    return profiles


def _axis_weights_on_pixels(weights: np.ndarray, shape, axis_angle: float) -> np.ndarray:
    """The pixel map (H, W) whose dot product with an image equals ``weights`` (L,) dotted with the
    image's binned profile (`_axis_binning`): the adjoint of the binning."""
    lo, frac, _ = _axis_bins(shape, axis_angle)
    return (weights[lo] * (1 - frac) + weights[lo + 1] * frac).reshape(shape)


PROFILE_SMOOTHING = 1.0  # px


def _axis_profiles(images: np.ndarray, axis_angle: float) -> np.ndarray:
    """Projection of every image onto the tilt axis turned by φ (degrees): (n, L) profiles on a
    1-pixel grid, linear binning. For a single-axis series these are all the same line (the common
    line) up to shifts along the axis, whatever the tilt."""
    # A 1-px smoothing that dominates the binning's own (none at φ = 0, most at 45°), so the profiles'
    # agreement does not favour angles aligned with the pixel grid.
    from scipy import ndimage

    return ndimage.gaussian_filter1d(_axis_binning(images, axis_angle), PROFILE_SMOOTHING, axis=1)


def _subpixel_peak(values: np.ndarray) -> float:
    """Position of the maximum of a sampled curve, refined by a parabola through its neighbours."""
    i = int(np.argmax(values))
    if 0 < i < len(values) - 1:
        a, b, c = values[i - 1], values[i], values[i + 1]
        denominator = a - 2 * b + c
        if denominator < 0:
            return i + 0.5 * (a - c) / denominator
    return float(i)


def _profile_shifts(profiles: np.ndarray, rounds: int = 3, scoring: int = 4, noise_power: float = 0.0,
                    initial: np.ndarray | None = None) -> tuple[np.ndarray, float, np.ndarray, float]:
    """Shifts (pixels) that register every profile onto their common mean: cross-correlation (Fourier
    shift, sub-pixel peak; or from ``initial`` shifts instead), then ``scoring`` Gauss-Newton steps
    s_k −= Σ t'(p_k(x + s_k) − r)/Σ t'r' against the mean r, which (unlike the peak of a noisy
    correlation, whose curvature is noisy too) are linear in the noise, so `_prealign_shifts` can
    give their standard errors. The template t is the mean Wiener-filtered for the noise of one
    profile (n times the mean's; ``noise_power`` is the expected |FFT|² of the mean's noise per
    frequency, white): it keeps the detail a single noisy profile can be matched on, and drops the
    finer detail on which noise makes the match ambiguous (several minima, the error far beyond the
    linear one), and a noisy slope neither adds variance nor inflates the curvature. Returns the
    shifts, the mismatch left (relative squared residual), the template's slope t' and the
    curvature Σ t'r'."""
    n, length = profiles.shape
    freq = np.fft.rfftfreq(length)
    spectra = np.fft.rfft(profiles, axis=1)
    shifts = np.zeros(n) if initial is None else np.asarray(initial, np.float64) - np.mean(initial)
    for _ in range(rounds if initial is None else 0):
        aligned = spectra * np.exp(2j * np.pi * freq * shifts[:, None])
        reference = aligned.mean(axis=0)
        correlation = np.fft.irfft(spectra * np.conj(reference), n=length, axis=1)
        correlation = np.fft.fftshift(correlation, axes=1)
        shifts = np.array([_subpixel_peak(c) for c in correlation]) - length // 2
        shifts -= shifts.mean()
    smoothing = np.exp(-2 * (np.pi * freq * PROFILE_SMOOTHING) ** 2)  # the profiles' own Gaussian
    for iteration in range(scoring + 1):
        aligned_spectra = spectra * np.exp(2j * np.pi * freq * shifts[:, None])
        mean_spectrum = aligned_spectra.mean(axis=0)
        mean_noise = noise_power * smoothing**2
        signal_power = np.maximum(np.abs(mean_spectrum) ** 2 - mean_noise, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            wiener = np.where(signal_power > 0, signal_power / (signal_power + n * mean_noise), 0.0)
        aligned = np.fft.irfft(aligned_spectra, n=length, axis=1)
        reference = aligned.mean(axis=0)
        slope = np.fft.irfft(2j * np.pi * freq * mean_spectrum, n=length)
        template_slope = np.fft.irfft(2j * np.pi * freq * mean_spectrum * wiener, n=length)
        curvature = float(template_slope @ slope)
        if curvature <= 0 or iteration == scoring:
            break
        step = (aligned - reference) @ template_slope / curvature
        shifts -= step - step.mean()
        if np.abs(step - step.mean()).max() < 1e-4:
            break
    mismatch = float(np.sum((aligned - reference) ** 2) / max(float(np.sum(aligned**2)), 1e-300))
    return shifts, mismatch, template_slope, curvature


AXIS_EVIDENCE = 0.05  # relative drop of the common-line mismatch that moves the axis off its nominal angle


def estimate_axis_angle(images: np.ndarray, search_deg: float = 10.0, step_deg: float = 0.5) -> float:
    """In-plane tilt-axis angle φ (degrees) that makes the common-line profiles of all projections
    agree best after registration: a grid search over ±``search_deg`` refined by a parabola, on
    images binned to at most 128 px a side (the angle does not depend on the pixel size). Coarse:
    for a compact particle the projection onto the axis changes little with a degree of axis error,
    and for a small one noise can make a flat landscape look tilted, so the nominal φ = 0 stays unless
    the best angle agrees at least AXIS_EVIDENCE better; the fit refines φ (`AlignmentRefiner`)."""
    n, h, w = images.shape
    factor = max(1, int(np.ceil(max(h, w) / 128)))
    if factor > 1:
        h, w = h // factor * factor, w // factor * factor
        images = images[:, :h, :w].reshape(n, h // factor, factor, w // factor, factor).sum(axis=(2, 4))
    steps = int(round(search_deg / step_deg))
    grid = step_deg * np.arange(-steps, steps + 1)  # holds φ = 0, the nominal angle, at index `steps`
    mismatch = np.array([_profile_shifts(_axis_profiles(images, phi))[1] for phi in grid])
    best = int(np.argmin(mismatch))
    if mismatch[best] > (1 - AXIS_EVIDENCE) * mismatch[steps]:
        return 0.0
    fine = np.linspace(grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)], 9)
    mismatch = np.array([_profile_shifts(_axis_profiles(images, phi))[1] for phi in fine])
    return float(fine[0] + (fine[1] - fine[0]) * _subpixel_peak(-mismatch))


SUPPORT_SMOOTHING = 3.0   # px: σ of the Gaussian that makes the particle stand out of the noise; also the ring width
SUPPORT_Z = 3.0           # one-sided z of a pixel of the smoothed image that counts as signal
RING_Z = 2.0              # one-sided z of a ring's summed signal that joins it to the support (lenient: a ring of
                          # noise only costs noise, a ring of signal left out moves the centre of mass)
MARGIN_RINGS = 2          # rings without significant signal added beyond the last one with it
SIGNIFICANCE = 1e-3       # false-alarm probability of the test "the series has shifts"
EDGE_PX = 3               # width of the image edge strips tested for specimen crossing the edge (the data model's frame)


def _disc(radius: float) -> np.ndarray:
    r = int(np.ceil(radius))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return xx**2 + yy**2 <= radius**2


def _smoothed_with_sd(images: np.ndarray, variance: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, H, W) smoothed by a Gaussian of σ pixels in the image plane, and the standard deviation
    of every smoothed pixel from the per-pixel ``variance`` of independent noise (the variance
    filtered by the squared kernel, edges included)."""
    from scipy import ndimage

    radius = int(np.ceil(4 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    smooth, var = np.asarray(images, np.float64), np.asarray(variance, np.float64)
    for axis in (1, 2):
        smooth = ndimage.correlate1d(smooth, kernel, axis=axis, mode="reflect")
        var = ndimage.correlate1d(var, kernel**2, axis=axis, mode="reflect")
    return smooth, np.sqrt(np.maximum(var, 0.0))


def _grow(image: np.ndarray, variance: np.ndarray, core: np.ndarray, step: float, ring_z: float,
          margin_rings: int) -> np.ndarray:
    """``core`` grown ring by ring (width ``step`` px) while a ring's summed signal is significant
    (one-sided ``ring_z`` against its summed variance), then by ``margin_rings`` rings more."""
    from scipy import ndimage

    disc = _disc(step)
    support, quiet = core, 0
    while quiet < margin_rings:
        grown = ndimage.binary_dilation(support, structure=disc)
        ring = grown & ~support
        if not ring.any():
            break
        signal, noise = float(image[ring].sum()), float(np.sqrt(max(variance[ring].sum(), 0.0)))
        quiet = 0 if signal > ring_z * noise else quiet + 1
        support = grown
    return support


def particle_support(images: np.ndarray, variance: np.ndarray, sigma: float = SUPPORT_SMOOTHING,
                     z: float = SUPPORT_Z, ring_z: float = RING_Z, margin_rings: int = MARGIN_RINGS) -> np.ndarray:
    """Where each background-subtracted image (n, H, W) holds the particle. The core: pixels whose
    Gaussian-smoothed (σ px) value is ``z`` standard errors (from the per-pixel ``variance``) above
    zero, in connected regions at least as large as the smoothing kernel (4πσ²; pure-noise
    excursions are smaller). Then grown by rings σ px wide as long as a ring holds significant
    signal (`_grow`), so a weak particle's faint rim, too faint for any pixel, is taken in as a
    whole: a support that cut through the particle would move its centre of mass with the noise.
    (n, H, W) bool; a projection without a core gets the whole image."""
    from scipy import ndimage

    smooth, sd = _smoothed_with_sd(images, variance, sigma)
    significant = smooth > z * np.maximum(sd, 1e-12 * max(float(np.abs(smooth).max()), 1e-300))
    support = np.ones(images.shape, bool)
    for k in range(len(images)):
        labels, count = ndimage.label(significant[k])
        if count == 0:
            continue  # too faint to locate: the whole image holds it
        area = np.bincount(labels.ravel())[1:]
        keep = np.flatnonzero(area >= 4 * np.pi * sigma**2) + 1
        if len(keep) == 0:
            continue
        support[k] = _grow(images[k], variance[k], np.isin(labels, keep), sigma, ring_z, margin_rings)
    return support


def series_support(images: np.ndarray, variance: np.ndarray, sigma: float = SUPPORT_SMOOTHING) -> np.ndarray:
    """One support (H, W) for the whole series: the `particle_support` of the series' mean image (√n
    less noisy, so it finds a faint rim that single projections miss), joined by every projection's
    own support where it touches that (a projection may reach further than the mean shows; its
    supports elsewhere are noise). A support shared by all projections cuts none of them where
    another holds the particle, so the common-line profiles stay comparable and the centres of mass
    are not moved by where a noisy support happened to end. All False when the mean image shows no
    particle."""
    from scipy import ndimage

    n = len(images)
    mean = particle_support(images.mean(axis=0)[None], (variance.sum(axis=0) / n**2)[None], sigma)[0]
    if mean.all():  # no core: no particle found
        return np.zeros(images.shape[1:], bool)
    support = mean.copy()
    for each in particle_support(images, variance, sigma):
        if each.all():
            continue
        labels, _ = ndimage.label(each)
        touching = np.unique(labels[mean & each])
        support |= np.isin(labels, touching[touching > 0])
    return support


def counts_background(counts: np.ndarray, sigma: float = SUPPORT_SMOOTHING, rounds: int = 20,
                      seed: int = 0) -> np.ndarray:
    """Background (counts per pixel) of every projection of counted data (n, H, W), also where the
    particle touches the image edge: the mean count of the pixels outside the particle's support
    (`series_support` with Poisson variance = the background).

    Choosing the pixels by their own counts would bias the mean low (upward noise excursions and their
    surroundings would be left out), so the counts are split by binomial thinning into two
    independent Poisson halves; the pixels are chosen on one half and averaged on the other, and the
    other way round. Starts from the 5th percentile of the smoothed image (below the background
    wherever a twentieth of the image is empty) and iterates to the fixed point; while the support
    fills the image (a background too low makes every ring look like signal) the background is
    raised by one standard error of the smoothed image instead. When the support still leaves fewer
    than 4πσ² pixels, the mean of the emptiest edge strip (EDGE_PX wide: top, bottom, left or right)
    over the series. The projections share one (pooled) background
    unless theirs differ significantly (χ² against their Poisson errors at SIGNIFICANCE), as they do
    when the beam current drifts. Pixels must be whole counts."""
    counts = np.asarray(counts, np.float64)
    n = len(counts)
    first = np.random.default_rng(seed).binomial(np.round(np.maximum(counts, 0)).astype(np.int64), 0.5)
    halves = [first.astype(np.float64), counts - first]
    smooth, _ = _smoothed_with_sd(counts, np.zeros_like(counts), sigma)
    background = np.percentile(smooth.reshape(n, -1), 5, axis=1)
    filled = False
    for _ in range(rounds):
        half = np.broadcast_to((background / 2)[:, None, None], counts.shape)
        sums, pixels = np.zeros((2, n)), np.zeros((2, n))
        for chosen, averaged in ((0, 1), (1, 0)):
            empty = ~series_support(halves[chosen] - half, half, sigma)
            sums[averaged], pixels[averaged] = (halves[averaged] * empty).sum(axis=(1, 2)), empty.sum()
        filled = pixels.min() < 4 * np.pi * sigma**2
        if filled:  # every ring looked like signal: the background is still too low; one standard error up
            background = background + np.sqrt(np.maximum(background, 1e-12) / (4 * np.pi * sigma**2))
            continue
        updated = (sums / pixels).sum(axis=0)
        converged = np.allclose(updated, background, rtol=0, atol=1e-9 + 1e-6 * float(background.max()))
        background = updated
        if converged:
            break
    if filled:  # the specimen fills the image: the emptiest edge strip's mean over the series
        strips = (counts[:, :EDGE_PX], counts[:, -EDGE_PX:], counts[:, :, :EDGE_PX], counts[:, :, -EDGE_PX:])
        return np.full(n, min(float(strip.mean()) for strip in strips))
    # One background for the whole series unless the projections' differ significantly: each is the sum
    # of two half means, each of Poisson variance (b/2)/pixels.
    from scipy import stats

    pooled = float((sums.sum(axis=1) / pixels.sum(axis=1)).sum())
    variance = (max(pooled, 1e-12) / 2) * (1 / pixels[0] + 1 / pixels[1])
    chi2 = float(np.sum((background - pooled) ** 2 / variance))
    if n > 1 and stats.chi2.sf(chi2, n - 1) >= SIGNIFICANCE:
        return np.full(n, pooled)
    return background


def counts_gain_or_none(projections: np.ndarray) -> float | None:
    """Counts per data unit when the series is counted data (whole numbers, or whole counts times one
    quantum: `estimate_counts_gain`), else None."""
    from engine.measure.datamodel import estimate_counts_gain

    values = np.asarray(projections)
    finite = values[np.isfinite(values)]
    if finite.size == 0 or finite.min() < 0:
        return None
    if np.all(finite == np.round(finite)):
        return 1.0
    try:
        return estimate_counts_gain(values)
    except InputError:
        return None


def _shrink(residuals: np.ndarray, errors: np.ndarray, leverage: np.ndarray) -> tuple[np.ndarray, float]:
    """Empirical-Bayes shrinkage of noisy, gauge-free shifts: with true shifts drawn from N(0, τ²) and
    independent errors N(0, σ_k²), τ² by moments (Σ r² − Σ σ²(1 − h)) / Σ(1 − h) (h: the leverage of
    the gauge fit), floored at 0, and every shift replaced by its posterior mean r τ²/(τ² + σ_k²).
    Returns the shrunk shifts and τ."""
    finite = np.isfinite(errors)
    r, e, h = residuals[finite], errors[finite], leverage[finite]
    tau2 = max(0.0, float(np.sum(r**2) - np.sum(e**2 * (1 - h))) / max(float(np.sum(1 - h)), 1e-12))
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.where(~finite, 0.0, np.where(tau2 + errors**2 > 0, tau2 / (tau2 + errors**2), 1.0))
    return np.where(finite, residuals, 0.0) * factor, float(np.sqrt(tau2))


def _weighted_gauge_fit(values: np.ndarray, errors: np.ndarray, design: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Residuals of ``values`` after the weighted (1/σ²) least-squares fit of ``design``'s columns, and
    the fit's leverages h_kk."""
    finite = np.isfinite(errors)
    floor = 1e-12 * max(float(errors[finite].max()) if finite.any() else 1.0, 1e-300)
    weight = np.where(finite, 1.0 / np.maximum(errors, floor), 0.0)
    a = design * weight[:, None]
    coefficients, *_ = np.linalg.lstsq(a, values * weight, rcond=None)
    q, _ = np.linalg.qr(a)
    return values - design @ coefficients, np.sum(q**2, axis=1)


def _edge_signal(images: np.ndarray, variance: np.ndarray, axis: int) -> np.ndarray:
    """z-score (n,) of the summed signal in the outer EDGE_PX lines of every image at both ends of
    ``axis`` (2: the left and right columns, 1: the top and bottom rows) against its noise."""
    index = np.r_[0:EDGE_PX, images.shape[axis] - EDGE_PX:images.shape[axis]]
    signal = np.take(images, index, axis=axis).sum(axis=(1, 2))
    noise = np.sqrt(np.maximum(np.take(variance, index, axis=axis).sum(axis=(1, 2)), 1e-300))
    return signal / noise


def _prealign_shifts(images: np.ndarray, angles_deg, pixel_size: float, variance: np.ndarray,
                     axis_angle: float) -> tuple[Alignment, dict]:
    """Shifts (Å, translation gauge removed) for a tilt axis at ``axis_angle``, each with its standard
    error from the per-pixel ``variance``: along the axis by cross-correlating the common-line
    profiles, across it from the centre of mass inside the particle's support, whose track over the
    series must be A cos θ + B sin θ for a rigid specimen (A, B are the specimen's own offset). The
    shifts are tested against their errors (χ²) and shrunk towards zero by empirical Bayes, so noise
    does not pose as misalignment: the shifts returned are zero unless the χ² test rejects "no
    shifts" at SIGNIFICANCE, and then the posterior means (`_shrink`). Projections without
    significant signal, or whose specimen crosses the image edge, are left out; when too few are
    left the evidence says why ("untestable") and the shifts are zero."""
    from scipy import ndimage, stats

    n, h, w = images.shape
    phi = np.deg2rad(axis_angle)
    support = series_support(images, variance)
    if not support.any():
        support = np.ones(support.shape, bool)
    masked = np.where(support, images, 0.0)
    masked_variance = np.where(support, variance, 0.0)

    # Along the axis: the common line. The Gauss-Newton shift moves with the noise n of the raw profile
    # by Σ (G t')(x) n(x) / Σ t'r', so its variance is Σ (G t')² var(n) / (Σ t'r')² (G: the profile
    # smoothing, t: the Wiener-filtered mean, r: the mean), summed pixel by pixel through the binning.
    # Noise power of the mean profile, |FFT|² per frequency (white; neighbouring bins' covariance aside).
    # The Gauss-Newton steps start from the centre of mass along the axis (a linear estimate, the same at
    # every tilt for a rigid specimen), not from the correlation peak, which at low counts can jump
    # to a noise peak far off.
    u, v = _axis_coordinates((h, w), axis_angle)
    total = masked.sum(axis=(1, 2))
    start = np.where(total > 0, (masked * v).sum(axis=(1, 2)) / np.where(total > 0, total, 1.0), 0.0)
    noise_power = float(masked_variance.sum()) / n**2
    along, _, slope, curvature = _profile_shifts(_axis_profiles(masked, axis_angle), noise_power=noise_power,
                                                 initial=start, scoring=20)
    weights = _axis_weights_on_pixels(ndimage.gaussian_filter1d(slope, PROFILE_SMOOTHING), (h, w), axis_angle)
    along_error = np.sqrt(np.sum(masked_variance * weights[None] ** 2, axis=(1, 2))) / max(curvature, 1e-300)

    # Across the axis: the centre of mass in the support, a ratio whose linearised variance is
    # Σ (u − ū)² var / S².
    # A projection whose signal in the support is not significant (the ratio's linearisation needs
    # S well above its noise) says nothing: its shifts get an infinite error. Nor does one whose image
    # edge is not empty (signal in the outer EDGE_PX columns significantly off zero: specimen crossing
    # the edge, material moving into view as it tilts, or a background that is off there, any of which
    # moves the centre of mass and changes the common line) or, for the shift along the axis, whose
    # top or bottom rows are not. A component that fewer than half the projections can measure is not
    # tested at all: the series is not an isolated specimen in an empty field.
    z_edge = float(stats.norm.isf(SIGNIFICANCE / 2))
    sides = np.abs(_edge_signal(images, variance, axis=2)) > z_edge
    ends = np.abs(_edge_signal(images, variance, axis=1)) > z_edge
    has_signal = total > SUPPORT_Z * np.sqrt(masked_variance.sum(axis=(1, 2)))
    across_ok = has_signal & ~sides
    along_ok = has_signal & ~sides & ~ends & (along_error > 0)
    across_ok &= across_ok.sum() >= n / 2
    along_ok &= along_ok.sum() >= n / 2
    safe_total = np.where(has_signal, total, 1.0)
    track = np.where(across_ok, (masked * u).sum(axis=(1, 2)) / safe_total, 0.0)
    track_error = np.sqrt(np.sum(masked_variance * (u[None] - track[:, None, None]) ** 2, axis=(1, 2))) / safe_total
    track_error = np.where(across_ok, track_error, np.inf)
    along, along_error = np.where(along_ok, along, 0.0), np.where(along_ok, along_error, np.inf)
    dof = max(int(across_ok.sum()) - 2, 0) + max(int(along_ok.sum()) - 1, 0)
    alignment = Alignment.identity(n)
    alignment.axis_angle = float(axis_angle)
    evidence = {"raw_shifts_A": np.zeros((n, 2)), "shift_errors_px": np.stack([track_error, along_error], axis=1),
                "chi2": 0.0, "dof": dof, "p_value": 1.0, "significant": False, "spread_px": (0.0, 0.0),
                "edge_crossings": int(np.sum(sides | ends)), "untestable": None}
    if dof < 3:
        crossing = int(np.sum(sides | ends))
        evidence["untestable"] = (f"the image edge is not empty (specimen crossing it, or the background off "
                                  f"there) in {crossing} of {n} projections" if crossing >= n / 2 else
                                  "too few projections have signal above the noise")
        return alignment, evidence

    rad = np.deg2rad(np.asarray(angles_deg, np.float64))
    across, across_leverage = _weighted_gauge_fit(track, track_error, np.stack([np.cos(rad), np.sin(rad)], axis=1))
    along, along_leverage = _weighted_gauge_fit(along, along_error, np.ones((n, 1)))
    across, along = np.where(across_ok, across, 0.0), np.where(along_ok, along, 0.0)
    chi2 = float(np.sum((across[across_ok] / track_error[across_ok]) ** 2)
                 + np.sum((along[along_ok] / along_error[along_ok]) ** 2))
    p_value = float(stats.chi2.sf(chi2, dof))
    across_shrunk, across_tau = _shrink(across, track_error, across_leverage)
    along_shrunk, along_tau = _shrink(along, along_error, along_leverage)

    across_unit, along_unit = np.array([np.cos(phi), np.sin(phi)]), np.array([-np.sin(phi), np.cos(phi)])
    rotations = alignment.geometry(angles_deg).rotations

    def gauge_free(across_px, along_px):
        shifts = (across_px[:, None] * across_unit + along_px[:, None] * along_unit) * pixel_size
        return shifts - np.einsum("kij,j->ki", rotations[:, :2, :], translation_gauge(shifts, rotations))

    significant = bool(p_value < SIGNIFICANCE)
    if significant:
        alignment.shifts = gauge_free(across_shrunk, along_shrunk)
    evidence.update({"raw_shifts_A": gauge_free(across, along), "chi2": chi2, "p_value": p_value,
                     "significant": significant, "spread_px": (across_tau, along_tau)})
    return alignment, evidence


def prealign_with_evidence(normalised: np.ndarray, angles_deg, pixel_size: float, noise: float,
                           axis_angle: float | None = None, variance: np.ndarray | None = None
                           ) -> tuple[Alignment, dict]:
    """`prealign`, and the evidence for its shifts: the unshrunk shifts (Å), every shift's standard
    error (pixels, across and along the axis), the χ² of the shifts against their errors with its
    degrees of freedom and p-value, whether that is significant at SIGNIFICANCE, and the estimated
    spread τ of the true shifts (pixels, across and along)."""
    images = np.asarray(normalised, np.float64)
    if variance is None:
        variance = np.full(images.shape, float(noise) ** 2)
    variance = np.broadcast_to(np.asarray(variance, np.float64), images.shape)
    if axis_angle is None:
        axis_angle = estimate_axis_angle(images)
    return _prealign_shifts(images, angles_deg, pixel_size, variance, axis_angle)


def prealign(normalised: np.ndarray, angles_deg, pixel_size: float, noise: float,
             axis_angle: float | None = None, variance: np.ndarray | None = None) -> Alignment:
    """Coarse alignment from the images alone (no atoms): the in-plane tilt-axis angle from the
    common line (`estimate_axis_angle`, unless given), then the shifts for it (`_prealign_shifts`).

    normalised : (n, H, W) background-subtracted projections; noise: their noise σ (same units).
    variance   : per-pixel noise variance (same units squared, e.g. the counts of counted data);
                 not given: noise² everywhere.
    Returns shifts in Å with the translation gauge removed: zero unless they are significant against
    their noise, else shrunk by it (posterior means, `_shrink`); no angle offsets, unit intensities.
    """
    return prealign_with_evidence(normalised, angles_deg, pixel_size, noise, axis_angle, variance)[0]


SHIFT_THAT_MATTERS_PX = 0.5
AXIS_THAT_MATTERS_DEG = 0.3


def misalignment_summary(alignment: Alignment, pixel_size: float, evidence: dict | None = None) -> dict:
    """What `atomsplat info` reports of a pre-alignment: shifts in pixels, the axis angle in degrees,
    and whether refining the alignment is advised: an axis off by over AXIS_THAT_MATTERS_DEG, or shifts
    that are significant against their noise (``evidence`` from `prealign_with_evidence`; without it
    every shift counts) and, after shrinking by their noise, reach SHIFT_THAT_MATTERS_PX."""
    shifts_px = alignment.shifts / pixel_size
    rms = float(np.sqrt(np.mean(np.sum(shifts_px**2, axis=1))))
    largest = float(np.abs(shifts_px).max())
    significant = True if evidence is None else evidence["significant"]
    summary = {"shift_rms_px": rms, "shift_max_px": largest, "axis_angle_deg": float(alignment.axis_angle),
               "refine_advised": bool((significant and largest > SHIFT_THAT_MATTERS_PX)
                                      or abs(alignment.axis_angle) > AXIS_THAT_MATTERS_DEG)}
    if evidence is not None:
        raw = evidence["raw_shifts_A"] / pixel_size
        errors = evidence["shift_errors_px"]
        finite = np.isfinite(errors)

        def rms(values):
            return float(np.sqrt(np.mean(values**2))) if values.size else None

        parts = [rms(raw[finite[:, i], i]) for i in (0, 1)], [rms(errors[finite[:, i], i]) for i in (0, 1)]
        raw_rms, error_rms = (None if None in p else float(np.hypot(*p)) for p in parts)
        summary.update({"raw_shift_rms_px": raw_rms, "shift_error_px": error_rms,
                        "projections_not_used": int(np.sum(~finite.all(axis=1))),
                        "edge_crossings": evidence["edge_crossings"], "untestable": evidence["untestable"],
                        "chi2": evidence["chi2"], "dof": evidence["dof"], "p_value": evidence["p_value"],
                        "shifts_significant": evidence["significant"]})
    return summary


# ---------------------------------------------------------------------- output
def write_alignment(alignment: Alignment, out_dir, angles_deg, pixel_size: float, data_scale: float,
                    stem: str = "alignment") -> list[Path]:
    """STEM.json (every parameter, units in the keys) and STEM.xf: IMOD-style lines
    "A11 A12 A21 A22 DX DY" mapping raw image coordinates (pixels from the image centre) to aligned
    ones (tilt axis along +y, specimen centred): x_aligned = A x_raw + D with A = R(−φ) and
    D = −A s_k / pixel size. Returns the paths written."""
    out_dir = Path(out_dir)
    a = alignment
    angles = np.asarray(angles_deg, np.float64)
    record = {"axis_angle_deg": a.axis_angle, "pixel_size_A": pixel_size, "data_scale": data_scale,
              "nominal_angles_deg": angles.tolist(), "angle_offsets_deg": a.angle_offsets.tolist(),
              "refined_angles_deg": (angles + a.angle_offsets).tolist(), "shifts_A": a.shifts.tolist(),
              "shifts_px": (a.shifts / pixel_size).tolist(), "intensity_scale": a.intensity_scale.tolist(),
              "intensity_offset_data_units": (a.intensity_offset * data_scale).tolist()}
    json_path, xf_path = out_dir / f"{stem}.json", out_dir / f"{stem}.xf"
    write_atomically(json_path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))
    c, s = np.cos(np.deg2rad(-a.axis_angle)), np.sin(np.deg2rad(-a.axis_angle))
    matrix = np.array([[c, -s], [s, c]])
    lines = []
    for shift in a.shifts:
        d = -matrix @ (shift / pixel_size)
        lines.append(f"{matrix[0, 0]:12.7f}{matrix[0, 1]:12.7f}{matrix[1, 0]:12.7f}{matrix[1, 1]:12.7f}"
                     f"{d[0]:12.3f}{d[1]:12.3f}")
    write_atomically(xf_path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    return [json_path, xf_path]


def read_alignment(path) -> Alignment:
    """An `Alignment` from an alignment.json written by `write_alignment`."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
        return Alignment(np.array(record["angle_offsets_deg"], float), np.array(record["shifts_A"], float),
                         float(record["axis_angle_deg"]), np.array(record["intensity_scale"], float),
                         np.array(record["intensity_offset_data_units"], float) / float(record["data_scale"]))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(path, f"not a readable alignment file ({err})") from err
