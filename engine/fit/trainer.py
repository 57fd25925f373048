"""The training loop: the learning-rate schedule, mini-batches, the density-control strategy's rounds,
joint alignment steps, the loss history, checkpoints (every ``checkpoint_every`` steps and on
Ctrl-C, which is held until the step in flight is done), the progress bar and an observer.

A checkpoint records what it belongs to: a fingerprint of the tilt series (`data_fingerprint`) and
the settings. Resuming checks both (`check_checkpoint`), so a checkpoint is never continued with
other data or other settings."""

from __future__ import annotations

import hashlib
import json
import signal
import sys
import threading
import time
import zipfile
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np

from engine.core.errors import InputError
from engine.core.files import write_atomically
from engine.fit.convergence import CAPPED, CHECK_EVERY, CONVERGED, INTERRUPTED, Convergence

CHECKPOINT = "checkpoint.npz"
GAUGE_EVERY = 10  # steps between moving the alignment's gauge directions onto the atoms
LEARNING_RATES = ("lr_position", "lr_amplitude", "lr_width", "lr_shift", "lr_angle", "lr_intensity")


def data_fingerprint(series) -> dict:
    """What identifies a tilt series for a checkpoint: a SHA-256 of its images, angles, pixel size
    and explicit geometry, with its shape and file for messages."""
    digest = hashlib.sha256()
    arrays = [series.projections, series.angles, np.array([float(series.pixel_size)])]
    if series.geometry is not None:
        arrays += [series.geometry.rotations, series.geometry.shifts, series.geometry.tilt_axes]
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
    return {"sha256": digest.hexdigest(), "shape": list(series.projections.shape), "source": series.source}


