"""The `atomsplat` command line: simulate, info, reconstruct, validate, baseline, evaluate, run, batch and view.

Every bad input ends in one line `atomsplat: error: FILE: problem` (or `--option: problem`) and exit
status 2, never a traceback, and everything is checked before any work, so a refused command leaves
no file behind. Ctrl-C ends with one line and status 130. stdout carries only what a command is
asked for (JSON with --json); progress, warnings (`atomsplat: warning: ...`) and errors go to
stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from engine.core.backend import ARCH_CHOICES, cpu_threads, init_backend
from engine.core.errors import InputError
from engine.core.settings import SettingError

SIMULATED_OUTPUTS = ("series.npz", "truth.xyz", "true_alignment.json", "true_alignment.xf")
"""What `run` writes beside the fit when its scene simulates the data."""
BASELINE_OUTPUTS = ("atoms.xyz", "volume.mrc", "report.json", "metrics.json")


def _add_arch(parser):
    parser.add_argument("--arch", choices=ARCH_CHOICES, default="auto",
                        help="Taichi backend; auto tries cuda, then vulkan (with a GPU only), then cpu (default: auto)")


def _add_fit_options(parser, resume: bool = True):
    from engine.fit.settings import FIT_SCHEMA

    FIT_SCHEMA.add_arguments(parser.add_argument_group("fit settings (also [reconstruct] keys of a scene)"))
    if resume:
        parser.add_argument("--resume", metavar="DIR", default=None,
                            help="continue the interrupted fit whose checkpoint is in DIR (writes there)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier fit in the output folder (its outputs are removed first)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_arch(parser)


def _simulation_inputs(structure_path, build, tilts, pixel_size, shape, blur, noise, peak_counts, b_factor, seed,
                       name) -> tuple:
    """Read and check everything a simulation needs, before any work: returns (atoms, angles, shape,
    label). ``name(key)`` is how an error names a parameter (a flag, or a scene key)."""
    from engine.core.memory import require_memory
    from engine.io.atoms import read_atoms
    from engine.physics.simulate import auto_shape, check_image_shape, parse_tilt_range
    from engine.physics.structures import build_structure, parse_recipe

    def number(key, value, minimum, strict=False):
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) \
                or value < minimum or (strict and value == minimum):
            raise InputError(name(key), f"must be a finite number {'>' if strict else '>='} {minimum:g}, got {value!r}")
        return float(value)

    number("pixel_size", pixel_size, 0, strict=True)
    number("blur", blur, 0)
    number("noise", noise, 0)
    number("peak_counts", peak_counts, 0, strict=True)
    number("b_factor", b_factor, 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(name("seed"), f"must be a whole number >= 0, got {seed!r}")
    try:
        angles = parse_tilt_range(tilts) if isinstance(tilts, str) else np.asarray(tilts, float)
    except InputError as err:
        raise InputError(name("tilts"), err.problem) from None
    if shape is not None:
        shape = check_image_shape(shape, name("shape"))
    if structure_path is not None:
        atoms = read_atoms(structure_path)
        label = str(structure_path)
    else:
        try:
            recipe = parse_recipe(build) if isinstance(build, str) else build
            atoms = build_structure(recipe, seed=seed)
        except InputError as err:
            raise InputError(name("build"), str(err)) from None
        label = " ".join(f"{k}={v}" for k, v in recipe.items())
    if shape is None:
        shape = auto_shape(atoms, pixel_size)
        check_image_shape(shape, name("shape"))
    require_memory(len(angles) * shape[0] * shape[1] * 48.0, name("shape"),
                   f"{len(angles)} projections of {shape[0]} x {shape[1]} px",
                   "use fewer tilts, larger pixels or a smaller image")
    return atoms, angles, tuple(shape), label


def _simulate(inputs, tilts, pixel_size, blur, noise, peak_counts, b_factor, seed, arch, misalignment=None):
    """Simulate the checked ``inputs`` (`_simulation_inputs`); returns the series. With
    ``misalignment`` (an `engine.measure.alignment.Alignment`) the series is recorded in that geometry
    and intensity but carries only the nominal angles, as a misaligned experiment would."""
    from engine.physics.simulate import simulate_tilt_series

    atoms, angles, shape, label = inputs
    init_backend(arch, verbose=True)
    series = simulate_tilt_series(atoms, angles, pixel_size, shape, blur_sigma=blur, b_factor=b_factor,
                                  noise=noise, peak_counts=peak_counts, seed=seed,
                                  description=f"atomsplat simulate: {label}; {len(atoms)} atoms; "
                                              f"tilts {tilts} deg; pixel {pixel_size} A; blur {blur} A; "
                                              f"noise {noise}; seed {seed}",
                                  geometry=None if misalignment is None else misalignment.geometry(angles),
                                  intensity_scale=None if misalignment is None else misalignment.intensity_scale)
    if misalignment is not None:
        series.geometry = None  # the experimenter knows only the nominal angles
    return series


SIMULATE_FLAGS = {"pixel_size": "--pixel", "build": "--build", "structure": "STRUCTURE"}


def cmd_simulate(args) -> int:
    from engine.core.files import writable_file
    from engine.io.atoms import write_atoms
    from engine.io.tiltseries import check_series_path, write_tilt_series

    if (args.structure is None) == (args.build is None):
        raise InputError("simulate", "give a STRUCTURE file or --build RECIPE (exactly one)")
    out = Path(args.out)
    check_series_path(out, "--out")
    targets = [out] + ([out.with_suffix(".tlt")] if out.suffix.lower() != ".npz" else [])
    truth = out.with_name(out.stem + "_truth.xyz")
    alignment_truth = out.with_name(out.stem + "_alignment.json")
    targets += [truth] if args.build is not None else []
    targets += [alignment_truth, alignment_truth.with_suffix(".xf")] if args.misalign is not None else []
    for target in targets:
        writable_file(target, args.overwrite)
    inputs = _simulation_inputs(args.structure, args.build, args.tilts, args.pixel,
                                tuple(args.shape) if args.shape else None, args.blur, args.noise, args.peak_counts,
                                args.b_factor, args.seed, lambda key: SIMULATE_FLAGS.get(key, "--" + key.replace("_", "-")))
    misalignment = None
    if args.misalign is not None:
        from engine.measure.alignment import misalignment_from

        misalignment = misalignment_from(args.misalign.split(","), "--misalign", inputs[1], args.pixel, seed=args.seed)
    series = _simulate(inputs, args.tilts, args.pixel, args.blur, args.noise, args.peak_counts, args.b_factor,
                       args.seed, args.arch, misalignment)
    atoms = inputs[0]
    write_tilt_series(series, out, overwrite=args.overwrite)
    if misalignment is not None:
        from engine.measure.alignment import write_alignment

        write_alignment(misalignment, out.parent, series.angles, series.pixel_size, 1.0, stem=out.stem + "_alignment")
        print(f"wrote {alignment_truth} (the true misalignment)")
    if args.build is not None:
        write_atoms(atoms, truth, overwrite=args.overwrite)
        print(f"wrote {truth} ({len(atoms)} atoms)")
    if args.overwrite:  # companions of an earlier simulation to this name that this one did not write
        source = Path(args.structure).resolve() if args.structure is not None else None
        for path in (truth, alignment_truth, alignment_truth.with_suffix(".xf")):
            if path not in targets and path.is_file() and path.resolve() != source:
                path.unlink()
    print(f"wrote {out}: {series.n_tilts} projections of {series.shape[0]}x{series.shape[1]} px, "
          f"pixel {series.pixel_size} A")
    return 0


def cmd_info(args) -> int:
    from engine.io.tiltseries import read_tilt_series, series_arguments, summarize

    series = read_tilt_series(args.file, finite=False, **series_arguments(args))
    summary = summarize(series)
    usable = summary["nan_count"] == 0 and np.isfinite(series.projections).all()
    summary["alignment_check"] = _alignment_check(series) if usable else None
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
    print(f"NaN pixels      {s['nan_count']}" + ("" if usable else "  (reconstruct and baseline refuse non-finite pixels)"))
    if s["noise_sigma"] is not None:
        print(f"noise sigma     {s['noise_sigma']:.4g} (from file)")
    if s["blur_sigma"] is not None:
        print(f"blur sigma      {s['blur_sigma']:g} A (from file)")
    check = s["alignment_check"]
    if check is not None:
        print(f"alignment       pre-alignment finds shifts of {check['shift_rms_px']:.2f} px rms "
              f"(max {check['shift_max_px']:.2f} px), tilt axis at {check['axis_angle_deg']:.2f} deg")
        if check.get("untestable"):
            print(f"                not tested: {check['untestable']}, so the images alone cannot tell shifts "
                  "(none reported)")
        elif "chi2" in check:
            verdict = ("significant: the shifts above are shrunk by their noise" if check["shifts_significant"]
                       else "not significant: no shift is reported")
            print(f"                measured shifts {check['raw_shift_rms_px']:.2f} px rms against a noise of "
                  f"{check['shift_error_px']:.2f} px per projection: chi2 {check['chi2']:.1f} for {check['dof']} "
                  f"dof, p = {check['p_value']:.2g}, {verdict}")
        if check["refine_advised"]:
            print("                the series looks misaligned: reconstruct with --refine-alignment")
    return 0


def _alignment_check(series) -> dict | None:
    """Coarse pre-alignment of a single-axis series (engine.measure.alignment.prealign_with_evidence) and
    whether refining the alignment is advised; None for other geometries or series without a usable
    signal. Counted data (whole counts, or counts times one quantum) are taken in counts: Poisson
    variance per pixel, background per projection from the pixels away from the particle (which may
    touch the image edge); other data use the data model's background and noise."""
    from scipy import ndimage

    from engine.io.tiltseries import require_tomography
    from engine.measure.alignment import (counts_background, counts_gain_or_none, misalignment_summary,
                                          prealign_with_evidence, require_single_axis)
    from engine.measure.datamodel import estimate_data_model

    try:
        require_tomography(series)
        require_single_axis(series)
        gain = counts_gain_or_none(series.projections)
        if gain is not None:
            counts = np.round(series.projections.astype(np.float64) * gain)
            background = counts_background(counts)
            images = counts - background[:, None, None]
            variance = np.maximum(ndimage.gaussian_filter(counts, sigma=(0, 2, 2)), 0.25 * background[:, None, None])
            noise = float(np.sqrt(max(background.mean(), 1e-12)))
        else:
            data = estimate_data_model(series, blur=0.0)
            images = (series.projections.astype(np.float64) - data.background) / data.scale
            variance, noise = None, data.noise
        alignment, evidence = prealign_with_evidence(images, series.angles, series.pixel_size, noise,
                                                     variance=variance)
    except InputError:
        return None
    summary = misalignment_summary(alignment, series.pixel_size, evidence)
    summary["counted"] = gain is not None
    if gain is not None:
        summary.update({"gain_counts_per_unit": gain, "background_counts": float(background.mean())})
    return summary


