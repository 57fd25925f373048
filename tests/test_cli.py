"""The command line: simulate → info round trip, scenes, and clean errors (no tracebacks)."""

import json

import numpy as np
import pytest

from engine.cli import main
from engine.scene import load_scene


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_simulate_builder_then_info(arch, tmp_path, capsys):
    out = tmp_path / "series.npz"
    code, stdout, _ = run_cli(capsys, "simulate", "--build", "cuboctahedron element=Au shells=2", "--tilts=-60:60:30",
                              "--pixel", "0.3", "--shape", "48", "40", "--noise", "0.01", "--out", str(out),
                              "--arch", arch)
    assert code == 0 and out.exists() and (tmp_path / "series_truth.xyz").exists()
    code, stdout, _ = run_cli(capsys, "info", str(out), "--json")
    summary = json.loads(stdout)
    assert code == 0 and summary["n_tilts"] == 5 and (summary["height"], summary["width"]) == (48, 40)
    assert summary["missing_wedge_deg"] == 60
    # Existing output is never overwritten without --overwrite.
    before = out.read_bytes()
    code, _, err = run_cli(capsys, "simulate", "--build", "cuboctahedron element=Au shells=1", "--out", str(out),
                           "--arch", arch)
    assert code == 2 and "exists" in err and "Traceback" not in err
    assert out.read_bytes() == before


def test_simulate_structure_file_with_auto_shape(arch, tmp_path, capsys):
    xyz = tmp_path / "pair.xyz"
    xyz.write_text("2\n\nAu 0 0 0\nNi 2.5 0.5 -1\n")
    out = tmp_path / "pair.mrc"
    code, _, _ = run_cli(capsys, "simulate", str(xyz), "--tilts=-30:30:30", "--out", str(out), "--arch", arch)
    assert code == 0 and out.exists() and out.with_suffix(".tlt").exists()
    code, stdout, _ = run_cli(capsys, "info", str(out), "--json")
    summary = json.loads(stdout)
    # Half-width ≥ the farthest atom's distance from the tilt axis + 6 Å.
    assert summary["width"] * 0.3 / 2 >= np.hypot(2.5, 1.0) + 6.0


@pytest.mark.parametrize("argv, words", [
    (["info", "missing.npz"], ["missing.npz", "not found"]),
    (["simulate", "nothing.xyz", "--out", "x.npz"], ["nothing.xyz"]),
    (["simulate", "--build", "octahedron element=Qq length=3", "--out", "x.npz"], ["Qq"]),
    (["simulate", "--build", "octahedron element=Au length=3", "--tilts", "5:1:1", "--out", "x.npz"], ["--tilts"]),
])
def test_bad_input_gives_one_clear_line(tmp_path, capsys, monkeypatch, argv, words):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("atomsplat: error:") and "Traceback" not in err
    for word in words:
        assert word in err


def test_scene_files_in_repo_are_valid():
    from pathlib import Path

    scenes = sorted((Path(__file__).resolve().parents[1] / "scenes").glob("*.toml"))
    assert {p.stem for p in scenes} >= {"demo", "dev_au_cubo_small", "dev_ptni_wedge"}
    for path in scenes:
        scene = load_scene(path)
        assert (scene.simulate is not None) or scene.data_file.name.endswith(".npz")


def test_scene_errors_name_file_and_key(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[data]\nfile = "x.npz"\ncolour = "red"\n')
    code, _, err = run_cli(capsys, "run", str(bad))
    assert code == 2 and "bad.toml" in err and "data.colour" in err
    bad.write_text('[data]\nfile = "x.npz"\n[data.simulate]\ntilts = "-60:60:3"\n')
    code, _, err = run_cli(capsys, "run", str(bad))
    assert code == 2 and "exactly one" in err
    bad.write_text("[data\n")
    code, _, err = run_cli(capsys, "run", str(bad))
    assert code == 2 and "cannot read" in err


def test_reconstruct_and_evaluate_from_the_command_line(arch, tmp_path, capsys):
    if arch != "cpu":
        pytest.skip("the end-to-end fit is checked on the CPU")
    series = tmp_path / "p.npz"
    code, _, _ = run_cli(capsys, "simulate", "--build", "cuboctahedron element=Pt shells=1", "--tilts=-60:60:10",
                         "--shape", "40", "40", "--noise", "0.01", "--out", str(series), "--arch", arch)
    assert code == 0
    out = tmp_path / "fit"
    code, stdout, err = run_cli(capsys, "reconstruct", str(series), "--out", str(out), "--iters", "300",
                                "--species", "Pt", "--truth", str(tmp_path / "p_truth.xyz"), "--quiet", "--arch", arch)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["f1"] == 1.0 and metrics["n_true"] == 13
    report = json.loads((out / "report.json").read_text())
    assert report["n_atoms"] == 13 and report["arch"] == arch
    # Stopped by the convergence rule well before the --iters cap, and says so.
    assert report["stopped"]["reason"] == "converged" and report["iterations"] < 300, report["stopped"]
    code, stdout, _ = run_cli(capsys, "evaluate", str(out / "atoms.xyz"), str(tmp_path / "p_truth.xyz"), "--json")
    assert code == 0 and json.loads(stdout)["f1"] == 1.0
    # A finished result is not replaced without --overwrite; --resume needs a checkpoint.
    before = (out / "atoms.xyz").read_bytes()
    code, _, err = run_cli(capsys, "reconstruct", str(series), "--out", str(out), "--arch", arch)
    assert code == 2 and "--overwrite" in err and (out / "atoms.xyz").read_bytes() == before
    code, _, err = run_cli(capsys, "reconstruct", str(series), "--resume", str(tmp_path), "--arch", arch)
    assert code == 2 and "checkpoint" in err


def test_auto_backend_skips_vulkan_without_a_gpu(monkeypatch):
    # Software Vulkan (lavapipe) is far slower than the CPU backend: 'auto' must not pick it.
    import engine.core.backend as backend

    monkeypatch.setattr(backend.sys, "platform", "linux")
    monkeypatch.setattr(backend.glob, "glob", lambda pattern: [])
    assert not backend._gpu_present()
    monkeypatch.setattr(backend.glob, "glob", lambda pattern: ["/dev/dri/renderD128"] if "dri" in pattern else [])
    assert backend._gpu_present()


def test_a_reader_that_leaves_early_gets_no_error(tmp_path):
    # `atomsplat evaluate ... --json | head -c 1`: the reader closes the pipe before the output is
    # written; the command must not print an error or a traceback about it.
    import subprocess
    import sys

    from engine.io.atoms import Atoms, write_atoms

    atoms = Atoms(np.array(["Au", "Au"]), np.array([[0.0, 0, 0], [3.0, 0, 0]]))
    write_atoms(atoms, tmp_path / "a.xyz")
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "evaluate", str(tmp_path / "a.xyz"),
                             str(tmp_path / "a.xyz"), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait()
    assert "error" not in err and "Traceback" not in err, err