def read_checkpoint_meta(path) -> dict:
    """The bookkeeping of a checkpoint (iteration, settings, data fingerprint, …) without its arrays.
    A missing, truncated or foreign file is an InputError naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no checkpoint here" if not path.exists() else "not a regular file")
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
        int(meta["iteration"]), dict(meta["settings"])
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as err:
        raise InputError(path, f"not a readable atomsplat checkpoint: truncated, corrupt or another file "
                               f"({type(err).__name__}: {err})") from None
    return meta


def resumed_settings(meta: dict, values: dict | None) -> dict:
    """The settings to resume a checkpoint with: its own (``meta``), with ``values`` given on top (a
    given value that differs is then refused by `check_checkpoint`)."""
    from engine.fit.settings import FIT_SCHEMA

    saved = {k: v for k, v in meta["settings"].items() if k in FIT_SCHEMA.settings}
    return {**saved, **(values or {})}


def _show(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, dict):
        return ",".join(f"{k}:{v:g}" for k, v in value.items())
    return "not set" if value is None else str(value)


def check_checkpoint(path, meta: dict, fingerprint: dict | None, settings: dict) -> None:
    """Refuse to resume the checkpoint at ``path`` (its ``meta``) with data of another ``fingerprint``
    or other ``settings`` (a dict; ``checkpoint_every`` may differ): InputError naming the checkpoint
    and what differs."""
    saved = meta.get("data")
    if fingerprint is not None and saved is not None and saved.get("sha256") != fingerprint["sha256"]:
        def describe(d):
            shape = "x".join(map(str, d.get("shape") or [])) or "?"
            return f"{d.get('source') or 'a tilt series'} ({shape})"

        raise InputError(path, f"belongs to a fit of other data: {describe(saved)}, not {describe(fingerprint)}; "
                               "resume with the same data, or start a new fit with --overwrite")
    if saved is None and fingerprint is not None:
        import warnings

        warnings.warn(f"{path}: written without a data fingerprint (an older atomsplat); cannot check that it "
                      "belongs to this data", UserWarning, stacklevel=2)
    current = json.loads(json.dumps(settings))
    differ = [f"{name} {_show(meta['settings'].get(name))} there, {_show(value)} here"
              for name, value in current.items()
              if name != "checkpoint_every" and name in meta["settings"] and meta["settings"][name] != value]
    if differ:
        raise InputError(path, f"was written with other settings ({'; '.join(differ)}); resume with the same "
                               "settings (any not given are taken from the checkpoint)")


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
    """Steps a `FitProblem` with a `DensityControl` strategy until it converges
    (`engine.fit.convergence`), at most ``settings.iters`` steps.

    The schedule reads off the fit, not the step count: density-control rounds come when the fit has
    settled at the first learning rate (or ``densify_every`` steps after the last round, and only
    during the first ``densify_until`` of the cap); once a round adds no atom, the count is final
    and each further settling lowers the learning rates, until the lowest rates settle too. When the
    alignment is refined it starts once the count is final (at the latest at ``align_start`` of the
    cap), and the rates step down only after it has run.

    out_dir : where checkpoints go.   rng : the fit's generator (mini-batches; shared with the strategy).
    fingerprint : a callable giving the data's `data_fingerprint` (called once, at the first checkpoint).
    """

    def __init__(self, problem, strategy, settings, out_dir, rng: np.random.Generator, progress: bool = True,
                 fingerprint=None):
        self.problem, self.strategy, self.settings = problem, strategy, settings
        self.out_dir, self.rng, self.progress = Path(out_dir), rng, progress
        self._fingerprint, self._fingerprint_value = fingerprint, None
        self.iteration = 0
        self.history = {"iteration": [], "loss": [], "atoms": []}
        self.phase_seconds = {"densify": 0.0, "refine": 0.0}
        self.convergence = Convergence(settings.lr_final)
        # The schedule's own state (all of it goes into checkpoints).
        self.schedule = {"counting": True, "last_round": 0, "round_due": False, "align_from": None,
                         "stop": None, "rounds": 0}

    @property
    def stop_reason(self) -> str | None:
        """Why the fit stopped: `CONVERGED`, `CAPPED`, `INTERRUPTED`, or None while it runs."""
        return self.schedule["stop"]

    def _align_from(self) -> int:
        """The first step that moves the alignment (the cap when it is not refined)."""
        s = self.settings
        if self.problem.refiner is None:
            return s.iters
        start = int(s.align_start * s.iters)
        return start if self.schedule["align_from"] is None else min(start, self.schedule["align_from"])

    def _check(self) -> None:
        """Every CHECK_EVERY steps: the loss history, and the schedule's decisions (see the class)."""
        problem, sched = self.problem, self.schedule
        loss = problem.series_loss()
        pixels = problem.target.n_proj * problem.target.height * problem.target.width
        self.history["iteration"].append(self.iteration)
        self.history["loss"].append(loss / pixels)
        self.history["atoms"].append(problem.model.count)
        # While the count may change, settled means the atoms wander within their error bars (a round
        # is due); after it, no improvement of ½ nat at all (rates step down, alignment, convergence).
        parameters = problem.free_parameters() if sched["counting"] else 1
        if not self.convergence.settled(loss, problem.model.largest_step(), parameters):
            return
        if sched["counting"]:
            sched["round_due"] = True
        elif problem.refiner is not None and self.iteration < self._align_from():
            sched["align_from"] = self.iteration  # the count is final: the alignment may move now
            self.convergence.restart()
        elif not self.convergence.step_down():
            sched["stop"] = CONVERGED

    def _round(self) -> None:
        """A density-control round when one is due; a round that adds no atom (spawns, splits and
        merges none) ends counting: every atom left has then been tested, and the residual of those
        it kept searched for missing ones. One that only culls (seeds beside the particle, a
        sparse series' artifacts) thus costs no further round."""
        s, sched = self.settings, self.schedule
        if sched["counting"] and self.iteration >= int(s.densify_until * s.iters):
            # Counting ends by the cap: a last round that only removes (no atom left untested).
            self.strategy.round(self.problem, spawn=False)
            sched.update(counting=False, last_round=self.iteration, rounds=sched["rounds"] + 1)
            self.convergence.restart()
        if not sched["counting"]:
            return
        if not (sched["round_due"] or self.iteration - sched["last_round"] >= s.densify_every):
            return
        changes = self.strategy.round(self.problem)
        sched.update(round_due=False, last_round=self.iteration, rounds=sched["rounds"] + 1)
        if any(changes.values()):
            self.convergence.restart()
        if not (changes["spawned"] or changes["split"] or changes["merged"]):
            sched["counting"] = False

    def run(self, observer=None) -> None:
        """Step until converged or ``settings.iters``, calling ``observer()`` after every step."""
        from tqdm import tqdm

        s, problem, sched = self.settings, self.problem, self.schedule
        bar = tqdm(total=s.iters, initial=self.iteration, disable=not self.progress, unit="it", file=sys.stderr,
                   dynamic_ncols=True)
        with deferred_interrupt() as interrupted:
            while self.iteration < s.iters and sched["stop"] is None:
                if interrupted():
                    bar.close()
                    sched["stop"] = INTERRUPTED
                    self.save_checkpoint()  # the last completed step
                    sched["stop"] = None
                    raise KeyboardInterrupt
                t0 = time.perf_counter()
                counting = sched["counting"]
                self._round()
                lr = self.convergence.learning_rates(s, LEARNING_RATES)
                problem.step(lr, choose_batch(self.rng, problem.n_tilts, s.batch), self.iteration >= self._align_from(),
                             fit_offsets=problem.target.loss != "poisson", fix_gauge=self.iteration % GAUGE_EVERY == 0)
                self.iteration += 1
                if self.iteration % CHECK_EVERY == 0 or self.iteration == s.iters:
                    self._check()
                    bar.set_postfix(loss=f"{self.history['loss'][-1]:.4g}", atoms=problem.model.count,
                                    lr=f"{self.convergence.factor:.2g}", refresh=False)
                self.phase_seconds["densify" if counting else "refine"] += time.perf_counter() - t0
                bar.update(1)
                if self.iteration % s.checkpoint_every == 0:
                    self.save_checkpoint()
                if observer is not None:
                    observer()
        if sched["stop"] is None:
            sched["stop"] = CAPPED
        bar.close()
        self.save_checkpoint()

    def fingerprint(self) -> dict | None:
        """The data's fingerprint, computed once."""
        if self._fingerprint_value is None and self._fingerprint is not None:
            self._fingerprint_value = self._fingerprint()
        return self._fingerprint_value

    def save_checkpoint(self) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        payload = {f"state_{k}": v for k, v in self.problem.state().items()}
        if self.problem.refiner is not None:
            payload.update({f"align_{k}": v for k, v in self.problem.refiner.state().items()})
        payload.update({f"data_{k}": v for k, v in self.problem.data_state().items()})
        payload["meta"] = np.array(json.dumps({
            "iteration": self.iteration, "settings": asdict(self.settings), "history": self.history,
            "phase_seconds": self.phase_seconds, "rng": self.rng.bit_generator.state, "data": self.fingerprint(),
            "schedule": self.schedule, "convergence": self.convergence.state()}))
        path = self.out_dir / CHECKPOINT
        write_atomically(path, lambda tmp: np.savez(tmp, **payload))
        return path

    def load_checkpoint(self, path) -> None:
        """Continue from the checkpoint at ``path``; refuses one of other data or settings."""
        path = Path(path)
        meta = read_checkpoint_meta(path)
        check_checkpoint(path, meta, self.fingerprint(), asdict(self.settings))
        try:
            with np.load(path, allow_pickle=False) as f:
                state = {k[len("state_"):]: f[k] for k in f.files if k.startswith("state_")}
                alignment = {k[len("align_"):]: f[k] for k in f.files if k.startswith("align_")}
                data_state = {k[len("data_"):]: f[k] for k in f.files if k.startswith("data_")}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            raise InputError(path, f"not a readable atomsplat checkpoint: truncated or corrupt "
                                   f"({type(err).__name__}: {err})") from None
        self.iteration = int(meta["iteration"])
        self.history = meta["history"]
        self.phase_seconds = meta["phase_seconds"]
        self.rng.bit_generator.state = meta["rng"]
        if "schedule" in meta:  # older checkpoints ran a fixed schedule: they continue with this one from its start
            self.schedule = {**meta["schedule"], "stop": None}  # a checkpoint is of a fit still running
            self.convergence.load_state(meta["convergence"])
        if self.problem.refiner is not None and alignment:
            self.problem.refiner.load_state(alignment)
            self.problem.apply_alignment()
            self.strategy.volumes.set_geometry(self.problem.geometry)
        self.problem.load_data_state(data_state)
        self.problem.upload(state, sort=False)  # the order the run had: same sums, same results