def _reconstruct(series, settings: dict, out_dir: Path, args, truth=None, observer=None) -> dict:
    """Fit ``series`` with ``settings`` into ``out_dir`` (checked before: `_fit_folder`); score it
    against ``truth`` (atoms read and checked before, never shown to the fit) afterwards.
    ``observer``: a viewer watching the fit (`viewer.cli.fit_observer`), finished once the results
    are written. --overwrite: the API removes the earlier fit's outputs once everything is checked.
    Returns the report."""
    from engine.api import reconstruct
    from engine.fit.trainer import CHECKPOINT

    resume = args.resume is not None
    checkpoint = out_dir / CHECKPOINT
    try:
        result = reconstruct(series, settings, out_dir=out_dir, arch=args.arch, resume=resume,
                             overwrite=args.overwrite and not resume, truth=truth, progress=not args.quiet,
                             observer=observer)
    except KeyboardInterrupt:
        if checkpoint.exists():
            raise KeyboardInterrupt(f"interrupted; checkpoint in {checkpoint} (continue with --resume {out_dir})") from None
        raise KeyboardInterrupt("interrupted before the first checkpoint; nothing to resume") from None
    report = result.report
    loss = "n/a" if report["final_loss"] is None else f"{report['final_loss']:.4g}"
    print(f"{len(result.atoms)} atoms -> {out_dir / 'atoms.xyz'} ({report['iterations']} iterations, "
          f"{report['wall_seconds']:.1f} s, loss {loss})")
    if report.get("empty_reason"):
        print(f"atomsplat: no atoms: {report['empty_reason']}", file=sys.stderr)
    if result.metrics is not None:
        from engine.evaluate.metrics import format_table

        print(format_table(result.metrics))
    if observer is not None:
        observer.finish()
    return report


