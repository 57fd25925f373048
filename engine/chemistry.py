"""Chemistry of the fitted atoms: which element each is, and its thermal (Debye–Waller) B.

Elements: a mixture model on the fitted amplitudes whose components sit where physics puts them.

A fitted amplitude is the integrated projected potential of the atom (data units · Å²), which for
element Z is proportional to its electron scattering factor at zero angle, f_e(0) (Peng 1996). So
in log space every element's component is centred at log s + log f_e(0)_Z with one shared, unknown
intensity scale s: the components are ordered by Z from the start and only s, their spreads and
their weights are refined on the data (EM). Each atom gets the most probable element and its
posterior probability.

B-factors: see `b_factors_from_calibration`: the fitted structure is simulated again without noise at
two known B and refitted, which measures how each atom's fitted width answers to B in its own
surroundings (neighbours, blur, pixel size, the single-Gaussian approximation of the profile).
"""

from __future__ import annotations

import numpy as np

from .elements import integrated_projected_potential, normalize_symbol
from .errors import InputError


def assign_species(amplitudes: np.ndarray, species: list[str], composition: dict | None = None,
                   iterations: int = 200) -> tuple[np.ndarray, np.ndarray, dict]:
    """Most probable element of each atom from its amplitude, its probability, and the fitted model.

    amplitudes  : (N,) fitted amplitudes (any consistent unit).
    species     : the elements present, e.g. ["Pt", "Ni"].
    composition : optional expected fractions {"Pt": 0.6, "Ni": 0.4}; fixes the mixture weights.
    Returns (labels (N,) str, probability (N,), {"scale", "spread", "weights"}).
    """
    species = [normalize_symbol(s, "--species") for s in species]
    log_a = np.log(np.maximum(np.asarray(amplitudes, dtype=np.float64), 1e-300))
    if len(species) == 1:
        return np.full(len(log_a), species[0]), np.ones(len(log_a)), {}
    log_f = np.log([integrated_projected_potential(s) for s in species])
    if composition is not None:
        weights = np.array([composition.get(s, 0.0) for s in species], dtype=np.float64)
        if not np.all(weights > 0):
            raise InputError("--composition", f"needs a positive fraction for each of {', '.join(species)}")
        weights /= weights.sum()
    else:
        weights = np.full(len(species), 1.0 / len(species))
    # Start: the scale that puts the median atom at the weighted mean element, a spread of a quarter of
    # the closest spacing between elements.
    log_s = np.median(log_a) - np.dot(weights, log_f)
    spread = np.full(len(species), 0.25 * np.min(np.diff(np.sort(log_f))))
    for _ in range(iterations):
        z = (log_a[:, None] - log_s - log_f[None, :]) / spread[None, :]
        log_p = np.log(weights)[None, :] - np.log(spread)[None, :] - 0.5 * z**2
        log_p -= log_p.max(axis=1, keepdims=True)
        resp = np.exp(log_p)
        resp /= resp.sum(axis=1, keepdims=True)
        # M-step: the shared scale is a precision-weighted mean offset; spreads and weights per element.
        precision = resp / spread[None, :] ** 2
        new_log_s = np.sum(precision * (log_a[:, None] - log_f[None, :])) / np.sum(precision)
        counts = resp.sum(axis=0) + 1e-9
        new_spread = np.sqrt(np.sum(resp * (log_a[:, None] - new_log_s - log_f[None, :]) ** 2, axis=0) / counts)
        new_spread = np.maximum(new_spread, 1e-3)
        if composition is None:
            weights = counts / counts.sum()
        converged = abs(new_log_s - log_s) < 1e-10 and np.allclose(new_spread, spread, rtol=1e-8)
        log_s, spread = new_log_s, new_spread
        if converged:
            break
    best = np.argmax(resp, axis=1)
    labels = np.array(species)[best]
    return labels, resp[np.arange(len(best)), best], {"scale": float(np.exp(log_s)), "spread": spread.tolist(),
                                                      "weights": weights.tolist()}



def b_factors_from_calibration(widths: np.ndarray, widths_at: dict) -> np.ndarray:
    """Per-atom B (Å², B = 8π²⟨u_x²⟩, the simulator's convention) from fitted widths σ (Å) and the
    widths the same atoms get when their structure is simulated at known B: {B0: σ0, B1: σ1}. The
    fitted σ² grows linearly with ⟨u²⟩, so B is read off the line through the two calibration points."""
    (b0, s0), (b1, s1) = sorted(widths_at.items())
    s2, s0, s1 = (np.asarray(v, dtype=np.float64) ** 2 for v in (widths, s0, s1))
    return b0 + (b1 - b0) * (s2 - s0) / np.where(np.abs(s1 - s0) > 1e-12, s1 - s0, np.nan)
