"""The Python API: the README's example runs as written, and a saved result is predicted by the
viewer exactly as the fit predicted it (one forward model, the atom profile saved with the result)."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # end-to-end fits and command-line runs

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_api_example() -> str:
    text = README.read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_api_example_runs(arch, tmp_path, capsys):
    if arch != "cpu":
        pytest.skip("the end-to-end fit is checked on the CPU")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        namespace = {}
        exec(compile(readme_api_example(), "README.md (Python API)", "exec"), namespace)
    finally:
        os.chdir(cwd)
    result, metrics = namespace["result"], namespace["metrics"]
    assert metrics["f1"] == 1.0 and metrics["rmsd_pm"] < 5.0
    assert len(namespace["ase_atoms"]) == len(result.atoms)
    assert (tmp_path / "out" / "api-demo" / "report.json").exists()
    assert "atoms" in capsys.readouterr().out


def test_view_predicts_exactly_what_the_fit_predicted(arch, tmp_path):
    if arch != "cpu":
        pytest.skip("checked on the CPU")
    from engine.api import reconstruct, simulate
    from engine.io.atoms import read_atoms
    from engine.physics.structures import build_structure
    from viewer.sources import SavedResult

    particle = build_structure({"kind": "cuboctahedron", "element": "Au", "shells": 1, "euler": [10.0, 20.0, 30.0]})
    series = simulate(particle, "-60:60:20", 0.3, shape=(48, 48), noise=0.01, seed=2)
    result = reconstruct(series, species=["Au"], profile="peng", iters=60, thermal_refits=0, out_dir=tmp_path,
                         progress=False)
    from engine.fit.reconstruct import Reconstruction
    from engine.fit.settings import fit_settings

    # The fit's own prediction, from its device model, for a fit resumed at its last step and finished
    # (the checkpoint holds the trained atoms; the profile correction comes after them).
    fit = Reconstruction(series, fit_settings(species=["Au"], profile="peng", iters=60, thermal_refits=0), tmp_path,
                         progress=False)
    fit.resume(tmp_path / "checkpoint.npz")
    fit.run()
    report = json.loads((tmp_path / "report.json").read_text())
    saved = SavedResult(read_atoms(tmp_path / "atoms.xyz"), "atoms", series, report=report)
    for k in (0, 3):
        fitted = fit.projection_images(k)[1]
        viewed = saved.snapshot(k).predicted
        assert np.abs(viewed - fitted).max() <= 1e-4 * np.abs(fitted).max()
    # Without the saved profile (one Gaussian per atom) the peaks come out far too high: the test
    # can tell the two apart.
    plain = SavedResult(read_atoms(tmp_path / "atoms.xyz"), "atoms", series, report={})
    assert plain.snapshot(3).predicted.max() > 1.1 * fit.projection_images(3)[1].max()
    assert len(result.atoms) == len(particle)