def _fit_folder(args, default: Path) -> tuple[Path, dict | None]:
    """The output folder (--resume DIR, else --out, else ``default``) and, when resuming, its
    checkpoint's bookkeeping; checked before any work (`engine.fit.outputs.check_output_folder`): a
    folder holding a fit needs --resume or --overwrite, and a finished fit is not resumed."""
    from engine.fit.outputs import check_output_folder

    if args.resume is not None:
        if args.out is not None and Path(args.out).resolve() != Path(args.resume).resolve():
            raise InputError("--out", "a resumed fit writes into its own folder (--resume DIR); drop --out")
        out_dir = Path(args.resume)
    else:
        out_dir = Path(args.out) if args.out else default
    out_dir = Path(os.path.normpath(out_dir))
    return out_dir, check_output_folder(out_dir, args.resume is not None, args.overwrite)


def _settings(args, base: dict, meta: dict | None = None) -> dict:
    """The scene's [reconstruct] table with the flags given on top, checked before any work. When
    resuming (``meta``: the checkpoint's bookkeeping), the checkpoint's settings are the base."""
    from engine.fit.settings import FIT_SCHEMA, fit_settings
    from engine.fit.trainer import resumed_settings

    settings = FIT_SCHEMA.from_args(args, base)
    if meta is not None:
        settings = resumed_settings(meta, settings)
    fit_settings(settings)
    return settings


