"""Half-set validation: the split, the statistics against known errors, and `atomsplat validate` on a
small simulated particle through the real command line."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.io.atoms import Atoms
from engine.io.tiltseries import TiltSeries
from engine.validation import compare_halves, split_halves

ROOT = Path(__file__).resolve().parents[1]


def test_halves_interleave_in_angle_order_whatever_the_acquisition_order():
    angles = np.array([0.0, 3, -3, 6, -6, 9, -9, 12, -12])  # dose-symmetric acquisition
    series = TiltSeries(np.zeros((9, 4, 4)), angles, 0.3)
    halves = split_halves(series)
    even, odd = (np.sort(angles[halves[name]]) for name in ("even", "odd"))
    np.testing.assert_array_equal(even, [-12, -6, 0, 6, 12])
    np.testing.assert_array_equal(odd, [-9, -3, 3, 9])
    assert sorted(np.concatenate([halves["even"], halves["odd"]]).tolist()) == list(range(9))


def test_precision_from_two_noisy_copies_of_known_atoms():
    """Halves with independent Gaussian errors σ_half per axis (anisotropic, as a missing wedge
    makes them): the per-half precision is σ_half, the full-data one σ_half / √2, each inside its
    95 % interval; a lone atom lowers the reproduced fraction."""
    rng = np.random.default_rng(3)
    truth = rng.uniform(-20, 20, size=(2000, 3))
    sigma = np.array([0.02, 0.03, 0.05])  # Å: 2, 3, 5 pm
    even = Atoms(["Au"] * 2000, truth + rng.normal(size=truth.shape) * sigma)
    odd = Atoms(["Au"] * 2001, np.vstack([truth + rng.normal(size=truth.shape) * sigma, [[40.0, 40, 40]]]))
    summary = compare_halves(even, odd, radius=1.0)
    assert summary["n_matched"] == 2000
    assert summary["reproduced_fraction"] == pytest.approx(4000 / 4001)
    assert summary["reproduced_fraction_even"] == 1.0 and summary["reproduced_fraction_odd"] == pytest.approx(2000 / 2001)
    expected = {"x": 2.0, "y": 3.0, "z": 5.0, "3d": float(np.sqrt(4 + 9 + 25))}
    for axis, value in expected.items():
        half, full = summary["precision_half_pm"][axis], summary["precision_full_pm"][axis]
        assert half == pytest.approx(value, rel=0.05)
        assert full == pytest.approx(half / np.sqrt(2))
        low, high = summary["precision_half_interval_pm"][axis]
        assert low < value < high and low < half < high
    json.dumps(summary)


def test_no_matched_atoms_gives_no_precision():
    summary = compare_halves(Atoms(["Au"], [[0.0, 0, 0]]), Atoms(["Au"], [[5.0, 0, 0]]))
    assert summary["n_matched"] == 0 and summary["reproduced_fraction"] == 0.0
    assert summary["precision_full_pm"] is None and summary["precision_half_interval_pm"] is None


@pytest.mark.slow
def test_validate_command_on_a_small_particle(tmp_path):
    """`atomsplat validate` through the command line: JSON on stdout alone, both halves find every
    atom, the implied per-half precision is the size of each half's true error, and the per-atom
    table lists every matched pair."""
    from engine.api import simulate
    from engine.io.atoms import write_atoms
    from engine.io.tiltseries import write_tilt_series
    from engine.physics.structures import build_structure

    particle = build_structure({"kind": "cuboctahedron", "element": "Au", "shells": 2, "euler": [10.0, 20.0, 30.0]})
    series = simulate(particle, "-60:60:6", 0.3, noise=0.03, seed=1, arch="cpu")
    write_tilt_series(series, tmp_path / "small.npz")
    write_atoms(particle, tmp_path / "truth.xyz")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "engine.cli", "validate", "small.npz", "--out", "v", "--truth",
                             "truth.xyz", "--species", "Au", "--iters", "200", "--thermal-refits", "0", "--arch", "cpu", "--quiet",
                             "--json"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary == json.loads((tmp_path / "v" / "validation.json").read_text())
    halves = summary["halves"]
    assert (halves["even"]["n_projections"], halves["odd"]["n_projections"]) == (11, 10)
    assert summary["n_matched"] == len(particle) and summary["reproduced_fraction"] == 1.0
    true_half = np.sqrt(np.mean([halves[h]["truth"]["rmsd_pm"] ** 2 for h in ("even", "odd")]))
    assert 0.5 * true_half < summary["precision_half_pm"]["3d"] < 2.0 * true_half
    for half in ("even", "odd"):
        assert halves[half]["truth"]["f1"] == 1.0
        assert (tmp_path / "v" / half / "atoms.xyz").exists()
    with open(tmp_path / "v" / "reproducibility.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(particle) and all(row["found_in"] == "both" for row in rows)
    distances = np.array([float(row["distance_pm"]) for row in rows])
    assert np.sqrt(np.mean(distances ** 2)) == pytest.approx(summary["half_to_half_rmsd_pm"], rel=1e-3)
    # a second run into the same folder is refused before any work, naming --overwrite
    again = subprocess.run([sys.executable, "-m", "engine.cli", "validate", "small.npz", "--out", "v", "--arch", "cpu"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and again.stderr.count("atomsplat: error:") == 1 and "--overwrite" in again.stderr
