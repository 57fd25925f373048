"""The precision limit of an experiment, before it is done: the Cramér–Rao bound of every atom of a
structure under a tilt geometry, pixel size, blur and dose (or noise level), and the dose needed for
a target precision. No fit: the Fisher information of each atom is taken at the truth, from the
expected (noise-free) data of the simulator's physics (Peng's five Gaussians per element,
`engine.physics.simulate`), by the likelihood-gain kernel the fits use (`engine.kernels.evidence`).

- Counted data (``counts_per_atom`` electrons per atom per projection, ``background`` counts per
  pixel): Poisson; each atom's position is the parameter (the tied-atom fit of counted data). Both
  counts scale with the dose, so the Fisher information is proportional to it and the bound to
  1/√dose.
- Gaussian noise (``noise`` σ as a fraction of the clean series' maximum, as `simulate --noise`):
  each atom's position, amplitude and width are free (the per-atom fit); the bound is proportional to
  the noise σ.

Each atom's bound is read off the joint information of the atom and its nearest neighbours of the
same element (as in `engine.fit.uncertainty`).
"""

from __future__ import annotations

import numpy as np

from engine.core.elements import projected_potential_gaussians
from engine.core.errors import InputError
from engine.fit.uncertainty import COUPLING_PER_D_MIN, coupled_pairs, position_covariance
from engine.kernels.atommodel import AtomProfile
from engine.kernels.evidence import cached_likelihood_gain
from engine.kernels.projector import cached_projector
from engine.physics.chemistry import minimum_distance
from engine.physics.forward import ForwardModel
from engine.physics.simulate import specimen_gaussians

DOSE_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0, 10.0)  # rows of the table, × the given dose (or noise σ)


def element_profile(symbol: str, b_factor: float = 0.0) -> tuple[AtomProfile, float, float]:
    """One element's projected potential as an `AtomProfile` about its narrowest Gaussian: (profile,
    amplitude V·Å³, width σ Å of the narrowest)."""
    weights, sigmas = projected_potential_gaussians(symbol, b_factor)
    order = np.argsort(sigmas)
    weights, sigmas = weights[order], sigmas[order]
    total = float(weights.sum())
    profile = AtomProfile(tuple(float(w) for w in weights / total), tuple(float(v) for v in sigmas ** 2 - sigmas[0] ** 2))
    return profile, total, float(sigmas[0])


def cramer_rao(atoms, geometry, shape, pixel_size: float, blur: float, *, counts_per_atom: float | None = None,
               background: float = 0.0, noise: float | None = None, b_factor: float = 0.0) -> dict:
    """Per-atom Cramér–Rao σ (N, 3) Å of ``atoms`` (`Atoms` of known elements) in ``geometry``
    (`TiltGeometry`), images ``shape`` (H, W) px of ``pixel_size`` Å, blur σ ``blur`` Å; give
    ``counts_per_atom`` (and ``background``) for counted data or ``noise`` for Gaussian noise."""
    if (counts_per_atom is None) == (noise is None):
        raise ValueError("give counts_per_atom or noise, not both")
    positions, weights, widths = specimen_gaussians(atoms, b_factor)
    clean = ForwardModel(geometry, shape, pixel_size, blur).render_gaussians(positions, weights, widths)
    clean = clean.astype(np.float64)
    projector = cached_projector(geometry, shape, pixel_size, blur)
    elements = {str(s): element_profile(str(s), b_factor) for s in np.unique(atoms.species)}
    if counts_per_atom is not None:
        # An atom of amplitude a integrates to a / pixel² over the image's pixels.
        mean_amplitude = float(np.mean([elements[str(s)][1] for s in atoms.species]))
        gain = counts_per_atom * pixel_size ** 2 / mean_amplitude  # counts per simulator unit
        expected = background + gain * clean
    else:
        gain, expected = 1.0, clean
        noise_sigma = noise * float(clean.max())
    sigma = np.zeros((len(atoms), 3))
    for symbol, (profile, amplitude, width) in elements.items():
        mask = atoms.species == symbol
        kernel = cached_likelihood_gain(projector, "poisson" if counts_per_atom is not None else "gaussian", profile,
                                        free_shape=counts_per_atom is None)
        kernel.set_model(expected)
        kernel.set_counts(expected)
        kernel.set_factor(gain)
        if noise is not None:
            kernel.set_noise_variance(noise_sigma ** 2)
        # Neighbours of other elements are left out (one kernel per element's profile).
        positions = atoms.positions[mask]
        pairs = coupled_pairs(positions, COUPLING_PER_D_MIN * minimum_distance([symbol]))
        moments = kernel.evaluate(positions, amplitude, width, pairs=pairs)
        covariance = position_covariance(moments.fisher, pairs, moments.cross)
        sigma[mask] = np.sqrt(np.diagonal(covariance, axis1=1, axis2=2))
    return {"sigma_A": sigma, "rmsd_pm": float(np.sqrt(np.mean(np.sum(sigma ** 2, axis=1)))) * 100,
            "rmsd_axis_pm": {a: float(np.sqrt(np.mean(sigma[:, i] ** 2))) * 100 for i, a in enumerate("xyz")}}


