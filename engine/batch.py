"""Many tilt series on Dask (`dask.distributed`): one reconstruction per task, each writing its own
output folder exactly as `engine.api.reconstruct` does, and a summary (batch.json, batch.md).

    from engine.batch import run_batch
    result = run_batch(["a.npz", "b.npz"], out_dir="out/batch", workers=2)
    result.rows                       # per series: status, atoms, final loss, F1, RMSD, wall time
    result = run_batch(["t0.npz", "t1.npz", "t2.npz"], out_dir="out/anneal", time_series=True)
    result.trajectory                 # atoms followed through the states (engine.evaluate.tracking)

The cluster: by default a local one of worker processes (a Nanny each, one task at a time), one per
GPU where GPUs are present, else one with every core, or ``workers`` of them sharing the cores;
``scheduler="tcp://host:8786"`` runs on an existing Dask cluster instead (its workers need
atomsplat installed and the files at the same paths). Taichi is process-global, so every task
starts the backend in its own worker process, with a fixed thread count: the CPU results are the
same bit for bit as those of `reconstruct` run alone with that many threads.

Reruns follow the fit's rules (`engine.fit.outputs`): a finished fit of the same data and settings
(its checkpoint's fingerprint) is skipped, an interrupted one resumes from its checkpoint, a folder
holding a fit of other data or settings fails that series unless ``overwrite``. A failed series is
reported and the others go on.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.core.errors import InputError

SUMMARY_JSON, SUMMARY_MD, TRAJECTORY = "batch.json", "batch.md", "trajectory.json"
SERIES_KEYS = ("data", "name", "out", "truth", "pixel_size", "angles")
"""Keys of a series in a TOML list; any other key is a fit setting of that series."""


@dataclass
class SeriesJob:
    """One tilt series of a batch: its file, its output folder, its own fit settings (on top of the
    batch's), a truth to score against, a pixel size (Å) and angle file for files that lack them."""

    name: str
    data: str
    out_dir: str
    settings: dict = field(default_factory=dict)
    truth: str | None = None
    pixel_size: float | None = None
    angles: str | None = None


@dataclass
class BatchResult:
    """What a batch gives: one row per series (also in batch.json), the trajectory of a time series
    (also in trajectory.json; None otherwise) and the batch's folder."""

    rows: list
    trajectory: dict | None
    out_dir: Path


# ---------------------------------------------------------------------------------------- the list
def batch_jobs(sources, out_dir, settings: dict | None = None) -> list[SeriesJob]:
    """The series of ``sources``: tilt-series files, glob patterns (matched in sorted order), or TOML
    lists (``[reconstruct]``: settings shared by its series; ``[[series]]``: ``data`` and optionally
    ``name``, ``out``, ``truth``, ``pixel_size``, ``angles`` and fit settings of its own; paths
    relative to the TOML file). ``settings`` (e.g. command-line flags) go on top of every series'.
    Each series writes to ``out_dir``/NAME (NAME: its file's stem) unless its ``out`` says otherwise;
    a file or pattern's series is scored against STEM_truth.xyz beside it when there is one (the
    fit never sees it).
    A file that is missing or unreadable is that series' failure, reported when it runs; a pattern
    that matches nothing, a bad TOML list or two series with one output folder stop the batch."""
    jobs = []
    for source in map(str, sources):
        if source.lower().endswith(".toml"):
            jobs += _toml_jobs(Path(source), Path(out_dir))
            continue
        paths = sorted(glob.glob(source)) if glob.has_magic(source) else [source]
        if not paths:
            raise InputError(source, "matches no file")
        jobs += [SeriesJob(Path(p).stem, p, str(Path(out_dir) / Path(p).stem), truth=_truth_beside(p)) for p in paths]
    if not jobs:
        raise InputError("batch", "no tilt series given")
    for job in jobs:
        job.settings = {**job.settings, **(settings or {})}
    seen = {}
    for job in jobs:
        key = os.path.normpath(os.path.abspath(job.out_dir))
        if key in seen:
            raise InputError(job.data, f"would write to {job.out_dir} as {seen[key]} does; give the series distinct "
                                       f"names (a TOML list with name = ... or out = ...)")
        seen[key] = job.data
    return jobs


def _truth_beside(path) -> str | None:
    """STEM_truth.xyz beside a series file (as `atomsplat simulate --build` writes it), if there is one."""
    truth = Path(path).with_name(Path(path).stem + "_truth.xyz")
    return str(truth) if truth.is_file() else None


def _toml_jobs(path: Path, out_dir: Path) -> list[SeriesJob]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        table = tomllib.loads(path.read_text())
    except OSError as err:
        raise InputError(path, err.strerror or str(err)) from None
    except tomllib.TOMLDecodeError as err:
        raise InputError(path, f"not valid TOML ({err})") from None
    shared, series = table.get("reconstruct", {}), table.get("series")
    unknown = sorted(set(table) - {"reconstruct", "series"})
    if unknown:
        raise InputError(path, f"unknown table {unknown[0]!r} (a batch list has [reconstruct] and [[series]])")
    if not isinstance(shared, dict) or not isinstance(series, list) or not series \
            or not all(isinstance(s, dict) and isinstance(s.get("data"), str) for s in series):
        raise InputError(path, "needs [[series]] entries with data = \"FILE\" (and optionally a [reconstruct] table)")
    base = path.parent

    def local(value):
        return None if value is None else str(base / value)

    jobs = []
    for entry in series:
        data = local(entry["data"])
        name = str(entry.get("name", Path(data).stem))
        out = local(entry["out"]) if "out" in entry else str(out_dir / name)
        own = {k: v for k, v in entry.items() if k not in SERIES_KEYS}
        jobs.append(SeriesJob(name, data, out, {**shared, **own}, local(entry.get("truth")), entry.get("pixel_size"),
                              local(entry.get("angles"))))
    return jobs


# ---------------------------------------------------------------------------------------- one task
def finished_report(out_dir: Path, settings, series) -> dict | None:
    """The report of a finished fit in ``out_dir`` of these data and (checked) ``settings``; None when
    the folder holds no finished fit. A finished fit of other data or settings is an InputError
    (the checkpoint's fingerprint decides, as for --resume; the tied-atom fit keeps no checkpoint,
    so its report's settings decide)."""
    from engine.fit.trainer import CHECKPOINT, check_checkpoint, data_fingerprint, read_checkpoint_meta

    report_path, checkpoint = out_dir / "report.json", out_dir / CHECKPOINT
    if not (report_path.is_file() and (out_dir / "atoms.xyz").is_file()):
        return None
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError):
        return None  # unreadable: not a finished fit; the fit's own folder rules decide what follows
    if checkpoint.exists():
        meta = read_checkpoint_meta(checkpoint)
        if meta["iteration"] < settings.iters:
            return None  # interrupted after an earlier finished fit: resume it
        fingerprint = data_fingerprint(series)
    else:
        meta, fingerprint = {"settings": report.get("settings", {})}, None
    try:
        check_checkpoint(checkpoint, meta, fingerprint, asdict(settings))
    except InputError as err:
        raise InputError(out_dir, f"holds a finished fit of other data or settings ({err.problem.split(';')[0]}); "
                                  "pass --overwrite to replace it") from None
    return report


