"""Choosing and starting the Taichi backend (`--arch cpu|cuda|vulkan|auto`)."""

from __future__ import annotations

import contextlib
import glob
import os
import sys
import time
import weakref
from pathlib import Path

import taichi as ti

from engine.core.errors import InputError
from engine.core.settings import SettingError

ARCH_CHOICES = ("auto", "cpu", "cuda", "vulkan")
_TI_ARCH = {"cpu": ti.cpu, "cuda": ti.cuda, "vulkan": ti.vulkan}
_state = {"arch": None, "cache": {}}


def cpu_threads() -> int:
    """Threads of the CPU backend: ``ATOMSPLAT_THREADS`` when set (a whole number >= 1), else every
    core. A bad value is an InputError naming the variable."""
    text = os.environ.get("ATOMSPLAT_THREADS", "").strip()
    if not text:
        return os.cpu_count() or 1
    try:
        threads = int(text)
    except ValueError:
        threads = 0
    if threads < 1:
        raise InputError("ATOMSPLAT_THREADS", f"must be a whole number of threads >= 1, got {text!r}")
    return threads


# Taichi's offline cache holds its index behind a lock file that is only held while the index is
# read or written (milliseconds); one left by a killed process makes every later start skip the
# cache, so every kernel compiles again (seconds per fit). Older than this, a lock is such a leftover.
STALE_LOCK_SECONDS = 60.0


def kernel_cache_dir() -> Path:
    """Where compiled kernels are kept between runs: ``TI_OFFLINE_CACHE_FILE_PATH`` when set, else
    atomsplat's own folder under the user's cache (``$XDG_CACHE_HOME``, default ~/.cache), apart from
    other Taichi programs' cache so that their kernels neither crowd ours out nor hold its lock."""
    given = os.environ.get("TI_OFFLINE_CACHE_FILE_PATH", "").strip()
    if given:
        return Path(given)
    root = os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache"
    return Path(root) / "atomsplat" / ("taichi-" + ".".join(map(str, ti.__version__)))


def _clear_stale_lock(cache: Path) -> None:
    """Remove the cache's index lock when a dead process left it (see STALE_LOCK_SECONDS)."""
    lock = cache / "ticache.lock"
    with contextlib.suppress(OSError):  # gone meanwhile, or not ours to remove: Taichi then warns
        if time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
            lock.unlink()


def _memoise_source_hints() -> None:
    """Taichi formats a source excerpt with a caret line (through textwrap) for every AST node it
    transforms, to attach to error messages; inlined `ti.func`s and static loops transform the same
    node many times (about 6 times per node here), and the formatting is a third of the time that
    compiling, or loading from the cache, every kernel of a fit takes in each new process. The text
    depends only on the node's place in its source, so it is computed once per place; messages are
    unchanged. Taichi versions without this hook are left as they are."""
    context = getattr(getattr(ti.lang, "ast", None), "ast_transformer_utils", None)
    context = getattr(context, "ASTTransformerContext", None)
    original = getattr(context, "get_pos_info", None)
    if original is None or getattr(original, "memoised", False):
        return
    hints = {}

    def get_pos_info(self, node):
        place = (self.file, self.lineno_offset, self.indent, self.func.func.__name__, type(node).__name__,
                 node.lineno, node.end_lineno, node.col_offset, node.end_col_offset)
        if place not in hints:
            hints[place] = original(self, node)
        return hints[place]

    get_pos_info.memoised = True
    context.get_pos_info = get_pos_info


_memoise_source_hints()


def _start(name: str) -> str:
    threads = cpu_threads()
    cache = kernel_cache_dir()
    _clear_stale_lock(cache)
    with contextlib.redirect_stdout(sys.stderr):  # Taichi prints "Starting on arch=..." to stdout
        ti.init(arch=_TI_ARCH[name], default_fp=ti.f32, default_ip=ti.i32, random_seed=0,
                log_level=ti.WARN, offline_cache=True, offline_cache_file_path=str(cache),
                cpu_max_num_threads=threads)
    got = ti.lang.impl.current_cfg().arch
    actual = {ti.x64: "cpu", ti.arm64: "cpu", ti.cuda: "cuda", ti.vulkan: "vulkan"}.get(got, str(got))
    _state["arch"] = actual
    _state["cache"] = {}
    return actual


def _gpu_present() -> bool:
    """Whether this machine has a GPU a Vulkan driver could use. On Linux a GPU shows as a DRM render
    node or an NVIDIA device; without one, Vulkan can only be Mesa's software rasteriser (lavapipe),
    which runs these kernels several times slower than Taichi's own CPU backend. Elsewhere: assumed."""
    if not sys.platform.startswith("linux"):
        return True
    return bool(glob.glob("/dev/dri/renderD*") or glob.glob("/dev/nvidia[0-9]*"))


def init_backend(arch: str = "auto", verbose: bool = False) -> str:
    """Start Taichi on ``arch`` and return the backend actually running ('cpu', 'cuda' or 'vulkan').

    'auto' tries CUDA, then Vulkan (only where a GPU is present: `_gpu_present`), then the CPU, and
    says which it picked when ``verbose`` (once, when it starts).
    Asking for a backend that this machine lacks is an error rather than a silent CPU fallback.
    Calling it again with 'auto' or the running arch keeps the running backend; another arch restarts
    Taichi, and every field allocated before is gone (so is `session_cache`).
    """
    if arch not in ARCH_CHOICES:
        raise SettingError("arch", f"unknown backend {arch!r}; choose one of {', '.join(ARCH_CHOICES)}")
    started = True
    if _state["arch"] is not None and arch in ("auto", _state["arch"]):
        actual = _state["arch"]  # already running: keep the fields and compiled kernels
        started = False
    elif arch == "auto":
        # ti.init falls back to the CPU when a backend is missing, so the first that sticks wins.
        for candidate in ("cuda", "vulkan", "cpu") if _gpu_present() else ("cpu",):
            actual = _start(candidate)
            if actual == candidate:
                break
    else:
        actual = _start(arch)
        if actual != arch:
            raise SettingError("arch", f"backend {arch!r} is not available on this machine (Taichi started {actual!r})")
    if verbose and started:  # said once, when it starts
        print(f"[atomsplat] backend: {actual}", file=sys.stderr)
    return actual


def current_arch() -> str | None:
    """The backend started by the last `init_backend`, or None before the first."""
    return _state["arch"]


def session_cache() -> dict:
    """A dict that lives as long as the running Taichi backend (emptied on restart): for fields and
    data-oriented objects worth reusing, since every new one means compiling its kernels again."""
    return _state["cache"]


def leased(key, build, owner):
    """An object of configuration ``key`` for ``owner`` alone: one that an earlier owner, now gone,
    held in this Taichi session (its kernels compiled already), else a new one from ``build()``. It
    returns to the session's pool when ``owner`` is garbage-collected; the new owner sets every
    value it reads. Unlike `session_cache` objects, a leased one never has two owners at once."""
    free = _state["cache"].setdefault(("free", key), [])
    thing = free.pop() if free else build()
    weakref.finalize(owner, free.append, thing)
    return thing
