"""Bad inputs and faults through the real command line (`python -m engine.cli` in a subprocess).

Every bad input must end with exit status 2 and exactly one line `atomsplat: error: ...` naming the
file or option, no traceback and nothing else on stderr (no backend line, no progress: it is refused
before any work), nothing on stdout, and no new or changed file or folder where it ran. Results are
never lost: a folder holding a fit needs --resume or --overwrite, a checkpoint is resumed only with
its own data and settings, a finished fit is not "resumed", and --overwrite leaves nothing stale.
JSON output parses from stdout alone; warnings are one line each; Ctrl-C gives one line.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # end-to-end fits and command-line runs

ROOT = Path(__file__).resolve().parents[1]
ERROR = "atomsplat: error:"
WARNING = "atomsplat: warning:"


def atomsplat(*argv, cwd, env=None, timeout=600):
    environment = {**os.environ, **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return subprocess.run([sys.executable, "-m", "engine.cli", *map(str, argv)], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=timeout)


def snapshot(folder: Path) -> dict:
    """Every file (with a hash of its bytes) and folder under ``folder``."""
    state = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        state[key] = hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else "folder"
    return state


def save_series(path, projections, angles=None, pixel_size=0.3):
    arrays = {"projections": projections, "pixel_size": pixel_size}
    if angles is not None:
        arrays["angles"] = np.asarray(angles, float)
    np.savez(path, **arrays)


SCENE = """[data]
file = "{data}"
[output]
dir = "{out}"
"""
SIMULATED_SCENE = """[data.simulate]
build = {{ kind = "cuboctahedron", element = "Au", shells = 1 }}
tilts = "-60:60:20"
pixel_size = 0.3
shape = {shape}
[output]
dir = "scene_out"
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Small input files, good and bad, made with NumPy (no fit)."""
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    images = rng.random((5, 24, 24))
    angles = np.linspace(-60, 60, 5)
    save_series(d / "small.npz", images.astype(np.float32), angles)
    nan = images.copy()
    nan[1, 2, 3] = np.nan
    save_series(d / "nan.npz", nan, angles)
    huge = images.copy()
    huge[0, 0, 0] = 1e39  # finite in float64, beyond float32
    save_series(d / "huge.npz", huge, angles)
    save_series(d / "cplx.npz", images + 1j, angles)
    save_series(d / "one.npz", images[:1], [0.0])
    save_series(d / "three.npz", images[:3], [-30.0, 0.0, 30.0])
    save_series(d / "noang.npz", images)
    save_series(d / "odd.npz", images, np.linspace(330, 470, 5))
    (d / "text.npz").write_text("these are my notes\n" * 10)
    from scipy.io import savemat

    stack = np.transpose(images, (2, 1, 0))  # MATLAB's x by y by projection
    savemat(d / "two.mat", {"raw": stack, "aligned": stack, "angles": angles, "pixel_size": 0.3})
    savemat(d / "nopixel.mat", {"aligned": stack, "angles": angles})
    (d / "atoms.xyz").write_text("3\n\nAu 0 0 0\nAu 2.9 0 0\nAu 0 2.9 0\n")
    (d / "short.xyz").write_text("2\n\nAu 0 0 0\nAu 2.9 0 0\nAu 0 2.9 0\n")  # the count line says 2
    (d / "afile.txt").write_text("not a folder\n")
    (d / "good.toml").write_text(SCENE.format(data="small.npz", out="scene_out"))
    (d / "missingdata.toml").write_text(SCENE.format(data="missing.npz", out="scene_out"))
    (d / "badsetting.toml").write_text(SCENE.format(data="small.npz", out="scene_out") + "[reconstruct]\nbatch = -3\n")
    (d / "shape64.toml").write_text(SIMULATED_SCENE.format(shape="[64]"))
    (d / "shapeab.toml").write_text(SIMULATED_SCENE.format(shape='["a", "b"]'))
    (d / "fitscene.toml").write_text(SCENE.format(data="sim.npz", out="fit"))
    return d


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A real (tiny) fit: sim.npz and other.npz simulated, sim.npz fitted into fit/ with a truth."""
    d = tmp_path_factory.mktemp("fitted")
    for name, element, tilts in (("sim", "Au", "-60:60:20"), ("other", "Pt", "-60:60:30")):
        r = atomsplat("simulate", "--build", f"cuboctahedron element={element} shells=1", f"--tilts={tilts}",
                      "--shape", 32, 32, "--noise", 0.01, "--out", f"{name}.npz", "--arch", "cpu", cwd=d)
        assert r.returncode == 0, r.stderr
    r = atomsplat("reconstruct", "sim.npz", "--out", "fit", "--iters", 20, "--thermal-refits", 0, "--truth",
                  "sim_truth.xyz", "--quiet", "--arch", "cpu", cwd=d)
    assert r.returncode == 0, r.stderr
    assert {"atoms.xyz", "report.json", "checkpoint.npz", "metrics.json"} <= {p.name for p in (d / "fit").iterdir()}
    return d


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    """A folder nothing can be written in: read-only permissions, or (as root, whom permissions do
    not stop) a folder of a special file system."""
    if os.geteuid() != 0:
        d = tmp_path_factory.mktemp("locked")
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    for candidate in (Path("/sys"), Path("/proc")):
        try:
            (candidate / ".atomsplat-test").touch()
        except OSError:
            yield candidate
            return
        (candidate / ".atomsplat-test").unlink()
    pytest.skip("no unwritable folder to test with (running as root)")


