"""Low-dose classical baseline: the Anscombe transform and its exact unbiased inverse, and
`atomsplat baseline --denoise bm3d` (Anscombe, BM3D, inverse, SIRT, tracing) on counted data."""

import json
import sys

import numpy as np
import pytest

from engine.classical.denoise import (anscombe, expected_anscombe, inverse_anscombe_asymptotic,
                                      inverse_anscombe_exact)
from engine.cli import main
from engine.io.atoms import write_atoms
from engine.io.tiltseries import TiltSeries, write_tilt_series
from engine.physics.simulate import auto_shape, simulate_tilt_series
from engine.physics.structures import build_structure, parse_recipe

MEANS = [1, 2, 3, 5, 8, 13, 20, 30, 50]


def test_exact_inverse_anscombe_is_unbiased_on_poisson_means():
    rng = np.random.default_rng(0)
    for mean in MEANS:
        transformed = anscombe(rng.poisson(mean, 400_000))
        # What a perfect denoiser returns is E[A(z)]; the exact inverse maps it back to the mean.
        assert inverse_anscombe_exact(transformed.mean()) == pytest.approx(mean, rel=0.01)
        assert inverse_anscombe_exact(expected_anscombe(mean)) == pytest.approx(mean, rel=1e-4)
        assert inverse_anscombe_asymptotic(transformed.mean()) == pytest.approx(mean, rel=0.08)
        assert transformed.var() == pytest.approx(1.0, abs=0.3)  # variance stabilised (0.72 at a mean of 1)
    # The algebraic inverse is what the exact one corrects: 18 % low at one count.
    low = anscombe(rng.poisson(1.0, 400_000)).mean()
    assert (low / 2) ** 2 - 3 / 8 < 0.85
    assert inverse_anscombe_exact(anscombe(0.0) - 0.1) == 0.0


def counted_series(atoms, dose, tilts, pixel, background=1.0, seed=0):
    """Poisson counts: ``dose`` expected signal counts per atom per projection plus ``background`` per
    pixel, a field of view 2 Å wider than the particle."""
    clean = simulate_tilt_series(atoms, tilts, pixel, auto_shape(atoms, pixel, margin=2.0), blur_sigma=0.35)
    clean = clean.projections.astype(np.float64)
    expected = clean * (dose * len(atoms) / clean.sum(axis=(1, 2)).mean()) + background
    counts = np.random.default_rng(seed).poisson(expected).astype(np.float32)
    return TiltSeries(projections=counts, angles=tilts, pixel_size=pixel)


def test_baseline_with_bm3d_traces_a_low_dose_counted_series(arch, tmp_path, capsys):
    pytest.importorskip("bm3d")
    if arch != "cpu":
        pytest.skip("CLI checked on the CPU")
    atoms = build_structure(parse_recipe("amorphous element=Si n_atoms=30 min_distance=2.25"), seed=1)
    write_tilt_series(counted_series(atoms, 28, np.arange(-75.0, 75.01, 7.5), 0.3), tmp_path / "series.npz")
    write_atoms(atoms, tmp_path / "truth.xyz")
    f1 = {}
    for denoise in ("none", "bm3d"):
        out = tmp_path / denoise
        assert main(["baseline", str(tmp_path / "series.npz"), "--denoise", denoise, "--species", "Si", "--arch", "cpu",
                     "--out", str(out), "--truth", str(tmp_path / "truth.xyz")]) == 0
        f1[denoise] = json.loads((out / "metrics.json").read_text())["f1"]
        report = json.loads((out / "report.json").read_text())
        assert report["counted"] and report["background"] == pytest.approx(1.0, abs=0.05)
    assert "BM3D" in capsys.readouterr().out
    # Raw counts trace mostly noise (F1 0.25 here); denoised, nearly every atom (0.87).
    assert f1["bm3d"] >= 0.75 and f1["bm3d"] > f1["none"] + 0.3


def test_denoise_needs_bm3d_and_counted_data(tmp_path, capsys, monkeypatch):
    series = TiltSeries(projections=np.random.default_rng(0).normal(5.0, 1.0, (5, 24, 24)).astype(np.float32),
                        angles=np.linspace(-60, 60, 5), pixel_size=0.3)
    write_tilt_series(series, tmp_path / "float.npz")
    monkeypatch.setitem(sys.modules, "bm3d", None)  # as if not installed
    assert main(["baseline", str(tmp_path / "float.npz"), "--denoise", "bm3d", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "--denoise" in err and "pip install bm3d" in err and len(err.strip().splitlines()) == 1
    monkeypatch.delitem(sys.modules, "bm3d")
    pytest.importorskip("bm3d")
    assert main(["baseline", str(tmp_path / "float.npz"), "--denoise", "bm3d", "--arch", "cpu",
                 "--out", str(tmp_path / "b")]) == 2
    assert "counted data" in capsys.readouterr().err


def test_benchmark_records_a_failing_method_and_goes_on(tmp_path, monkeypatch, capsys):
    import importlib.util
    from pathlib import Path

    from engine.io.atoms import Atoms

    spec = importlib.util.spec_from_file_location("benchmark", Path(__file__).resolve().parents[1] / "scripts"
                                                  / "benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    data = tmp_path / "data"
    data.mkdir()
    counts = np.random.default_rng(0).poisson(1.0, (3, 16, 16)).astype(np.float32)  # whole counts
    write_tilt_series(TiltSeries(projections=counts, angles=np.array([-30.0, 0.0, 30.0]), pixel_size=0.3),
                      data / "tiny.npz")
    truth = Atoms(np.array(["Si", "Si"]), np.array([[0.0, 0.0, 0.0], [2.5, 0.0, 0.0]]), {})
    write_atoms(truth, data / "tiny_truth.xyz")

    def fake_run(command):
        if command[0] == "reconstruct":
            raise RuntimeError("atomsplat: error: tiny.npz: no signal peaks inside the particle support")
        out = Path(command[command.index("--out") + 1])
        out.mkdir(parents=True)
        write_atoms(truth, out / "atoms.xyz")
        return 1.5

    monkeypatch.setattr(benchmark, "run", fake_run)
    monkeypatch.setattr(sys, "argv", ["benchmark.py", str(data), "--out", str(tmp_path / "out")])
    benchmark.main()
    rows = json.loads((tmp_path / "out" / "benchmark.json").read_text())
    assert [r["method"] for r in rows] == ["direct fit", "BM3D + SIRT + tracing"]
    assert "no signal peaks" in rows[0]["error"] and rows[0]["f1@1.0"] is None
    assert rows[1]["error"] is None and rows[1]["f1@1.0"] == 1.0
    assert "no signal peaks" in capsys.readouterr().out
