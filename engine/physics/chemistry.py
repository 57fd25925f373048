"""Chemistry of the fitted atoms: which element each is, and its thermal (Debye–Waller) B.

Elements: a mixture model on the fitted amplitudes and widths whose components sit where physics
puts them. A fitted amplitude is (most of) the atom's integrated projected potential, which grows
with its electron scattering factor f_e(0) (Peng 1996), and its width reflects how compact the
potential is. Where one isolated atom of each element lands in (amplitude, width) is computed from
the simulator's own parameterization (`isolated_atom_fit`), so the components are physically placed
and ordered from the start; the data only refine one shared intensity scale, one shared width offset
and the spreads and weights (EM). Each atom gets the most probable element and its probability.

B-factors: see `b_factors_from_calibration`: the fitted structure is simulated again without noise at
two known B and refitted, which measures how each atom's fitted width answers to B in its own
surroundings (neighbours, blur, pixel size, the single-Gaussian approximation of the profile).
"""

from __future__ import annotations

import numpy as np

from engine.core.elements import normalize_symbol, projected_potential_gaussians
from engine.core.settings import SettingError


def isolated_atom_fit(symbol: str, pixel_size: float, blur: float, profile=None) -> tuple[float, float]:
    """Amplitude (V·Å³) and width σ (Å, blur excluded) of the atom model (``profile``, an
    `engine.physics.profile.AtomProfile`; default one isotropic Gaussian) that best fits, in least squares at
    pixel centres, the projected potential of one isolated atom (B = 0) blurred by ``blur`` (Å): where
    the fit puts that element. (With one Gaussian the amplitude falls short of the integrated
    potential by the part of the profile's tails it cannot hold.)"""
    from engine.physics.profile import AtomProfile
    from scipy.optimize import least_squares

    weights, sigmas = projected_potential_gaussians(symbol)
    half = int(np.ceil(4.0 / pixel_size))
    x = np.arange(-half, half + 1) * pixel_size
    r2 = (x[:, None] ** 2 + x[None, :] ** 2).ravel()
    s2 = sigmas**2 + blur**2
    target = (weights / (2 * np.pi * s2) * np.exp(-r2[:, None] / (2 * s2))).sum(axis=1)

    profile = profile or AtomProfile()

    def residual(params):
        amps, widths = profile.gaussians(params[0], params[1])
        t2 = widths**2 + blur**2
        return (amps / (2 * np.pi * t2) * np.exp(-r2[:, None] / (2 * t2))).sum(axis=1) - target

    fit = least_squares(residual, x0=[weights.sum(), 0.3], bounds=([0.0, 0.01], [np.inf, 3.0]))
    return float(fit.x[0]), float(fit.x[1])


