"""B-factor calibration with a fitter of its own: the fitted structure (positions, elements) is
simulated without noise at B = 0 and 1 Å² in the data's geometry and refitted from the fitted atoms,
without count changes, until converged (at most ``thermal_refits`` steps); how each atom's width answers to B then gives
its B (`engine.physics.chemistry.b_factors_from_calibration`). The live fit is never touched."""

from __future__ import annotations

import numpy as np

from engine.fit.convergence import CHECK_EVERY, Convergence
from engine.fit.trainer import LEARNING_RATES, choose_batch
from engine.io.atoms import Atoms
from engine.physics.chemistry import b_factors_from_calibration
from engine.physics.simulate import simulate_tilt_series


def calibrate_b_factors(problem, state: dict, species: np.ndarray, series, measured: np.ndarray, data,
                        settings) -> np.ndarray:
    """B (Å²) of every atom of ``state`` (pos Å, amp and sigma as fitted, in the fit's order) with
    elements ``species``, fitted to ``series`` in the geometry of the fit's `FitProblem` ``problem``
    under the data model ``data``. The refits borrow ``problem`` (its kernels are compiled already; a
    new one would compile them again) and hand it back as it was: its atoms, optimiser state,
    measured images (``measured``, normalised), intensities and fitted background."""
    structure = Atoms(species, state["pos"])
    steps = settings.thermal_refits
    rng = np.random.default_rng(settings.seed)
    live = problem.state()
    live_scale, live_offsets = problem.target.intensity_scale.to_numpy(), problem.target.offsets()
    widths_at = {}
    try:
        problem.target.set_intensity(np.ones(problem.n_tilts), np.zeros(problem.n_tilts))
        for b in (0.0, 1.0):
            clean = simulate_tilt_series(structure, series.angles, series.pixel_size, series.shape,
                                         blur_sigma=data.blur, b_factor=b, geometry=problem.geometry)
            problem.target.set_measured(clean.projections / data.scale)  # atoms alone: no background
            problem.upload({k: state[k] for k in ("pos", "amp", "sigma")}, sort=False)
            convergence = Convergence(settings.lr_final)
            for i in range(1, steps + 1):  # until converged (`engine.fit.convergence`), at most ``steps``
                problem.step(convergence.learning_rates(settings, LEARNING_RATES),
                             choose_batch(rng, series.n_tilts, settings.batch), align=False, fit_offsets=False,
                             fix_gauge=False)
                if (i % CHECK_EVERY == 0 and convergence.settled(problem.series_loss(), problem.model.largest_step())
                        and not convergence.step_down()):
                    break
            widths_at[b] = problem.state()["sigma"]
    finally:
        problem.upload(live, sort=False)
        problem.target.set_measured(measured)
        problem.target.set_intensity(live_scale, live_offsets)  # the fit's intensities and fitted background
    return b_factors_from_calibration(state["sigma"], widths_at)