def _check_resume(out_dir: Path, meta: dict | None, series, settings: dict) -> None:
    """A resumed checkpoint must belong to these data and settings."""
    if meta is None:
        return
    from dataclasses import asdict

    from engine.fit.settings import fit_settings
    from engine.fit.trainer import CHECKPOINT, check_checkpoint, data_fingerprint

    check_checkpoint(out_dir / CHECKPOINT, meta, data_fingerprint(series), asdict(fit_settings(settings)))


def _read_truth(path):
    from engine.io.atoms import read_atoms

    return None if path is None else read_atoms(path)


def cmd_reconstruct(args) -> int:
    from engine.scene import load_scene
    from engine.io.tiltseries import read_tilt_series, require_tomography, series_arguments

    base, truth, viewer_table = {}, args.truth, {}
    if args.scene:
        scene = load_scene(args.scene)
        base, viewer_table = scene.reconstruct, scene.viewer
        truth = truth or scene.truth_file
    out_dir, meta = _fit_folder(args, Path("out") / Path(args.data).stem)
    settings = _settings(args, base, meta)
    series = require_tomography(read_tilt_series(args.data, **series_arguments(args)))
    _check_resume(out_dir, meta, series, settings)
    truth_atoms = _read_truth(truth)
    from viewer.cli import fit_observer

    observer = fit_observer(args, viewer_table, args.scene, out_dir, truth_atoms, args.resume is not None)
    _reconstruct(series, settings, out_dir, args, truth_atoms, observer)
    return 0


def cmd_validate(args) -> int:
    from engine.io.tiltseries import read_tilt_series, series_arguments
    from engine.scene import load_scene
    from engine.validation import format_summary, validate

    if not (np.isfinite(args.radius) and args.radius > 0):
        raise InputError("--radius", f"must be a positive number of Å, got {args.radius}")
    base, truth = {}, args.truth
    if args.scene:
        scene = load_scene(args.scene)
        base, truth = scene.reconstruct, truth or scene.truth_file
    settings = _settings(args, base)
    series = read_tilt_series(args.data, **series_arguments(args))
    out_dir = Path(os.path.normpath(Path(args.out) if args.out else Path("out") / (Path(args.data).stem + "_validate")))
    result = validate(series, settings, out_dir=out_dir, arch=args.arch, overwrite=args.overwrite, truth=truth,
                      radius=args.radius, progress=not args.quiet)
    print(json.dumps(result.summary, indent=2) if args.json else format_summary(result.summary))
    return 0


def cmd_baseline(args) -> int:
    import dataclasses
    import time

    from engine.classical.baseline import (BASELINE_SCHEMA, baseline_settings, check_baseline_size, run_baseline,
                                           write_volume_mrc)
    from engine.core.files import make_folder, writable_folder, write_atomically
    from engine.fit.outputs import clear_outputs
    from engine.io.atoms import write_atoms
    from engine.io.tiltseries import read_tilt_series, require_tomography, series_arguments

    settings = baseline_settings(BASELINE_SCHEMA.from_args(args))
    if settings.denoise == "bm3d":
        from engine.classical.denoise import require_bm3d

        require_bm3d()  # fail before any work
    series = require_tomography(read_tilt_series(args.data, **series_arguments(args)))
    out_dir = Path(os.path.normpath(Path(args.out) if args.out else Path("out") / (Path(args.data).stem + "_baseline")))
    writable_folder(out_dir)
    found = [name for name in BASELINE_OUTPUTS if (out_dir / name).exists()]
    if found and not args.overwrite:
        raise InputError(out_dir, f"already holds a result ({', '.join(found)}); pass --overwrite to replace it")
    check_baseline_size(series, settings)
    truth = _read_truth(args.truth)
    make_folder(out_dir)
    if args.overwrite:
        clear_outputs(out_dir, BASELINE_OUTPUTS, keep=(args.data, args.truth))
    init_backend(args.arch, verbose=True)
    t0 = time.perf_counter()
    from tqdm import tqdm

    details = {}
    with tqdm(total=settings.iters, desc="SIRT", unit="it", file=sys.stderr, dynamic_ncols=True,
              disable=settings.method != "sirt") as bar:
        try:
            atoms, volume, projector = run_baseline(series, settings, details, callback=lambda *_: bar.update(1))
        except InputError as err:
            if err.source != "volume":
                raise
            raise InputError(args.data, f"no atoms traced: {err.problem}") from None
    write_atoms(atoms, out_dir / "atoms.xyz", overwrite=True)
    write_volume_mrc(volume, projector.voxel, out_dir / "volume.mrc", overwrite=True)
    seconds = time.perf_counter() - t0
    steps = ([f"{'counted data' if details['counted'] else 'data'}, background {details['background']:.4g}"]
             + ([f"BM3D {details['denoise_seconds']:.1f} s"] if "denoise_seconds" in details else []))
    print(f"{settings.method}: {len(atoms)} atoms traced -> {out_dir / 'atoms.xyz'}, volume -> "
          f"{out_dir / 'volume.mrc'} ({seconds:.1f} s; {'; '.join(steps)})")
    record = {"settings": dataclasses.asdict(settings), **details,
              "n_atoms": len(atoms), "wall_seconds": seconds}
    write_atomically(out_dir / "report.json", lambda tmp: tmp.write_text(json.dumps(record, indent=2, default=str)))
    if truth is not None:
        from engine.evaluate.metrics import evaluate_atoms, format_table

        metrics = evaluate_atoms(atoms, truth, radius=1.0, radii_extra=(0.5,))
        write_atomically(out_dir / "metrics.json", lambda tmp: tmp.write_text(json.dumps(metrics, indent=2)))
        print(format_table(metrics))
    return 0


