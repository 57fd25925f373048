"""How far to trust each fitted atom: its position covariance from the Fisher information of the
fit's own likelihood, and its detection confidence, the log-likelihood gain of keeping it over its
Occam penalty (the evidence rule of `engine.fit.evidence`).

Both come from one pass of the likelihood-gain kernel (`engine.kernels.evidence`) over every
atom's footprints, at the fitted parameters:

- Counted data, tied atoms (`engine.fit.counted`): Poisson, W = 1/λ; the parameters of an atom are
  its position (the shared amplitude, width and backgrounds are fitted from all atoms at once).
- Per-atom fits (`engine.fit.reconstruct`): the position, log amplitude and log width of each atom,
  with the fitted intensity scales and geometry; Poisson in counts for counted data, else Gaussian
  with the noise variance of each projection read off the fit's residual (Σ r² over the pixels less
  the atoms' parameters), so a model that fits worse than the noise gets wider error bars.

Each atom's covariance is the inverse of its own block of the Fisher information, so σ is the
Cramér–Rao bound of that atom with every other parameter held at its fitted value: the coupling
with neighbouring atoms that overlap in projection, and with the shared and alignment parameters,
is left out (`scripts/uncertainty_check.py` measures what that costs).
"""

from __future__ import annotations

import numpy as np

from engine.fit.evidence import occam_penalty, visible_volume
from engine.kernels.evidence import LikelihoodGain

COLUMNS = ("sigma_x", "sigma_y", "sigma_z", "pos_uncertainty", "significance")
"""The per-atom columns written to atoms.xyz (meanings: `engine.io.atoms.KNOWN_COLUMNS`)."""
WORST = 5  # atoms listed in report.json as the least certain and the weakest


def position_covariance(fisher: np.ndarray) -> np.ndarray:
    """(N, 3, 3) Å² covariance of each atom's position: the inverse of its Fisher block (N, P, P),
    marginal over the block's other parameters (amplitude, width); infinite where it is singular."""
    fisher = np.asarray(fisher, np.float64)
    out = np.full((len(fisher), 3, 3), np.inf)
    for i, block in enumerate(fisher):
        try:
            inverse = np.linalg.inv(block)
        except np.linalg.LinAlgError:
            continue
        if np.all(np.isfinite(inverse)) and np.all(np.diag(inverse)[:3] > 0):
            out[i] = inverse[:3, :3]
    return out


def atom_columns(gain: np.ndarray, fisher: np.ndarray, volume: float) -> dict:
    """The per-atom columns (`COLUMNS`) from each atom's gain (nats) and Fisher block (position
    first; `engine.kernels.evidence`), its prior volume ``volume`` Å³."""
    covariance = position_covariance(fisher)
    sigma = np.sqrt(np.diagonal(covariance, axis1=1, axis2=2))
    return {"sigma_x": sigma[:, 0], "sigma_y": sigma[:, 1], "sigma_z": sigma[:, 2],
            "pos_uncertainty": np.sqrt(np.mean(sigma ** 2, axis=1)),
            "significance": gain - occam_penalty(fisher[:, :3, :3], volume, len(gain))}


def summary(atoms, noise: dict | None = None) -> dict | None:
    """What report.json says about the uncertainties of ``atoms`` (`Atoms` with the `COLUMNS`):
    median σ per axis (pm), the least certain and the weakest atoms (index in atoms.xyz, position Å)."""
    c = atoms.columns
    if not len(atoms) or "sigma_x" not in c:
        return None

    def listing(order, key):
        return [{"index": int(i), "position_A": [round(float(v), 4) for v in atoms.positions[i]],
                 key: float(c[key][i])} for i in order[:WORST]]

    finite = np.isfinite(c["pos_uncertainty"])
    return {"median_sigma_pm": {axis: float(np.median(c[f"sigma_{axis}"][finite]) * 100) if finite.any() else None
                                for axis in "xyz"},
            "median_pos_uncertainty_pm": float(np.median(c["pos_uncertainty"][finite]) * 100) if finite.any() else None,
            "atoms_not_significant": int(np.sum(c["significance"] < 0)),
            "least_certain": listing(np.argsort(-np.where(finite, c["pos_uncertainty"], np.inf)), "pos_uncertainty"),
            "weakest": listing(np.argsort(c["significance"]), "significance"),
            "noise": noise,
            "left_out": "coupling between atoms (neighbours overlapping in projection) and with the shared "
                        "and alignment parameters: each atom's own Fisher block is inverted"}


def per_atom_fit_uncertainty(fit, state: dict) -> tuple[dict, dict]:
    """The `COLUMNS` (in ``state``'s atom order) of a per-atom `Reconstruction` at ``state`` (its
    atoms: pos, amp, sigma), and what noise was assumed."""
    problem, data = fit.problem, fit.data
    n = problem.n_tilts
    predicted = problem.predicted(np.arange(n)).astype(np.float64)
    measured = fit.normalised
    scale = np.ones(n) if fit.refiner is None else np.asarray(fit.refiner.alignment.intensity_scale, np.float64)
    if fit.loss == "poisson":
        counts = fit.gain * data.scale
        kernel = LikelihoodGain(problem.projector, "poisson", fit.profile, free_shape=True)
        kernel.set_model(counts * predicted + fit.gain * data.background)
        kernel.set_counts(counts * measured + fit.gain * data.background)
        kernel.set_factor(counts * scale)
        noise = {"kind": "poisson", "gain": fit.gain}
    else:
        residual = measured - predicted
        pixels = residual[0].size
        free = 5 * len(state["pos"]) / n  # the atoms' parameters, shared among the projections
        variance = np.sum(residual ** 2, axis=(1, 2)) / max(pixels - free, 1.0)
        kernel = LikelihoodGain(problem.projector, "gaussian", fit.profile, free_shape=True)
        kernel.set_model(predicted)
        kernel.set_counts(measured)
        kernel.set_factor(scale)
        kernel.set_noise_variance(variance)
        noise = {"kind": "gaussian", "from": "the fit's residual, per projection",
                 "sigma_data_units_median": float(np.sqrt(np.median(variance)) * data.scale),
                 "sigma_over_data_model": float(np.sqrt(np.median(variance)) / data.noise)}
    gain, fisher, _ = kernel.evaluate(state["pos"], state["amp"], state["sigma"])
    return atom_columns(gain, fisher, visible_volume(measured.shape[1:], fit.series.pixel_size)), noise
