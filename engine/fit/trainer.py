"""The training loop: the learning-rate schedule, mini-batches, the density-control strategy's rounds,
joint alignment steps, the loss history, checkpoints (every ``checkpoint_every`` steps and on
Ctrl-C, which is held until the step in flight is done), the progress bar and an observer."""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np

from engine.core.errors import InputError
from engine.core.files import write_atomically

CHECKPOINT = "checkpoint.npz"
GAUGE_EVERY = 10  # steps between moving the alignment's gauge directions onto the atoms
LEARNING_RATES = ("lr_position", "lr_amplitude", "lr_width", "lr_shift", "lr_angle", "lr_intensity")


def learning_rates(settings, iteration: int, steps: int) -> dict:
    """Every learning rate (the settings' lr_*) at ``iteration`` of ``steps``: cosine decay from the
    set value to ``lr_final`` of it."""
    factor = settings.lr_final + (1 - settings.lr_final) * 0.5 * (1 + math.cos(math.pi * iteration / steps))
    return {name: getattr(settings, name) * factor for name in LEARNING_RATES}


def choose_batch(rng: np.random.Generator, n: int, size: int | None) -> np.ndarray:
    """The projections of a step: all n, or a sorted random mini-batch of ``size`` of them."""
    if size is not None and size < n:
        return np.sort(rng.choice(n, size, replace=False))
    return np.arange(n)


@contextmanager
def deferred_interrupt():
    """Ctrl-C during a step is held until the step is done, so a checkpoint never holds half a step.
    Yields a function telling whether an interrupt is pending (outside the main thread: never)."""
    pending = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = signal.signal(signal.SIGINT, lambda *_: pending.append(True))
    try:
        yield lambda: bool(pending)
    finally:
        signal.signal(signal.SIGINT, previous)


class Trainer:
    """Runs ``settings.iters`` steps of a `FitProblem` with a `DensityControl` strategy.

    out_dir : where checkpoints go.   rng : the fit's generator (mini-batches; shared with the strategy).
    """

    def __init__(self, problem, strategy, settings, out_dir, rng: np.random.Generator, progress: bool = True):
        self.problem, self.strategy, self.settings = problem, strategy, settings
        self.out_dir, self.rng, self.progress = Path(out_dir), rng, progress
        self.iteration = 0
        self.history = {"iteration": [], "loss": [], "atoms": []}
        self.phase_seconds = {"densify": 0.0, "refine": 0.0}

    def run(self, observer=None) -> None:
        """Step to ``settings.iters``, calling ``observer()`` after every step."""
        from tqdm import tqdm

        s, problem = self.settings, self.problem
        align_begin = int(s.align_start * s.iters) if problem.refiner is not None else s.iters
        bar = tqdm(total=s.iters, initial=self.iteration, disable=not self.progress, unit="it", file=sys.stderr,
                   dynamic_ncols=True)
        with deferred_interrupt() as interrupted:
            while self.iteration < s.iters:
                if interrupted():
                    bar.close()
                    self.save_checkpoint()  # the last completed step
                    raise KeyboardInterrupt
                t0 = time.perf_counter()
                counting = self.strategy.counting(self.iteration, s.iters)
                self.strategy.step_pre(problem, self.iteration, s.iters)
                align = self.iteration >= align_begin
                problem.step(learning_rates(s, self.iteration, s.iters), choose_batch(self.rng, problem.n_tilts, s.batch), align,
                             fit_offsets=problem.target.loss != "poisson", fix_gauge=self.iteration % GAUGE_EVERY == 0)
                self.iteration += 1
                self.phase_seconds["densify" if counting else "refine"] += time.perf_counter() - t0
                if self.iteration % 10 == 0 or self.iteration == s.iters:
                    loss = problem.loss_value()
                    self.history["iteration"].append(self.iteration)
                    self.history["loss"].append(loss)
                    self.history["atoms"].append(problem.model.count)
                    bar.set_postfix(loss=f"{loss:.4g}", atoms=problem.model.count, refresh=False)
                bar.update(1)
                if self.iteration % s.checkpoint_every == 0:
                    self.save_checkpoint()
                if observer is not None:
                    observer()
        bar.close()
        self.save_checkpoint()

    def save_checkpoint(self) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        payload = {f"state_{k}": v for k, v in self.problem.state().items()}
        if self.problem.refiner is not None:
            payload.update({f"align_{k}": v for k, v in self.problem.refiner.state().items()})
        payload["meta"] = np.array(json.dumps({
            "iteration": self.iteration, "settings": asdict(self.settings), "history": self.history,
            "phase_seconds": self.phase_seconds, "rng": self.rng.bit_generator.state}))
        path = self.out_dir / CHECKPOINT
        write_atomically(path, lambda tmp: np.savez(tmp, **payload))
        return path

    def load_checkpoint(self, path) -> None:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as f:
                state = {k[len("state_"):]: f[k] for k in f.files if k.startswith("state_")}
                alignment = {k[len("align_"):]: f[k] for k in f.files if k.startswith("align_")}
                meta = json.loads(str(f["meta"]))
        except (OSError, ValueError, KeyError) as err:
            raise InputError(path, f"not a readable atomsplat checkpoint ({err})") from err
        self.iteration = int(meta["iteration"])
        self.history = meta["history"]
        self.phase_seconds = meta["phase_seconds"]
        self.rng.bit_generator.state = meta["rng"]
        if self.problem.refiner is not None and alignment:
            self.problem.refiner.load_state(alignment)
            self.problem.apply_alignment()
            self.strategy.volumes.set_geometry(self.problem.geometry)
        self.problem.upload(state, sort=False)  # the order the run had: same sums, same results
