"""Alignment: the gauge, pre-alignment from the images, the written files, and joint refinement
against a known misalignment (engine.measure.alignment, engine.fit.alignment, a Reconstruction with
refine_alignment)."""

import json

import numpy as np
import pytest

from engine.fit.alignment import AlignmentRefiner
from engine.measure.alignment import (Alignment, counts_background, prealign, prealign_with_evidence,
                                      random_misalignment, read_alignment, translation_gauge, write_alignment)
from engine.io.atoms import read_atoms
from engine.io.tiltseries import TiltSeries, write_tilt_series
from engine.cli import main
from engine.core.errors import InputError
from engine.evaluate.metrics import evaluate_atoms
from engine.kernels.projector import project_tilt_series
from engine.fit.outputs import write_outputs
from engine.fit.reconstruct import Reconstruction
from engine.fit.settings import fit_settings
from engine.measure.datamodel import estimate_data_model
from engine.physics.simulate import auto_shape, simulate_tilt_series
from engine.physics.structures import build_structure, parse_recipe

TILTS = np.arange(-70.0, 70.01, 5.0)
PIXEL = 0.3


@pytest.fixture(scope="module")
def particle():
    return build_structure(parse_recipe("cuboctahedron element=Au shells=3 euler=-52,28,139"))


def misaligned_series(atoms, misalignment, seed=1, shape=(96, 96)):
    series = simulate_tilt_series(atoms, TILTS, PIXEL, shape, blur_sigma=0.4, peak_counts=25, seed=seed,
                                  geometry=misalignment.geometry(TILTS),
                                  intensity_scale=misalignment.intensity_scale)
    series.geometry = None
    return series


def shift_rmse_px(estimate: Alignment, truth: Alignment) -> float:
    return float(np.sqrt(np.mean((estimate.shifts - truth.shifts) ** 2)) / PIXEL)


def test_random_misalignment_is_bounded_and_gauge_free():
    a = random_misalignment(TILTS, PIXEL, 2.0, 0.5, 1.0, 0.05, seed=4)
    assert np.abs(a.shifts / PIXEL).max() == pytest.approx(2.0)
    assert np.abs(a.angle_offsets).max() == pytest.approx(0.5) and abs(a.angle_offsets.mean()) < 1e-12
    assert np.abs(translation_gauge(a.shifts, a.geometry(TILTS).rotations)).max() < 1e-12
    assert np.exp(np.mean(np.log(a.intensity_scale))) == pytest.approx(1.0)
    assert np.all(np.abs(np.log(a.intensity_scale)) <= 0.1)


def test_gauge_fix_leaves_every_projection_unchanged(arch):
    rng = np.random.default_rng(0)
    positions = rng.uniform(-4, 4, (12, 3))
    amplitudes = rng.uniform(1, 2, 12)
    widths = np.full(12, 0.4)
    a = Alignment(rng.uniform(0.1, 0.6, len(TILTS)), rng.uniform(-0.5, 0.5, (len(TILTS), 2)), 2.0,
                  rng.uniform(0.8, 1.3, len(TILTS)), np.zeros(len(TILTS)))
    refiner = AlignmentRefiner(a, TILTS)

    def images(pos, amp):
        raw = project_tilt_series(pos, amp, widths, refiner.geometry(), (40, 40), PIXEL, 0.3)
        return raw * a.intensity_scale[:, None, None]

    before = images(positions, amplitudes)
    turn, translation, gain = refiner.fix_gauge()
    after = images(positions @ turn.T + translation, amplitudes * gain)
    assert np.abs(after - before).max() <= 1e-4 * before.max()
    assert abs(a.angle_offsets.mean()) < 1e-12
    assert np.abs(translation_gauge(a.shifts, refiner.geometry().rotations)).max() < 1e-9
    assert np.exp(np.mean(np.log(a.intensity_scale))) == pytest.approx(1.0)
    axis = np.array([-np.sin(np.radians(2.0)), np.cos(np.radians(2.0)), 0.0])  # the turned tilt axis
    assert np.allclose(turn @ axis, axis) and not np.allclose(turn, np.eye(3))


def test_prealign_finds_shifts_and_tilt_axis(arch, particle):
    truth = random_misalignment(TILTS, PIXEL, 2.0, 0.0, 3.0, 0.0, seed=2)
    series = misaligned_series(particle, truth)
    data = estimate_data_model(series, 0.4)
    estimate = prealign((series.projections - data.background) / data.scale, TILTS, PIXEL, data.noise)
    assert abs(estimate.axis_angle - 3.0) < 0.3
    assert shift_rmse_px(estimate, truth) < 0.15


