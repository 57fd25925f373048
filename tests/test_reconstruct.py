"""Reconstruction end to end on particles simulated by our own simulator, scored against the truth;
checkpoint and resume; bad settings."""

import os
import signal

import numpy as np
import pytest

from engine.core.errors import InputError
from engine.core.settings import SettingError
from engine.evaluate.metrics import evaluate_atoms
from engine.fit.outputs import write_outputs
from engine.fit.reconstruct import Reconstruction
from engine.fit.settings import fit_settings
from engine.fit.uncertainty import covariance_of
from engine.io.atoms import read_atoms
from engine.physics.chemistry import minimum_distance
from engine.physics.simulate import parse_tilt_range, simulate_tilt_series
from engine.physics.structures import build_structure


@pytest.fixture(scope="module")
def small_particle():
    atoms = build_structure({"kind": "cuboctahedron", "element": "Au", "shells": 2, "euler": [20.0, 35.0, -50.0]})
    return atoms


def simulate(atoms, tilts="-70:70:5", noise=0.02, seed=1):
    return simulate_tilt_series(atoms, parse_tilt_range(tilts), 0.3, (64, 64), blur_sigma=0.4, noise=noise, seed=seed)


@pytest.mark.slow
def test_small_particle_is_recovered_exactly(arch, small_particle, tmp_path):
    if arch != "cpu":
        pytest.skip("the end-to-end fit is checked on the CPU (the kernels are tested on every backend)")
    series = simulate(small_particle)
    rec = Reconstruction(series, fit_settings(), tmp_path, progress=False)
    atoms = rec.run()
    result = evaluate_atoms(atoms, small_particle, radius=1.0, radii_extra=(0.5,))
    assert result["f1_at"]["0.5"] == 1.0
    assert result["rmsd_pm"] < 5.0
    report = write_outputs(rec, atoms, arch, 0.0)
    for name in ("atoms.xyz", "report.json", "projections.png", "loss.png", "checkpoint.npz"):
        assert (tmp_path / name).exists(), name
    assert report["n_atoms"] == len(small_particle)
    # Error bars: finite, and the size of the errors actually made (our simulator's Peng atoms are
    # not the fit's one Gaussian, so not exactly).
    sigma = np.column_stack([atoms.columns[f"sigma_{a}"] for a in "xyz"])
    assert np.all(np.isfinite(sigma)) and np.all(sigma > 0) and np.all(atoms.columns["significance"] > 0)
    assert 0.5 < result["rmsd_pm"] / (100 * np.sqrt(np.mean(np.sum(sigma ** 2, axis=1)))) < 2.0
    # The whole 3 × 3 per atom reaches atoms.xyz (σ and correlations): positive definite, as fitted.
    written = read_atoms(tmp_path / "atoms.xyz").columns
    covariance = covariance_of(written)
    assert np.all(np.linalg.eigvalsh(covariance) > 0)
    np.testing.assert_allclose(covariance, covariance_of(atoms.columns), rtol=1e-4, atol=1e-6 * covariance.max())
    assert report["uncertainty"]["median_sigma_pm"]["z"] > 0


@pytest.mark.slow
def test_huber_loss_shrugs_off_hot_pixels(arch, small_particle, tmp_path):
    # 0.3 % of the pixels are hot (5× the brightest atom). Least squares bends atoms towards them and
    # back-projected hot pixels spawn stray atoms; the Huber loss caps their pull and the volumes that
    # seed and spawn atoms skip isolated hot pixels.
    if arch != "cpu":
        pytest.skip("checked on the CPU")
    series = simulate(small_particle)
    rng = np.random.default_rng(7)
    hot = rng.random(series.projections.shape) < 0.003
    series.projections[hot] += 5 * series.projections.max()
    result = {}
    for robust in (False, True):
        atoms = Reconstruction(series, fit_settings(robust=robust, iters=400, thermal_refits=0),
                               tmp_path / str(robust), progress=False).run()
        result[robust] = evaluate_atoms(atoms, small_particle, radius=1.0)
    assert result[True]["f1"] >= 0.95 and result[False]["f1"] < 0.9  # measured 1.000 and 0.812
    assert result[True]["rmsd_pm"] < 0.3 * result[False]["rmsd_pm"]  # measured 1.3 and 10.5 pm


@pytest.mark.slow
def test_huber_error_bars_are_those_of_the_clean_data(arch, small_particle, tmp_path):
    # A robust fit's σ scatter as an M-estimator's (the Huber influence's variance): hot pixels
    # barely widen them. From the raw residual's variance they came out about 12× wider.
    if arch != "cpu":
        pytest.skip("checked on the CPU")
    sigma = {}
    for hot_share in (0.0, 0.003):
        series = simulate(small_particle)
        hot = np.random.default_rng(7).random(series.projections.shape) < hot_share
        series.projections[hot] += 5 * series.projections.max()
        atoms = Reconstruction(series, fit_settings(robust=True, iters=400, thermal_refits=0),
                               tmp_path / str(hot_share), progress=False).run()
        sigma[hot_share] = np.median(atoms.columns["pos_uncertainty"])
    assert 0.8 < sigma[0.003] / sigma[0.0] < 1.25