def cmd_evaluate(args) -> int:
    from engine.io.atoms import read_atoms
    from engine.evaluate.metrics import best_translation, evaluate_atoms, format_table

    if not (np.isfinite(args.radius) and args.radius > 0):
        raise InputError("--radius", f"must be a positive number of Å, got {args.radius}")
    pred, truth = read_atoms(args.pred), read_atoms(args.truth)
    shift = None
    if args.translate:
        shift = best_translation(pred.positions, truth.positions, args.radius)
        pred = pred.copy()
        pred.positions += shift
    radii = tuple(r for r in (0.5, 1.0) if r != args.radius)
    result = evaluate_atoms(pred, truth, radius=args.radius, radii_extra=radii)
    if shift is not None:
        result["translation_A"] = dict(zip("xyz", (float(v) for v in shift)))
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def cmd_run(args) -> int:
    from engine.core.files import make_folder
    from engine.fit.outputs import clear_outputs
    from engine.io.atoms import write_atoms
    from engine.io.tiltseries import read_tilt_series, require_tomography, summarize, write_tilt_series
    from engine.scene import load_scene

    scene = load_scene(args.scene)
    out_dir, meta = _fit_folder(args, scene.output_dir or Path("out") / Path(args.scene).stem)
    settings = _settings(args, scene.reconstruct, meta)
    truth, series, simulation, misalignment = scene.truth_file, None, None, None
    keep = (scene.data_file, scene.truth_file)
    if scene.simulate is None:
        series = read_tilt_series(scene.data_file, pixel_size=scene.pixel_size, angles_file=scene.angles_file,
                                  mat_key=scene.mat_key, layout=scene.layout)
    elif args.resume is not None:  # the interrupted run's own simulated series and truth
        series, truth = read_tilt_series(out_dir / "series.npz"), out_dir / "truth.xyz"
    else:
        sim = scene.simulate

        def name(key):
            return f"{args.scene}: data.simulate.{key}"

        simulation = _simulation_inputs(sim.get("structure"), sim.get("build"), sim["tilts"], sim["pixel_size"],
                                        sim.get("shape"), sim.get("blur", 0.4), sim.get("noise", 0.0),
                                        sim.get("peak_counts"), sim.get("b_factor", 0.0), sim.get("seed", 0), name)
        if "misalign" in sim:
            from engine.measure.alignment import misalignment_from

            misalignment = misalignment_from(sim["misalign"], name("misalign"), simulation[1], sim["pixel_size"],
                                             seed=sim.get("seed", 0))
        truth = None
    if series is not None:
        require_tomography(series)
        _check_resume(out_dir, meta, series, settings)
    truth_atoms = _read_truth(truth) if simulation is None else simulation[0]
    from viewer.cli import fit_observer

    observer = fit_observer(args, scene.viewer, args.scene, out_dir, truth_atoms, args.resume is not None)
    make_folder(out_dir)
    # --overwrite: an earlier simulation's series, truth and misalignment go too (after the fit's own
    # checks when nothing is simulated now)
    replace_simulated = args.overwrite and args.resume is None
    if simulation is not None:
        if replace_simulated:
            clear_outputs(out_dir, SIMULATED_OUTPUTS, keep=keep)
        sim = scene.simulate
        series = _simulate(simulation, sim["tilts"], sim["pixel_size"], sim.get("blur", 0.4), sim.get("noise", 0.0),
                           sim.get("peak_counts"), sim.get("b_factor", 0.0), sim.get("seed", 0), args.arch,
                           misalignment)
        require_tomography(series)
        write_tilt_series(series, out_dir / "series.npz", overwrite=True)
        write_atoms(truth_atoms, out_dir / "truth.xyz", overwrite=True)
        if misalignment is not None:
            from engine.measure.alignment import write_alignment

            write_alignment(misalignment, out_dir, series.angles, series.pixel_size, 1.0, stem="true_alignment")
        print(f"simulated {len(truth_atoms)} atoms -> {out_dir / 'series.npz'}")
    s = summarize(series)
    print(f"series: {s['n_tilts']} projections {s['height']}x{s['width']} px, tilts {s['angle_min']:g}.."
          f"{s['angle_max']:g} deg, pixel {s['pixel_size']:g} A")
    _reconstruct(series, settings, out_dir, args, truth_atoms, observer)
    if simulation is None and replace_simulated:
        clear_outputs(out_dir, SIMULATED_OUTPUTS, keep=keep)
    own_truth = misalignment is not None or (args.resume is not None and scene.simulate is not None)
    if own_truth and (out_dir / "true_alignment.json").exists() and (out_dir / "alignment.json").exists():
        from engine.core.files import write_atomically
        from engine.measure.alignment import alignment_errors, read_alignment

        errors = alignment_errors(read_alignment(out_dir / "alignment.json"),
                                  read_alignment(out_dir / "true_alignment.json"), series.pixel_size)
        write_atomically(out_dir / "alignment_errors.json", lambda tmp: tmp.write_text(json.dumps(errors, indent=2)))
        print("alignment vs truth: " + ", ".join(f"{k} {v:.3g}" for k, v in errors.items()))
    return 0


