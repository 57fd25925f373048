"""Denoising of counted projections before a classical reconstruction, as low-dose AET papers do it:
the Anscombe transform makes Poisson counts approximately Gaussian with unit variance, BM3D (the
optional `bm3d` package: ``pip install 'atomsplat[denoise]'``) denoises each projection with σ = 1,
and the exact unbiased inverse of the transform (Mäkitalo & Foi, IEEE TIP 20(1), 2011) brings the
result back to expected counts.

The exact unbiased inverse is the inverse of λ ↦ E[A(z)], z ~ Poisson(λ), A(z) = 2 √(z + 3/8): the
denoised value estimates E[A(z)], not A(λ), so the algebraic inverse (y/2)² − 3/8 is biased low at
low counts. Here that expectation is tabulated (a sum over the Poisson probabilities) and inverted by
interpolation; `inverse_anscombe_asymptotic`, (y/2)² − 1/8, is the large-count limit.
"""

from __future__ import annotations

import numpy as np

from engine.core.errors import InputError

ANSCOMBE_FLOOR = 2 * np.sqrt(3 / 8)  # E[A(z)] at λ = 0


def anscombe(counts) -> np.ndarray:
    """A(z) = 2 √(z + 3/8): Poisson counts to approximately unit-variance Gaussian values."""
    return 2 * np.sqrt(np.maximum(np.asarray(counts, np.float64), 0.0) + 3 / 8)


def expected_anscombe(mean) -> np.ndarray:
    """E[A(z)] for z ~ Poisson(λ), λ = ``mean`` (any shape): Σ_k A(k) P(k; λ), summed to λ + 12√λ + 30."""
    from scipy import stats

    lam = np.asarray(mean, np.float64)
    flat = lam.ravel()
    top = int(np.ceil(flat.max() + 12 * np.sqrt(flat.max()) + 30)) if flat.size else 0
    k = np.arange(top + 1)
    values = anscombe(k)
    out = np.empty(flat.shape)
    for start in range(0, len(flat), 256):  # bounded memory: 256 means × (top + 1) terms at a time
        chunk = flat[start:start + 256]
        out[start:start + 256] = stats.poisson.pmf(k[None, :], chunk[:, None]) @ values
    return out.reshape(lam.shape)


def inverse_anscombe_exact(values) -> np.ndarray:
    """The exact unbiased inverse: the λ with E[A(z)] = y, z ~ Poisson(λ) (0 where y is below
    E[A(z)] at λ = 0). Tabulated on a grid dense in √λ and interpolated; beyond the largest value
    present the asymptotic inverse is exact to far below a count."""
    y = np.asarray(values, np.float64)
    top = float(np.max(y)) if y.size else 0.0
    largest = max((top / 2) ** 2 + 2 * top + 10, 10.0)
    grid = np.linspace(0.0, np.sqrt(largest), 4000) ** 2
    table = expected_anscombe(grid)
    return np.where(y <= ANSCOMBE_FLOOR, 0.0, np.interp(y, table, grid))


def inverse_anscombe_asymptotic(values) -> np.ndarray:
    """The asymptotically unbiased inverse (y/2)² − 1/8, floored at 0."""
    return np.maximum((np.asarray(values, np.float64) / 2) ** 2 - 1 / 8, 0.0)


def require_bm3d():
    """The bm3d module, or a one-line error naming --denoise when it is not installed."""
    try:
        import bm3d
    except ImportError:
        raise InputError("--denoise", "bm3d is not installed; pip install bm3d (or 'atomsplat[denoise]'), "
                                      "or use --denoise none") from None
    return bm3d


def denoise_counts_bm3d(counts: np.ndarray, progress=None) -> np.ndarray:
    """Every projection of counted data (n, H, W; whole counts) denoised: Anscombe transform, BM3D with
    σ = 1 (unit variance by construction of the transform), exact unbiased inverse. Returns the
    estimated expected counts per pixel. ``progress(k, n)`` is called after each projection."""
    bm3d = require_bm3d()
    counts = np.asarray(counts, np.float64)
    transformed = np.empty(counts.shape)
    for k, image in enumerate(counts):
        transformed[k] = np.asarray(bm3d.bm3d(anscombe(image), sigma_psd=1.0), np.float64).reshape(image.shape)
        if progress is not None:
            progress(k + 1, len(counts))
    return inverse_anscombe_exact(transformed)
