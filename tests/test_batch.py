"""Batch runs on Dask and time series: a local cluster of 2 worker processes gives the same atoms as
separate `reconstruct` runs (bit for bit on the CPU), a bad series is reported while the others
finish, a rerun does no work; a simulated 3-state time series (moved atoms, a vacancy, an added
atom) is tracked with every displacement within 3σ of the truth. Atom tracking and the batch list
are checked without fits."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.io.atoms import Atoms

FIT = {"species": ["Au"], "iters": 60, "thermal_refits": 0}
TILTS = "-60:60:10"


def write_series(folder: Path, name: str, positions: np.ndarray, seed: int, tilts: str = TILTS) -> Path:
    from engine.api import simulate
    from engine.io.tiltseries import write_tilt_series

    series = simulate(Atoms(np.full(len(positions), "Au"), positions), tilts, 0.3, noise=0.02, seed=seed, arch="cpu")
    return write_tilt_series(series, folder / f"{name}.npz")


def cuboctahedron(shells: int, euler) -> np.ndarray:
    from engine.physics.structures import build_structure

    atoms = build_structure({"kind": "cuboctahedron", "element": "Au", "shells": shells, "euler": list(euler)})
    return atoms.positions - atoms.positions.mean(axis=0)


@pytest.mark.slow
def test_two_workers_match_separate_fits_bad_series_reported_rerun_does_nothing(tmp_path):
    pytest.importorskip("distributed")
    from engine.api import load_series, reconstruct
    from engine.batch import SeriesJob, fit_series, run_batch

    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        write_series(data, f"p{i}", cuboctahedron(1, (25.0 * i, 35, -50)), seed=i)
    (data / "p3.npz").write_bytes(b"not a tilt series")
    result = run_batch([str(data / "p*.npz")], tmp_path / "batch", settings=FIT, workers=2, arch="cpu", progress=False)
    rows = {row["name"]: row for row in result.rows}
    assert [rows[f"p{i}"]["status"] for i in range(4)] == ["done", "done", "done", "failed"]
    assert "p3.npz" in rows["p3"]["error"]
    summary = json.loads((tmp_path / "batch" / "batch.json").read_text())
    assert summary["counts"] == {"done": 3, "skipped": 0, "failed": 1, "not run": 0}
    assert "| p3 | failed |" in (tmp_path / "batch" / "batch.md").read_text()

    # each worker ran its CPU backend with 1 thread (2 workers on this machine's cores, or fewer);
    # CPU results do not depend on the thread count, so this process's own fits must agree bit for bit
    for i in range(3):
        alone = tmp_path / f"alone{i}"
        reconstruct(load_series(data / f"p{i}.npz"), FIT, out_dir=alone, arch="cpu", progress=False)
        batch = tmp_path / "batch" / f"p{i}"
        assert (alone / "atoms.xyz").read_bytes() == (batch / "atoms.xyz").read_bytes()
        with np.load(alone / "checkpoint.npz") as a, np.load(batch / "checkpoint.npz") as b:
            for key in ("state_pos", "state_amp", "state_sigma"):
                assert np.array_equal(a[key], b[key])

    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "batch").rglob("*") if p.is_file() and "batch." not in p.name}
    again = run_batch([str(data / "p*.npz")], tmp_path / "batch", settings=FIT, workers=1, arch="cpu", progress=False)
    assert [row["status"] for row in again.rows] == ["skipped"] * 3 + ["failed"]
    assert [row["n_atoms"] for row in again.rows[:3]] == [row["n_atoms"] for row in result.rows[:3]]
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}  # no output touched

    other = fit_series(SeriesJob("p0", str(data / "p0.npz"), str(tmp_path / "batch" / "p0"), {**FIT, "iters": 50}))
    assert other["status"] == "failed" and "other data or settings" in other["error"] and "--overwrite" in other["error"]


def time_series_truth():
    """Three states of a 55-atom Au cuboctahedron: state 1 moves two atoms and leaves a vacancy,
    state 2 moves another and adds an atom outside a facet. Returns positions and each atom's
    identity per state, the vacancy's identity and the identities moved at each step."""
    pos = cuboctahedron(2, (20, 35, -50))
    radial = np.linalg.norm(pos, axis=1)
    surface = np.flatnonzero(radial > radial.max() - 0.5)
    moved1, vacancy, moved2, anchor = surface[0], surface[3], surface[6], surface[9]
    step1 = pos.copy()
    step1[moved1] += [0.30, -0.20, 0.15]
    step1[2] += [0.0, 0.25, 0.0]
    keep = np.setdiff1d(np.arange(len(pos)), [vacancy])
    step2 = step1.copy()
    step2[moved2] += [-0.25, 0.0, 0.30]
    added = pos[anchor] * (1 + 2.88 / radial[anchor])  # one bond further out
    states = [pos, step1[keep], np.vstack([step2[keep], added])]
    return states, [np.arange(len(pos)), keep, np.append(keep, len(pos))], vacancy, [{moved1, 2}, {moved2}]