def test_alignment_files_round_trip_and_xf_maps_raw_to_aligned(tmp_path):
    a = random_misalignment(TILTS, PIXEL, 2.0, 0.5, 1.5, 0.05, seed=5)
    a.intensity_offset = np.linspace(-0.01, 0.01, len(TILTS))
    write_alignment(a, tmp_path, TILTS, PIXEL, data_scale=7.0)
    back = read_alignment(tmp_path / "alignment.json")
    for name in ("angle_offsets", "shifts", "intensity_scale", "intensity_offset"):
        np.testing.assert_allclose(getattr(back, name), getattr(a, name), rtol=1e-12, atol=1e-15)
    assert back.axis_angle == a.axis_angle
    # A point u of the aligned image (tilt axis along +y) appears in the raw image at R(φ) u + s/pixel.
    rows = np.loadtxt(tmp_path / "alignment.xf")
    u = np.array([3.0, -7.0])
    phi = np.radians(a.axis_angle)
    rotate = np.array([[np.cos(phi), -np.sin(phi)], [np.sin(phi), np.cos(phi)]])
    for row, shift in zip(rows, a.shifts):
        raw = rotate @ u + shift / PIXEL
        np.testing.assert_allclose(row[:4].reshape(2, 2) @ raw + row[4:], u, atol=2e-3)
    with pytest.raises(InputError, match="alignment"):
        (tmp_path / "bad.json").write_text("{}")
        read_alignment(tmp_path / "bad.json")


@pytest.mark.slow
def test_joint_refinement_recovers_the_misalignment(arch, particle, tmp_path):
    if arch != "cpu":
        pytest.skip("the end-to-end fit is checked on the CPU")
    truth = random_misalignment(TILTS, PIXEL, 2.0, 0.5, 1.0, 0.05, seed=1)
    series = misaligned_series(particle, truth)
    results = {}
    for refine in (False, True):
        settings = fit_settings(species=["Au"], noise="poisson", profile="peng", refine_alignment=refine,
                                iters=600, thermal_refits=0)
        rec = Reconstruction(series, settings, tmp_path / str(refine), progress=False)
        results[refine] = (rec, evaluate_atoms(rec.run(), particle, radius=1.0))
    rec, metrics = results[True]
    estimate = rec.refiner.alignment
    assert metrics["f1"] == 1.0
    assert results[False][1]["rmsd_pm"] > 2 * metrics["rmsd_pm"], (results[False][1], metrics)  # what it is for
    assert rec.alignment_selection["kept"]
    assert shift_rmse_px(estimate, truth) <= 0.1
    assert abs(estimate.axis_angle - truth.axis_angle) <= 0.1
    # 147 atoms at 25 counts pin each tilt angle to about ±0.15° (the 561-atom check in
    # scripts/alignment_check.py reaches 0.08°).
    assert np.sqrt(np.mean((estimate.angle_offsets - truth.angle_offsets) ** 2)) <= 0.2
    assert np.sqrt(np.mean((estimate.intensity_scale / truth.intensity_scale - 1) ** 2)) <= 0.02
    write_outputs(rec, rec.atoms(), "cpu", 0.0)
    assert read_alignment(tmp_path / "True" / "alignment.json").axis_angle == pytest.approx(estimate.axis_angle)


@pytest.mark.slow
def test_refinement_of_an_aligned_series_is_not_kept(arch, tmp_path):
    # Refinement fits the noise of an aligned series; its atoms then predict held-out images no
    # better than the nominal fit's, so the nominal geometry and its fit stand.
    if arch != "cpu":
        pytest.skip("the end-to-end fit is checked on the CPU")
    small = build_structure(parse_recipe("cuboctahedron element=Au shells=2 euler=-52,28,139"))
    series = misaligned_series(small, Alignment.identity(len(TILTS)), shape=(64, 64))
    settings = fit_settings(species=["Au"], noise="poisson", refine_alignment=True, iters=600, thermal_refits=0)
    rec = Reconstruction(series, settings, tmp_path, progress=False)
    metrics = evaluate_atoms(rec.run(), small, radius=1.0)
    assert not rec.alignment_selection["kept"], rec.alignment_selection
    assert rec.refiner is None and metrics["f1"] == 1.0
    write_outputs(rec, rec.atoms(), "cpu", 0.0)
    assert not (tmp_path / "alignment.json").exists()
    assert json.loads((tmp_path / "report.json").read_text())["alignment_selection"]["kept"] is False


