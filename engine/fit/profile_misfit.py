"""The atom profile's misfit, read off the fit's own residual, and the bias it leaves in the positions.

One Gaussian per atom (or Peng's core and tail) is not an atom's exact projected potential: the fit's
residual keeps, around every atom, what the profile cannot draw (a sharper peak and a negative ring
for a Gaussian fitted to a real atom). An atom's own misfit is even about it and pulls it nowhere,
but its neighbours' misfit is not, and the fit moves each atom to make up for it: a bias, common to
every fit of the same structure, which no variance (Fisher, dispersion, sandwich) can see, since
the score is zero at the fit.

The misfit is estimated from the data, then corrected to first order:

1. Its radial profiles: the residual r_k of every projection k is modelled as m_k = Σ_c K_c ∗ D_kc,
   D_kc the atoms splatted bilinearly at their projected centres with class c's weights (per
   species its profile and the profile's change with the atom's width, `class_weights`) and K_c(d)
   a piecewise-linear function of |d| (knots every ``KNOT_SPACING_PX`` px, out to the footprint's
   truncation radius: the profile the projector walks). The knot values are the least-
   squares solution over all projections, whose normal equations need only the centres' and the
   residual's correlations at short lags (FFTs, summed over projections before the inverse). A
   least-squares fit, not a stacked mean: the neighbours' own misfits, which a stacked mean would
   count once more around every atom, are each given to their own atom.
2. The rendered misfit m is what the model lacks; the Gauss–Newton step of the atoms towards the
   data with it, Δ = F⁻¹ Jᵀ W (r − m) (≈ −F⁻¹ Jᵀ W m, since Jᵀ W r ≈ 0 at the fit), is each atom's
   bias with the sign reversed. Jᵀ W (r − m) is the likelihood-gain kernel's score against model + r − m;
   F⁻¹ is taken over each atom and its coupled neighbours' positions, as for its covariance
   (`engine.fit.uncertainty.misfit_shift`).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import fft

from engine.kernels.projector import TRUNCATION_RADIUS_SIGMAS

KNOT_SPACING_PX = 0.5  # the profile's resolution: half a pixel, finer than the pixels sample it
PROJECTION_CHUNK = 16  # projections transformed at once (bounded memory at 10⁵ atoms)


class MisfitProfile:
    """The radial misfit profiles (`fit`) and their rendering at the atoms (`render`).

    centres  : (n, N, 2) the atoms' projected (col, row) px (`TiltGeometry.pixel_coordinates`).
    weights  : (N, C) how much of each of the C profiles every atom draws (`class_weights`).
    radius_px: how far from an atom's centre the profiles reach (px)."""

    def __init__(self, centres: np.ndarray, weights: np.ndarray, shape, radius_px: float):
        self.centres, self.weights = centres, np.asarray(weights, np.float64).reshape(centres.shape[1], -1)
        self.n_classes = self.weights.shape[1]
        self.shape = tuple(shape)
        self.knots = np.arange(0.0, radius_px + KNOT_SPACING_PX, KNOT_SPACING_PX)
        self.reach = int(math.ceil(radius_px))  # offsets −reach..reach px along each axis
        # Zero-padded by twice the reach: the centres' correlations at lags up to 2 reach do not wrap.
        self.padded = tuple(fft.next_fast_len(size + 2 * self.reach, real=True) for size in self.shape)
        offsets = np.arange(-self.reach, self.reach + 1)
        distance = np.hypot(offsets[:, None], offsets[None, :])
        # (B, L, L): knot b's hat function of the distance, on the grid of offsets.
        self.basis = np.maximum(1.0 - np.abs(distance[None] - self.knots[:, None, None]) / KNOT_SPACING_PX, 0.0)
        self.basis[:, distance > radius_px] = 0.0
        self.values = None  # (C, B) knot values, in the residual's units, once fitted
        self._splat_spectra = None
        self.explained = None  # the share of the residual's power the rendered misfit accounts for

    def _splat(self, chunk: slice) -> np.ndarray:
        """(C, k, H', W') the atoms splatted bilinearly at their centres in projections ``chunk``,
        with each class's weights, in the zero-padded frame."""
        centres = self.centres[chunk]
        k = len(centres)
        h, w = self.padded
        base = np.floor(centres).astype(np.int64)
        frac = centres - base
        # Every (class, projection) its own padded image in one flat array: one bincount for all.
        image = (np.arange(self.n_classes)[:, None, None] * k + np.arange(k)[None, :, None]) * (h * w)
        index, weights = [], []
        for dc, dr in ((0, 0), (1, 0), (0, 1), (1, 1)):
            col, row = base[..., 0] + dc, base[..., 1] + dr
            weight = (frac[..., 0] if dc else 1 - frac[..., 0]) * (frac[..., 1] if dr else 1 - frac[..., 1])
            inside = (col >= 0) & (col < self.shape[1]) & (row >= 0) & (row < self.shape[0])
            index.append((image + (row * w + col)[None])[:, inside].ravel())
            weights.append((weight[None] * self.weights.T[:, None, :])[:, inside].ravel())
        out = np.bincount(np.concatenate(index), np.concatenate(weights), minlength=self.n_classes * k * h * w)
        return out.reshape(self.n_classes, k, h, w)

    def _lags(self, image: np.ndarray, reach: int) -> np.ndarray:
        """The (…, 2 reach + 1, 2 reach + 1) central part (lags −reach..reach) of a correlation image."""
        rows = np.r_[-reach:reach + 1] % image.shape[-2]
        cols = np.r_[-reach:reach + 1] % image.shape[-1]
        return image[..., rows[:, None], cols[None, :]]

    def _spectra(self) -> np.ndarray:
        """(C, n, H', W'/2 + 1) complex64: the splatted atoms' spectra (single precision: a correction
        needs no more, and it halves the memory at 10⁵ atoms), computed once."""
        if self._splat_spectra is None:
            n = len(self.centres)
            self._splat_spectra = np.zeros((self.n_classes, n, self.padded[0], self.padded[1] // 2 + 1), np.complex64)
            for start in range(0, n, PROJECTION_CHUNK):
                chunk = slice(start, min(start + PROJECTION_CHUNK, n))
                self._splat_spectra[:, chunk] = fft.rfft2(self._splat(chunk).astype(np.float32), s=self.padded,
                                                          workers=-1)
        return self._splat_spectra

    def fit(self, residual: np.ndarray) -> np.ndarray:
        """The knot values (C, B) that best explain ``residual`` (n, H, W) in least squares, in its units."""
        s_count, b_count, reach = self.n_classes, len(self.knots), self.reach
        spectra = self._spectra()
        cross = np.zeros((s_count, s_count) + spectra.shape[2:], np.complex128)
        rhs = np.zeros((s_count,) + spectra.shape[2:], np.complex128)
        for start in range(0, len(residual), PROJECTION_CHUNK):
            chunk = slice(start, min(start + PROJECTION_CHUNK, len(residual)))
            image = fft.rfft2(residual[chunk].astype(np.float32), s=self.padded, workers=-1)
            for s in range(s_count):
                conjugate = spectra[s, chunk].conj()
                rhs[s] += (conjugate * image).sum(axis=0)
                for t in range(s_count):
                    cross[s, t] += (conjugate * spectra[t, chunk]).sum(axis=0)
        # D_s ⋆ D_t at lags up to 2 reach, and D_s ⋆ r at lags up to reach, summed over projections.
        centre_correlation = self._lags(fft.irfft2(cross, s=self.padded, workers=-1), 2 * reach)
        residual_correlation = self._lags(fft.irfft2(rhs, s=self.padded, workers=-1), reach)
        # Normal equations: <B_b ∗ D_s, B_c ∗ D_t> = Σ_{u,v} B_b(u) B_c(v) (D_s ⋆ D_t)(u − v) and
        # <B_b ∗ D_s, r> = Σ_u B_b(u) (D_s ⋆ r)(u) (the offsets u, v on the basis grid).
        side = 2 * reach + 1
        grid = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1).reshape(-1, 2)
        lag = grid[:, None, :] - grid[None, :, :] + 2 * reach  # (u, v) → index of u − v
        basis = self.basis.reshape(b_count, -1)
        normal = np.zeros((s_count, b_count, s_count, b_count))
        for s in range(s_count):
            for t in range(s_count):
                correlation = centre_correlation[s, t][lag[..., 0], lag[..., 1]]
                normal[s, :, t, :] = basis @ correlation @ basis.T
        vector = np.einsum("bu,su->sb", basis, residual_correlation.reshape(s_count, -1))
        size = s_count * b_count
        solution = np.linalg.lstsq(normal.reshape(size, size), vector.reshape(size), rcond=None)[0]
        self.values = solution.reshape(s_count, b_count)
        return self.values

    def kernels(self) -> np.ndarray:
        """(C, L, L) each class's fitted profile on the grid of offsets (px)."""
        return np.einsum("sb,bij->sij", self.values, self.basis)

    def render(self) -> np.ndarray:
        """(n, H, W) the fitted misfit drawn at every atom: what the fitted model lacks."""
        kernels = np.zeros((self.n_classes,) + self.padded)
        side = 2 * self.reach + 1
        kernels[:, :side, :side] = self.kernels()
        kernels = np.roll(kernels, (-self.reach, -self.reach), axis=(1, 2))  # offset 0 at index 0
        kernels = fft.rfft2(kernels, workers=-1).astype(np.complex64)
        spectra = self._spectra()
        n = len(self.centres)
        out = np.zeros((n,) + self.shape)
        h, w = self.shape
        for start in range(0, n, PROJECTION_CHUNK):
            chunk = slice(start, min(start + PROJECTION_CHUNK, n))
            drawn = fft.irfft2(np.einsum("shw,skhw->khw", kernels, spectra[:, chunk]), s=self.padded, workers=-1)
            out[chunk] = drawn[:, :h, :w]
        return out


def footprint_radius_px(widths: np.ndarray, profile, blur: float, pixel_size: float) -> float:
    """The truncation radius (px) of the widest footprint the projector walks (widths σ Å, the
    profile's widest component, the blur σ Å)."""
    widest = math.sqrt(float(np.max(widths)) ** 2 + max(profile.extra_var) + blur ** 2)
    return TRUNCATION_RADIUS_SIGMAS * widest / pixel_size


def misfit_score(kernel, remainder: np.ndarray, positions, amplitudes, widths) -> np.ndarray:
    """(N, P) Jᵀ W ``remainder``: the score of ``kernel``'s atoms against its model plus the residual
    that remains with the misfit drawn (ψ(r − m): r the data less the model, m the misfit, ψ the
    loss's influence; the kernel's units); the kernel's data are put back afterwards."""
    data = kernel.data
    kernel.set_counts(kernel.model + remainder)
    try:
        return kernel.evaluate(positions, amplitudes, widths).score
    finally:
        kernel.data = data


def class_weights(species, widths) -> np.ndarray:
    """(N, C) each atom's weights of the misfit profiles: per species (integer classes 0..S−1) its
    profile and, where the species' widths σ (Å) differ, the profile's change with the width,
    weighted by the atom's width against its species' mean: a Gaussian's misfit against an atom
    depends on its width, to first order linearly."""
    species = np.asarray(species, int)
    widths = np.broadcast_to(np.asarray(widths, np.float64), species.shape)
    columns = []
    for s in range(int(species.max()) + 1 if len(species) else 0):
        member = species == s
        columns.append(member.astype(np.float64))
        if member.any() and np.ptp(widths[member]) > 0:
            columns.append(np.where(member, widths / widths[member].mean() - 1.0, 0.0))
    return np.column_stack(columns) if columns else np.zeros((0, 1))


def fit_misfit(residual: np.ndarray, geometry, positions, weights, radius_px: float, pixel_size: float):
    """The `MisfitProfile` fitted to ``residual`` (n, H, W: data less the fitted model) at the atoms
    (positions Å, their `class_weights`) and the misfit it renders (n, H, W, the residual's units);
    the profile's ``explained`` is the share of the residual's power the misfit accounts for."""
    residual = np.asarray(residual, np.float64)
    centres = geometry.pixel_coordinates(positions, residual.shape[1:], pixel_size)
    profile = MisfitProfile(centres, weights, residual.shape[1:], radius_px)
    profile.fit(residual)
    misfit = profile.render()
    profile.explained = float(1.0 - np.sum((residual - misfit) ** 2) / max(np.sum(residual ** 2), 1e-300))
    return profile, misfit
