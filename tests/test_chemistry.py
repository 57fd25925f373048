"""Element assignment from fitted amplitudes."""

import numpy as np
import pytest

from engine.chemistry import assign_species
from engine.elements import integrated_projected_potential
from engine.errors import InputError


def test_two_species_with_an_unknown_scale_are_separated_and_ordered_by_z():
    rng = np.random.default_rng(0)
    truth = np.array(["Pt"] * 120 + ["Ni"] * 80)
    scale = 0.37  # the data's own units: unknown to the model
    amplitude = scale * np.array([integrated_projected_potential(s) for s in truth]) * rng.normal(1, 0.04, 200)
    labels, probability, model = assign_species(amplitude, ["Ni", "Pt"])
    assert np.mean(labels == truth) == 1.0
    assert model["scale"] == pytest.approx(scale, rel=0.02)
    assert model["weights"] == pytest.approx([0.4, 0.6], abs=0.02)  # in the order given: Ni, Pt
    assert probability.min() > 0.9


def test_composition_fixes_the_weights_and_single_species_is_trivial():
    amplitude = np.array([integrated_projected_potential("Fe")] * 5 + [integrated_projected_potential("Pt")] * 5)
    labels, _, model = assign_species(amplitude * 2.0, ["Fe", "Pt"], composition={"Fe": 0.5, "Pt": 0.5})
    assert list(labels) == ["Fe"] * 5 + ["Pt"] * 5 and model["weights"] == [0.5, 0.5]
    labels, probability, _ = assign_species(amplitude, ["Au"])
    assert set(labels) == {"Au"} and np.all(probability == 1)
    with pytest.raises(InputError, match="composition"):
        assign_species(amplitude, ["Fe", "Pt"], composition={"Fe": 1.0})
    with pytest.raises(InputError, match="Xx"):
        assign_species(amplitude, ["Fe", "Xx"])


def test_species_from_the_abtem_wedge_fit(shared_data, arch, tmp_path):
    """The fitted amplitudes of dev_ptni_wedge (abTEM, Lobato potentials) carry the chemistry: the
    physically placed mixture recovers the species of ≥ 97 % of the atoms."""
    if arch != "cpu":
        pytest.skip("checked on the CPU")
    from engine.atoms import read_atoms
    from engine.metrics import evaluate_atoms
    from engine.reconstruct import ReconstructionConfig, Reconstructor
    from engine.tiltseries import read_tilt_series

    series = read_tilt_series(shared_data / "dev_ptni_wedge.npz")
    atoms = Reconstructor(series, ReconstructionConfig(species=["Pt", "Ni"], iters=400), tmp_path,
                          progress=False).run()
    result = evaluate_atoms(atoms, read_atoms(shared_data / "dev_ptni_wedge_truth.xyz"))
    assert result["f1"] == 1.0
    assert result["species_accuracy"] >= 0.97


def test_b_factor_line_through_two_calibration_points():
    from engine.chemistry import b_factors_from_calibration

    s0, s1 = np.array([0.30, 0.40]), np.array([0.32, 0.42])
    widths = np.sqrt(s0**2 + 0.25 * (s1**2 - s0**2))  # a quarter of the way from B = 0 to B = 2
    assert b_factors_from_calibration(widths, {0.0: s0, 2.0: s1}) == pytest.approx([0.5, 0.5])
    assert b_factors_from_calibration(s0, {2.0: s1, 0.0: s0}) == pytest.approx([0.0, 0.0])


def test_ordered_fept_particle_species_and_b_factor(arch, tmp_path):
    """An L1_0 FePt particle simulated with B = 0.5 Å² and 3 % noise: species and B come back."""
    if arch != "cpu":
        pytest.skip("checked on the CPU")
    from engine.metrics import evaluate_atoms
    from engine.reconstruct import ReconstructionConfig, Reconstructor
    from engine.simulate import parse_tilt_range, simulate_tilt_series
    from engine.structures import build_structure

    truth = build_structure({"kind": "octahedron", "species": {"Fe": 0.5, "Pt": 0.5}, "ordering": "l10",
                             "length": 7, "cutoff": 2, "a": 3.85, "euler": [30.0, 50.0, -20.0]})
    series = simulate_tilt_series(truth, parse_tilt_range("-70:70:4"), 0.3, (80, 80), blur_sigma=0.4,
                                  b_factor=0.5, noise=0.03, seed=2)
    atoms = Reconstructor(series, ReconstructionConfig(species=["Fe", "Pt"], iters=600), tmp_path,
                          progress=False).run()
    result = evaluate_atoms(atoms, truth)
    assert result["f1"] == 1.0 and result["species_accuracy"] >= 0.97
    assert np.median(atoms.columns["b_factor"]) == pytest.approx(0.5, rel=0.2)