def checkpoint_only(d):
    (d / "ck").mkdir()
    shutil.copy(d / "fit" / "checkpoint.npz", d / "ck")


def truncated_checkpoint(d):
    (d / "ck").mkdir()
    (d / "ck" / "checkpoint.npz").write_bytes((d / "fit" / "checkpoint.npz").read_bytes()[:3000])


SETUPS = {"checkpoint only": checkpoint_only, "truncated checkpoint": truncated_checkpoint,
          "empty folder": lambda d: (d / "empty").mkdir()}
BUILD = ["--build", "cuboctahedron element=Au shells=1"]

# (id, argv, words the error line must hold, what the case needs: "fit" (a finished fit), a SETUPS
# entry, "locked" (an unwritable folder, as {locked}), env)
CASES = [
    # results lost or silently replaced
    ("resume-finished-with-other-data", ["reconstruct", "other.npz", "--resume", "fit"], ["fit", "finished"], "fit"),
    ("resume-finished", ["reconstruct", "sim.npz", "--resume", "fit"], ["fit", "finished"], "fit"),
    ("resume-other-data", ["reconstruct", "other.npz", "--resume", "ck"],
     ["checkpoint.npz", "other data", "sim.npz", "other.npz"], "checkpoint only"),
    ("resume-other-settings", ["reconstruct", "sim.npz", "--resume", "ck", "--iters", "25"],
     ["checkpoint.npz", "iters 20 there, 25 here"], "checkpoint only"),
    ("new-fit-over-checkpoint", ["reconstruct", "sim.npz", "--out", "ck"], ["ck", "--overwrite", "--resume"],
     "checkpoint only"),
    ("new-fit-over-result", ["reconstruct", "sim.npz", "--out", "fit"], ["fit", "--overwrite"], "fit"),
    ("run-over-result", ["run", "fitscene.toml"], ["fit", "--overwrite"], "fit"),
    ("baseline-over-result", ["baseline", "sim.npz", "--out", "fit"], ["fit", "--overwrite"], "fit"),
    ("resume-without-checkpoint", ["reconstruct", "small.npz", "--resume", "empty"], ["empty", "checkpoint.npz"],
     "empty folder"),
    ("resume-truncated-checkpoint", ["reconstruct", "sim.npz", "--resume", "ck"], ["checkpoint.npz", "truncated"],
     "truncated checkpoint"),
    ("resume-and-other-out", ["reconstruct", "sim.npz", "--resume", "ck", "--out", "elsewhere"], ["--out"],
     "checkpoint only"),
    # unwritable outputs
    ("reconstruct-unwritable", ["reconstruct", "small.npz", "--out", "{locked}/out"], ["{locked}", "cannot write"],
     "locked"),
    ("simulate-unwritable", ["simulate", *BUILD, "--out", "{locked}/s.npz"], ["{locked}", "cannot write"], "locked"),
    ("view-unwritable", ["view", "atoms.xyz", "--out", "{locked}/v.png"], ["{locked}", "cannot write"], "locked"),
    ("mesh-unwritable", ["view", "atoms.xyz", "--mesh", "{locked}/m.glb"], ["{locked}", "cannot write"], "locked"),
    ("baseline-unwritable", ["baseline", "small.npz", "--out", "{locked}/b"], ["{locked}", "cannot write"], "locked"),
    ("run-unwritable", ["run", "good.toml", "--out", "{locked}/r"], ["{locked}", "cannot write"], "locked"),
    ("movie-unwritable", ["reconstruct", "small.npz", "--movie", "{locked}/fit.gif"], ["{locked}", "cannot write"],
     "locked"),
    # --out naming an existing file
    ("reconstruct-out-is-file", ["reconstruct", "small.npz", "--out", "afile.txt"], ["afile.txt", "is a file"]),
    ("baseline-out-is-file", ["baseline", "small.npz", "--out", "afile.txt"], ["afile.txt", "is a file"]),
    ("run-out-is-file", ["run", "good.toml", "--out", "afile.txt"], ["afile.txt", "is a file"]),
    ("simulate-out-exists", ["simulate", *BUILD, "--out", "small.npz"], ["small.npz", "--overwrite"]),
    ("simulate-out-unknown-type", ["simulate", *BUILD, "--out", "series.txt"], ["--out", ".npz"]),
    ("view-out-is-folder", ["view", "atoms.xyz", "--out", "."], ["is a folder"]),
    # simulation sizes and values, checked before anything is allocated
    ("simulate-tilts-nan", ["simulate", *BUILD, "--tilts=nan:70:2", "--out", "s.npz"], ["--tilts", "finite"]),
    ("simulate-tilts-too-many", ["simulate", *BUILD, "--tilts=-1e9:1e9:0.001", "--out", "s.npz"],
     ["--tilts", "projections"]),
    ("simulate-shape-zero", ["simulate", *BUILD, "--shape", "0", "0", "--out", "s.npz"], ["--shape", "0 x 0"]),
    ("simulate-shape-negative", ["simulate", *BUILD, "--shape", "-5", "-5", "--out", "s.npz"], ["--shape", "-5"]),
    ("simulate-shape-huge", ["simulate", *BUILD, "--shape", "100000", "100000", "--out", "s.npz"],
     ["--shape", "memory"]),
    ("simulate-build-huge", ["simulate", "--build", "octahedron element=Au length=1000 cutoff=2", "--out", "s.npz"],
     ["--build", "length=1000", "memory"]),
    ("simulate-seed-negative", ["simulate", *BUILD, "--seed", "-1", "--out", "s.npz"], ["--seed"]),
    ("simulate-pixel-zero", ["simulate", *BUILD, "--pixel", "0", "--out", "s.npz"], ["--pixel"]),
    ("simulate-noise-negative", ["simulate", *BUILD, "--noise", "-1", "--out", "s.npz"], ["--noise"]),
    ("scene-shape-one-number", ["run", "shape64.toml"], ["shape64.toml", "data.simulate.shape"]),
    ("scene-shape-strings", ["run", "shapeab.toml"], ["shapeab.toml", "data.simulate.shape"]),
    # settings
    ("reconstruct-seed-negative", ["reconstruct", "small.npz", "--seed", "-1"], ["--seed"]),
    ("reconstruct-batch-negative", ["reconstruct", "small.npz", "--batch", "-3"], ["--batch"]),
    ("composition-short", ["reconstruct", "small.npz", "--composition", "Au:0.5"], ["--composition"]),
    ("composition-negative", ["reconstruct", "small.npz", "--composition", "Au:-1"], ["--composition"]),
    ("composition-over-one", ["reconstruct", "small.npz", "--composition", "Au:0.5,Pt:0.9"], ["--composition"]),
    ("composition-negative-pair", ["reconstruct", "small.npz", "--composition", "Au:-1,Pt:2"], ["--composition"]),
    ("gain-negative", ["reconstruct", "small.npz", "--noise", "poisson", "--gain", "-1"], ["--gain"]),
    ("baseline-voxel-negative", ["baseline", "small.npz", "--voxel", "-1"], ["--voxel"]),
    ("baseline-voxel-tiny", ["baseline", "small.npz", "--voxel", "0.001"], ["--voxel", "memory"]),
    ("baseline-iters-zero", ["baseline", "small.npz", "--iters", "0"], ["--iters"]),
    ("threads-not-a-number", ["reconstruct", "small.npz"], ["ATOMSPLAT_THREADS", "abc"], None,
     {"ATOMSPLAT_THREADS": "abc"}),
    ("threads-zero", ["reconstruct", "small.npz"], ["ATOMSPLAT_THREADS"], None, {"ATOMSPLAT_THREADS": "0"}),
    ("evaluate-radius-negative", ["evaluate", "atoms.xyz", "atoms.xyz", "--radius", "-1"], ["--radius"]),
    ("view-camera-nan", ["view", "atoms.xyz", "--camera", "nan", "0", "--out", "v.png"], ["--camera"]),
    ("view-out-unknown-type", ["view", "atoms.xyz", "--out", "v.bmp"], ["v.bmp", ".jpg"]),
    ("view-mesh-unknown-type", ["view", "atoms.xyz", "--mesh", "m.obj"], ["m.obj", ".glb"]),
    ("view-tilt-without-data", ["view", "atoms.xyz", "--tilt", "3", "--out", "v.png"], ["--tilt"]),
    ("plan-without-dose", ["plan", "atoms.xyz", "--tilts=-60:60:5", "--pixel", "0.3"], ["--counts-per-atom"]),
    ("plan-bad-target", ["plan", "atoms.xyz", "--like", "small.npz", "--target", "ten"], ["--target", "10pm"]),
    ("plan-like-and-tilts", ["plan", "atoms.xyz", "--like", "small.npz", "--tilts=-60:60:5"], ["--like", "--tilts"]),
    ("plan-structure-missing", ["plan", "nothing.xyz", "--like", "small.npz"], ["nothing.xyz", "not found"]),
    # every input checked before any work
    ("truth-invalid", ["reconstruct", "small.npz", "--truth", "short.xyz"], ["short.xyz", "count line"]),
    ("truth-missing", ["reconstruct", "small.npz", "--truth", "nothing.xyz"], ["nothing.xyz", "not found"]),
    ("baseline-truth-invalid", ["baseline", "small.npz", "--truth", "short.xyz"], ["short.xyz"]),
    ("run-data-missing", ["run", "missingdata.toml"], ["missing.npz", "not found"]),
    ("run-bad-scene-setting", ["run", "badsetting.toml"], ["badsetting.toml", "reconstruct.batch"]),
    ("run-bad-flag", ["run", "good.toml", "--batch", "-3"], ["--batch"]),
    # files read as something they are not
    ("xyz-count-line-short", ["evaluate", "short.xyz", "atoms.xyz"], ["short.xyz", "count line"]),
    ("complex-projections", ["reconstruct", "cplx.npz"], ["cplx.npz", "complex"]),
    ("one-projection", ["reconstruct", "one.npz"], ["one.npz", "1 projection"]),
    ("baseline-one-projection", ["baseline", "one.npz"], ["one.npz", "1 projection"]),
    ("beyond-float32", ["info", "huge.npz"], ["huge.npz", "1e+39"]),
    ("text-named-npz", ["info", "text.npz"], ["text.npz", "not an .npz archive"]),
    ("no-angles", ["info", "noang.npz"], ["noang.npz", "--angles FILE"]),
    ("angles-file-missing", ["reconstruct", "noang.npz", "--angles", "nothing.tlt"], ["nothing.tlt", "not found"]),
    ("nan-pixels", ["reconstruct", "nan.npz"], ["nan.npz", "NaN"]),
    # MATLAB files: what is ambiguous or missing names the option that settles it
    ("mat-two-stacks", ["info", "two.mat"], ["two.mat", "2 3D numeric arrays", "--mat-key"]),
    ("mat-key-missing", ["reconstruct", "two.mat", "--mat-key", "tomo"], ["--mat-key", "'tomo'", "raw"]),
    ("mat-key-on-npz", ["baseline", "small.npz", "--mat-key", "raw"], ["--mat-key", "small.npz"]),
    ("mat-bad-layout", ["reconstruct", "two.mat", "--mat-key", "raw", "--layout", "xyz"], ["--layout", "'xyz'"]),
    ("mat-no-pixel", ["info", "nopixel.mat"], ["nopixel.mat", "--pixel"]),
    # half-set validation
    ("validate-radius-negative", ["validate", "small.npz", "--radius", "-1"], ["--radius"]),
    ("validate-halves-too-small", ["validate", "three.npz"], ["three.npz", "odd half", "1 projection"]),
    ("validate-bad-setting", ["validate", "small.npz", "--batch", "-3"], ["--batch"]),
    ("validate-truth-invalid", ["validate", "small.npz", "--truth", "short.xyz"], ["short.xyz", "count line"]),
]