@pytest.mark.slow
def test_time_series_tracks_displacements_vacancy_and_addition(tmp_path):
    from engine.batch import run_batch
    from engine.evaluate.metrics import match_atoms
    from engine.evaluate.tracking import state_atoms

    states, identity, vacancy, moved = time_series_truth()
    files = [str(write_series(tmp_path, f"t{k}", p, seed=10 + k, tilts="-70:70:5")) for k, p in enumerate(states)]
    # in this process (workers=0: the same task function as on Dask, which the test above covers)
    result = run_batch(files, tmp_path / "series", settings={**FIT, "iters": 300}, workers=0, time_series=True,
                       arch="cpu", progress=False)
    assert [row["status"] for row in result.rows] == ["done"] * 3
    assert result.rows[0]["init"] is None and result.rows[2]["init"].endswith("t1/atoms.xyz")
    trajectory = result.trajectory
    assert trajectory == json.loads((tmp_path / "series" / "trajectory.json").read_text())
    fitted = [atoms for _, atoms in state_atoms(tmp_path / "series" / "trajectory.json")]

    def true_id(k, i):  # the true identity of fitted atom i of state k
        pairs = match_atoms(fitted[k].positions[[i]], states[k], 0.5).pairs
        assert len(pairs) == 1
        return identity[k][pairs[0, 1]]

    step1, step2 = trajectory["steps"]
    assert step1["appeared"] == [] and step2["vanished"] == []
    [gone] = step1["vanished"]
    assert true_id(0, trajectory["atoms"][gone]["index"][0]) == vacancy
    [new] = step2["appeared"]
    assert true_id(2, trajectory["atoms"][new]["index"][2]) == len(states[0])
    errors = []
    for track in trajectory["atoms"]:
        for step in track["steps"]:
            k = step["to_state"]
            now, before = track["index"][k], track["index"][k - 1]
            assert true_id(k, now) == true_id(k - 1, before)  # the identity is kept
            truth = (states[k][identity[k] == true_id(k, now)][0]
                     - states[k - 1][identity[k - 1] == true_id(k - 1, before)][0]) * 100
            error, sigma = np.array(step["displacement_pm"]) - truth, np.array(step["sigma_pm"])
            errors.append(np.linalg.norm(error) / np.linalg.norm(sigma))
    assert len(errors) == 2 * 54
    assert max(errors) <= 3.0  # every displacement within 3σ of the truth (σ of the 3D displacement)
    for k, step in ((1, step1), (2, step2)):  # the atoms that moved are found moved
        assert moved[k - 1] <= {true_id(k, trajectory["atoms"][t]["index"][k]) for t in step["moved"]}