def conditions_like(series, atoms, blur: float | None = None) -> dict:
    """The conditions of a measured (or simulated) ``series`` of ``atoms``: geometry, image size,
    pixel size, blur (the file's unless given) and the dose (counted data: counts per atom per
    projection and background counts per pixel) or the noise σ as a fraction of the clean maximum
    (the data model's noise against the structure's simulated series, scaled to the data)."""
    from engine.measure.alignment import counts_background
    from engine.measure.datamodel import choose_noise_model, estimate_data_model

    source = series.source or "tilt series"
    blur = series.blur_sigma if blur is None else blur
    if blur is None:
        raise InputError("--blur", f"{source} does not say its blur; give it (σ, Å)")
    geometry, shape = series.get_geometry(), series.shape
    out = {"geometry": geometry, "shape": tuple(shape), "pixel_size": float(series.pixel_size), "blur": float(blur)}
    model = choose_noise_model(series)
    if model.kind == "poisson":
        counts = np.asarray(series.projections, np.float64) * model.gain
        background = np.asarray(counts_background(counts), np.float64).reshape(-1)
        signal = counts.sum(axis=(1, 2)) - background * counts[0].size
        out.update(counts_per_atom=float(np.mean(signal)) / len(atoms), background=float(np.mean(background)))
        return out
    data = estimate_data_model(series, blur)
    positions, weights, widths = specimen_gaussians(atoms)
    clean = ForwardModel(geometry, shape, series.pixel_size, blur).render_gaussians(positions, weights, widths)
    scale = float(np.sum(series.projections - data.background)) / float(np.sum(clean))  # data units per simulator unit
    if not scale > 0:
        raise InputError(source, "holds no signal above its background to compare the structure with")
    out["noise"] = data.noise * data.scale / scale / float(clean.max())
    return out


def plan_table(atoms, conditions: dict, target_pm: float | None = None, b_factor: float = 0.0) -> dict:
    """The bound at the given conditions and at `DOSE_FACTORS` times their dose (or noise σ), and
    the dose (largest noise σ) that reaches ``target_pm`` RMSD."""
    counted = conditions.get("counts_per_atom") is not None
    bound = cramer_rao(atoms, conditions["geometry"], conditions["shape"], conditions["pixel_size"],
                       conditions["blur"], counts_per_atom=conditions.get("counts_per_atom"),
                       background=conditions.get("background", 0.0), noise=conditions.get("noise"),
                       b_factor=b_factor)
    rmsd, rmsd_z = bound["rmsd_pm"], bound["rmsd_axis_pm"]["z"]
    rows = []
    for f in DOSE_FACTORS:
        shrink = 1 / np.sqrt(f) if counted else f  # σ ∝ 1/√dose, or ∝ the noise σ
        row = ({"counts_per_atom": conditions["counts_per_atom"] * f, "background": conditions["background"] * f}
               if counted else {"noise": conditions["noise"] * f})
        rows.append({**row, "rmsd_pm": rmsd * shrink, "rmsd_z_pm": rmsd_z * shrink})
    result = {"atoms": len(atoms), "model": "poisson" if counted else "gaussian",
              "conditions": {k: v for k, v in conditions.items() if k not in ("geometry", "shape")}
              | {"tilts": len(conditions["geometry"]), "shape": list(conditions["shape"])},
              "rmsd_pm": rmsd, "rmsd_axis_pm": bound["rmsd_axis_pm"], "table": rows,
              "sigma_A": bound["sigma_A"]}
    if target_pm is not None:
        ratio = rmsd / target_pm
        result["target_pm"] = target_pm
        result["needed"] = ({"counts_per_atom": conditions["counts_per_atom"] * ratio ** 2,
                             "background": conditions["background"] * ratio ** 2} if counted
                            else {"noise": conditions["noise"] / ratio})
    return result