def fit_series(job: SeriesJob, arch: str = "auto", overwrite: bool = False, previous: dict | None = None) -> dict:
    """Run one series (in a Dask worker, or here) and return its summary row; never raises for a bad
    series: its row says ``failed`` and why. ``previous``: the row of the state before (time series),
    whose atoms start this fit (a warm start; when that state failed, the atoms it would have started
    from)."""
    from engine.api import load_series, reconstruct
    from engine.fit.settings import fit_settings
    from engine.fit.trainer import CHECKPOINT

    t0 = time.perf_counter()
    row = {"name": job.name, "data": job.data, "out_dir": job.out_dir, "status": "failed", "n_atoms": None,
           "final_loss": None, "iterations": None, "f1": None, "rmsd_pm": None, "wall_seconds": None,
           "init": None, "error": None}
    try:
        settings = dict(job.settings)
        if previous is not None:  # the last state before that has atoms (none: a cold start)
            fitted = previous.get("status") in ("done", "skipped")
            row["init"] = str(Path(previous["out_dir"]).resolve() / "atoms.xyz") if fitted else previous.get("init")
            if row["init"] is not None:
                settings["init"] = row["init"]
        checked = fit_settings(settings)
        series = load_series(job.data, pixel_size=job.pixel_size, angles_file=job.angles)
        out = Path(job.out_dir)
        report = None if overwrite else finished_report(out, checked, series)
        if report is not None:
            metrics_path = out / "metrics.json"
            metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
            row["status"] = "skipped"
        else:
            resume = not overwrite and (out / CHECKPOINT).exists()
            result = reconstruct(series, settings, out_dir=out, arch=arch, resume=resume, overwrite=overwrite,
                                 truth=job.truth, progress=False)
            report, metrics, row["status"] = result.report, result.metrics, "done"
        row.update(n_atoms=report.get("n_atoms"), final_loss=report.get("final_loss"),
                   iterations=report.get("iterations"))
        if metrics is not None:
            row.update(f1=metrics.get("f1"), rmsd_pm=metrics.get("rmsd_pm"))
    except InputError as err:  # SettingError included: a setting of this series
        row["error"] = str(err)
    except MemoryError:
        row["error"] = f"{job.data}: out of memory"
    except Exception as err:  # a fault in one series must not stop the others; its row says what it was
        row["error"] = f"{job.data}: {type(err).__name__}: {err}"
    row["wall_seconds"] = time.perf_counter() - t0
    return row


