"""Chemical elements and their electron scattering factors.

Each element's elastic electron scattering factor is Peng et al. (1996)'s 5-Gaussian fit
f_e(s) = Σ_i a_i exp(−b_i s²) (a_i in Å, b_i in Å², s = sinθ/λ = q/2 in Å⁻¹). Its projected
potential is then analytic: a sum of 5 normalized 2D Gaussians, see `projected_potential_gaussians`.
"""

from __future__ import annotations

from importlib import resources

import numpy as np

from engine.core.errors import InputError

# 2π a₀ e = 2π · 0.529177 Å · 14.3996 V·Å: converts scattering amplitude (Å) to potential (V·Å³).
POTENTIAL_PER_SCATTERING_VA3 = 2.0 * np.pi * 0.529177210903 * 14.3996454784


def _load_peng_table() -> tuple[list[str], np.ndarray]:
    text = resources.files("engine.core").joinpath("tables/peng1996_elastic.txt").read_text()
    symbols, rows = [], []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split()
        symbols.append(fields[1])
        rows.append([float(x) for x in fields[2:12]])
    return symbols, np.asarray(rows, dtype=np.float64)


SYMBOLS, _PENG = _load_peng_table()
ATOMIC_NUMBER = {s: z for z, s in enumerate(SYMBOLS, start=1)}


def atomic_number(symbol: str, source: str | None = None) -> int:
    """Atomic number Z of an element symbol ('Au', 'au' and 'AU' all work).

    Raises InputError naming ``source`` (a file or option) for an unknown symbol.
    """
    key = symbol.strip().capitalize()
    if key not in ATOMIC_NUMBER:
        raise InputError(source, f"unknown element symbol {symbol!r} (known: H..Cf, Z = 1-98)")
    return ATOMIC_NUMBER[key]


def normalize_symbol(symbol: str, source: str | None = None) -> str:
    """Canonical capitalisation of an element symbol, validated."""
    return SYMBOLS[atomic_number(symbol, source) - 1]


def peng_parameters(symbol: str) -> tuple[np.ndarray, np.ndarray]:
    """Peng 1996 elastic parameters (a_i in Å, b_i in Å²), five of each."""
    row = _PENG[atomic_number(symbol) - 1]
    return row[:5].copy(), row[5:].copy()


def projected_potential_gaussians(symbol: str, b_factor: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """One atom's projected potential as a sum of normalized 2D Gaussians.

    v_z(r) = Σ_i w_i / (2π σ_i²) · exp(−r² / (2σ_i²)) in V·Å, with weights w_i (V·Å³, the integral
    of each term over the image plane) and widths σ_i (Å). A Debye–Waller factor exp(−B s²) with
    B = 8π²⟨u_x²⟩ (Å²) adds B to every b_i, i.e. ⟨u_x²⟩ to every σ_i².

    Derivation: V(r) = 2π a₀ e ∫ f_e(q) e^{2πi q·r} d³q with s = q/2; the projection keeps q_z = 0
    and the 2D transform of exp(−b q²/4) is a Gaussian with σ² = b / (8π²).
    """
    a, b = peng_parameters(symbol)
    weights = POTENTIAL_PER_SCATTERING_VA3 * a
    sigmas = np.sqrt((b + b_factor) / (8.0 * np.pi**2))
    return weights, sigmas


def integrated_projected_potential(symbol: str) -> float:
    """Integral of one atom's projected potential over the image plane (V·Å³) = 2π a₀ e f_e(0)."""
    return float(projected_potential_gaussians(symbol)[0].sum())
