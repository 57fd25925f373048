"""Batch figures for the README: the wall time of N small simulated series on a local Dask cluster of
1 worker against 2 workers (the same series, fresh output folders, cluster start included), and the
warm start of a time series: the steps each state's fit needs to come within 0.1 % of its final
loss, started cold (seeding) against warm (the previous state's atoms).

    python scripts/bench_batch.py [--series 8] [--iters 200] [--out /tmp/bench_batch] [--part all|workers|warm]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def steps_to_converge(report: dict, tolerance: float = 1e-3) -> int:
    """The first recorded iteration whose loss is within ``tolerance`` (relative) of the run's last."""
    history = report["history"]
    final = history["loss"][-1]
    return next(it for it, loss in zip(history["iteration"], history["loss"]) if loss <= final * (1 + tolerance))


def main() -> None:
    from engine.api import reconstruct
    from engine.batch import run_batch
    from test_batch import cuboctahedron, time_series_truth, write_series

    parser = argparse.ArgumentParser()
    parser.add_argument("--series", type=int, default=8)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--out", default="/tmp/bench_batch")
    parser.add_argument("--part", choices=("all", "workers", "warm"), default="all")
    args = parser.parse_args()
    out = Path(args.out)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    settings = {"species": ["Au"], "iters": args.iters, "thermal_refits": 0}
    for i in range(args.series):
        if not (data / f"p{i}.npz").exists():
            write_series(data, f"p{i}", cuboctahedron(1 + i % 2, (15.0 * i, 35, -50)), seed=i, tilts="-70:70:5")
    walls = {}
    for workers in (1, 2) if args.part in ("all", "workers") else ():
        t0 = time.perf_counter()
        result = run_batch([str(data / "p*.npz")], out / f"workers{workers}", settings=settings, workers=workers,
                           arch="cpu", overwrite=True, progress=False)
        walls[workers] = time.perf_counter() - t0
        statuses = {row["status"] for row in result.rows}
        print(f"{args.series} series, {workers} worker(s): {walls[workers]:.1f} s ({statuses})", flush=True)
    if walls:
        print(f"ratio 1 worker / 2 workers: {walls[1] / walls[2]:.2f}", flush=True)
    if args.part == "workers":
        return

    from engine.api import simulate
    from engine.io.atoms import Atoms

    states, _, _, moved = time_series_truth()
    # the states of tests/test_batch.py (state 1: two atoms moved and a vacancy; state 2: one more moved
    # and an atom added), then a state 3 in which state 2's atoms only move (the same steps again)
    state3 = states[2].copy()
    state3[[0, 7, 20]] += [[0.2, 0.1, -0.15], [0.0, -0.25, 0.1], [0.15, 0.0, 0.2]]
    states = states + [state3]
    series = [simulate(Atoms(np.full(len(p), "Au"), p), "-70:70:5", 0.3, noise=0.02, seed=10 + k, arch="cpu")
              for k, p in enumerate(states)]
    ts = {**settings, "iters": 400}
    previous = None
    for k, s in enumerate(series):
        cold = reconstruct(s, ts, out_dir=out / f"cold{k}", overwrite=True, arch="cpu", progress=False)
        line = f"state {k}: cold {steps_to_converge(cold.report)} steps (final loss {cold.report['final_loss']:.5f})"
        if previous is not None:
            warm = reconstruct(s, {**ts, "init": str(previous)}, out_dir=out / f"warm{k}", overwrite=True, arch="cpu",
                               progress=False)
            line += (f", warm {steps_to_converge(warm.report)} steps (final loss {warm.report['final_loss']:.5f}; "
                     f"first recorded loss cold {cold.report['history']['loss'][0]:.4f}, "
                     f"warm {warm.report['history']['loss'][0]:.4f})")
        print(line, flush=True)
        previous = out / f"cold{k}" / "atoms.xyz"


if __name__ == "__main__":
    main()