# ---------------------------------------------------------------------------------------- cluster
def gpu_count() -> int:
    """NVIDIA GPUs this machine shows (/dev/nvidiaN); 0 elsewhere."""
    return len(glob.glob("/dev/nvidia[0-9]*"))


def local_cluster(workers: int | None = None, quiet: bool = True):
    """A local Dask cluster of worker processes (each a Nanny running one task at a time): ``workers``
    of them sharing the cores, else one per GPU, else one with every core (with GPUs, worker i sees
    GPU i mod their number).
    Each worker's CPU backend gets cores // workers threads (ATOMSPLAT_THREADS). The workers ignore
    Ctrl-C: the client stops them."""
    from distributed import Nanny, Scheduler, SpecCluster

    from engine.core.backend import cpu_threads

    gpus = gpu_count()
    n = workers if workers is not None else max(gpus, 1)
    threads = max(1, cpu_threads() // n)
    specs = {}
    for i in range(n):
        env = {"ATOMSPLAT_THREADS": str(threads), "OMP_NUM_THREADS": "1"}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
        specs[f"atomsplat-{i}"] = {"cls": Nanny, "options": {"nthreads": 1, "env": env,
                                                              "silence_logs": logging.ERROR if quiet else None}}
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0", "dashboard": False}}
    # Children inherit an ignored SIGINT (across exec too): Ctrl-C then reaches only this process.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None
    # Workers stopped in the middle of a task leave their queues' semaphores to multiprocessing's
    # resource tracker (started now, with this environment), which removes them and says so: not news.
    warnings_before = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [warnings_before, "ignore:resource_tracker:UserWarning"]))
    try:
        cluster = SpecCluster(workers=specs, scheduler=scheduler, silence_logs=logging.ERROR if quiet else False,
                              name="atomsplat")
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        if warnings_before is None:
            del os.environ["PYTHONWARNINGS"]
        else:
            os.environ["PYTHONWARNINGS"] = warnings_before
    return cluster


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ---------------------------------------------------------------------------------------- the batch
def run_batch(sources, out_dir="out/batch", *, settings: dict | None = None, workers: int | None = None,
              scheduler: str | None = None, time_series: bool = False, arch: str = "auto",
              overwrite: bool = False, track_radius: float = 1.0, progress: bool = True) -> BatchResult:
    """Reconstruct every series of ``sources`` (`batch_jobs`) on Dask; write batch.json and batch.md
    to ``out_dir`` and return the rows.

    settings     : fit settings for every series (on top of a TOML list's own).
    workers      : local worker processes (default: one per GPU, else one; 0: no Dask, the series
                   run in this process one after another); ``scheduler``: the address of an
                   existing Dask cluster instead.
    time_series  : the series are successive states of one specimen, in the order given: each fit
                   starts from the atoms of the state before (a warm start; density control still
                   adds and removes atoms), and the atoms are followed from state to state
                   (`engine.evaluate.tracking`, matched within ``track_radius`` Å) into
                   trajectory.json.
    overwrite    : fit every series again, replacing its earlier outputs.
    Ctrl-C cancels the batch: the summary lists what finished, the rest resume on the next run.
    """
    from engine.core.backend import ARCH_CHOICES
    from engine.core.files import make_folder, writable_folder
    from engine.core.settings import SettingError
    from engine.fit.settings import fit_settings

    if arch not in ARCH_CHOICES:
        raise SettingError("arch", f"unknown backend {arch!r}; choose one of {', '.join(ARCH_CHOICES)}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise InputError("--workers", f"must be a whole number >= 0, got {workers!r}")
    if workers is not None and scheduler is not None:
        raise InputError("--workers", "sizes a local cluster; an existing one (--scheduler) has its own workers")
    if not (isinstance(track_radius, (int, float)) and 0 < track_radius < float("inf")):
        raise InputError("--track-radius", f"must be a positive number of Å, got {track_radius!r}")
    fit_settings(settings)  # the batch's own settings are checked before any work; a list entry's when it runs
    out_dir = Path(os.path.normpath(out_dir))
    writable_folder(out_dir)
    jobs = batch_jobs(sources, out_dir, settings)
    make_folder(out_dir)
    rows = {job.name: _row_not_run(job) for job in jobs}
    started, cluster = time.perf_counter(), None
    try:
        if workers == 0:
            _collect(_run_here(jobs, arch, overwrite, time_series), rows, progress)
        else:
            from distributed import Client

            cluster = None if scheduler is not None else local_cluster(workers)
            with Client(scheduler if scheduler is not None else cluster, set_as_default=False) as client:
                _collect(_run_on_dask(client, jobs, arch, overwrite, time_series), rows, progress)
    except KeyboardInterrupt:
        _finish(out_dir, jobs, rows, time.perf_counter() - started, time_series, track_radius)
        done = sum(r["status"] in ("done", "skipped") for r in rows.values())
        raise KeyboardInterrupt(f"interrupted; {done} of {len(jobs)} series finished (summary in "
                                f"{out_dir / SUMMARY_JSON}); run it again to go on: finished series are "
                                f"skipped, interrupted fits resume from their checkpoints") from None
    finally:
        if cluster is not None:
            cluster.close()
    trajectory = _finish(out_dir, jobs, rows, time.perf_counter() - started, time_series, track_radius)
    return BatchResult([rows[job.name] for job in jobs], trajectory, out_dir)


def _row_not_run(job: SeriesJob) -> dict:
    return {"name": job.name, "data": job.data, "out_dir": job.out_dir, "status": "not run"}


def _run_on_dask(client, jobs, arch, overwrite, time_series):
    """One task per series, yielding (name, row) as they finish; in a time series each task takes
    the previous one's row (Dask passes the result along, so the states run in order)."""
    from distributed import as_completed

    futures, previous = {}, None
    for job in jobs:
        future = client.submit(fit_series, job, arch, overwrite, previous, key=f"atomsplat-{job.name}", pure=False)
        futures[future] = job
        previous = future if time_series else None
    try:
        for future in as_completed(list(futures), loop=client.loop):
            job = futures[future]
            try:
                row = future.result()
            except Exception as err:  # the task itself could not run (a worker lost, say)
                row = {**_row_not_run(job), "status": "failed", "error": f"{type(err).__name__}: {err}"}
            yield job.name, row
    except KeyboardInterrupt:
        client.cancel(list(futures), force=True)  # stop the tasks before the cluster goes
        raise


def _run_here(jobs, arch, overwrite, time_series):
    """The same tasks in this process, one after another (``workers=0``: no Dask)."""
    previous = None
    for job in jobs:
        row = fit_series(job, arch, overwrite, previous)
        previous = row if time_series else None
        yield job.name, row


def _collect(results, rows: dict, progress: bool) -> None:
    """Fill ``rows`` from ``results`` ((name, row) as series finish) under one progress bar."""
    from tqdm import tqdm

    counts = {"done": 0, "skipped": 0, "failed": 0}
    with tqdm(total=len(rows), desc="batch", unit="series", file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar:
        for name, row in results:
            rows[name] = row
            counts[row["status"]] += 1
            if progress:
                bar.write(f"[atomsplat] {name}: {_status_text(row)}", file=sys.stderr)
            bar.set_postfix(counts, refresh=False)
            bar.update(1)


def _status_text(row: dict) -> str:
    if row["status"] == "failed":
        return f"failed: {row.get('error')}"
    text = f"{row['status']}, {row.get('n_atoms')} atoms"
    if row.get("f1") is not None:
        text += f", F1 {row['f1']:.3f}, RMSD {row['rmsd_pm']:.2f} pm"
    return text + f" ({row.get('wall_seconds', 0):.1f} s)"


def _finish(out_dir: Path, jobs, rows: dict, seconds: float, time_series: bool, track_radius: float) -> dict | None:
    """Write the summary (and the trajectory of a time series); return the trajectory."""
    from engine.core.files import write_atomically

    ordered = [rows[job.name] for job in jobs]
    trajectory = _trajectory(out_dir, jobs, rows, track_radius) if time_series else None
    summary = {"series": ordered, "wall_seconds": seconds, "time_series": time_series,
               "counts": {s: sum(r["status"] == s for r in ordered) for s in ("done", "skipped", "failed", "not run")}}
    write_atomically(out_dir / SUMMARY_JSON, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    write_atomically(out_dir / SUMMARY_MD, lambda tmp: Path(tmp).write_text(summary_table(ordered)))
    return trajectory


def _trajectory(out_dir: Path, jobs, rows: dict, radius: float) -> dict | None:
    """Track the states that have atoms (a failed state is left out and said so)."""
    from engine.evaluate.tracking import track_states, write_trajectory
    from engine.io.atoms import read_atoms

    fitted = [job for job in jobs if rows[job.name]["status"] in ("done", "skipped")]
    if not fitted:
        return None
    files = [Path(job.out_dir) / "atoms.xyz" for job in fitted]
    trajectory = track_states([read_atoms(f) for f in files], radius, [job.name for job in fitted])
    for state, file in zip(trajectory["states"], files):
        state["atoms"] = os.path.relpath(file, out_dir)
    trajectory["left_out"] = [job.name for job in jobs if job not in fitted]
    write_trajectory(trajectory, out_dir / TRAJECTORY)
    return trajectory


def summary_table(rows: list) -> str:
    """The rows as a Markdown table: series, status, atoms, final loss, F1, RMSD (pm), wall (s)."""
    def cell(value, digits):
        return "" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    lines = ["| series | status | atoms | final loss | F1 | RMSD pm | wall s | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        note = (r.get("error") or "").replace("|", "\\|")
        lines.append(f"| {r['name']} | {r['status']} | {cell(r.get('n_atoms'), 0)} | {cell(r.get('final_loss'), 4)} | "
                     f"{cell(r.get('f1'), 3)} | {cell(r.get('rmsd_pm'), 2)} | {cell(r.get('wall_seconds'), 1)} | "
                     f"{note} |")
    return "\n".join(lines) + "\n"
