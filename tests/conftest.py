"""Shared fixtures: every backend-dependent test runs on NumPy and on CuPy.

The CuPy case is skipped with a reason when no GPU is usable, except when the suite runs with
``GPUSMALL_BACKEND=cupy``: then a missing GPU is a failure, so a GPU run can never pass by skipping.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpusmall.backend import Backend, gpu_status

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_configure(config):
    """GPUSMALL_CUPY_NO_POOL=1: CuPy allocates each array with cudaMalloc (no memory pool), so that
    compute-sanitizer sees a kernel overrunning an array (benchmarks/gpu_session.sh sets it)."""
    if os.environ.get("GPUSMALL_CUPY_NO_POOL") == "1":
        try:
            import cupy
        except ImportError:
            return
        cupy.cuda.set_allocator(None)


_prebuild: subprocess.Popen | None = None


def pytest_collection_finish(session):
    """When the collected tests use the CPU runtime of the CUDA kernels (they import tests/cuda_cpu), compile
    the kernels in a background process (``python -m cuda_cpu``) while the first tests run: on a machine
    without the compiled kernels in the cache (a fresh CI runner) that takes 20-30 s of g++ on one core.
    A test that needs a kernel before it is ready waits for that compile instead of starting another."""
    global _prebuild
    if "cuda_cpu" not in sys.modules or session.config.option.collectonly:
        return
    from cuda_cpu import compiler

    if compiler() is None:
        return
    here = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")]))
    _prebuild = subprocess.Popen(
        [sys.executable, "-m", "cuda_cpu"], cwd=here, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def pytest_sessionfinish(session):
    if _prebuild is not None and _prebuild.poll() is None:
        _prebuild.terminate()
        _prebuild.wait()


def _data_dir() -> Path:
    env = os.environ.get("GPUSMALL_TEST_DATA")
    for d in ([Path(env)] if env else []) + [Path(__file__).resolve().parent / "data", SHARED_DATA]:
        if (d / "test_epix_calib.xtc2").is_file():
            return d
    return SHARED_DATA


def make_backend(name: str) -> Backend:
    """Backend ``name``; "cupy" skips without a GPU (fails when the suite runs with GPUSMALL_BACKEND=cupy)."""
    if name == "cupy":
        ok, why = gpu_status()
        if not ok:
            if os.environ.get("GPUSMALL_BACKEND", "").lower() == "cupy":
                pytest.fail(f"GPUSMALL_BACKEND=cupy but no GPU is usable: {why}")
            pytest.skip(f"CuPy backend: {why}")
    return Backend(name)


@pytest.fixture(params=["numpy", "cupy"])
def backend(request) -> Backend:
    """A Backend for each array library; CuPy skips without a GPU (fails with GPUSMALL_BACKEND=cupy)."""
    return make_backend(request.param)


@pytest.fixture
def numpy_backend() -> Backend:
    return Backend("numpy")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Folder of the real XTC2 test files ($GPUSMALL_TEST_DATA, tests/data, or ../shared/data)."""
    return _data_dir()


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
