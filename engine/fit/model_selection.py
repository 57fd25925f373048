"""Is a refined alignment worth it? Refinement gives every projection its own shifts, tilt-angle
offset and intensity scale, which can absorb anything that differs between images, misalignment or
not: on a measured window of an extended film the material tilting into view drops the residual of
each image as much as a real shift would, so no likelihood ratio on the data the parameters were
fitted to can tell the two apart. What real misalignment changes is the atoms: aligned images agree
on them, so atoms fitted in the right geometry predict images they have not seen better.

The test holds out every other projection in tilt order (H), then the others (two folds, so every
image is held out once and a short series still gives as many replicates as it has images) and, for
each geometry (the refined one and the nominal one, whose fit is the refined fit's atoms refitted in
it), refits the atoms on the other projections alone, then fits each held-out image's own alignment (two shifts, a tilt-angle
offset, an intensity scale, and one tilt-axis angle for them all) to those atoms, which stay fixed:
both geometries get the same freedom on H, so what is compared is how well their atoms predict
unseen images. The per-image log-likelihood differences over H are tested by a one-sided paired t
test (images as replicates: model error and pixel correlation stay inside each difference); the
refined alignment is kept only when it predicts better with a false-alarm rate of 10⁻³
(ALIGNMENT_SIGNIFICANCE), else the nominal geometry and its fit stand.
"""

from __future__ import annotations

import numpy as np

from engine.fit.alignment import AlignmentRefiner
from engine.fit.convergence import CHECK_EVERY, Convergence
from engine.fit.problem import FitProblem, with_moments
from engine.fit.trainer import LEARNING_RATES, choose_batch
from engine.measure.alignment import Alignment

ALIGNMENT_SIGNIFICANCE = 1e-3
FOLDS = 2  # every other projection in tilt order held out in turn: each image is held out once
ATOM_RATES = ("lr_position", "lr_amplitude", "lr_width")


def _atoms(problem: FitProblem) -> dict:
    return {k: v for k, v in problem.state().items() if k in ("pos", "amp", "sigma")}


def refit(fit, indices, geometry, atoms: dict, cap: int, refiner: AlignmentRefiner | None = None) -> FitProblem:
    """``atoms`` refitted to ``fit``'s projections ``indices`` in ``geometry`` (of those projections)
    until converged (`engine.fit.convergence`), at most ``cap`` steps, without density control. With a
    ``refiner`` only the alignment moves and the atoms stay as given."""
    s, series = fit.settings, fit.series
    problem = FitProblem(fit.normalised[indices], geometry, series.pixel_size, fit.data, fit.loss, fit.gain,
                         fit.profile, fit.d_min, s.repulsion, refiner)
    problem.upload(with_moments(atoms))
    rng = np.random.default_rng(s.seed)
    convergence = Convergence(s.lr_final)
    batch = None if s.batch is None else min(s.batch, len(indices))
    for step in range(1, cap + 1):
        lr = convergence.learning_rates(s, LEARNING_RATES)
        if refiner is not None:
            lr.update({name: 0.0 for name in ATOM_RATES})
        problem.step(lr, choose_batch(rng, problem.n_tilts, batch), align=refiner is not None,
                     fit_offsets=fit.loss != "poisson", fix_gauge=False)
        if step % CHECK_EVERY == 0 and convergence.settled(problem.series_loss(), problem.model.largest_step()):
            if not convergence.step_down():
                break
    return problem


def held_out_losses(fit, geometry, atoms: dict, held: np.ndarray, cap: int) -> np.ndarray:
    """Per projection of ``held``, the negative log-likelihood (nats) of atoms refitted without those
    projections in ``geometry`` (all n projections), each held-out image aligned to them."""
    kept = np.setdiff1d(np.arange(fit.series.n_tilts), held)
    trained = refit(fit, kept, geometry.subset(kept), atoms, cap)
    angles = np.asarray(fit.series.angles, np.float64)[held]
    refiner = AlignmentRefiner(Alignment.identity(len(held)), angles)
    aligned = refit(fit, held, refiner.geometry(), _atoms(trained), cap, refiner)
    return aligned.projection_losses()


def select_alignment(fit) -> tuple[dict, FitProblem | None]:
    """Whether ``fit`` (a finished `Reconstruction` with an alignment refiner) keeps its refined
    alignment. Returns the test's record for report.json and, when the refined alignment is not kept,
    the fit of its atoms in the nominal geometry to take instead (else None)."""
    from scipy import stats

    series = fit.series
    cap = max(fit.settings.iters // 4, CHECK_EVERY)
    nominal_geometry = series.get_geometry()
    every = np.arange(series.n_tilts)
    nominal = refit(fit, every, nominal_geometry, _atoms(fit.problem), cap)
    order = np.argsort(series.angles, kind="stable")
    gain = []  # nats per held-out image: > 0 where the refined atoms predict better
    for fold in range(FOLDS):
        held = np.sort(order[fold::FOLDS])
        gain.append(held_out_losses(fit, nominal_geometry, _atoms(nominal), held, cap)
                    - held_out_losses(fit, fit.problem.geometry, _atoms(fit.problem), held, cap))
    gain = np.concatenate(gain)
    m = len(gain)
    spread = float(np.std(gain, ddof=1)) if m > 1 else 0.0
    t = float(np.mean(gain) / (spread / np.sqrt(m))) if spread > 0 else (np.inf if np.mean(gain) > 0 else -np.inf)
    p_value = float(stats.t.sf(t, m - 1)) if m > 1 else 1.0
    kept = p_value < ALIGNMENT_SIGNIFICANCE
    record = {"kept": kept, "held_out_projections": m, "mean_gain_nats": float(np.mean(gain)),
              "t": t, "p_value": p_value, "significance": ALIGNMENT_SIGNIFICANCE, "refit_cap": cap,
              "verdict": ("atoms fitted in the refined geometry predict held-out projections significantly better: "
                          "the refined alignment is kept" if kept else
                          "atoms fitted in the refined geometry do not predict held-out projections significantly "
                          "better: the nominal geometry and its fit are kept")}
    return record, None if kept else nominal
