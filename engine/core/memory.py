"""Memory checks before large allocations: a run that cannot fit says so, with what it would need,
before any work rather than with a MemoryError after it."""

from __future__ import annotations

import os

from engine.core.errors import InputError


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux: MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(n: float) -> str:
    """1.5e9 → '1.5 GB' (decimal units)."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} PB"


def require_memory(nbytes: float, source, what: str, hint: str = "") -> None:
    """InputError naming ``source`` when ``what`` (e.g. '61 projections of 4096 x 4096 px') needs more
    than the memory available now; ``hint`` says what to change."""
    available = available_memory()
    if available is not None and nbytes > available:
        raise InputError(source, f"{what} would need about {format_bytes(nbytes)} of memory, "
                                 f"{format_bytes(available)} is available{'; ' + hint if hint else ''}")