def test_cli_simulates_misalignment_and_info_advises_refinement(arch, tmp_path, capsys):
    if arch != "cpu":
        pytest.skip("CLI checked on the CPU")
    recipe = "cuboctahedron element=Au shells=2 euler=-52,28,139"
    for name, extra in (("aligned", []), ("misaligned", ["--misalign", "2,0.5,2"])):
        assert main(["simulate", "--build", recipe, "--tilts=-60:60:5", "--peak-counts", "50", "--arch", "cpu",
                     "--out", str(tmp_path / f"{name}.npz")] + extra) == 0
        capsys.readouterr()
        assert main(["info", str(tmp_path / f"{name}.npz")]) == 0
        advised = "--refine-alignment" in capsys.readouterr().out
        assert advised == (name == "misaligned")
    truth = read_alignment(tmp_path / "misaligned_alignment.json")
    assert truth.axis_angle == 2.0 and np.abs(truth.shifts / 0.3).max() == pytest.approx(2.0)
    assert len(read_atoms(tmp_path / "misaligned_truth.xyz")) == 55
    assert main(["simulate", "--build", recipe, "--misalign", "2,x,1", "--out", str(tmp_path / "bad.npz")]) == 2
    assert "--misalign" in capsys.readouterr().err
    assert main(["reconstruct", str(tmp_path / "aligned.npz"), "--noise", "poisson", "--robust",
                 "--out", str(tmp_path / "fit")]) == 2
    assert "--robust" in capsys.readouterr().err


def test_viewer_predicts_saved_atoms_in_the_refined_alignment(arch):
    from engine.io.atoms import Atoms
    from engine.kernels.projector import project_tilt_series
    from engine.io.tiltseries import TiltSeries
    from viewer.sources import SavedResult

    rng = np.random.default_rng(3)
    atoms = Atoms(np.full(15, "Au"), rng.uniform(-4, 4, (15, 3)),
                  {"amplitude": rng.uniform(50, 80, 15), "width": np.full(15, 0.4)})
    truth = random_misalignment(TILTS, PIXEL, 2.0, 0.5, 2.0, 0.05, seed=3)
    clean = project_tilt_series(atoms.positions, atoms.columns["amplitude"], atoms.columns["width"],
                                truth.geometry(TILTS), (48, 48), PIXEL, 0.4)
    series = TiltSeries(projections=(clean * truth.intensity_scale[:, None, None] + 10.0).astype(np.float32),
                        angles=TILTS, pixel_size=PIXEL, blur_sigma=0.4)
    k = 3
    error = {}
    for name, alignment in (("nominal", None), ("refined", truth)):
        snapshot = SavedResult(atoms, "atoms", series, alignment=alignment).snapshot(k)
        error[name] = np.abs(snapshot.predicted - snapshot.measured).max() / clean[k].max()
    assert error["refined"] < 1e-3 < 0.1 < error["nominal"]
    with pytest.raises(InputError, match="aligns"):
        SavedResult(atoms, "atoms", series, alignment=random_misalignment(TILTS[:5], PIXEL, 1, 0, 0))


@pytest.mark.slow
def test_scene_with_misalignment_scores_the_refined_alignment(arch, tmp_path, capsys):
    if arch != "cpu":
        pytest.skip("CLI checked on the CPU")
    scene = tmp_path / "scene.toml"
    scene.write_text('[data.simulate]\nbuild = { kind = "cuboctahedron", element = "Au", shells = 2 }\n'
                     'tilts = "-60:60:6"\npixel_size = 0.3\npeak_counts = 50.0\nmisalign = [1.5, 0.3, 1.0]\n'
                     '[output]\ndir = "out"\n[reconstruct]\nspecies = ["Au"]\nnoise = "poisson"\n'
                     'refine_alignment = true\niters = 400\nthermal_refits = 0\n')
    assert main(["run", str(scene), "--arch", "cpu", "--quiet"]) == 0
    assert "alignment vs truth" in capsys.readouterr().out
    errors = json.loads((tmp_path / "out" / "alignment_errors.json").read_text())
    assert errors["shift_rmse_px"] < 0.3 and abs(errors["axis_error_deg"]) < 0.3
    scene.write_text(scene.read_text().replace("misalign = [1.5, 0.3, 1.0]", 'misalign = [1.5, "x", 1.0]'))
    assert main(["run", str(scene), "--arch", "cpu", "--overwrite"]) == 2
    assert "misalign" in capsys.readouterr().err


# ---------------------------------------------------------------------- low-dose counted data
LOW_DOSE_TILTS = np.arange(-75.0, 75.01, 2.5)


def counted_series(atoms, dose, misalignment=None, pixel=0.2, background=1.0, seed=0):
    """Poisson counts as a low-dose AET series: ``dose`` expected signal counts per atom per projection
    plus ``background`` per pixel, a field of view 2 Å wider than the particle (it nearly touches
    the edge)."""
    tilts = LOW_DOSE_TILTS
    clean = simulate_tilt_series(atoms, tilts, pixel, auto_shape(atoms, pixel, margin=2.0), blur_sigma=0.35,
                                 geometry=None if misalignment is None else misalignment.geometry(tilts),
                                 intensity_scale=None if misalignment is None else misalignment.intensity_scale)
    clean = clean.projections.astype(np.float64)
    expected = clean * (dose * len(atoms) / clean.sum(axis=(1, 2)).mean()) + background
    counts = np.random.default_rng(seed).poisson(expected).astype(np.float32)
    return TiltSeries(projections=counts, angles=tilts, pixel_size=pixel)