@pytest.mark.slow
def test_missing_and_extra_atoms_are_fixed_by_density_control(arch, small_particle, tmp_path):
    if arch != "cpu":
        pytest.skip("checked on the CPU")
    series = simulate(small_particle)
    rec = Reconstruction(series, fit_settings(iters=600), tmp_path, progress=False)
    seeds = rec.seeds()
    # Remove five seeds and duplicate three others 0.4 Å away: spawn and merge must repair both.
    rng = np.random.default_rng(0)
    drop = rng.choice(len(seeds["pos"]), 5, replace=False)
    keep = np.setdiff1d(np.arange(len(seeds["pos"])), drop)
    dup = keep[:3]
    pos = np.concatenate([seeds["pos"][keep], seeds["pos"][dup] + [0.4, 0.0, 0.0]])
    n = len(pos)
    rec.start_from({"pos": pos, "amp": np.full(n, seeds["amp"][0]), "sigma": np.full(n, 0.35)})
    result = evaluate_atoms(rec.run(), small_particle, radius=0.5)
    assert result["f1"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("refine_alignment", [False, True])
def test_resume_after_interrupt_matches_uninterrupted_run(arch, small_particle, tmp_path, refine_alignment):
    if arch != "cpu":
        pytest.skip("determinism is promised on the CPU")
    series = simulate(small_particle)
    settings = fit_settings(iters=250, densify_every=50, checkpoint_every=100, batch=8, seed=3,
                            refine_alignment=refine_alignment)
    straight_fit = Reconstruction(series, settings, tmp_path / "a", progress=False)
    straight = straight_fit.run()

    # Interrupt about half way, between two convergence checks (every 10 steps).
    cut = 10 * (straight_fit.iteration // 20) + 6
    interrupted = Reconstruction(series, settings, tmp_path / "b", progress=False)
    step = interrupted.problem.step

    def step_then_interrupt(*args, **kwargs):
        step(*args, **kwargs)
        if interrupted.iteration == cut:  # the trainer counts this step once it returns
            os.kill(os.getpid(), signal.SIGINT)

    interrupted.problem.step = step_then_interrupt
    with pytest.raises(KeyboardInterrupt):
        interrupted.run()
    if not refine_alignment:  # the checkpoint belongs to these data and settings only
        other_data = simulate(small_particle, seed=2)
        with pytest.raises(InputError, match="other data"):
            Reconstruction(other_data, settings, tmp_path / "b", progress=False).resume(tmp_path / "b" / "checkpoint.npz")
        other_settings = fit_settings(iters=250, densify_every=50, checkpoint_every=100, batch=8, seed=4)
        with pytest.raises(InputError, match="seed 3 there, 4 here"):
            Reconstruction(series, other_settings, tmp_path / "b", progress=False).resume(tmp_path / "b" / "checkpoint.npz")
    resumed = Reconstruction(series, settings, tmp_path / "b", progress=False)
    resumed.resume(tmp_path / "b" / "checkpoint.npz")
    assert resumed.iteration == cut + 1
    atoms = resumed.run()
    assert resumed.iteration == straight_fit.iteration
    assert resumed.trainer.stop_reason == straight_fit.trainer.stop_reason
    assert np.array_equal(atoms.positions, straight.positions)
    assert np.array_equal(atoms.columns["amplitude"], straight.columns["amplitude"])
    if refine_alignment:  # the refined alignment (kept or not: the trainer's problem holds it) and the verdict
        assert np.array_equal(resumed.trainer.problem.refiner.alignment.shifts,
                              straight_fit.trainer.problem.refiner.alignment.shifts)
        assert resumed.alignment_selection == straight_fit.alignment_selection


def test_bad_settings_are_refused_by_name():
    with pytest.raises(SettingError, match="unknown setting") as err:
        fit_settings({"iterations": 5})
    assert err.value.setting == "iterations"
    with pytest.raises(SettingError, match="Qq"):
        fit_settings({"species": ["Qq"]})
    with pytest.raises(SettingError, match="gaussian, poisson") as err:
        fit_settings({"noise": "laplace"})
    assert err.value.setting == "noise"
    for values in ({"batch": -3}, {"iters": 0}, {"seed": -1}, {"voxel": 0.0}, {"lr_final": 2.0},
                   {"blur": float("nan")}, {"iters": 2.5}, {"species": "Au"}):
        with pytest.raises(SettingError) as err:
            fit_settings(values)
        assert err.value.setting == next(iter(values))
    with pytest.raises(SettingError, match="Huber"):
        fit_settings(noise="poisson", robust=True)
    with pytest.raises(SettingError, match="species"):
        fit_settings(profile="peng")


def test_minimum_distance_follows_species():
    assert minimum_distance(["Au"]) == pytest.approx(0.7 * 4.08 / np.sqrt(2), rel=1e-3)
    assert minimum_distance(["Au"], 1.2) == 1.2
    assert fit_settings().d_min is None


def test_composition_must_match_species():
    settings = fit_settings({"species": ["pt", "Ni"], "composition": {"Pt": 0.6, "ni": 0.4}})
    assert settings.species == ["Pt", "Ni"] and settings.composition == {"Pt": 0.6, "Ni": 0.4}
    assert fit_settings(composition={"Pt": 0.5, "Ni": 0.5}).species == ["Pt", "Ni"]
    for composition in ({"Pt": 1.0}, {"Pt": 0.5, "Ni": 0.9}, {"Pt": -1.0, "Ni": 2.0}):
        with pytest.raises(SettingError, match="composition"):
            fit_settings({"species": ["Pt", "Ni"], "composition": composition})
