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
    ``path``; a failed cleanup never hides the error that caused it."""
    path = Path(path)
    if path.is_dir():
        raise InputError(path, "is a folder; give a file name")
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise InputError(path, f"cannot write ({os_reason(err)})") from err
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # nothing was created there (an unwritable folder): the error above says why
    return path


def os_reason(err: OSError) -> str:
    """An OS error in words, without the path (the message names it already)."""
    return err.strerror or str(err)


def writable_folder(folder, source=None) -> Path:
    """Check, before any work, that ``folder`` is or can be made a folder we can write in: it is not
    a file, and its nearest existing ancestor is a writable folder. Leaves nothing behind. Raises
    InputError naming ``source`` (default: the folder)."""
    folder = Path(folder)
    label = folder if source is None else source
    if folder.exists() and not folder.is_dir():
        raise InputError(label, ("" if source is None else f"{folder} ") + "is a file, not a folder")
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(label, f"cannot create {folder}: {probe} is a file, not a folder")
    _probe(probe, label)
    return folder


def _probe(folder: Path, label) -> None:
    """Whether a file can be created in ``folder``: permissions alone do not tell (root, read-only
    mounts, special file systems), so a hidden empty file is made and removed at once."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(label, f"cannot write in {folder} (permission denied)")
    probe = folder / f".atomsplat-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.touch(exist_ok=False)
    except OSError as err:
        raise InputError(label, f"cannot write in {folder} ({os_reason(err)})") from None
    try:
        probe.unlink()
    except OSError:
        pass


def writable_file(path, overwrite: bool, source=None) -> Path:
    """Check, before any work, that the file ``path`` can be written: not a folder, not an existing
    file unless ``overwrite``, its folder exists and is writable. Leaves nothing behind."""
    path = Path(path)
    label = path if source is None else source
    if path.is_dir():
        raise InputError(label, ("" if source is None else f"{path} ") + "is a folder; give a file name")
    if path.exists() and not overwrite:
        raise InputError(label, "already exists; pass --overwrite to replace it")
    parent = path.parent
    if not parent.is_dir():
        raise InputError(label, f"the folder {parent} does not exist" if not parent.exists()
                         else f"{parent} is a file, not a folder")
    _probe(parent, label)
    return path


def make_folder(folder, source=None) -> Path:
    """Create ``folder`` (and its parents) if needed and make sure a file can be written in it, so a
    run fails before its work rather than after. Raises InputError naming ``source`` (default: the
    folder)."""
    folder = Path(folder)
    label = folder if source is None else source
    writable_folder(folder, source)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(label, f"cannot create the folder {folder} ({os_reason(err)})") from None
    _probe(folder, label)
    return folder
