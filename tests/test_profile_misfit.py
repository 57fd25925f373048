"""The atom profile's misfit (engine.fit.profile_misfit): the FFT normal equations against a dense
float64 NumPy least squares, and the correction against the truth on a simulated particle whose
atoms (Peng's potentials) are not the fit's one Gaussian."""

import numpy as np
import pytest

from engine.evaluate.metrics import evaluate_atoms
from engine.fit.profile_misfit import MisfitProfile, class_weights
from engine.fit.reconstruct import Reconstruction
from engine.fit.settings import fit_settings
from engine.physics.simulate import parse_tilt_range, simulate_tilt_series
from engine.physics.structures import build_structure

SHAPE = (22, 26)


def profile_of(rng, weights, radius=3.2):
    """A profile on random centres (3 projections), some atoms closer than the profile's reach; every
    footprint inside the images (the normal equations sum over the zero-padded plane)."""
    centres = rng.uniform([5.0, 5.0], [19.0, 15.0], (3, len(weights), 2))
    centres[:, 1] = centres[:, 0] + [1.3, 0.6]  # overlapping footprints: a stacked mean would count them twice
    return MisfitProfile(centres, weights, SHAPE, radius)


def test_misfit_profile_is_the_least_squares_fit():
    """The knot values from the centres' and residual's correlations are the least-squares solution
    over the images, found here by rendering every knot's basis image and solving densely."""
    rng = np.random.default_rng(3)
    widths = np.array([0.3, 0.4, 0.35, 0.45, 0.42, 0.31, 0.38])
    profile = profile_of(rng, class_weights([0, 1, 0, 1, 1, 0, 0], widths))
    assert profile.n_classes == 4  # two species, each a profile and its change with the width
    residual = rng.normal(size=(3,) + SHAPE)
    fitted = profile.fit(residual).copy()
    columns = []
    for s in range(profile.n_classes):
        for b in range(len(profile.knots)):
            profile.values = np.zeros_like(fitted)
            profile.values[s, b] = 1.0
            columns.append(profile.render().ravel())
    design = np.column_stack(columns)
    expected = np.linalg.lstsq(design, residual.ravel(), rcond=None)[0]
    # Knots no pixel offset reaches have no column: both solutions give them 0 (minimum norm).
    np.testing.assert_allclose(fitted.ravel(), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    # A residual that is a rendered profile is explained completely, the overlaps apart.
    truth = rng.normal(size=fitted.shape)
    profile.values = truth
    drawn = profile.render()
    refit = profile.fit(drawn)
    profile.values = refit
    np.testing.assert_allclose(profile.render(), drawn, atol=1e-4 * np.abs(drawn).max())


@pytest.mark.slow
def test_profile_correction_removes_the_profile_bias(arch, tmp_path):
    """Au atoms simulated with Peng's potentials and fitted with one Gaussian each, at low noise so
    that the profile's bias dominates: the correction brings the RMSD down, and report.json says
    what it did."""
    if arch != "cpu":
        pytest.skip("the end-to-end fit is checked on the CPU (the kernels are tested on every backend)")
    truth = build_structure({"kind": "cuboctahedron", "element": "Au", "shells": 2, "euler": [20.0, 35.0, -50.0]})
    series = simulate_tilt_series(truth, parse_tilt_range("-70:70:5"), 0.3, (64, 64), blur_sigma=0.4,
                                  noise=0.002, seed=1)
    rmsd = {}
    for corrected in (False, True):
        fit = Reconstruction(series, fit_settings(species=["Au"], thermal_refits=0, profile_correction=corrected),
                             tmp_path / str(corrected), progress=False)
        atoms = fit.run()
        result = evaluate_atoms(atoms, truth, radius=1.0)
        assert result["f1"] == 1.0
        rmsd[corrected] = result["rmsd_pm"]
    assert rmsd[True] < 0.7 * rmsd[False], rmsd
    summary = fit.report_extra()["profile_correction"]
    assert 0 < summary["shift_pm"]["median"] < 10 and summary["residual_power_explained"] > 0
