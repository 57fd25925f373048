"""Writing files safely: nothing the user had is lost to a half-written file."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from engine.core.errors import InputError


def write_atomically(path, write) -> Path:
    """Let ``write(tmp)`` create the file at ``tmp`` (a Path beside ``path`` with the same extension),
    then rename it onto ``path``: readers see the old file or the new one, never half of one, and a
    failed write leaves the old file and no temporary behind. OS errors become InputError naming
    ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise InputError(path, f"cannot write ({err})") from err
    finally:
        tmp.unlink(missing_ok=True)
    return path