def _case(entry):
    name, argv, words, needs, env = (list(entry) + [None, None])[:5]
    return pytest.param(argv, words, needs, env, id=name)


@pytest.mark.parametrize("argv, words, needs, env", [_case(c) for c in CASES])
def test_bad_input_gives_one_line_and_changes_nothing(argv, words, needs, env, inputs, request, tmp_path):
    for path in inputs.iterdir():
        shutil.copy(path, tmp_path)
    substitutions = {}
    if needs is not None and needs != "locked":
        fitted = request.getfixturevalue("fitted")
        for name in ("sim.npz", "other.npz", "sim_truth.xyz"):
            shutil.copy(fitted / name, tmp_path)
        shutil.copytree(fitted / "fit", tmp_path / "fit")
        if needs in SETUPS:
            SETUPS[needs](tmp_path)
    if needs == "locked":
        substitutions["locked"] = request.getfixturevalue("locked")
    argv = [a.format(**substitutions) for a in argv]
    words = [w.format(**substitutions) for w in words]
    before = snapshot(tmp_path)
    result = atomsplat(*argv, cwd=tmp_path, env=env)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(ERROR)]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1, result.stderr
    assert [line for line in lines if not line.startswith((ERROR, WARNING))] == [], result.stderr
    for word in words:
        assert word in errors[0], errors[0]
    assert result.stdout == ""
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------- what works


