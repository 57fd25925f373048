"""Shared fixtures. Kernel tests take the `arch` fixture and run once per Taichi backend.

Backends: cpu and vulkan by default (Mesa's software Vulkan in CI); set ATOMSPLAT_TEST_ARCHES
(comma-separated, e.g. "cpu,vulkan,cuda") to choose. The fixture is session-scoped so pytest groups
the tests per backend and Taichi restarts only when the backend changes.
"""

import os
from pathlib import Path

import pytest

ARCHES = [a.strip() for a in os.environ.get("ATOMSPLAT_TEST_ARCHES", "cpu,vulkan").split(",") if a.strip()]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session", params=ARCHES)
def arch(request):
    from engine.core.backend import init_backend

    return init_backend(request.param)


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"development datasets not found at {SHARED_DATA}")
    return SHARED_DATA
