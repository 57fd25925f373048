"""The `atomsplat` command line: simulate, info and run (more subcommands land with their engines).

Every bad input ends in one line `atomsplat: error: FILE: problem` and exit status 2, never a
traceback; Ctrl-C ends with status 130.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .backend import ARCH_CHOICES, init_backend
from .errors import InputError


def _add_arch(parser):
    parser.add_argument("--arch", choices=ARCH_CHOICES, default="auto",
                        help="Taichi backend; auto tries cuda, then vulkan, then cpu (default: auto)")


def auto_shape(atoms, pixel_size: float, margin: float = 6.0) -> tuple[int, int]:
    """Square image (H, W) whose half-width exceeds every atom's distance from the tilt axis (and
    |y|) by ``margin`` Å, so the particle stays inside at every tilt."""
    p = atoms.positions
    reach = max(np.sqrt(p[:, 0] ** 2 + p[:, 2] ** 2).max(), np.abs(p[:, 1]).max()) + margin
    n = int(2 * np.ceil(reach / pixel_size))
    return n, n


def _simulate_from(structure_path, build, tilts, pixel_size, shape, blur, noise, peak_counts, b_factor, seed,
                   arch):
    """Returns (atoms, series) for a structure file or a builder recipe. Inputs are read and checked
    before the backend starts, so bad input fails fast."""
    from .atoms import read_atoms
    from .simulate import parse_tilt_range, simulate_tilt_series
    from .structures import build_structure, parse_recipe

    if structure_path is not None:
        atoms = read_atoms(structure_path)
        label = str(structure_path)
    else:
        recipe = parse_recipe(build) if isinstance(build, str) else build
        atoms = build_structure(recipe, seed=seed)
        label = " ".join(f"{k}={v}" for k, v in recipe.items())
    angles = parse_tilt_range(tilts) if isinstance(tilts, str) else np.asarray(tilts, float)
    if shape is None:
        shape = auto_shape(atoms, pixel_size)
    init_backend(arch, verbose=True)
    series = simulate_tilt_series(atoms, angles, pixel_size, shape, blur_sigma=blur, b_factor=b_factor,
                                  noise=noise, peak_counts=peak_counts, seed=seed,
                                  description=f"atomsplat simulate: {label}; {len(atoms)} atoms; "
                                              f"tilts {tilts} deg; pixel {pixel_size} A; blur {blur} A; "
                                              f"noise {noise}; seed {seed}")
    return atoms, series


def cmd_simulate(args) -> int:
    from .atoms import write_atoms
    from .tiltseries import write_tilt_series

    if (args.structure is None) == (args.build is None):
        raise InputError("simulate", "give a STRUCTURE file or --build RECIPE (exactly one)")
    atoms, series = _simulate_from(args.structure, args.build, args.tilts, args.pixel,
                                   tuple(args.shape) if args.shape else None, args.blur, args.noise,
                                   args.peak_counts, args.b_factor, args.seed, args.arch)
    out = Path(args.out)
    truth = out.with_name(out.stem + "_truth.xyz")
    if args.build is not None and truth.exists() and not args.overwrite:
        raise InputError(truth, "already exists; pass --overwrite to replace it")
    write_tilt_series(series, out, overwrite=args.overwrite)
    if args.build is not None:
        write_atoms(atoms, truth, overwrite=args.overwrite)
        print(f"wrote {truth} ({len(atoms)} atoms)")
    print(f"wrote {out}: {series.n_tilts} projections of {series.shape[0]}x{series.shape[1]} px, "
          f"pixel {series.pixel_size} A")
    return 0


def cmd_info(args) -> int:
    from .tiltseries import read_tilt_series, summarize

    series = read_tilt_series(args.file, pixel_size=args.pixel)
    summary = summarize(series)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    s = summary
    print(f"file            {s['source']}")
    print(f"projections     {s['n_tilts']} of {s['height']} x {s['width']} px")
    step = "n/a" if s["angle_step"] is None else f"{s['angle_step']:g}"
    print(f"tilt angles     {s['angle_min']:g} .. {s['angle_max']:g} deg, step {step} deg")
    if s["missing_wedge_deg"] is not None:
        print(f"missing wedge   {s['missing_wedge_deg']:g} deg")
    print(f"pixel size      {s['pixel_size']:g} A  (field of view {s['field_of_view_A'][1]:.1f} x "
          f"{s['field_of_view_A'][0]:.1f} A)")
    print(f"intensity       min {s['intensity_min']:.4g}, max {s['intensity_max']:.4g}, "
          f"mean {s['intensity_mean']:.4g}")
    print(f"NaN pixels      {s['nan_count']}")
    if s["noise_sigma"] is not None:
        print(f"noise sigma     {s['noise_sigma']:.4g} (from file)")
    if s["blur_sigma"] is not None:
        print(f"blur sigma      {s['blur_sigma']:g} A (from file)")
    return 0


def cmd_run(args) -> int:
    from .scene import load_scene
    from .tiltseries import read_tilt_series, summarize, write_tilt_series
    from .atoms import write_atoms

    scene = load_scene(args.scene)
    out_dir = Path(args.out) if args.out else (scene.output_dir or Path("out") / Path(args.scene).stem)
    out_dir.mkdir(parents=True, exist_ok=True)
    if scene.simulate is not None:
        sim = scene.simulate
        atoms, series = _simulate_from(sim.get("structure"), sim.get("build"), sim["tilts"], sim["pixel_size"],
                                       tuple(sim["shape"]) if "shape" in sim else None, sim.get("blur", 0.4),
                                       sim.get("noise", 0.0), sim.get("peak_counts"), sim.get("b_factor", 0.0),
                                       sim.get("seed", 0), args.arch)
        write_tilt_series(series, out_dir / "series.npz", overwrite=True)
        write_atoms(atoms, out_dir / "truth.xyz", overwrite=True)
        print(f"simulated {len(atoms)} atoms -> {out_dir / 'series.npz'}")
    else:
        series = read_tilt_series(scene.data_file, pixel_size=scene.pixel_size)
    s = summarize(series)
    print(f"series: {s['n_tilts']} projections {s['height']}x{s['width']} px, tilts {s['angle_min']:g}.."
          f"{s['angle_max']:g} deg, pixel {s['pixel_size']:g} A")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atomsplat", description="Direct 3D atom fitting for atomic electron "
                                     "tomography with differentiable Gaussians (lengths in Å, angles in degrees).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="simulate a tilt series from atoms (a file or a builder recipe)")
    p.add_argument("structure", nargs="?", help="atoms: .xyz (extended XYZ) or .pdb")
    p.add_argument("--build", metavar="RECIPE",
                   help="build the structure instead, e.g. 'octahedron element=Au length=7 cutoff=3 euler=-52,28,139'")
    p.add_argument("--tilts", default="-70:70:2", help="START:STOP:STEP in degrees (default -70:70:2)")
    p.add_argument("--pixel", type=float, default=0.3, help="pixel size in Å (default 0.3)")
    p.add_argument("--shape", type=int, nargs=2, metavar=("H", "W"),
                   help="image size in pixels (default: fits the particle at every tilt with 6 Å to spare)")
    p.add_argument("--blur", type=float, default=0.4, help="microscope blur σ in Å (default 0.4)")
    p.add_argument("--noise", type=float, default=0.0,
                   help="additive Gaussian noise σ as a fraction of the clean maximum (default 0)")
    p.add_argument("--peak-counts", type=float, default=None,
                   help="Poisson noise: mean counts at the brightest pixel (default: none)")
    p.add_argument("--b-factor", type=float, default=0.0, help="Debye-Waller B in Å² (default 0)")
    p.add_argument("--seed", type=int, default=0, help="random seed for noise and random structures")
    p.add_argument("--out", required=True, help="output .npz or .mrc (a .tlt is written beside an MRC)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    _add_arch(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("info", help="summarize a tilt series file")
    p.add_argument("file", help=".npz, .mrc/.st (with .tlt) or .tif (with .tlt)")
    p.add_argument("--pixel", type=float, default=None, help="pixel size in Å when the file has none")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("run", help="run a scene file (simulate if the scene says so, then the pipeline)")
    p.add_argument("scene", help="scene .toml")
    p.add_argument("--out", default=None, help="output folder (default: the scene's [output] dir)")
    _add_arch(p)
    p.set_defaults(func=cmd_run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except InputError as err:
        print(f"atomsplat: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("atomsplat: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
