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
def _axis_profiles(images: np.ndarray, axis_angle: float) -> np.ndarray:
    """Projection of every image onto the tilt axis turned by φ (degrees): (n, L) profiles on a
    1-pixel grid, linear binning. For a single-axis series these are all the same line (the common
    line) up to shifts along the axis, whatever the tilt."""
    n, h, w = images.shape
    phi = np.deg2rad(axis_angle)
    yy, xx = np.mgrid[0:h, 0:w]
    coordinate = (-(xx - centre_index(w)) * np.sin(phi) + (yy - centre_index(h)) * np.cos(phi)).ravel()
    half = int(np.ceil(np.hypot(h, w) / 2)) + 1
    position = coordinate + half
    lo = np.floor(position).astype(int)
    frac = position - lo
    length = 2 * half + 2
    flat = images.reshape(n, -1)
    profiles = np.zeros((n, length))
    for k in range(n):
        profiles[k] = (np.bincount(lo, flat[k] * (1 - frac), length) + np.bincount(lo + 1, flat[k] * frac, length))
    # A 1-px smoothing that dominates the binning's own (none at φ = 0, most at 45°), so the profiles'
    # agreement does not favour angles aligned with the pixel grid.
    from scipy import ndimage

    return ndimage.gaussian_filter1d(profiles, 1.0, axis=1)


def _subpixel_peak(values: np.ndarray) -> float:
    """Position of the maximum of a sampled curve, refined by a parabola through its neighbours."""
    i = int(np.argmax(values))
    if 0 < i < len(values) - 1:
        a, b, c = values[i - 1], values[i], values[i + 1]
        denominator = a - 2 * b + c
        if denominator < 0:
            return i + 0.5 * (a - c) / denominator
    return float(i)


def _profile_shifts(profiles: np.ndarray, rounds: int = 3) -> tuple[np.ndarray, float]:
    """Shifts (pixels) that register every profile onto their common mean by cross-correlation
    (Fourier shift, sub-pixel peak), and the mismatch left (relative squared residual)."""
    n, length = profiles.shape
    freq = np.fft.rfftfreq(length)
    spectra = np.fft.rfft(profiles, axis=1)
    shifts = np.zeros(n)
    for _ in range(rounds):
        aligned = spectra * np.exp(2j * np.pi * freq * shifts[:, None])
        reference = aligned.mean(axis=0)
        correlation = np.fft.irfft(spectra * np.conj(reference), n=length, axis=1)
        correlation = np.fft.fftshift(correlation, axes=1)
        shifts = np.array([_subpixel_peak(c) for c in correlation]) - length // 2
        shifts -= shifts.mean()
    aligned = np.fft.irfft(spectra * np.exp(2j * np.pi * freq * shifts[:, None]), n=length, axis=1)
    mismatch = float(np.sum((aligned - aligned.mean(axis=0)) ** 2) / np.sum(aligned**2))
    return shifts, mismatch


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


def _signal_weights(images: np.ndarray, noise: float) -> np.ndarray:
    """The images, smoothed over 1.5 px and kept where clearly above the noise: centre-of-mass weights
    that ignore the empty, noisy frame."""
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(images, sigma=(0, 1.5, 1.5))
    smoothed_noise = noise / (2 * np.sqrt(np.pi) * 1.5)
    return np.where(smooth > 4 * smoothed_noise, smooth, 0.0)


def _prealign_shifts(images: np.ndarray, angles_deg, pixel_size: float, noise: float, axis_angle: float) -> Alignment:
    """Shifts (Å, translation gauge removed) for a tilt axis at ``axis_angle``: along the axis by
    cross-correlating the common-line profiles, across it from the centre of mass, whose track over
    the series must be A cos θ + B sin θ for a rigid specimen (A, B are the specimen's own offset)."""
    n, h, w = images.shape
    phi = np.deg2rad(axis_angle)
    along, _ = _profile_shifts(_axis_profiles(images, axis_angle))
    weights = _signal_weights(images, noise)
    total = weights.sum(axis=(1, 2))
    if np.any(total <= 0):
        raise InputError("tilt series", "a projection has no signal above the noise; cannot pre-align it")
    yy, xx = np.mgrid[0:h, 0:w]
    com = np.stack([(weights * (xx - centre_index(w))).sum(axis=(1, 2)),
                    (weights * (yy - centre_index(h))).sum(axis=(1, 2))], axis=1) / total[:, None]
    across_axis = np.array([np.cos(phi), np.sin(phi)])
    track = com @ across_axis
    rad = np.deg2rad(np.asarray(angles_deg, np.float64))
    design = np.stack([np.cos(rad), np.sin(rad)], axis=1)
    coefficients, *_ = np.linalg.lstsq(design, track, rcond=None)
    across = track - design @ coefficients
    shifts = (across[:, None] * across_axis + along[:, None] * np.array([-np.sin(phi), np.cos(phi)])) * pixel_size
    alignment = Alignment.identity(n)
    alignment.axis_angle = float(axis_angle)
    rotations = alignment.geometry(angles_deg).rotations
    alignment.shifts = shifts - np.einsum("kij,j->ki", rotations[:, :2, :], translation_gauge(shifts, rotations))
    return alignment


def prealign(normalised: np.ndarray, angles_deg, pixel_size: float, noise: float,
             axis_angle: float | None = None) -> Alignment:
    """Coarse alignment from the images alone (no atoms): the in-plane tilt-axis angle from the
    common line (`estimate_axis_angle`, unless given), then the shifts for it (`_prealign_shifts`).

    normalised : (n, H, W) background-subtracted projections; noise: their noise σ (same units).
    Returns shifts in Å with the translation gauge removed; no angle offsets, unit intensities.
    """
    images = np.asarray(normalised, np.float64)
    if axis_angle is None:
        axis_angle = estimate_axis_angle(images)
    return _prealign_shifts(images, angles_deg, pixel_size, noise, axis_angle)


def misalignment_summary(alignment: Alignment, pixel_size: float) -> dict:
    """What `atomsplat info` reports of a pre-alignment: shifts in pixels, the axis angle in degrees,
    and whether refining the alignment is advised (shifts over 0.5 px or an axis off by over 0.3°)."""
    shifts_px = alignment.shifts / pixel_size
    rms = float(np.sqrt(np.mean(np.sum(shifts_px**2, axis=1))))
    largest = float(np.abs(shifts_px).max())
    return {"shift_rms_px": rms, "shift_max_px": largest, "axis_angle_deg": float(alignment.axis_angle),
            "refine_advised": bool(largest > 0.5 or abs(alignment.axis_angle) > 0.3)}


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
