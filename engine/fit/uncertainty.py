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

Each atom's covariance is the inverse of the joint observed information (the Hessian of −log L at
the fit and the data; `information_covariance`) of the atom and its nearest neighbours (the 12
nearest within 3 d_min, whose footprints overlap at many tilts; the kernel gives the cross blocks
too), under Poisson noise the sandwich H⁻¹ S H⁻¹ with S the scores' spread over the pixels, read at
the atom: those neighbours' parameters unknown, the atoms beyond them, the shared and the alignment
parameters held at their fitted values (`scripts/uncertainty_check.py` measures this against the
joint information of all atoms). The significance's Occam penalty keeps the Fisher information,
the detection rule's.

The same pass gives the profile correction its Fisher information (`misfit_shift`): the bias the
atom profile's misfit leaves in each position (`engine.fit.profile_misfit`), corrected to first order.
"""

from __future__ import annotations

import time
from functools import partial
from typing import NamedTuple

import numpy as np
from scipy.spatial import cKDTree

from engine.fit.evidence import occam_penalty, visible_volume
from engine.fit.profile_misfit import class_weights, fit_misfit, footprint_radius_px, misfit_score
from engine.fit.seeding import residual_dispersion
from engine.kernels.evidence import LikelihoodGain
from engine.kernels.loss import HUBER_DELTA

COLUMNS = ("sigma_x", "sigma_y", "sigma_z", "corr_xy", "corr_xz", "corr_yz", "pos_uncertainty", "significance")
"""The per-atom columns written to atoms.xyz (meanings: `engine.io.atoms.KNOWN_COLUMNS`)."""
# Each atom is coupled with its 12 nearest neighbours (a close-packed shell) within 3 d_min: in a
# close-packed structure these are its first shell; in an open one (amorphous Si, four bonds) the
# first shell holds four, and the second, whose footprints overlap at as many tilts, fills the rest.
COUPLING_PER_D_MIN = 3.0
MAX_NEIGHBOURS = 12  # bounds each atom's joint matrix (13 atoms × 5 parameters)
WORST = 5  # atoms listed in report.json as the least certain and the weakest
LINEAR_REACH = 0.5  # the longest profile-correction step, in footprint widths (`misfit_shift`)
BATCH_ATOMS = 2048  # joint matrices built at once (each up to 65² float64: about 70 MB a batch)


def position_covariance(fisher: np.ndarray, pairs=None, cross=None, spread=None) -> np.ndarray:
    """(N, 3, 3) Å² covariance of each atom's position, marginal over its amplitude and width (the
    other parameters of its Fisher block, fisher (N, P, P)) and, with ``pairs`` (M, 2) and their
    cross blocks ``cross`` (M, P, P), over its coupled neighbours' parameters: the inverse of the
    joint information of the atom and its neighbours (a principal submatrix of the whole; atoms
    farther out are taken as known). Infinite where that is singular. With ``spread`` (the scores'
    spread: own blocks (N, P, P) and cross blocks (M, P, P)), the sandwich F⁻¹ S F⁻¹ over the same
    neighbourhood instead."""
    return neighbourhood_solve(fisher, pairs, cross, spread=spread)[0]


def _numbered_blocks(own: np.ndarray, cross: np.ndarray) -> np.ndarray:
    """Every block of a joint matrix by number: own blocks, cross blocks (i, j), their transposes
    (j, i), a zero block."""
    p = own.shape[1]
    return np.concatenate([own, cross, cross.transpose(0, 2, 1), np.zeros((1, p, p))])


def neighbourhood_solve(fisher: np.ndarray, pairs=None, cross=None, score=None, spread=None):
    """`position_covariance` (the sandwich with ``spread``: own and cross blocks), and with ``score``
    (N, P) the Gauss–Newton step of each atom's position (N, 3) Å over the same joint information,
    (F⁻¹ g) read at the atom with g the scores of the atom and its neighbours (None without
    ``score``; 0 where the joint information is singular)."""
    fisher = np.asarray(fisher, np.float64)
    n, p = fisher.shape[:2]
    pairs = np.zeros((0, 2), int) if pairs is None else np.asarray(pairs, int).reshape(-1, 2)
    cross = np.zeros((0, p, p)) if cross is None else np.asarray(cross, np.float64)
    m = len(pairs)
    blocks = _numbered_blocks(fisher, cross)
    if spread is not None:
        spread_own, spread_cross = (np.asarray(b, np.float64) if b is not None else np.zeros((0, p, p))
                                    for b in spread)
        middle_blocks = _numbered_blocks(spread_own, spread_cross)
    # Directed couplings (i, j), (j, i) pair by pair: each atom's neighbours in the order of ``pairs``.
    source, target = pairs.ravel(), pairs[:, ::-1].ravel()
    number = n + np.column_stack([np.arange(m), m + np.arange(m)]).ravel()
    order = np.argsort(source * n + target)
    keys, numbers = (source * n + target)[order], number[order]  # the block of (u, v) by binary search
    degree = np.bincount(source, minlength=n)
    first = np.cumsum(degree) - degree
    by_source = np.argsort(source, kind="stable")
    out = np.full((n, 3, 3), np.inf)
    steps = None if score is None else np.zeros((n, 3))
    score = np.zeros((n, p)) if score is None else np.asarray(score, np.float64)
    for size in np.unique(degree):  # atoms with as many neighbours at once: batched solves,
        group = np.flatnonzero(degree == size)
        for start in range(0, len(group), BATCH_ATOMS):  # in batches of bounded memory
            atoms = group[start:start + BATCH_ATOMS]
            # (G, size + 1): each atom and its neighbours
            ring = np.column_stack([atoms, target[by_source[first[atoms, None] + np.arange(size)]]])
            u, v = ring[:, :, None], ring[:, None, :]
            index = np.where(u == v, u, len(blocks) - 1)
            if m:
                found = np.searchsorted(keys, u * n + v).clip(max=2 * m - 1)
                index = np.where((u != v) & (keys[found] == u * n + v), numbers[found], index)
            k = (size + 1) * p
            joint = blocks[index].transpose(0, 1, 3, 2, 4).reshape(len(atoms), k, k)
            # Right-hand sides: the atom's x, y, z (the columns of the inverse wanted) and the scores.
            rhs = np.concatenate([np.broadcast_to(np.eye(k)[:, :3], (len(atoms), k, 3)),
                                  score[ring].reshape(len(atoms), k, 1)], axis=2)
            try:
                solution = np.linalg.solve(joint, rhs)
            except np.linalg.LinAlgError:  # one singular matrix fails the batch: one by one
                solution = np.full((len(atoms), k, 4), np.inf)
                for g in range(len(atoms)):
                    try:
                        solution[g] = np.linalg.solve(joint[g], rhs[g])
                    except np.linalg.LinAlgError:
                        pass
            inverse = solution[:, :3, :3]
            if spread is not None:  # the sandwich, read at the atom: Xᵀ S X, X the inverse's x, y, z columns
                middle = middle_blocks[index].transpose(0, 1, 3, 2, 4).reshape(len(atoms), k, k)
                with np.errstate(invalid="ignore"):
                    sandwich = np.einsum("gka,gkl,glb->gab", solution[..., :3], middle, solution[..., :3])
                    # only where the information is positive definite there (a maximum, not a saddle)
                    inverse = np.where(np.all(np.isfinite(inverse), axis=(1, 2))[:, None, None]
                                       & (np.linalg.eigvalsh(np.nan_to_num(inverse))[:, :1, None] > 0),
                                       sandwich, np.inf)
            solution = solution[:, :3]
            good = (np.all(np.isfinite(inverse), axis=(1, 2))
                    & np.all(np.diagonal(inverse, axis1=1, axis2=2) > 0, axis=1))
            out[atoms[good]] = inverse[good]
            if steps is not None:
                steps[atoms[good]] = solution[good, :, 3]
    return out, steps


def coupled_pairs(positions: np.ndarray, radius: float) -> np.ndarray:
    """(M, 2) index pairs (i < j) of each atom and its nearest neighbours closer than ``radius`` Å
    (at most MAX_NEIGHBOURS each): those whose footprints overlap at many tilts, so that their
    positions, amplitudes and widths trade off against each other."""
    if len(positions) < 2:
        return np.zeros((0, 2), int)
    k = min(MAX_NEIGHBOURS + 1, len(positions))
    distance, index = cKDTree(positions).query(positions, k=k, distance_upper_bound=radius)
    own = np.repeat(np.arange(len(positions)), k).reshape(-1, k)
    keep = np.isfinite(distance) & (index != own)
    pairs = np.sort(np.column_stack([own[keep], index[keep]]), axis=1)
    return np.unique(pairs, axis=0) if len(pairs) else np.zeros((0, 2), int)


class JointInformation(NamedTuple):
    """One pass of the likelihood-gain kernel over the atoms and their coupled neighbours: each
    atom's gain (N,) nats and Fisher block (N, P, P), the coupled ``pairs`` (M, 2) and their cross
    blocks ``cross`` (M, P, P) (None without pairs), the observed information, the Hessian of
    −log L at the fit and the data: ``observed`` (N, P, P) and ``observed_cross`` (M, P, P), and
    under Poisson noise the scores' spread pixel by pixel, ``spread`` (N, P, P) and
    ``spread_cross`` (M, P, P) (None under Gaussian noise)."""
    gain: np.ndarray
    fisher: np.ndarray
    pairs: np.ndarray
    cross: np.ndarray | None
    observed: np.ndarray
    observed_cross: np.ndarray | None
    spread: np.ndarray | None = None
    spread_cross: np.ndarray | None = None


def joint_information(kernel, positions, amplitudes, widths, coupling_radius: float) -> JointInformation:
    """`JointInformation` of the atoms (positions Å, amplitudes image units · Å², widths Å) against
    ``kernel`` (a `LikelihoodGain` holding the data and the fitted model), neighbours within
    ``coupling_radius`` Å coupled."""
    pairs = coupled_pairs(positions, coupling_radius)
    moments = kernel.evaluate(positions, amplitudes, widths, pairs=pairs, observed=True)
    return JointInformation(moments.gain, moments.fisher, pairs, moments.cross, moments.observed,
                            moments.observed_cross, moments.spread, moments.spread_cross)


def information_covariance(information: JointInformation) -> tuple[np.ndarray, int]:
    """(N, 3, 3) Å² each atom's position covariance: the inverse of the observed information of it
    and its coupled neighbours (`position_covariance`), and how many atoms took the Fisher
    information's instead, where the observed one is not positive definite there. Under Poisson
    noise (with the scores' spread S) the sandwich H⁻¹ S H⁻¹ over the same neighbourhood instead.

    The observed information rather than its expectation, the Fisher information: it is the
    curvature of the likelihood these data give, so it widens σ where the noise left the likelihood
    flatter than on average (Efron & Hinkley 1978). At low counts the estimates scatter that much
    wider (on `dev_asi_dose14`, 14 counts an atom per projection, 89 % of the atoms inside their 95 %
    ellipsoid against 81 % with the Fisher information, `scripts/uncertainty_check.py`); at many
    counts the two agree.

    The sandwich (Huber 1967, White 1982) because Poisson noise has no free variance: where the
    counts scatter about the model more than Poisson says (atoms the fit missed nearby, a profile
    the model lacks), the scores spread more than the information predicts and only S sees it. A
    Gaussian fit reads its noise variance off its residual already. With the model right, S and H
    have the same expectation and the sandwich is H⁻¹ to within noise."""
    spread = None if information.spread is None else (information.spread, information.spread_cross)
    covariance = position_covariance(information.observed, information.pairs, information.observed_cross, spread)
    with np.errstate(invalid="ignore"):
        proper = np.all(np.isfinite(covariance), axis=(1, 2))
        proper[proper] = np.linalg.eigvalsh(covariance[proper])[:, 0] > 0
    if not proper.all():
        expected = position_covariance(information.fisher, information.pairs, information.cross, spread)
        covariance[~proper] = expected[~proper]
    return covariance, int(np.sum(~proper))


def atom_columns(information: JointInformation, volume: float) -> tuple[dict, dict]:
    """The per-atom columns (`COLUMNS`) from the atoms' `JointInformation` (``volume`` Å³ their prior
    volume), and what report.json says of the information used (in the noise model's entry)."""
    gain, fisher = information.gain, information.fisher
    covariance, fallback = information_covariance(information)
    sigma = np.sqrt(np.diagonal(covariance, axis1=1, axis2=2))
    # The off-diagonal terms as correlations: an atom's 95 % ellipsoid is that of the whole 3×3
    # (eᵀ C⁻¹ e ≤ χ²₃), and covariances of (pm)² would not survive extxyz's 8 decimals of Å².
    with np.errstate(invalid="ignore"):
        correlation = {f"corr_{'xyz'[a]}{'xyz'[b]}": np.nan_to_num(covariance[:, a, b] / (sigma[:, a] * sigma[:, b]),
                                                                   nan=0.0, posinf=0.0, neginf=0.0)
                       for a, b in ((0, 1), (0, 2), (1, 2))}
    columns = {"sigma_x": sigma[:, 0], "sigma_y": sigma[:, 1], "sigma_z": sigma[:, 2], **correlation,
               "pos_uncertainty": np.sqrt(np.mean(sigma ** 2, axis=1)),
               "significance": gain - occam_penalty(fisher[:, :3, :3], volume, len(gain))}
    kind = "observed" if information.spread is None else "sandwich: observed information, scores' spread"
    return columns, {"kind": kind, "atoms_with_fisher_instead": fallback}


def misfit_shift(kernel, remainder: np.ndarray, positions, amplitudes, widths, information: JointInformation):
    """(N, 3) Å each position's first-order correction for the bias the atom profile's misfit m
    leaves (`engine.fit.profile_misfit`), given the ``remainder`` ψ(r − m) of the residual r once m is
    drawn (n, H, W, the kernel's units; ψ the loss's influence): the step of the positions towards the
    data with the misfit drawn, F⁻¹ Jᵀ W ψ(r − m) (≈ −F⁻¹ Jᵀ W m: Jᵀ W r ≈ 0 at the fit), over each
    atom and its coupled neighbours, amplitudes and widths held (the misfit drawn is what their
    profile lacks)."""
    score = misfit_score(kernel, remainder, positions, amplitudes, widths)[:, :3]
    cross = None if information.cross is None else information.cross[:, :3, :3]
    shift = neighbourhood_solve(information.fisher[:, :3, :3], information.pairs, cross, score)[1]
    # A first-order step holds while a Gaussian's gradient is about linear in the displacement: up to
    # half its width (the footprint's: atom, widest component and blur). A longer one (an ill-pinned
    # atom, a neighbourhood the misfit does not describe) is not taken.
    footprint = np.sqrt(np.asarray(widths, np.float64) ** 2 + kernel.widest_extra + kernel.projector.blur_sigma ** 2)
    shift[np.linalg.norm(shift, axis=1) > LINEAR_REACH * footprint] = 0.0
    return shift


def covariance_of(columns: dict) -> np.ndarray:
    """(N, 3, 3) Å² position covariance of each atom from its atoms.xyz columns (`COLUMNS`):
    C_ab = corr_ab σ_a σ_b."""
    sigma = np.column_stack([columns[f"sigma_{a}"] for a in "xyz"])
    correlation = np.repeat(np.eye(3)[None], len(sigma), axis=0)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        correlation[:, a, b] = correlation[:, b, a] = columns[f"corr_{'xyz'[a]}{'xyz'[b]}"]
    with np.errstate(invalid="ignore"):  # an atom the data do not pin (σ infinite) stays so
        return np.where(correlation == 0, 0.0, correlation * sigma[:, :, None] * sigma[:, None, :])


def summary(atoms, noise: dict | None = None) -> dict | None:
    """What report.json says about the uncertainties of ``atoms`` (`Atoms` with the `COLUMNS`):
    median σ per axis (pm), the least certain and the weakest atoms (index in atoms.xyz, position Å),
    and the ``noise`` model assumed, with the information used (`atom_columns`)."""
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
            "columns": "atoms.xyz: sigma_x, sigma_y, sigma_z (Å) and corr_xy, corr_xz, corr_yz (the correlations "
                       "of the position errors): covariance C_ab = corr_ab sigma_a sigma_b; the atom's 95 % "
                       "ellipsoid is e^T C^-1 e <= 7.815; C the inverse of the observed information (the Hessian "
                       "of -log L at the fit) of the atom and its nearest neighbours; for counts the sandwich "
                       "H^-1 S H^-1 with S the scores' spread over the pixels (noise.information.kind)",
            "left_out": "coupling with atoms beyond the 12 nearest neighbours (within 3 d_min) and with the shared and "
                        "alignment parameters; the bias of a misfitting atom profile, a bias rather than a variance, "
                        "which the profile correction (report.json profile_correction) removes to first order; "
                        "at a few counts per atom and projection, the estimate's scatter beyond its curvature (the "
                        "likelihood far from quadratic) and the pull of atoms the fit missed"}


