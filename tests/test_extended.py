"""Extended specimens: a film wider than the field of view, the data's own background level, and
the scorer's global translation."""

import json
import subprocess
import sys

import numpy as np
import pytest

from engine.api import reconstruct, score, simulate
from engine.core.geometry import TiltGeometry
from engine.evaluate.metrics import best_translation
from engine.io.atoms import Atoms
from engine.io.tiltseries import write_tilt_series
from engine.measure.datamodel import estimate_data_model, pixel_noise

PIXEL = 0.4      # Å
SHAPE = (24, 48)  # px: a 9.2 × 18.8 Å window
TILTS = np.arange(-60.0, 60.1, 5.0)


def film(seed: int = 4) -> Atoms:
    """A two-layer Au film 52 Å wide (across the tilt axis), 8 Å along it, 2.6 Å thick: wider than
    the window, so its ends tilt into and out of view. Atoms on a jittered 2.9 Å square grid."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(np.arange(-26.0, 26.1, 2.9), np.arange(-2.9, 3.0, 2.9), (-1.3, 1.3), indexing="ij")
    positions = np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1)
    positions[:, 0] += 1.45 * (np.round(z.ravel() / 2.6 + 0.5))  # the layers staggered
    positions += rng.normal(scale=0.15, size=positions.shape)
    return Atoms(np.full(len(positions), "Au"), positions)


def in_window(atoms: Atoms) -> Atoms:
    seen = TiltGeometry.from_tilt_angles(TILTS).views(atoms.positions, SHAPE, PIXEL)
    return atoms.subset(np.all(seen, axis=0))


@pytest.fixture(scope="module")
def film_series(tmp_path_factory):
    truth = film()
    series = simulate(truth, TILTS, PIXEL, shape=SHAPE, blur=0.3, noise=0.02, seed=2, arch="cpu")
    path = tmp_path_factory.mktemp("film") / "film.npz"
    write_tilt_series(series, path)
    return truth, series, path


def test_film_edges_hold_specimen_and_background_comes_from_the_data(film_series):
    truth, series, _ = film_series
    model = estimate_data_model(series, None)
    assert model.sides_hold_specimen and not model.frame_empty
    # The pixel noise from pixel-to-pixel variation: exact on noise alone; on these sharp atoms (1.1 px)
    # packed edge to edge the structure adds to it, never takes from it.
    clean = simulate(truth, TILTS, PIXEL, shape=SHAPE, blur=0.3, noise=0.0, arch="cpu")
    noise = series.projections - clean.projections
    sigma = float(noise.std())
    assert pixel_noise(noise) == pytest.approx(sigma, rel=0.03)
    assert sigma < pixel_noise(series.projections) < 1.35 * sigma
    # No vacuum anywhere: the start is the lowest level the images reach, far below the edges' median
    # (which an isolated particle's frame would give); the fit refines it (see the end-to-end test).
    assert model.background < np.median(series.projections[:, :, :3])


def test_isolated_particle_frame_is_empty():
    particle = film().subset(np.abs(film().positions[:, 0]) < 5)
    series = simulate(particle, TILTS, PIXEL, shape=SHAPE, blur=0.3, noise=0.02, seed=2, arch="cpu")
    model = estimate_data_model(series, None)
    assert model.frame_empty and not model.sides_hold_specimen


@pytest.mark.slow
def test_film_window_atoms_all_found_and_none_invented_at_the_edges(film_series, tmp_path):
    truth, series, _ = film_series
    # The scattering-factor profile: a single Gaussian leaves the atoms' tails, which a film sums to a
    # level, to the background.
    result = reconstruct(series, out_dir=tmp_path / "fit", species=["Au"], profile="peng", iters=400, progress=False,
                         arch="cpu")
    atoms = result.atoms
    assert result.report["extended"] is True
    inside = atoms.columns["inside"] == 1
    assert result.report["n_atoms_inside"] == inside.sum() and result.report["n_atoms_outside"] == (~inside).sum()
    window = in_window(truth)
    metrics = score(atoms, window)  # scores the atoms marked inside the window
    assert metrics["n_pred_outside_not_scored"] == (~inside).sum()
    assert metrics["f1"] == 1.0, metrics
    assert metrics["rmsd_pm"] < 15, metrics
    # The fitted background of every projection: the vacuum level 0 within the noise of a pixel
    # (the margin's atoms are fitted, not left to the background).
    model = result.report["forward_model"]
    fitted = model["background"] + np.array(model["background_offsets"])
    assert np.all(np.abs(fitted) < series.noise_sigma), fitted


@pytest.mark.slow
def test_info_on_film_gives_no_alignment_advice(film_series):
    _, _, path = film_series
    out = subprocess.run([sys.executable, "-m", "engine.cli", "info", str(path), "--json"], capture_output=True,
                         text=True, check=True)
    info = json.loads(out.stdout)
    text = json.dumps(info)
    assert "--refine-alignment" not in text, text


def test_best_translation_recovers_a_global_shift():
    truth = film()
    rng = np.random.default_rng(0)
    shift = np.array([0.4, -0.3, 0.25])
    moved = truth.positions + shift + rng.normal(scale=0.05, size=truth.positions.shape)
    found = best_translation(moved, truth.positions, 1.0)
    np.testing.assert_allclose(found, -shift, atol=0.02)
