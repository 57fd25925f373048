"""Scene files: one TOML file describes a run (data, reconstruction settings, output, viewer).

    [data]                       # either a file ...
    file = "series.npz"          # paths are relative to the scene file
    truth = "truth.xyz"          # optional ground truth, used only for evaluation
    pixel_size = 0.3             # Å, for MRC/TIFF stacks without one in the header
    angles = "series.tlt"        # optional: tilt angles, one per line (else from the file or STEM.tlt);
                                 # for a .mat file also the name of a variable in it
    mat_key = "projections"      # optional, .mat: the variable holding the projections
    layout = "xyk"               # optional: the stored axis order (see `atomsplat reconstruct --layout`)

    [data.simulate]              # ... or a structure simulated on the fly
    build = { kind = "cuboctahedron", element = "Au", shells = 3 }   # or structure = "atoms.xyz"
    tilts = "-70:70:3"           # degrees, START:STOP:STEP
    pixel_size = 0.3             # Å
    shape = [96, 96]             # H W, pixels
    blur = 0.4                   # Å
    noise = 0.02                 # fraction of the clean maximum
    seed = 0
    misalign = [2.0, 0.5, 1.0, 0.05]   # optional: shifts (px), tilt-angle errors (deg), axis angle (deg),
                                       # intensity drift, as `atomsplat simulate --misalign`

    [reconstruct]                # the fit's settings (engine.fit.settings), e.g. species = ["Au"]
    [output]
    dir = "out/demo"             # relative to the scene file
    [viewer]                     # see viewer.cli; --view/--no-view and --view-every override
    view = false                 # watch the fit live (headless frames without a display)
    every = 100                  # iterations between frames

Unknown sections or keys are an error naming the scene file and the key.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from engine.core.errors import InputError

SIMULATE_KEYS = {"build": dict, "structure": str, "tilts": str, "pixel_size": (int, float),
                 "shape": list, "blur": (int, float), "noise": (int, float), "peak_counts": (int, float),
                 "b_factor": (int, float), "seed": int, "misalign": list}
DATA_KEYS = {"file": str, "truth": str, "pixel_size": (int, float), "angles": str, "mat_key": str, "layout": str,
             "simulate": dict}
SECTIONS = {"data": DATA_KEYS, "reconstruct": None, "output": {"dir": str}, "viewer": {"view": bool, "every": int}}


@dataclass
class Scene:
    """A parsed scene: every path absolute, every key checked."""

    path: Path
    data_file: Path | None = None
    truth_file: Path | None = None
    pixel_size: float | None = None
    angles_file: Path | str | None = None
    mat_key: str | None = None
    layout: str | None = None
    simulate: dict | None = None
    reconstruct: dict = field(default_factory=dict)
    output_dir: Path | None = None
    viewer: dict = field(default_factory=dict)


def _check(table: dict, schema: dict, where: str, path: Path) -> None:
    for key, value in table.items():
        if key not in schema:
            raise InputError(path, f"unknown key '{where}{key}' (known in [{where.rstrip('.') or 'top'}]: "
                                   f"{', '.join(sorted(schema))})")
        if schema[key] is not None and not isinstance(value, schema[key]):
            raise InputError(path, f"'{where}{key}' has the wrong type ({type(value).__name__})")


def load_scene(path) -> Scene:
    """Read and validate a scene file; [reconstruct] takes the fit's settings (`engine.fit.settings`)."""
    from engine.core.settings import SettingError
    from engine.fit.settings import fit_settings

    path = Path(path)
    try:
        with open(path, "rb") as fh:
            table = tomllib.load(fh)
    except FileNotFoundError:
        raise InputError(path, "scene file not found") from None
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise InputError(path, f"cannot read the scene: {err}") from err
    _check(table, {section: dict for section in SECTIONS}, "", path)
    data = table.get("data", {})
    _check(data, DATA_KEYS, "data.", path)
    try:
        fit_settings(table.get("reconstruct", {}))
    except SettingError as err:
        raise InputError(path, f"'reconstruct.{err.setting}': {err.problem}") from None
    _check(table.get("output", {}), SECTIONS["output"], "output.", path)
    _check(table.get("viewer", {}), SECTIONS["viewer"], "viewer.", path)
    if ("file" in data) == ("simulate" in data):
        raise InputError(path, "[data] needs exactly one of 'file' or a [data.simulate] table")
    base = path.resolve().parent

    def resolve(relative) -> Path:
        return Path(os.path.normpath(base / relative))

    scene = Scene(path=path, reconstruct=dict(table.get("reconstruct", {})), viewer=dict(table.get("viewer", {})))
    if "file" in data:
        scene.data_file = resolve(data["file"])
        scene.pixel_size = data.get("pixel_size")
        scene.mat_key, scene.layout = data.get("mat_key"), data.get("layout")
        if "angles" in data:
            scene.angles_file = resolve(data["angles"])
            if scene.data_file.suffix.lower() == ".mat" and not scene.angles_file.exists():
                scene.angles_file = data["angles"]  # a variable of the .mat
    else:
        simulate = dict(data["simulate"])
        _check(simulate, SIMULATE_KEYS, "data.simulate.", path)
        if ("build" in simulate) == ("structure" in simulate):
            raise InputError(path, "[data.simulate] needs exactly one of 'build' or 'structure'")
        for key in ("tilts", "pixel_size"):
            if key not in simulate:
                raise InputError(path, f"[data.simulate] needs '{key}'")
        for key in ("angles", "mat_key", "layout"):
            if key in data:
                raise InputError(path, f"'data.{key}' goes with 'data.file'; a simulation takes 'tilts'")
        if "shape" in simulate:
            from engine.physics.simulate import check_image_shape

            simulate["shape"] = check_image_shape(simulate["shape"], f"{path}: data.simulate.shape")
        if "structure" in simulate:
            simulate["structure"] = resolve(simulate["structure"])
        scene.simulate = simulate
    if "truth" in data:
        scene.truth_file = resolve(data["truth"])
    out = table.get("output", {}).get("dir")
    scene.output_dir = resolve(out) if out else None
    return scene