def cmd_batch(args) -> int:
    from engine.batch import SUMMARY_JSON, TRAJECTORY, run_batch, summary_table
    from engine.fit.settings import FIT_SCHEMA

    result = run_batch(args.series, args.out, settings=FIT_SCHEMA.from_args(args), workers=args.workers,
                       scheduler=args.scheduler, time_series=args.time_series, arch=args.arch,
                       overwrite=args.overwrite, track_radius=args.track_radius, progress=not args.quiet)
    print(summary_table(result.rows), end="")
    print(f"summary: {result.out_dir / SUMMARY_JSON}" + (f", trajectory: {result.out_dir / TRAJECTORY}"
                                                         if result.trajectory is not None else ""))
    failed = [row for row in result.rows if row["status"] == "failed"]
    for row in failed:
        print(f"atomsplat: error: series {row['name']}: {row.get('error')}", file=sys.stderr)
    return 1 if failed else 0


def _length_pm(text: str) -> float:
    """'10pm', '0.1A', '0.1Å' or a bare number of pm → pm."""
    value = text.strip()
    factor = 1.0
    for unit, f in (("pm", 1.0), ("Å", 100.0), ("A", 100.0)):
        if value.endswith(unit):
            value, factor = value[:-len(unit)], f
            break
    try:
        number = float(value) * factor
    except ValueError:
        raise InputError("--target", f"expected a length such as 10pm or 0.1A, got {text!r}") from None
    return number