def per_atom_fit_uncertainty(fit, state: dict) -> tuple[dict, dict, dict | None]:
    """The `COLUMNS` (in ``state``'s atom order) of a per-atom `Reconstruction` at ``state`` (its
    atoms: pos, amp, sigma), what noise was assumed, and, when the settings ask for it, the profile
    correction (`profile_correction`; classes: the species assigned, else one)."""
    problem, data = fit.problem, fit.data
    n = problem.n_tilts
    predicted = problem.predicted(np.arange(n)).astype(np.float64)
    measured = fit.normalised
    scale = np.ones(n) if fit.refiner is None else np.asarray(fit.refiner.alignment.intensity_scale, np.float64)
    poisson = fit.loss == "poisson"
    kernel = LikelihoodGain(problem.projector, "poisson" if poisson else "gaussian", fit.profile, free_shape=True)
    if poisson:
        counts = fit.gain * data.scale
        kernel.set_model(counts * predicted + fit.gain * data.background)
        kernel.set_counts(counts * measured + fit.gain * data.background)
        kernel.set_factor(counts * scale)
    else:
        kernel.set_model(predicted)
        kernel.set_counts(measured)
        kernel.set_factor(scale)
    residual = kernel.data - kernel.model
    influence = None
    if fit.loss == "huber":  # outliers pull as the fit's loss lets them: at most HUBER_DELTA σ
        bound = HUBER_DELTA * data.noise
        influence = partial(np.clip, a_min=-bound, a_max=bound)
    pulling = residual if influence is None else influence(residual)  # ψ(r): the residual as the loss sees it
    correction = None
    if fit.settings.profile_correction:
        labels = (fit._species(state["amp"] * data.scale, state["sigma"])[0] if fit.settings.species
                  else np.zeros(len(state["pos"]), int))
        weights = class_weights(np.unique(labels, return_inverse=True)[1], state["sigma"])
        correction = profile_correction(residual, problem.geometry, state["pos"], weights,
                                        footprint_radius_px(state["sigma"], fit.profile, data.blur, fit.series.pixel_size),
                                        fit.series.pixel_size, influence)
    if poisson:
        noise = {"kind": "poisson", "gain": fit.gain}
    else:
        pixels = residual[0].size
        free = problem.free_parameters() / n  # the atoms' parameters, shared among the projections
        # Correlated residual (model error, filtered data) carries less information than as many
        # independent pixels: the variance is scaled by the correlation area (1 for white noise).
        # The misfit stays in it: the profile correction is first order, and what its radial
        # profile leaves of the misfit biases the corrected positions as the whole did the fitted.
        # A robust (Huber) fit's estimates scatter as an M-estimator's: the variance of the residual's
        # influence ψ(r) over the squared share of pixels inside the bound, ψ' (Huber 1981): outliers
        # (hot pixels) widen the error bars only as far as they pull.
        inside = np.mean(pulling == residual, axis=(1, 2))  # ψ' (1 without a robust loss)
        _, area = residual_dispersion(pulling)
        variance = np.sum(pulling ** 2, axis=(1, 2)) / max(pixels - free, 1.0) / np.maximum(inside, 0.5) ** 2 * area
        kernel.set_noise_variance(variance)
        noise = {"kind": "gaussian", "from": "the fit's residual, per projection" + (
                     "; its Huber influence, an M-estimator's variance" if influence is not None else ""),
                 "sigma_data_units_median": float(np.sqrt(np.median(variance)) * data.scale),
                 "sigma_over_data_model": float(np.sqrt(np.median(variance)) / data.noise),
                 "correlation_area_px": area}
    if influence is not None:  # the gains and the observed curvature as the robust loss sees the residual
        kernel.set_counts(kernel.model + pulling)
    information = joint_information(kernel, state["pos"], state["amp"], state["sigma"], COUPLING_PER_D_MIN * fit.d_min)
    columns, noise["information"] = atom_columns(information, visible_volume(measured.shape[1:], fit.series.pixel_size))
    if correction is not None:
        finish_correction(correction, kernel, state["pos"], state["amp"], state["sigma"], information)
    return columns, noise, correction


