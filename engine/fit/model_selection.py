"""Is a refined alignment worth its parameters? After a fit with alignment refinement, the same atoms
are refitted in the nominal geometry for a quarter of the run, and the two fits' likelihoods are
compared: refinement adds 4 parameters per projection (two shifts, a tilt-angle offset, an
intensity scale) and the tilt-axis angle, less the 4 gauge directions (a 3D translation and a
common tilt offset) that move atoms instead of images. Under an aligned series twice the
log-likelihood gain of so many extra parameters is χ² with that many degrees of freedom; the
refined alignment is kept only when the gain would arise by chance less than once in 1000
(ALIGNMENT_SIGNIFICANCE), else the nominal geometry and its fit stand.

Counted data use the Poisson deviance as it is. For Gaussian data, whose residual also holds model
error and, in filtered (e.g. denoised) measurements, correlation between pixels, the least-squares
gain is measured in units of the residual's variance times its correlation area
(`engine.fit.seeding.residual_dispersion`): a quasi-likelihood ratio.
"""

from __future__ import annotations

import numpy as np

from engine.fit.problem import FitProblem, with_moments
from engine.fit.seeding import residual_dispersion
from engine.fit.trainer import choose_batch, learning_rates

ALIGNMENT_SIGNIFICANCE = 1e-3
GAUGE_DIRECTIONS = 4


def nominal_refit(fit, steps: int) -> FitProblem:
    """The refined fit's atoms refitted for ``steps`` Adam steps in the series' nominal geometry (no
    density control: the comparison is of geometries, with the same atoms)."""
    s, series = fit.settings, fit.series
    problem = FitProblem(fit.normalised, series.get_geometry(), series.pixel_size, fit.data, fit.loss, fit.gain,
                         fit.profile, fit.d_min, s.repulsion)
    problem.upload(with_moments({k: v for k, v in fit.problem.state().items() if k in ("pos", "amp", "sigma")}))
    rng = np.random.default_rng(s.seed)
    for i in range(steps):
        problem.step(learning_rates(s, i, steps), choose_batch(rng, problem.n_tilts, s.batch), align=False,
                     fit_offsets=fit.loss != "poisson", fix_gauge=False)
    return problem


def select_alignment(fit) -> tuple[dict, FitProblem | None]:
    """Compare ``fit`` (a finished `Reconstruction` with an alignment refiner) with its atoms refitted
    in the nominal geometry. Returns the test's record for report.json and, when the refined
    alignment is not significant, the nominal problem to take instead (else None)."""
    from scipy import stats

    n = fit.series.n_tilts
    steps = max(fit.settings.iters // 4, 1)
    nominal = nominal_refit(fit, steps)
    pixels = fit.normalised.size
    loss_refined, loss_nominal = fit.problem.full_loss(), nominal.full_loss()
    gain = (loss_nominal - loss_refined) * pixels  # log-likelihood gain of the refined alignment
    if fit.loss == "poisson":
        statistic, dispersion, area = 2 * gain, None, None
    else:
        residual = fit.normalised - fit.problem.predicted(np.arange(n))
        dispersion, area = residual_dispersion(residual)
        # 2 × gain × σ² is the drop in the sum of squared residuals (normalised units).
        statistic = 2 * gain * fit.data.noise ** 2 / (dispersion * area)
    dof = 4 * n + 1 - GAUGE_DIRECTIONS
    p_value = float(stats.chi2.sf(statistic, dof))
    kept = p_value < ALIGNMENT_SIGNIFICANCE
    record = {"kept": kept, "statistic": float(statistic), "dof": dof, "p_value": p_value,
              "significance": ALIGNMENT_SIGNIFICANCE, "nominal_refit_steps": steps,
              "loss_refined": loss_refined, "loss_nominal": loss_nominal,
              "residual_variance": dispersion, "correlation_area_px": area,
              "verdict": ("the refined alignment explains the data better than its parameters can by chance: kept"
                          if kept else "the refined alignment does not fit significantly better than the nominal "
                                       "geometry: the nominal geometry and its fit are kept")}
    return record, None if kept else nominal