def test_tracking_identities_appear_vanish_and_uncertainty_columns():
    from engine.evaluate.tracking import track_states

    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(4) * 2.5] * 3, indexing="ij"), -1).reshape(-1, 3)
    sigma = {c: np.full(len(grid), 0.01) for c in ("sigma_x", "sigma_y", "sigma_z")}
    first = Atoms(np.full(len(grid), "Au"), grid, sigma)
    moved = grid + rng.normal(0, 0.01, grid.shape)
    moved[5] += [0.3, 0, 0]
    order = rng.permutation(len(grid) - 1) + 1  # atom 0 vanishes, the rest shuffled
    second = Atoms(np.full(len(order) + 1, "Au"), np.vstack([moved[order], [[20.0, 0, 0]]]),
                   {c: np.full(len(order) + 1, 0.01) for c in sigma})
    trajectory = track_states([first, second], radius=1.0)
    [step] = trajectory["steps"]
    assert step["vanished"] == [0] and step["appeared"] == [len(grid)] and step["matched"] == len(grid) - 1
    assert step["sigma_source"] == "fits' per-atom uncertainties"
    assert step["moved"] == [5]
    for track in trajectory["atoms"][1:len(grid)]:
        assert np.allclose(track["positions_A"][1], moved[track["id"]])
        assert np.allclose(track["steps"][0]["sigma_pm"], np.hypot(1, 1))
    plain = track_states([Atoms(first.species, grid), Atoms(second.species, second.positions)], radius=1.0)
    assert plain["steps"][0]["sigma_source"].startswith("scatter") and plain["steps"][0]["moved"] == [5]


def test_batch_list_from_toml_and_bad_lists(tmp_path):
    from engine.batch import batch_jobs
    from engine.core.errors import InputError

    (tmp_path / "list.toml").write_text('[reconstruct]\niters = 50\nspecies = ["Au"]\n\n'
                                        '[[series]]\ndata = "a.npz"\ntruth = "a.xyz"\n\n'
                                        '[[series]]\ndata = "b/a.npz"\nname = "b"\niters = 70\n')
    jobs = batch_jobs([tmp_path / "list.toml"], tmp_path / "out", {"seed": 3})
    assert [j.name for j in jobs] == ["a", "b"]
    assert jobs[0].data == str(tmp_path / "a.npz") and jobs[0].truth == str(tmp_path / "a.xyz")
    assert jobs[1].out_dir == str(tmp_path / "out" / "b")
    assert jobs[0].settings == {"iters": 50, "species": ["Au"], "seed": 3}
    assert jobs[1].settings == {"iters": 70, "species": ["Au"], "seed": 3}
    with pytest.raises(InputError, match="matches no file"):
        batch_jobs([str(tmp_path / "none*.npz")], tmp_path / "out")
    with pytest.raises(InputError, match="distinct"):
        batch_jobs([str(tmp_path / "x.npz"), str(tmp_path / "y" / "x.npz")], tmp_path / "out")
    (tmp_path / "bad.toml").write_text("[[series]]\nfile = 'a.npz'\n")
    with pytest.raises(InputError, match="needs"):
        batch_jobs([tmp_path / "bad.toml"], tmp_path / "out")


def test_batch_command_refuses_bad_input_in_one_line(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "batch", str(tmp_path / "none*.npz"), "--out", str(out)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"atomsplat: error: {tmp_path / 'none*.npz'}: matches no file"]
    assert not out.exists()


def test_warm_start_file_is_checked_before_any_work(tmp_path):
    from engine.api import reconstruct, simulate
    from engine.core.errors import InputError

    series = simulate(Atoms(["Au"], [[0.0, 0.0, 0.0]]), "-60:60:30", 0.3, shape=(24, 24), arch="cpu")
    (tmp_path / "empty.xyz").write_text("0\n\n")
    for init, problem in ((tmp_path / "none.xyz", "none.xyz"), (tmp_path / "empty.xyz", "empty.xyz: empty structure")):
        with pytest.raises(InputError, match=problem):
            reconstruct(series, init=str(init), out_dir=tmp_path / "fit", arch="cpu", progress=False)
        assert not (tmp_path / "fit").exists()
