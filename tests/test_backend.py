"""The kernel cache's place and its lock: a leftover lock must not switch the cache off for good."""

import os
import time

from engine.core import backend


def test_kernel_cache_dir_is_atomsplats_own_unless_given(monkeypatch, tmp_path):
    monkeypatch.delenv("TI_OFFLINE_CACHE_FILE_PATH", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert backend.kernel_cache_dir().parent == tmp_path / "atomsplat"
    monkeypatch.setenv("TI_OFFLINE_CACHE_FILE_PATH", str(tmp_path / "mine"))
    assert backend.kernel_cache_dir() == tmp_path / "mine"


def test_only_a_leftover_lock_is_removed(tmp_path):
    lock = tmp_path / "ticache.lock"
    lock.touch()
    backend._clear_stale_lock(tmp_path)
    assert lock.exists()  # held right now by a running process: kept
    old = time.time() - 2 * backend.STALE_LOCK_SECONDS
    os.utime(lock, (old, old))
    backend._clear_stale_lock(tmp_path)
    assert not lock.exists()
    backend._clear_stale_lock(tmp_path)  # no lock at all: nothing to do, no error
