"""Element assignment from fitted amplitudes."""

import numpy as np
import pytest

from engine.physics.chemistry import assign_species, isolated_atom_fit
from engine.core.elements import integrated_projected_potential
from engine.core.errors import InputError

PIXEL, BLUR = 0.3, 0.4


def fitted_atoms(truth, scale=1.0, width_offset=0.0, noise=0.0, seed=0):
    """Amplitudes and widths as a fit would return them for isolated atoms of the given elements."""
    rng = np.random.default_rng(seed)
    fits = {s: isolated_atom_fit(s, PIXEL, BLUR) for s in set(truth)}
    amplitude = np.array([scale * fits[s][0] for s in truth]) * rng.normal(1, noise, len(truth))
    width = np.sqrt(np.array([fits[s][1] ** 2 for s in truth]) + width_offset) * rng.normal(1, noise / 2, len(truth))
    return amplitude, width


def test_isolated_atom_fit_keeps_most_of_the_potential():
    amplitude, width = isolated_atom_fit("Pt", PIXEL, BLUR)
    assert 0.85 < amplitude / integrated_projected_potential("Pt") < 1.0  # tails beyond one Gaussian
    assert 0.25 < width < 0.4
    assert isolated_atom_fit("Fe", PIXEL, BLUR)[1] > width  # Fe's potential is less compact


def test_two_species_with_unknown_scale_and_smearing_are_separated():
    truth = np.array(["Pt"] * 120 + ["Ni"] * 80)
    amplitude, width = fitted_atoms(truth, scale=0.37, width_offset=0.006, noise=0.04)  # data units unknown
    labels, probability, model = assign_species(amplitude, width, ["Ni", "Pt"], PIXEL, BLUR)
    assert np.mean(labels == truth) == 1.0
    assert model["scale"] == pytest.approx(0.37, rel=0.03)
    assert model["width_offset_A2"] == pytest.approx(0.006, abs=0.003)
    assert model["weights"] == pytest.approx([0.4, 0.6], abs=0.02)  # in the order given: Ni, Pt
    assert probability.min() > 0.9


def test_width_separates_elements_of_equal_amplitude():
    # Pd and Fe differ by 14 % in amplitude but Pd's potential is far more compact.
    truth = np.array(["Pd"] * 50 + ["Fe"] * 50)
    amplitude, width = fitted_atoms(truth, noise=0.05, seed=3)
    labels, _, _ = assign_species(amplitude, width, ["Fe", "Pd"], PIXEL, BLUR)
    assert np.mean(labels == truth) >= 0.97


def test_composition_fixes_the_weights_and_single_species_is_trivial():
    truth = np.array(["Fe"] * 5 + ["Pt"] * 5)
    amplitude, width = fitted_atoms(truth, scale=2.0)
    labels, _, model = assign_species(amplitude, width, ["Fe", "Pt"], PIXEL, BLUR, composition={"Fe": 0.5, "Pt": 0.5})
    assert list(labels) == list(truth) and model["weights"] == [0.5, 0.5]
    labels, probability, _ = assign_species(amplitude, width, ["Au"], PIXEL, BLUR)
    assert set(labels) == {"Au"} and np.all(probability == 1)
    with pytest.raises(InputError, match="composition"):
        assign_species(amplitude, width, ["Fe", "Pt"], PIXEL, BLUR, composition={"Fe": 1.0})
    with pytest.raises(InputError, match="Xx"):
        assign_species(amplitude, width, ["Fe", "Xx"], PIXEL, BLUR)


@pytest.mark.slow
def test_species_from_the_abtem_wedge_fit(shared_data, arch, tmp_path):
    """The fitted amplitudes of dev_ptni_wedge (abTEM, Lobato potentials) carry the chemistry: the
    physically placed mixture recovers the species of ≥ 97 % of the atoms."""
    if arch != "cpu":
        pytest.skip("checked on the CPU")
    from engine.io.atoms import read_atoms
    from engine.evaluate.metrics import evaluate_atoms
    from engine.fit.reconstruct import Reconstruction
    from engine.fit.settings import fit_settings
    from engine.io.tiltseries import read_tilt_series

    series = read_tilt_series(shared_data / "dev_ptni_wedge.npz")
    atoms = Reconstruction(series, fit_settings(species=["Pt", "Ni"], iters=400), tmp_path,
                           progress=False).run()
    result = evaluate_atoms(atoms, read_atoms(shared_data / "dev_ptni_wedge_truth.xyz"))
    assert result["f1"] == 1.0
    assert result["species_accuracy"] >= 0.97


def test_b_factor_line_through_two_calibration_points():
    from engine.physics.chemistry import b_factors_from_calibration

    s0, s1 = np.array([0.30, 0.40]), np.array([0.32, 0.42])
    widths = np.sqrt(s0**2 + 0.25 * (s1**2 - s0**2))  # a quarter of the way from B = 0 to B = 2
    assert b_factors_from_calibration(widths, {0.0: s0, 2.0: s1}) == pytest.approx([0.5, 0.5])
    assert b_factors_from_calibration(s0, {2.0: s1, 0.0: s0}) == pytest.approx([0.0, 0.0])


@pytest.mark.slow
def test_ordered_fept_particle_species_and_b_factor(arch, tmp_path):
    """An L1_0 FePt particle simulated with B = 0.5 Å² and 3 % noise: species and B come back."""
    if arch != "cpu":
        pytest.skip("checked on the CPU")
    from engine.evaluate.metrics import evaluate_atoms
    from engine.fit.reconstruct import Reconstruction
    from engine.fit.settings import fit_settings
    from engine.physics.simulate import parse_tilt_range, simulate_tilt_series
    from engine.physics.structures import build_structure

    truth = build_structure({"kind": "octahedron", "species": {"Fe": 0.5, "Pt": 0.5}, "ordering": "l10",
                             "length": 7, "cutoff": 2, "a": 3.85, "euler": [30.0, 50.0, -20.0]})
    series = simulate_tilt_series(truth, parse_tilt_range("-70:70:4"), 0.3, (80, 80), blur_sigma=0.4,
                                  b_factor=0.5, noise=0.03, seed=2)
    atoms = Reconstruction(series, fit_settings(species=["Fe", "Pt"], iters=600), tmp_path,
                           progress=False).run()
    result = evaluate_atoms(atoms, truth)
    assert result["f1"] == 1.0 and result["species_accuracy"] >= 0.97
    assert np.median(atoms.columns["b_factor"]) == pytest.approx(0.5, rel=0.2)
