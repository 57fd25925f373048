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


def test_memoised_source_hints_keep_taichis_error_message(arch):
    """The memoised source excerpt is the one Taichi would write: file, line, the code and a caret
    line under the offending name."""
    import pytest
    import taichi as ti

    from taichi.lang.ast import ast_transformer_utils

    assert ast_transformer_utils.ASTTransformerContext.get_pos_info.memoised

    @ti.kernel
    def undefined_name(x: ti.f32) -> ti.f32:
        return x + not_defined_anywhere  # noqa: F821

    with pytest.raises(ti.TaichiNameError) as caught:
        undefined_name(1.0)
    message = str(caught.value)
    assert __file__ in message and "return x + not_defined_anywhere" in message
    assert "^" * len("not_defined_anywhere") in message
