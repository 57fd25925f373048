"""Counted (Poisson) data: the noise model read off the data, the per-projection background, and the
evidence rule that decides how many atoms the data support, on series made by our own simulator
with known counts per atom and background."""

import json

import numpy as np
import pytest

from engine.core.errors import InputError
from engine.evaluate.metrics import evaluate_atoms
from engine.fit.uncertainty import covariance_of
from engine.io.tiltseries import TiltSeries
from engine.measure.datamodel import choose_noise_model
from engine.physics.simulate import parse_tilt_range, simulate_tilt_series
from engine.physics.structures import build_structure

pytestmark = pytest.mark.slow  # end-to-end fits and command-line runs

TILTS = parse_tilt_range("-70:70:5")
PIXEL = 0.25


@pytest.fixture(scope="module")
def particle():
    return build_structure({"kind": "amorphous", "element": "Si", "n_atoms": 30, "min_distance": 2.25}, seed=4)


def counted_series(atoms, counts_per_atom: float, background: float = 1.0, margin: float = 1.0, seed: int = 0):
    """Poisson counts: ``counts_per_atom`` expected signal counts per atom per projection plus
    ``background`` per pixel; the image half-width exceeds the particle's reach by ``margin`` Å (1 Å:
    the particle touches the border at some tilts)."""
    p = atoms.positions
    reach = max(np.sqrt(p[:, 0] ** 2 + p[:, 2] ** 2).max(), np.abs(p[:, 1]).max()) + margin
    n = int(2 * np.ceil(reach / PIXEL))
    clean = simulate_tilt_series(atoms, TILTS, PIXEL, (n, n), blur_sigma=0.35).projections.astype(np.float64)
    clean *= counts_per_atom * len(atoms) / clean.sum(axis=(1, 2)).mean()
    counts = np.random.default_rng(seed).poisson(clean + background).astype(np.float32)
    return TiltSeries(projections=counts, angles=TILTS, pixel_size=PIXEL, source="counts.npz")


def fit(series, tmp_path, **settings):
    from engine.api import reconstruct

    return reconstruct(series, out_dir=tmp_path, progress=False, arch="cpu", **settings)


def test_noise_model_is_read_off_the_data():
    rng = np.random.default_rng(0)
    counts = rng.poisson(3.0, (4, 16, 16)).astype(np.float32)
    series = TiltSeries(projections=counts, angles=np.arange(4.0), pixel_size=0.3, source="c.npz")
    model = choose_noise_model(series)
    assert (model.kind, model.gain) == ("poisson", 1.0) and "counts" in model.reason
    scaled = TiltSeries(projections=counts * 0.37, angles=np.arange(4.0), pixel_size=0.3, source="s.npz")
    model = choose_noise_model(scaled)
    assert model.kind == "poisson" and model.gain == pytest.approx(1 / 0.37, rel=1e-4)
    noisy = TiltSeries(projections=counts + rng.normal(0, 0.5, counts.shape).astype(np.float32),
                       angles=np.arange(4.0), pixel_size=0.3, source="g.npz")
    assert choose_noise_model(noisy).kind == "gaussian"
    assert choose_noise_model(series, "gaussian").kind == "gaussian"
    with pytest.raises(InputError, match="g.npz.*negative"):
        choose_noise_model(noisy, "poisson")


def test_pure_background_gives_no_atom(arch, tmp_path):
    if arch != "cpu":
        pytest.skip("checked on the CPU")
    counts = np.random.default_rng(1).poisson(1.0, (len(TILTS), 48, 48)).astype(np.float32)
    result = fit(TiltSeries(projections=counts, angles=TILTS, pixel_size=PIXEL), tmp_path, species=["Si"])
    assert len(result.atoms) == 0
    assert "support" in result.report["empty_reason"]
    assert np.mean(result.report["background_counts"]) == pytest.approx(1.0, rel=0.01)


def test_every_atom_of_a_particle_at_20_counts_and_the_background_at_the_border(arch, particle, tmp_path):
    if arch != "cpu":
        pytest.skip("checked on the CPU")
    series = counted_series(particle, 20.0, margin=1.0)
    frame = np.median(np.concatenate([series.projections[:, :3].ravel(), series.projections[:, -3:].ravel()]))
    result = fit(series, tmp_path, species=["Si"])
    metrics = evaluate_atoms(result.atoms, particle, radius=1.0)
    assert metrics["recall"] == 1.0 and metrics["precision"] == 1.0
    assert result.report["model"] == "tied" and result.report["noise_model"]["kind"] == "poisson"
    # The fitted background is the true 1 count per pixel although the particle reaches the border
    # (there the frame is not empty: its median says otherwise whenever atoms sit in it).
    background = np.asarray(result.report["background_counts"])
    assert np.abs(background - 1.0).max() < 0.1 and abs(background.mean() - 1.0) < 0.02
    assert frame >= 1.0
    assert np.all(result.atoms.columns["significance"] > 0)
    assert np.all(np.isfinite(result.atoms.columns["sigma_z"])) and result.report["uncertainty"]["atoms_not_significant"] == 0
    assert np.all(np.linalg.eigvalsh(covariance_of(result.atoms.columns)) > 0)  # the written 3 × 3 per atom


def test_tied_and_per_atom_shapes_agree_at_high_dose(arch, particle, tmp_path):
    if arch != "cpu":
        pytest.skip("checked on the CPU")
    series = counted_series(particle, 2000.0, background=1.0, margin=4.0, seed=2)
    tied = fit(series, tmp_path / "tied", species=["Si"]).atoms
    free = fit(series, tmp_path / "free", species=["Si"], per_atom_shape=True, thermal_refits=0).atoms
    for atoms in (tied, free):
        assert evaluate_atoms(atoms, particle, radius=0.5)["f1"] == 1.0
    between = evaluate_atoms(tied, free, radius=0.5)
    assert between["f1"] == 1.0 and between["rmsd_pm"] < 2.0


def test_an_all_zero_series_ends_cleanly(arch, tmp_path):
    if arch != "cpu":
        pytest.skip("CLI checked on the CPU")
    from engine.cli import main
    from engine.io.tiltseries import write_tilt_series

    path = tmp_path / "zeros.npz"
    write_tilt_series(TiltSeries(projections=np.zeros((5, 20, 20), np.float32), angles=np.linspace(-40, 40, 5),
                                 pixel_size=0.3), path)
    assert main(["reconstruct", str(path), "--out", str(tmp_path / "out"), "--arch", "cpu", "--quiet"]) == 0
    assert (tmp_path / "out" / "atoms.xyz").read_text().splitlines()[0].strip() == "0"
    assert "no counts" in json.loads((tmp_path / "out" / "report.json").read_text())["empty_reason"]


def test_negative_counts_are_refused_naming_the_file(arch, tmp_path, capsys):
    if arch != "cpu":
        pytest.skip("CLI checked on the CPU")
    from engine.cli import main
    from engine.io.tiltseries import write_tilt_series

    path = tmp_path / "negative.npz"
    images = np.random.default_rng(0).normal(0, 1, (5, 20, 20)).astype(np.float32)
    write_tilt_series(TiltSeries(projections=images, angles=np.linspace(-40, 40, 5), pixel_size=0.3), path)
    assert main(["reconstruct", str(path), "--noise", "poisson", "--out", str(tmp_path / "o"), "--arch", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "negative.npz" in err[-1] and "negative" in err[-1]  # refused before the backend starts
    assert not (tmp_path / "o").exists()
