"""The viewer's part of the command line: `--view`, `--headless`, `--view-every`, `--movie` for fits
(`atomsplat reconstruct`, `atomsplat run`) and the `atomsplat view` command for saved results.
`engine.cli` calls `add_view_options`, `add_view_parser` and `fit_observer`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_EVERY = 100
"""Iterations between frames by default (viewer overhead ≤ 10 % of the fit, see scripts/bench_viewer.py);
`viewer.window` takes it from here, so the command line starts without loading the renderer."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def add_view_options(parser) -> None:
    """Viewer options of a fit command."""
    group = parser.add_argument_group("viewer")
    group.add_argument("--view", action=argparse.BooleanOptionalAction, default=None,
                       help="watch the fit in a live window; headless frames when there is no display "
                            "(default: the scene's [viewer] view)")
    group.add_argument("--headless", action="store_true",
                       help="render the viewer's frames offscreen to OUT/frames/*.png and a movie (OUT/fit.gif)")
    group.add_argument("--view-every", type=int, default=None, metavar="K",
                       help=f"draw every K iterations (default: the scene's [viewer] every, else {DEFAULT_EVERY})")
    group.add_argument("--movie", default=None, metavar="PATH",
                       help="the headless movie, .gif or .mp4 (MP4 needs imageio-ffmpeg); implies --headless")


def fit_observer(args, scene_viewer: dict, scene_path, out_dir, truth=None, resume: bool = False):
    """The observer the options ask for (a LiveViewer or a HeadlessRecorder), or None. Checks every
    option before the fit starts; a live window without a display falls back to headless frames.
    ``truth``: true atoms (`Atoms` or a file) shown in the frames, never given to the fit."""
    from engine.core.errors import InputError

    from .frame import ViewSettings
    from .window import HeadlessRecorder, LiveViewer, check_every, check_movie_path, display_available

    view = args.view if args.view is not None else scene_viewer.get("view", False)
    headless = args.headless or args.movie is not None
    if args.view_every is not None:
        every = check_every(args.view_every)
    else:
        every = check_every(scene_viewer.get("every", DEFAULT_EVERY), str(scene_path))
    if not (view or headless):
        if args.view_every is not None:
            raise InputError("--view-every", "needs --view or --headless")
        return None
    if args.movie is not None:
        from engine.core.files import writable_folder

        check_movie_path(args.movie)
        if Path(args.movie).exists() and not args.overwrite:
            raise InputError(args.movie, "already exists; pass --overwrite to replace it")
        writable_folder(Path(args.movie).parent, args.movie)
    if truth is not None and not hasattr(truth, "positions"):
        from engine.io.atoms import read_atoms

        truth = read_atoms(truth)  # shown only; the fit never sees it
    settings = ViewSettings(truth=truth, show_truth=truth is not None)
    if not headless:
        if display_available():
            return LiveViewer(out_dir, every, settings)
        print(f"atomsplat: no display found; rendering the viewer headless into {Path(out_dir) / 'frames'}",
              file=sys.stderr)
    return HeadlessRecorder(out_dir, every, args.movie, fresh=not resume, settings=settings)