def profile_correction(residual, geometry, positions, weights, radius_px: float, pixel_size: float,
                       influence=None) -> dict:
    """The atom profile's misfit m fitted to ``residual`` r (`fit_misfit`; to ψ(r) with the loss's
    ``influence`` ψ: outliers count as the loss lets them): ``{"profile": the `MisfitProfile`,
    "remainder": ψ(r − m), "seconds": the time taken}``; `finish_correction` adds the positions'
    shift."""
    t0 = time.perf_counter()
    influence = influence or (lambda r: r)
    profile, misfit = fit_misfit(influence(residual), geometry, positions, weights, radius_px, pixel_size)
    return {"profile": profile, "remainder": influence(residual - misfit), "seconds": time.perf_counter() - t0}


def finish_correction(correction: dict, kernel, positions, amplitudes, widths, information) -> np.ndarray:
    """Adds to a `profile_correction` the positions' "shift" (N, 3) Å (`misfit_shift`), its time
    included, and drops the remainder image; returns the shift."""
    t0 = time.perf_counter()
    correction["shift"] = misfit_shift(kernel, correction.pop("remainder"), positions, amplitudes, widths, information)
    correction["seconds"] += time.perf_counter() - t0
    return correction["shift"]


def correction_summary(correction: dict | None) -> dict | None:
    """What report.json says about a profile correction (`per_atom_fit_uncertainty`): the shifts'
    median, 95th percentile and largest (pm), and the share of the residual's power the fitted
    misfit explains."""
    if correction is None or correction.get("shift") is None:
        return None
    length = np.linalg.norm(correction["shift"], axis=1) * 100
    profile = correction["profile"]
    return {"seconds": correction["seconds"], "not_taken": int(np.sum(length == 0)),
            "shift_pm": {"median": float(np.median(length)), "p95": float(np.percentile(length, 95)),
                         "max": float(length.max())} if len(length) else None,
            "residual_power_explained": profile.explained,
            "knot_spacing_px": float(profile.knots[1] - profile.knots[0]),
            "profile": [[float(v) for v in row] for row in profile.values]}