def test_json_output_parses_from_stdout_alone(inputs, tmp_path):
    for path in inputs.iterdir():
        shutil.copy(path, tmp_path)
    for name in ("small.npz", "odd.npz", "nan.npz"):  # odd.npz warns, nan.npz has a NaN
        result = atomsplat("info", name, "--json", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["n_tilts"] == 5
    assert json.loads(atomsplat("info", "nan.npz", "--json", cwd=tmp_path).stdout)["nan_count"] == 1
    result = atomsplat("evaluate", "atoms.xyz", "atoms.xyz", "--json", cwd=tmp_path)
    assert result.returncode == 0 and json.loads(result.stdout)["f1"] == 1.0


def test_warnings_are_one_line_each(inputs, tmp_path):
    shutil.copy(inputs / "odd.npz", tmp_path)
    result = atomsplat("info", "odd.npz", cwd=tmp_path)
    assert result.returncode == 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(WARNING) and "330..470" in lines[0], result.stderr
    assert "NaN pixels" in result.stdout


def test_info_counts_nan_pixels(inputs, tmp_path):
    # The README promises info shows the NaN count: it must read such a file, not refuse it.
    shutil.copy(inputs / "nan.npz", tmp_path)
    result = atomsplat("info", "nan.npz", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "NaN pixels      1" in result.stdout


def test_resume_takes_the_checkpoint_settings_and_overwrite_leaves_nothing_stale(fitted, tmp_path):
    for name in ("sim.npz", "other.npz", "sim_truth.xyz"):
        shutil.copy(fitted / name, tmp_path)
    shutil.copytree(fitted / "fit", tmp_path / "fit")
    checkpoint_only(tmp_path)
    # An interrupted fit (here: stopped after its last step, before its outputs) is resumed with no
    # settings given: they come from the checkpoint (20 iterations, not the default 800).
    result = atomsplat("reconstruct", "sim.npz", "--resume", "ck", "--quiet", "--arch", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "ck" / "report.json").read_text())["iterations"] == 20
    assert (tmp_path / "ck" / "atoms.xyz").read_bytes() == (fitted / "fit" / "atoms.xyz").read_bytes()
    # --overwrite with other data and no truth: the old metrics.json, frames and movie go; a file of
    # the user's stays.
    fit = tmp_path / "fit"
    (fit / "frames").mkdir()
    (fit / "frames" / "frame_000010.png").write_bytes(b"old frame")
    (fit / "fit.gif").write_bytes(b"old movie")
    (fit / "notes.txt").write_text("mine\n")
    result = atomsplat("reconstruct", "other.npz", "--out", "fit", "--overwrite", "--iters", 20, "--thermal-refits", 0,
                       "--quiet", "--arch", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    names = {str(p.relative_to(fit)) for p in fit.rglob("*") if p.is_file()}
    assert names == {"atoms.xyz", "report.json", "projections.png", "loss.png", "checkpoint.npz", "notes.txt"}
    assert json.loads((fit / "report.json").read_text())["source"] == "other.npz"


def test_ctrl_c_gives_one_line_and_a_checkpoint(fitted, tmp_path):
    shutil.copy(fitted / "sim.npz", tmp_path)
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "engine.cli", "reconstruct", "sim.npz", "--out", "x", "--iters",
                                "100000", "--checkpoint-every", "5", "--quiet", "--arch", "cpu"], cwd=tmp_path,
                               env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (tmp_path / "x" / "checkpoint.npz").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("[Taichi]")]
    assert len(lines) == 1 and lines[0].startswith("atomsplat: interrupted; checkpoint in"), stderr
    assert "--resume x" in lines[0] and "Traceback" not in stderr


