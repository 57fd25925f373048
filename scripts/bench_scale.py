"""Scale benchmark: Au spheres of about 10^3, 10^4 and 10^5 atoms, 90 tilts (−89..89 step 2), 0.35 Å
pixels, images sized to the particle (6 Å to spare), 2 % noise; the default fit (no B-factor
calibration). Each size runs in a process of its own, so its peak host memory (ru_maxrss) is its own.

Per size: atoms, image size, seconds per step (the training loop's time over its steps, density
rounds included), steps to converge and why it stopped, total time (simulation excluded: fit
preparation, seeding and training), peak host memory, CPU utilisation (CPU seconds / wall seconds /
cores), F1 at 1 Å and RMSD against the truth; then the fitted exponent of the time per step and of
the total time against N (least squares in log-log over the sizes run). Device memory is reported
where Taichi runs on CUDA (its allocator's bytes in use); on the CPU backend the fields are host memory.
The last line is JSON.

    python scripts/bench_scale.py [--sizes 1000,10000,100000] [--arch cpu] [--iters 800]
"""

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

AU_DENSITY = 4 / 4.078 ** 3  # atoms per Å³ (fcc, a = 4.078 Å)


def radius_for(n_atoms: int) -> float:
    """Sphere radius (Å) holding about ``n_atoms`` Au atoms."""
    return (3 * n_atoms / (4 * math.pi * AU_DENSITY)) ** (1 / 3)


def one_size(n_atoms: int, arch: str, iters: int) -> dict:
    from engine.api import simulate
    from engine.core.backend import init_backend
    from engine.evaluate.metrics import evaluate_atoms
    from engine.fit.reconstruct import Reconstruction
    from engine.fit.settings import fit_settings
    from engine.physics.structures import build_structure

    arch = init_backend(arch)
    truth = build_structure({"kind": "sphere", "element": "Au", "radius": radius_for(n_atoms), "euler": [20, 35, -50]})
    series = simulate(truth, "-89:89:2", 0.35, noise=0.02, seed=0, arch=arch)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        fit = Reconstruction(series, fit_settings(species=["Au"], thermal_refits=0, iters=iters), out, progress=True)
        atoms = fit.run()
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    phases = fit.phase_seconds
    train = phases["densify"] + phases["refine"]
    metrics = evaluate_atoms(atoms, truth, radius=1.0, radii_extra=())
    device = None
    if arch == "cuda":
        import taichi as ti

        device = ti.lang.impl.get_runtime().prog.get_total_device_memory_allocated() if hasattr(
            ti.lang.impl.get_runtime().prog, "get_total_device_memory_allocated") else None
    return {"n_atoms": len(truth), "image_px": list(series.shape), "tilts": series.n_tilts, "arch": arch,
            "steps": fit.iteration, "stop": fit.trainer.stop_reason, "density_rounds": fit.trainer.schedule["rounds"],
            "seconds_per_step": train / max(fit.iteration, 1), "train_s": train, "total_s": wall,
            "prepare_s": phases["prepare"], "phase_seconds": phases, "peak_host_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "device_bytes": device, "cpu_utilisation": cpu / wall / os.cpu_count(), "f1_1A": metrics["f1"],
            "rmsd_pm": metrics["rmsd_pm"], "n_fitted": len(atoms)}


def exponent(ns, values) -> float | None:
    """Slope of log(value) against log(N) (least squares), None with fewer than two sizes."""
    if len(ns) < 2:
        return None
    return float(np.polyfit(np.log(ns), np.log(values), 1)[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="atom counts, comma-separated")
    parser.add_argument("--arch", default="cpu", choices=["cpu", "cuda", "vulkan"])
    parser.add_argument("--iters", type=int, default=800, help="the fit's step cap")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child process: one size, JSON out
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_size(args.one, args.arch, args.iters)))
        return
    rows = []
    for n in (int(v) for v in args.sizes.split(",")):
        child = subprocess.run([sys.executable, __file__, "--one", str(n), "--arch", args.arch, "--iters",
                                str(args.iters)], stdout=subprocess.PIPE, text=True, env={**os.environ})
        if child.returncode != 0:
            print(f"N={n}: failed (exit {child.returncode})", flush=True)
            continue
        r = json.loads(child.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"N={r['n_atoms']} ({r['image_px'][0]}x{r['image_px'][1]} px, {r['tilts']} tilts, {r['arch']}): "
              f"{1e3 * r['seconds_per_step']:.1f} ms/step, {r['steps']} steps ({r['stop']}, {r['density_rounds']} "
              f"density rounds), train {r['train_s']:.1f} s, total {r['total_s']:.1f} s, peak host "
              f"{r['peak_host_MiB']:.0f} MiB, CPU use {100 * r['cpu_utilisation']:.0f} % of {os.cpu_count()} cores, "
              f"F1 @ 1 A {r['f1_1A']:.4f}, RMSD {r['rmsd_pm']:.2f} pm", flush=True)
    ns = [r["n_atoms"] for r in rows]
    fitted = {"per_step": exponent(ns, [r["seconds_per_step"] for r in rows]),
              "total": exponent(ns, [r["total_s"] for r in rows])}
    if len(rows) >= 2:
        print(f"time ~ N^{fitted['per_step']:.2f} per step, N^{fitted['total']:.2f} in total "
              f"(sizes {', '.join(map(str, ns))})", flush=True)
    print(json.dumps({"sizes": rows, "exponent": fitted}))


if __name__ == "__main__":
    main()