def assign_species(amplitudes: np.ndarray, widths: np.ndarray, species: list[str], pixel_size: float,
                   blur: float, composition: dict | None = None, iterations: int = 300, profile=None) -> tuple:
    """Most probable element of each atom from its fitted amplitude and width, its probability, and
    the fitted model.

    amplitudes  : (N,) fitted amplitudes (any consistent unit); widths: (N,) fitted σ (Å).
    species     : the elements present, e.g. ["Pt", "Ni"].
    pixel_size, blur : Å, to predict where each element's atoms sit (`isolated_atom_fit`).
    profile     : the fit's `engine.physics.profile.AtomProfile` (default one Gaussian).
    composition : optional expected fractions {"Pt": 0.6, "Ni": 0.4}; fixes the mixture weights.

    Model: element k is a Gaussian in (log a, σ²) centred at (log s + log A_k, S_k + δ), with A_k, S_k
    the isolated-atom fit and one shared intensity scale s and one shared width offset δ (thermal
    smearing, ≈ B/8π²) refined by EM together with per-element spreads and weights.
    Returns (labels (N,) str, probability (N,), {"scale", "width_offset_A2", "weights"}).
    """
    species = [normalize_symbol(s, "--species") for s in species]
    n = len(amplitudes)
    if len(species) == 1:
        return np.full(n, species[0]), np.ones(n), {}
    features = np.stack([np.log(np.maximum(np.asarray(amplitudes, np.float64), 1e-300)),
                         np.asarray(widths, np.float64) ** 2], axis=1)
    fits = np.array([isolated_atom_fit(s, pixel_size, blur, profile) for s in species])
    centres = np.stack([np.log(fits[:, 0]), fits[:, 1] ** 2], axis=1)
    if composition is not None:
        weights = np.array([composition.get(s, 0.0) for s in species], dtype=np.float64)
        if not np.all(weights > 0):
            raise SettingError("composition", f"needs a positive fraction for each of {', '.join(species)}")
        weights /= weights.sum()
    else:
        weights = np.full(len(species), 1.0 / len(species))
    # Start: shifts that put the median atom on the weighted mean element; spreads a quarter of the
    # closest spacing between elements along each feature.
    shift = np.median(features, axis=0) - weights @ centres
    spacing = np.array([np.min(np.diff(np.sort(c))) for c in centres.T])
    spread = np.tile(0.25 * np.maximum(spacing, 1e-6), (len(species), 1))
    for _ in range(iterations):
        d = features[:, None, :] - shift[None, None, :] - centres[None, :, :]
        log_p = np.log(weights)[None, :] - np.log(spread).sum(axis=1)[None, :] - 0.5 * np.sum((d / spread) ** 2, axis=2)
        log_p -= log_p.max(axis=1, keepdims=True)
        resp = np.exp(log_p)
        resp /= resp.sum(axis=1, keepdims=True)
        # M-step: shared shifts as precision-weighted mean offsets; spreads and weights per element.
        precision = resp[:, :, None] / spread[None, :, :] ** 2
        new_shift = np.sum(precision * (features[:, None, :] - centres[None]), axis=(0, 1)) / precision.sum(axis=(0, 1))
        counts = resp.sum(axis=0) + 1e-9
        d = features[:, None, :] - new_shift[None, None, :] - centres[None, :, :]
        new_spread = np.sqrt(np.sum(resp[:, :, None] * d**2, axis=0) / counts[:, None])
        new_spread = np.maximum(new_spread, 0.02 * np.maximum(spacing, 1e-6))
        if composition is None:
            weights = counts / counts.sum()
        converged = np.allclose(new_shift, shift, rtol=0, atol=1e-12) and np.allclose(new_spread, spread, rtol=1e-9)
        shift, spread = new_shift, new_spread
        if converged:
            break
    best = np.argmax(resp, axis=1)
    return (np.array(species)[best], resp[np.arange(n), best],
            {"scale": float(np.exp(shift[0])), "width_offset_A2": float(shift[1]), "weights": weights.tolist()})


def b_factors_from_calibration(widths: np.ndarray, widths_at: dict) -> np.ndarray:
    """Per-atom B (Å², B = 8π²⟨u_x²⟩, the simulator's convention) from fitted widths σ (Å) and the
    widths the same atoms get when their structure is simulated at known B: {B0: σ0, B1: σ1}. The
    fitted σ² grows linearly with ⟨u²⟩, so B is read off the line through the two calibration points."""
    (b0, s0), (b1, s1) = sorted(widths_at.items())
    s2, s0, s1 = (np.asarray(v, dtype=np.float64) ** 2 for v in (widths, s0, s1))
    return b0 + (b1 - b0) * (s2 - s0) / np.where(np.abs(s1 - s0) > 1e-12, s1 - s0, np.nan)


def minimum_distance(species: list[str], d_min: float | None = None) -> float:
    """The shortest distance (Å) two atoms may keep: ``d_min`` when given, else 0.7 × the shortest
    nearest-neighbour distance of the expected ``species``, else 0.7 × 2.45 Å (about the shortest
    bond among the common metals)."""
    from engine.physics.structures import nearest_neighbour_distance

    if d_min is not None:
        return float(d_min)
    bond = min((nearest_neighbour_distance(s) for s in species), default=2.45)
    return 0.7 * bond