def cmd_plan(args) -> int:
    from engine.api import plan

    target = _length_pm(args.target) if args.target is not None else None
    if args.like is None and args.tilts is None:
        raise InputError("--tilts", "needed without --like (or give --like SERIES)")
    result = plan(args.structure, args.like, tilts=args.tilts, pixel_size=args.pixel, shape=args.shape,
                  blur=args.blur, counts_per_atom=args.counts_per_atom, background=args.background or 0.0,
                  noise=args.noise, target_pm=target, b_factor=args.b_factor, arch=args.arch)
    sigma = result.pop("sigma_A")
    if args.json:
        result["sigma_A"] = sigma.tolist()
        print(json.dumps(result))
        return 0
    c = result["conditions"]
    counted = result["model"] == "poisson"
    print(f"{result['atoms']} atoms, {c['tilts']} tilts, {c['shape'][0]} x {c['shape'][1]} px of "
          f"{c['pixel_size']:g} A, blur {c['blur']:g} A, {'Poisson counts' if counted else 'Gaussian noise'}")
    axes = result["rmsd_axis_pm"]
    print(f"Cramer-Rao RMSD {result['rmsd_pm']:.3g} pm (x {axes['x']:.3g}, y {axes['y']:.3g}, z {axes['z']:.3g})")
    head = "counts/atom  background/px" if counted else "noise (of max)"
    print(f"{head}  RMSD pm  z-RMSD pm")
    for row in result["table"]:
        first = (f"{row['counts_per_atom']:11.4g}  {row['background']:13.4g}" if counted
                 else f"{row['noise']:14.4g}")
        print(f"{first}  {row['rmsd_pm']:7.3g}  {row['rmsd_z_pm']:9.3g}")
    if "needed" in result:
        need = result["needed"]
        what = (f"{need['counts_per_atom']:.4g} counts per atom per projection "
                f"(background {need['background']:.4g} per px)" if counted else f"noise {need['noise']:.4g} of the max")
        print(f"for {result['target_pm']:g} pm RMSD: {what}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from engine.io.tiltseries import add_series_arguments
    from viewer.cli import add_view_options, add_view_parser

    parser = argparse.ArgumentParser(prog="atomsplat", description="Direct 3D atom fitting for atomic electron "
                                     "tomography with differentiable Gaussians (lengths in Å, angles in degrees).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="simulate a tilt series from atoms (a file or a builder recipe)")
    p.add_argument("structure", nargs="?", help="atoms: any format ASE reads (.xyz, .pdb, .cif, POSCAR, ...)")
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
    p.add_argument("--misalign", metavar="SHIFT_PX,ANGLE_DEG,AXIS_DEG[,DRIFT]", default=None,
                   help="record a misaligned series: random shifts within SHIFT_PX px, tilt-angle errors within "
                        "ANGLE_DEG, the tilt axis turned by AXIS_DEG, intensity drift within ±DRIFT (fraction); "
                        "the file keeps the nominal angles, the truth goes to OUT_alignment.json")
    p.add_argument("--seed", type=int, default=0, help="random seed for noise and random structures")
    p.add_argument("--out", required=True, help="output .npz or .mrc (a .tlt is written beside an MRC)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    _add_arch(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("info", help="summarize a tilt series file")
    p.add_argument("file", help=".npz, .mrc/.st (with .tlt), .tif (with .tlt) or .mat")
    add_series_arguments(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("reconstruct", help="fit atoms to a tilt series")
    p.add_argument("data", help="tilt series: .npz, .mrc/.st (with .tlt), .tif (with .tlt) or .mat")
    p.add_argument("--scene", help="take [reconstruct] settings (and the truth) from a scene file")
    p.add_argument("--out", help="output folder (default: out/<data name>)")
    add_series_arguments(p)
    p.add_argument("--truth", help="ground-truth atoms to score against after the fit (checked before it, "
                                   "never shown to it)")
    _add_fit_options(p)
    add_view_options(p)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("validate", help="half-set validation: fit the even and the odd projections apart and "
                                        "measure how well the atoms reproduce (precision without a truth)")
    p.add_argument("data", help="tilt series: .npz, .mrc/.st (with .tlt), .tif (with .tlt) or .mat")
    p.add_argument("--scene", help="take [reconstruct] settings (and the truth) from a scene file")
    p.add_argument("--out", help="output folder: even/ and odd/ fits, validation.json, reproducibility.csv "
                                 "(default: out/<data name>_validate)")
    add_series_arguments(p)
    p.add_argument("--truth", help="ground-truth atoms to score each half against as well (never shown to the fits)")
    p.add_argument("--radius", type=float, default=1.0, help="matching radius in Å (default 1.0)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_fit_options(p, resume=False)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("evaluate", help="score predicted atoms against the truth (optimal one-to-one matching)")
    p.add_argument("pred", help="predicted atoms (.xyz/.pdb)")
    p.add_argument("truth", help="true atoms (.xyz/.pdb)")
    p.add_argument("--radius", type=float, default=1.0, help="matching radius in Å (default 1.0)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--translate", action="store_true",
                   help="first remove the global translation between the two sets (a reference model "
                        "whose origin differs, as for measured data aligned elsewhere)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("baseline", help="classical pipeline: SIRT (or FBP) volume, then atom tracing")
    p.add_argument("data", help="tilt series: .npz, .mrc/.st (with .tlt), .tif (with .tlt) or .mat")
    p.add_argument("--out", help="output folder (default: out/<data name>_baseline)")
    from engine.classical.baseline import BASELINE_SCHEMA

    BASELINE_SCHEMA.add_arguments(p.add_argument_group("baseline settings"))
    add_series_arguments(p)
    p.add_argument("--truth", help="ground-truth atoms to score against afterwards")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier result in the output folder (its outputs are removed first)")
    _add_arch(p)
    p.set_defaults(func=cmd_baseline)

    p = sub.add_parser("run", help="run a scene: simulate (if the scene says so), reconstruct, evaluate")
    p.add_argument("scene", help="scene .toml")
    p.add_argument("--out", default=None, help="output folder (default: the scene's [output] dir)")
    _add_fit_options(p)
    add_view_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("batch", help="reconstruct many tilt series on Dask (a local cluster or --scheduler), "
                                     "or the states of a time series (--time-series)")
    p.add_argument("series", nargs="+", help="tilt series files, glob patterns, or TOML lists ([[series]] data = ...)")
    p.add_argument("--out", default="out/batch", help="folder of the summary (batch.json, batch.md); each series "
                                                      "writes to OUT/<name> (default out/batch)")
    p.add_argument("--workers", type=int, default=None, help="local worker processes (default: one per GPU, "
                                                             "else one with every core; 0: no Dask, one "
                                                             "series after another in this process)")
    p.add_argument("--scheduler", metavar="ADDRESS", default=None,
                   help="run on this existing Dask cluster (e.g. tcp://host:8786) instead of a local one")
    p.add_argument("--time-series", action="store_true",
                   help="the series are successive states of one specimen: warm starts, atoms tracked into "
                        "OUT/trajectory.json")
    p.add_argument("--track-radius", type=float, default=1.0,
                   help="time series: largest step in Å an atom makes and keeps its identity (default 1.0)")
    p.add_argument("--overwrite", action="store_true", help="fit every series again, replacing its earlier outputs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    from engine.fit.settings import FIT_SCHEMA

    FIT_SCHEMA.add_arguments(p.add_argument_group("fit settings for every series (on top of a TOML list's)"))
    _add_arch(p)
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("plan", help="the precision limit of an experiment: the Cramér-Rao bound of every atom, "
                                    "against dose or noise (no fit)")
    p.add_argument("structure", help="atoms of known elements: any format ASE reads")
    p.add_argument("--like", metavar="SERIES", help="take the geometry, pixel and image size, blur and dose (or noise) "
                                                    "from this tilt series")
    p.add_argument("--tilts", default=None, help="START:STOP:STEP in degrees (without --like)")
    p.add_argument("--pixel", type=float, default=None, help="pixel size in Å (without --like)")
    p.add_argument("--shape", type=int, nargs=2, metavar=("H", "W"),
                   help="image size in pixels (default: fits the particle at every tilt with 6 Å to spare)")
    p.add_argument("--blur", type=float, default=None, help="microscope blur σ in Å (default: the series', else 0.4)")
    p.add_argument("--counts-per-atom", type=float, default=None,
                   help="counted data: electrons per atom per projection (Poisson)")
    p.add_argument("--background", type=float, default=None, help="with --counts-per-atom: background counts per pixel")
    p.add_argument("--noise", type=float, default=None,
                   help="Gaussian noise σ as a fraction of the clean maximum (as simulate --noise)")
    p.add_argument("--b-factor", type=float, default=0.0, help="Debye-Waller B in Å² (default 0)")
    p.add_argument("--target", default=None, help="precision to reach, e.g. 10pm or 0.1A: prints the dose (or noise) needed")
    p.add_argument("--json", action="store_true", help="print JSON (with every atom's σ in Å)")
    _add_arch(p)
    p.set_defaults(func=cmd_plan)

    add_view_parser(sub, _add_arch)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Python warnings as one line each, without a source path and code line."""
    print(f"atomsplat: warning: {message}", file=sys.stderr)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            if hasattr(args, "arch"):
                cpu_threads()  # a bad ATOMSPLAT_THREADS is refused before any work
            return args.func(args)
        except SettingError as err:  # a library error names the setting; here it is a flag
            print(f"atomsplat: error: --{err.setting.replace('_', '-')}: {err.problem}", file=sys.stderr)
            return 2
        except InputError as err:
            print(f"atomsplat: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as err:
            print(f"atomsplat: {err.args[0] if err.args else 'interrupted'}", file=sys.stderr)
            return 130
        except BrokenPipeError:
            # The reader of stdout left (`... | head`): what it wanted it has; say nothing more, and keep
            # Python from complaining about the closed pipe as it exits.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        except MemoryError:
            print("atomsplat: error: out of memory (use smaller data, or fewer or larger voxels and pixels)",
                  file=sys.stderr)
            return 2
        except OSError as err:  # a file the checks before the work could not foresee
            where = err.filename or "atomsplat"
            print(f"atomsplat: error: {where}: {err.strerror or err}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