def test_view_writes_a_real_jpeg(inputs, tmp_path):
    shutil.copy(inputs / "atoms.xyz", tmp_path)
    result = atomsplat("view", "atoms.xyz", "--out", "v.jpg", "--arch", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "v.jpg").read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG, not PNG bytes


def test_baseline_without_atoms_names_the_data(inputs, tmp_path, monkeypatch, capsys):
    # Tracing that finds no peaks reports the data file, not "volume" (in-process: no real series
    # makes the tracer come back empty on demand).
    import engine.classical.baseline as baseline
    from engine.cli import main
    from engine.core.errors import InputError

    def no_peaks(*args, **kwargs):
        raise InputError("volume", "no peaks in the reconstructed volume")

    monkeypatch.setattr(baseline, "run_baseline", no_peaks)
    monkeypatch.chdir(tmp_path)
    shutil.copy(inputs / "small.npz", tmp_path)
    assert main(["baseline", "small.npz", "--arch", "cpu"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith(ERROR)]
    assert errors == [f"{ERROR} small.npz: no atoms traced: no peaks in the reconstructed volume"]


def test_simulate_overwrite_leaves_no_stale_companions(inputs, tmp_path):
    shutil.copy(inputs / "atoms.xyz", tmp_path / "s_truth.xyz")  # the input structure, named like a truth
    (tmp_path / "s_alignment.json").write_text("{}")  # an earlier --misalign run's truth
    (tmp_path / "s_alignment.xf").write_text("")
    (tmp_path / "s.npz").write_bytes(b"old")
    result = atomsplat("simulate", "s_truth.xyz", "--tilts=-60:60:30", "--out", "s.npz", "--overwrite", "--arch", "cpu",
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz", "s_truth.xyz"]
