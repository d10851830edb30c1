"""Backend choice, transfers and kernel discovery."""

import numpy as np
import pytest

from gpusmall.backend import Backend, find_kernel_source, get_backend, gpu_status, kernel_dirs, resolve_choice
from gpusmall.errors import BackendError


def test_precedence_argument_env_config(monkeypatch):
    monkeypatch.delenv("GPUSMALL_BACKEND", raising=False)
    assert resolve_choice() == "auto"
    assert resolve_choice(config="numpy") == "numpy"
    monkeypatch.setenv("GPUSMALL_BACKEND", "cupy")
    assert resolve_choice(config="numpy") == "cupy"
    assert resolve_choice("numpy", config="cupy") == "numpy"


def test_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.delenv("GPUSMALL_BACKEND", raising=False)
    with pytest.raises(BackendError, match="--backend"):
        resolve_choice("tpu")
    monkeypatch.setenv("GPUSMALL_BACKEND", "gpu")
    with pytest.raises(BackendError, match="GPUSMALL_BACKEND"):
        resolve_choice()


def test_cupy_without_gpu_is_a_clear_error():
    ok, why = gpu_status()
    if ok:
        pytest.skip("a GPU is usable here")
    with pytest.raises(BackendError, match="no GPU is usable"):
        Backend("cupy")


def test_auto_picks_what_is_usable(monkeypatch):
    monkeypatch.delenv("GPUSMALL_BACKEND", raising=False)
    b = get_backend("auto")
    ok, why = gpu_status()
    assert b.name == ("cupy" if ok else "numpy")
    if not ok:  # the reason shows (and is stored in result files): e.g. CuPy installed without a driver
        assert b.description == f"numpy (CPU; no GPU used: {why})"
    assert get_backend("numpy").description == "numpy (CPU)"


def test_round_trip(backend):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    d = backend.to_device(a)
    np.testing.assert_array_equal(backend.to_host(d * 2), a * 2)
    buf = backend.pinned_empty((3, 4), np.uint16)
    assert buf.shape == (3, 4) and buf.dtype == np.uint16


def test_every_kernel_source_is_found():
    names = sorted(p.name for d in kernel_dirs() if d.is_dir() for p in d.glob("*.cu"))
    assert "calib.cu" in names
    for n in names:
        assert find_kernel_source(n).read_text().strip()
    with pytest.raises(FileNotFoundError):
        find_kernel_source("nope.cu")


def test_allocator_keeps_freed_memory_on_glibc():
    """The command line raises glibc's mmap threshold so batches reuse host memory (Linux/glibc only)."""
    import platform
    import sys

    from gpusmall.producer.allocator import keep_freed_memory

    ok = keep_freed_memory()
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert ok
    a = np.ones((64, 512, 512), np.float32)  # a large block from the heap still works as memory
    assert float(a.sum()) == 64 * 512 * 512


def test_gpu_probe_runs_on_the_ranks_device_only(monkeypatch):
    """An MPI rank on GPU 3 must not open a context on GPU 0 while checking that its GPU works."""
    import sys
    import types

    used = []

    class Device:
        def __init__(self, i=0):
            self.id = i

        def __enter__(self):
            used.append(self.id)
            return self

        def __exit__(self, *exc):
            return False

    def arange(n, dtype=None):
        assert used, "a kernel ran before a device was chosen"
        return np.arange(n, dtype=dtype)

    runtime = types.SimpleNamespace(getDeviceCount=lambda: 4, getDeviceProperties=lambda i: {"name": b"Fake H100"})
    fake = types.SimpleNamespace(
        cuda=types.SimpleNamespace(runtime=runtime, Device=Device), arange=arange, float32=np.float32
    )
    monkeypatch.setitem(sys.modules, "cupy", fake)
    gpu_status.cache_clear()
    try:
        assert gpu_status(3) == (True, "Fake H100 (device 3 of 4)") and used == [3]
        assert gpu_status(7)[0] is False and "no CUDA device 7" in gpu_status(7)[1]
    finally:
        gpu_status.cache_clear()
