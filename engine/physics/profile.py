"""The shape every fitted atom is rendered with.

The paper's model is one isotropic Gaussian per atom. A real atom's projected potential is sharper at
the core and has longer tails (Peng's five Gaussians span σ ≈ 0.03–0.8 Å for Au). The single
Gaussian then leaves a residual around every atom; where atoms overlap in projection, the fit bends
positions and per-projection tilt angles to absorb it (a bias of about 0.2° on tilt-angle offsets
refined from simulated data). The 'peng' profile renders each atom as a few Gaussians sharing one
position: atom = a Σ_k w_k G(σ² + Δ_k²), with fixed weights w_k (Σ w_k = 1) and extra variances Δ_k²
(Δ_0 = 0) fitted once to the expected elements' blurred Peng potential. The learnable amplitude a is
then the whole integrated potential and σ the core width, which grows with thermal smearing as
σ² = σ_core² + B/8π².
"""

from __future__ import annotations

import numpy as np

from engine.core.elements import projected_potential_gaussians
from engine.kernels.atommodel import AtomProfile

PROFILE_COMPONENTS = 2  # core and tail: most of the gain of all five of Peng's terms at a fraction of the cost


def peng_profile(species: list[str], blur: float, components: int = PROFILE_COMPONENTS) -> AtomProfile:
    """The K-Gaussian profile closest (least squares over the image plane) to the mean unit-integral
    projected potential of ``species`` (B = 0), both blurred by ``blur`` Å."""
    from scipy.optimize import least_squares

    r = np.linspace(0.0, 4.0, 400)  # Å; the tails are below 1e-4 of the peak beyond
    area = np.sqrt(r + 1e-3)  # residuals weighted by √r: least squares over the plane, not the radius

    def blurred(weights, variances):
        s2 = np.asarray(variances)[None, :] + blur**2
        return np.sum(np.asarray(weights)[None, :] / (2 * np.pi * s2) * np.exp(-r[:, None] ** 2 / (2 * s2)), axis=1)

    target = np.zeros_like(r)
    for symbol in species:
        w, s = projected_potential_gaussians(symbol)
        target += blurred(w / w.sum(), s**2) / len(species)
    # Start from Peng's own terms pooled into K groups of neighbouring widths.
    w, s = projected_potential_gaussians(species[0])
    groups = np.array_split(np.arange(len(w)), components)
    w0 = np.array([w[g].sum() for g in groups]) / w.sum()
    v0 = np.array([np.average(s[g] ** 2, weights=w[g]) for g in groups])

    def unpack(params):
        logits, log_v = params[:components], params[components:]
        weights = np.exp(logits - logits.max())
        return weights / weights.sum(), np.exp(log_v)

    def residual(params):
        weights, variances = unpack(params)
        return (blurred(weights, variances) - target) * area

    fit = least_squares(residual, np.concatenate([np.log(w0), np.log(v0)]))
    weights, variances = unpack(fit.x)
    order = np.argsort(variances)
    weights, variances = weights[order], variances[order]
    return AtomProfile(tuple(float(x) for x in weights), tuple(float(x) for x in variances - variances[0]))


def atom_profile(kind: str, species: list[str], blur: float) -> AtomProfile:
    """The profile a fit uses: 'gaussian' (one Gaussian) or 'peng' (needs the expected species)."""
    from engine.core.errors import InputError

    if kind == "gaussian":
        return AtomProfile()
    if kind == "peng":
        if not species:
            raise InputError("atom_profile", "the 'peng' atom profile needs the expected species (--species)")
        return peng_profile(species, blur)
    raise InputError("atom_profile", f"unknown atom profile {kind!r} (known: gaussian, peng)")
