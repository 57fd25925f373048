"""Viewer overhead: the default demo fit without an observer and with the viewer drawing a frame
every k iterations (the headless recorder, or with --live the GGUI window), in one process on one
backend.

The fit time is `Reconstruction.run` (the optimisation loop; B-factor calibration is switched off so
the loop is all of it, which makes the ratio stricter). The viewer's time is what it takes from the
fit, counted directly (`cost_seconds`): for the recorder, drawing (snapshot, 3D render, composing)
plus the CPU time of PNG encoding on its background thread; for the window, drawing plus showing the
frame. The movie is assembled after the fit and reported separately. The difference of wall times
is printed too, but on a shared 2-core machine it is as noisy as the effect. Every fit reads its
model and one projection back before the clock starts: the first read-back of a new model or
projector compiles kernels (0.1-0.3 s), a one-off that the fit pays anyway at its first density
control and when it writes its outputs, so it is nobody's cost here. Runs alternate (plain,
viewer, plain, ...) after a warm-up that compiles every kernel; times are medians over --repeats.

    python scripts/bench_viewer.py [--arch cpu|cuda|vulkan] [--every 50,100,200] [--repeats 3] [--live]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from engine.core.backend import init_backend
from engine.physics.simulate import auto_shape
from engine.fit.reconstruct import Reconstruction
from engine.fit.settings import FIT_SCHEMA, fit_settings
from engine.scene import load_scene
from engine.physics.simulate import parse_tilt_range, simulate_tilt_series
from engine.physics.structures import build_structure
from viewer.window import DEFAULT_EVERY, HeadlessRecorder, LiveViewer, display_available

DEMO = Path(__file__).resolve().parents[1] / "scenes" / "demo.toml"


def demo_series():
    sim = load_scene(DEMO).simulate
    atoms = build_structure(sim["build"], seed=sim.get("seed", 0))
    return simulate_tilt_series(atoms, parse_tilt_range(sim["tilts"]), sim["pixel_size"],
                                auto_shape(atoms, sim["pixel_size"]), blur_sigma=sim.get("blur", 0.4),
                                noise=sim.get("noise", 0.0), seed=sim.get("seed", 0))


def fit_seconds(series, settings: dict, out_dir: Path, every: int | None, live: bool):
    """(fit seconds, the observer or None, seconds to finish afterwards: the movie, or closing the window)."""
    rec = Reconstruction(series, fit_settings(settings), out_dir, progress=False)
    rec.projection_images(0)  # compile the read-back kernels of this fit's fields before the clock starts
    rec.problem.state()
    observer = None if not every else LiveViewer(out_dir, every) if live else HeadlessRecorder(out_dir, every)
    t0 = time.perf_counter()
    rec.run(observer=observer)
    fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    if observer is not None:
        observer.close() if live else observer.finish()
    return fit, observer, time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="cpu")
    parser.add_argument("--every", default=f"50,{DEFAULT_EVERY},200", help="comma-separated k values")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--live", action="store_true", help="measure the live window instead (needs a display)")
    args = parser.parse_args()
    if args.live and not display_available():
        parser.error("--live needs a display")
    arch = init_backend(args.arch)
    series = demo_series()
    settings = {**load_scene(DEMO).reconstruct, "thermal_refits": 0}
    ks = [int(k) for k in args.every.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        fit_seconds(series, {**settings, "iters": 60}, Path(tmp) / "warm", 20, args.live)
        plain, viewed = [], {k: [] for k in ks}
        for _ in range(args.repeats):
            plain.append(fit_seconds(series, settings, Path(tmp) / "plain", None, False)[0])
            for k in ks:
                viewed[k].append(fit_seconds(series, settings, Path(tmp) / f"k{k}", k, args.live))
        base = statistics.median(plain)
        print(f"demo fit, {settings.get('iters', FIT_SCHEMA.settings['iters'].default)} iterations on {arch}: "
              f"{base:.2f} s without the viewer (median of {args.repeats})")
        for k in ks:
            fit = statistics.median(r[0] for r in viewed[k])
            observer = viewed[k][-1][1]
            cost = statistics.median(r[1].cost_seconds() for r in viewed[k])
            after = statistics.median(r[2] for r in viewed[k])
            print(f"k = {k:3d}{' (default)' if k == DEFAULT_EVERY else '':10s}: {observer.frames_drawn} frames, viewer "
                  f"time {cost:.2f} s = {100 * cost / base:.1f} % of the fit; fit wall time {fit:.2f} s "
                  f"({100 * (fit / base - 1):+.1f} %); then {after:.1f} s "
                  f"{'closing the window' if args.live else 'writing ' + observer.movie.name}")

if __name__ == "__main__":
    main()
