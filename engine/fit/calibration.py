"""B-factor calibration with a fitter of its own: the fitted structure (positions, elements) is
simulated without noise at B = 0 and 1 Å² in the data's geometry and refitted from the fitted atoms,
without count changes, for ``thermal_refits`` steps; how each atom's width answers to B then gives
its B (`engine.physics.chemistry.b_factors_from_calibration`). The live fit is never touched."""

from __future__ import annotations

import numpy as np

from engine.fit.problem import FitProblem
from engine.fit.trainer import choose_batch, learning_rates
from engine.io.atoms import Atoms
from engine.physics.chemistry import b_factors_from_calibration
from engine.physics.simulate import simulate_tilt_series


def calibrate_b_factors(state: dict, species: np.ndarray, series, geometry, data, loss: str, gain, profile,
                        d_min: float, settings) -> np.ndarray:
    """B (Å²) of every atom of ``state`` (pos Å, amp and sigma as fitted, in the fit's order) with
    elements ``species``, fitted to ``series`` in ``geometry`` under the data model ``data``."""
    structure = Atoms(species, state["pos"])
    steps = settings.thermal_refits
    rng = np.random.default_rng(settings.seed)
    widths_at, problem = {}, None
    for b in (0.0, 1.0):
        clean = simulate_tilt_series(structure, series.angles, series.pixel_size, series.shape, blur_sigma=data.blur,
                                     b_factor=b, geometry=geometry)
        normalised = (clean.projections - data.background) / data.scale
        if problem is None:
            problem = FitProblem(normalised, geometry, series.pixel_size, data, loss, gain, profile, d_min,
                                 settings.repulsion)
        else:
            problem.target.set_measured(normalised)
        problem.upload({k: state[k] for k in ("pos", "amp", "sigma")}, sort=False)
        for i in range(steps):
            problem.step(learning_rates(settings, i, steps), choose_batch(rng, series.n_tilts, settings.batch),
                         align=False, fit_offsets=False, fix_gauge=False)
        widths_at[b] = problem.state()["sigma"]
    return b_factors_from_calibration(state["sigma"], widths_at)