def add_view_parser(sub, add_arch) -> None:
    """The `view` command; ``add_arch`` adds the shared --arch option."""
    p = sub.add_parser("view", help="show saved atoms (and their projections) in the viewer, render a PNG, "
                                    "or export a sphere mesh")
    p.add_argument("atoms", help="atoms: .xyz (extended XYZ) or .pdb; or a time series' trajectory.json "
                                 "(its states, atoms coloured by displacement: ← → step, or one frame per state)")
    p.add_argument("--data", metavar="SERIES", help="the tilt series the atoms were fitted to: shows measured, "
                                                    "predicted and residual projections")
    p.add_argument("--truth", help="true atoms: shows matched, missed and spurious atoms")
    from engine.io.tiltseries import add_series_arguments

    add_series_arguments(p, "--data")
    p.add_argument("--alignment", metavar="JSON", default=None,
                   help="refined alignment to predict the projections with (default: alignment.json beside the "
                        "atoms, when the fit wrote one)")
    p.add_argument("--out", metavar="IMAGE", help="render one frame to this .png or .jpg instead of opening a window")
    p.add_argument("--headless", action="store_true",
                   help="no window: render the frame to --out (default ATOMS_view.png beside the atoms)")
    p.add_argument("--mesh", metavar="OUT", help="export the atoms as spheres to OUT.glb or OUT.ply (alone: "
                                                 "nothing else is shown or written)")
    p.add_argument("--colour", choices=["species", "amplitude", "uncertainty", "displacement"], default=None,
                   help="atom colours: element, fitted amplitude, position uncertainty σ (pm, atoms.xyz's "
                        "pos_uncertainty) or displacement (a trajectory) (default: species when known, else "
                        "amplitude; a trajectory: displacement)")
    p.add_argument("--tilt", type=int, default=None, help="projection shown, 0-based (default: nearest 0°)")
    p.add_argument("--camera", type=float, nargs=2, metavar=("AZIMUTH", "ELEVATION"), default=None,
                   help="view direction in degrees: turned about the tilt axis, then tipped (0 0: along the beam "
                        "at zero tilt)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    add_arch(p)
    p.set_defaults(func=cmd_view)


def cmd_view(args) -> int:
    import math

    from engine.core.backend import init_backend
    from engine.core.errors import InputError
    from engine.core.files import writable_file, writable_folder
    from engine.io.atoms import read_atoms
    from engine.io.tiltseries import read_tilt_series, series_arguments

    from .frame import ViewSettings
    from .window import display_available

    if args.camera is not None and not all(math.isfinite(v) for v in args.camera):
        raise InputError("--camera", f"azimuth and elevation must be finite numbers of degrees, got "
                                     f"{args.camera[0]:g} {args.camera[1]:g}")
    if args.atoms.lower().endswith(".json"):
        return _view_states(args)
    atoms = read_atoms(args.atoms)
    truth = read_atoms(args.truth) if args.truth else None
    for option in ("angles", "mat_key", "layout", "pixel"):
        if getattr(args, option) is not None and not args.data:
            raise InputError("--" + option.replace("_", "-"), "goes with --data (the series it describes)")
    series = read_tilt_series(args.data, **series_arguments(args)) if args.data else None
    if args.tilt is not None and (series is None or not 0 <= args.tilt < series.n_tilts):
        raise InputError("--tilt", "needs --data" if series is None else
                         f"no projection {args.tilt} in a series of {series.n_tilts} (0-based)")
    if args.mesh:
        from .mesh import MESH_FORMATS

        mesh = Path(args.mesh)
        if mesh.suffix.lower() not in MESH_FORMATS:
            raise InputError(mesh, f"unknown mesh format {mesh.suffix!r} (use {' or '.join(MESH_FORMATS)})")
        if mesh.is_dir():
            raise InputError(mesh, "is a folder; give a file name")
        if mesh.exists() and not args.overwrite:
            raise InputError(mesh, "already exists; pass --overwrite to replace it")
        writable_folder(mesh.parent, mesh)
    frame_wanted = not args.mesh or bool(args.out or args.headless)
    headless = bool(args.out or args.headless) or not display_available()
    out = Path(args.out) if args.out else Path(args.atoms).with_name(Path(args.atoms).stem + "_view.png")
    if frame_wanted and headless:
        writable_file(out, args.overwrite)
        if out.suffix.lower() not in IMAGE_SUFFIXES:
            raise InputError(out, f"cannot write a picture as {out.suffix or '(no extension)'!r}; "
                                  f"give a file ending in {', '.join(IMAGE_SUFFIXES)}")
    if args.mesh:
        from .mesh import export_mesh

        export_mesh(atoms, args.mesh, overwrite=args.overwrite)
        print(f"wrote {args.mesh}: {len(atoms)} atoms as spheres")
        if not frame_wanted:
            return 0
    init_backend(args.arch, verbose=True)
    from .sources import SavedResult, default_colour_mode, saved_report

    alignment_path = args.alignment
    if alignment_path is None and series is not None and Path(args.atoms).with_name("alignment.json").exists():
        alignment_path = Path(args.atoms).with_name("alignment.json")
    alignment = None
    if alignment_path is not None:
        from engine.measure.alignment import read_alignment

        alignment = read_alignment(alignment_path)
    result = SavedResult(atoms, Path(args.atoms).name, series, atoms_source=args.atoms,
                         report=saved_report(args.atoms), alignment=alignment, alignment_source=str(alignment_path))
    tilt = result.default_tilt() if args.tilt is None else args.tilt
    settings = ViewSettings(colour_mode=args.colour or default_colour_mode(atoms), truth=truth,
                            show_truth=truth is not None)
    if args.camera is not None:
        settings.camera.set_angles(*args.camera)
    if not headless:
        from .window import LiveViewer

        LiveViewer(Path(args.atoms).parent, settings=settings).show_result(result, tilt)
        return 0
    from .frame import compose_frame
    from .window import write_image

    if not (args.out or args.headless):
        print(f"atomsplat: no display found; rendering {out} instead", file=sys.stderr)
    write_image(compose_frame(result.snapshot(tilt), settings), out)
    print(f"wrote {out}")
    return 0


def _view_states(args) -> int:
    """The states of a time series (`atomsplat batch --time-series`'s trajectory.json), atoms coloured
    by how far they moved since the state before: a window stepping through them (← →), or one
    frame per state (OUT_stateK.png) without a display."""
    from engine.core.backend import init_backend
    from engine.core.errors import InputError
    from engine.core.files import writable_file
    from engine.evaluate.tracking import state_atoms

    from .frame import Snapshot, ViewSettings, compose_frame
    from .window import LiveViewer, display_available, write_image

    for option in ("data", "truth", "mesh", "alignment", "tilt"):
        if getattr(args, option) is not None:
            raise InputError("--" + option, "does not go with a trajectory (its states' atoms are shown)")
    states = state_atoms(args.atoms)
    top = max((float(a.columns["displacement_pm"].max(initial=0.0)) for _, a in states), default=0.0)
    snapshots = [Snapshot(atoms=atoms, label=f"STATE {k} {name}") for k, (name, atoms) in enumerate(states)]
    settings = ViewSettings(colour_mode=args.colour or "displacement", colour_max=max(top, 1.0))
    if args.camera is not None:
        settings.camera.set_angles(*args.camera)
    headless = bool(args.out or args.headless) or not display_available()
    base = Path(args.out) if args.out else Path(args.atoms).with_name(Path(args.atoms).stem + "_view.png")
    outs = [base.with_name(f"{base.stem}_state{k}{base.suffix}") for k in range(len(states))]
    if headless:
        if base.suffix.lower() not in IMAGE_SUFFIXES:
            raise InputError(base, f"give a file ending in {', '.join(IMAGE_SUFFIXES)}")
        for out in outs:
            writable_file(out, args.overwrite)
    init_backend(args.arch, verbose=True)
    if not headless:
        LiveViewer(Path(args.atoms).parent, settings=settings).show_states(snapshots)
        return 0
    for snapshot, out in zip(snapshots, outs):
        write_image(compose_frame(snapshot, settings), out)
        print(f"wrote {out}")
    return 0