@pytest.fixture(scope="module")
def small_si():
    return build_structure(parse_recipe("amorphous element=Si n_atoms=60 min_distance=2.25"), seed=1)


def test_counts_background_is_unbiased_where_the_particle_touches_the_edge():
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[0:96, 0:96]
    # A faint disc running off the right edge (the frame's median would be a whole count, 1).
    disc = 0.6 * np.sqrt(np.clip(1 - ((xx - 70.0) ** 2 + (yy - 48.0) ** 2) / 34.0**2, 0, None))
    for background in (0.4, 1.3):
        counts = rng.poisson(background + disc, (12, 96, 96)).astype(float)
        assert counts_background(counts).mean() == pytest.approx(background, rel=0.03)
        empty = rng.poisson(background, (12, 96, 96)).astype(float)
        assert counts_background(empty).mean() == pytest.approx(background, rel=0.01)
    # A drifting beam: each projection keeps its own background.
    drift = np.linspace(0.7, 1.3, 12)
    counts = rng.poisson(drift[:, None, None] + disc, (12, 96, 96)).astype(float)
    np.testing.assert_allclose(counts_background(counts), drift, rtol=0.05)


def test_info_on_counted_data_advises_refinement_only_when_misaligned(arch, small_si, tmp_path, capsys):
    if arch != "cpu":
        pytest.skip("CLI checked on the CPU")
    truth = random_misalignment(LOW_DOSE_TILTS, 0.2, 2.0, 0.5, 1.0, seed=3)
    checks = {}
    for name, misalignment in (("aligned", None), ("misaligned", truth)):
        write_tilt_series(counted_series(small_si, 28, misalignment), tmp_path / f"{name}.npz")
        capsys.readouterr()
        assert main(["info", str(tmp_path / f"{name}.npz"), "--json"]) == 0
        checks[name] = json.loads(capsys.readouterr().out)["alignment_check"]
    aligned, misaligned = checks["aligned"], checks["misaligned"]
    assert aligned["counted"] and not aligned["refine_advised"] and aligned["shift_rms_px"] <= 0.3
    # The errors are honest: aligned shifts scatter as their standard errors say (χ² per dof near 1).
    assert 0.7 < aligned["chi2"] / aligned["dof"] < 1.4
    assert misaligned["refine_advised"] and misaligned["shifts_significant"] and misaligned["p_value"] < 1e-6
    # A field of view that cuts the specimen (a film, a window on a larger object): material moves in and
    # out of view with the tilt, so the images alone cannot tell shifts and none are invented.
    cropped = counted_series(small_si, 28, truth)
    cropped.projections = np.ascontiguousarray(cropped.projections[:, :, 20:-20])
    write_tilt_series(cropped, tmp_path / "cropped.npz")
    capsys.readouterr()
    assert main(["info", str(tmp_path / "cropped.npz"), "--json"]) == 0
    check = json.loads(capsys.readouterr().out)["alignment_check"]
    assert check["untestable"] and not check["refine_advised"] and check["shift_rms_px"] == 0
    # Shrinking by the noise brings the shifts closer to the truth than the raw estimates (each about
    # ±1 px here) and than no shifts at all.
    counts = counted_series(small_si, 28, truth).projections.astype(np.float64)
    background = counts_background(counts)
    estimate, evidence = prealign_with_evidence(counts - background[:, None, None], LOW_DOSE_TILTS, 0.2, 1.0,
                                                axis_angle=truth.axis_angle,
                                                variance=np.maximum(counts, background.min()))

    def rms(shifts):
        return np.sqrt(np.mean(shifts**2))

    shrunk = rms(estimate.shifts - truth.shifts)
    assert shrunk < rms(evidence["raw_shifts_A"] - truth.shifts) and shrunk < 0.8 * rms(truth.shifts)


@pytest.mark.parametrize("dose", [14, 28, 140])
def test_info_finds_the_low_dose_development_series_aligned(shared_data, dose, capsys):
    path = shared_data / f"dev_asi_dose{dose}.npz"
    if not path.exists():
        pytest.skip(f"{path} not found")
    assert main(["info", str(path), "--json"]) == 0
    check = json.loads(capsys.readouterr().out)["alignment_check"]
    assert check["counted"] and check["shift_rms_px"] <= 0.3 and not check["refine_advised"]
