"""The array backend: NumPy on the CPU or CuPy on a GPU, chosen once per run.

Everything above this module receives a :class:`Backend` and works with ``backend.xp``;
no other module imports cupy. The backend also owns host<->device transfers, pinned
host buffers, streams and the CUDA kernels compiled from ``kernels/*.cu``.

Choice, in order of precedence: the explicit argument (command line ``--backend``), the
environment variable ``GPUSMALL_BACKEND``, the config key ``backend:``, then ``auto``.
``auto`` takes CuPy only when a GPU is usable and says which one it took; asking for
``cupy`` without a usable GPU is an error, never a silent fallback.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BackendError

log = logging.getLogger(__name__)

CHOICES = ("auto", "numpy", "cupy")
ENV_VAR = "GPUSMALL_BACKEND"


def kernel_dirs() -> list[Path]:
    """Where CUDA sources are looked for: inside an installed wheel, then a source checkout."""
    here = Path(__file__).resolve().parent
    return [here / "_kernels", here.parent / "kernels"]


def find_kernel_source(filename: str) -> Path:
    """Path of ``kernels/<filename>`` in a wheel or a checkout; FileNotFoundError when absent."""
    for d in kernel_dirs():
        p = d / filename
        if p.is_file():
            return p
    raise FileNotFoundError(f"CUDA source {filename!r} not found in {[str(d) for d in kernel_dirs()]}")


@functools.cache
def gpu_status(device_id: int | None = None) -> tuple[bool, str]:
    """(usable, reason): whether CuPy can import and run a kernel on GPU ``device_id`` (default 0).

    The probe runs on that device only, so MPI ranks that use GPUs 1, 2, ... do not also open a
    context (hundreds of MB) on GPU 0.
    """
    try:
        import cupy  # noqa: F401
    except Exception as exc:  # ImportError, or a broken CUDA install
        return False, f"cupy not importable ({type(exc).__name__}: {exc})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()  # makes no context
        if n < 1:
            return False, "no CUDA device"
        dev = 0 if device_id is None else int(device_id)
        if not 0 <= dev < n:
            return False, f"no CUDA device {dev} ({n} visible)"
        with cupy.cuda.Device(dev):
            (cupy.arange(4, dtype=cupy.float32) * 2).sum().item()
        props = cupy.cuda.runtime.getDeviceProperties(dev)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        return True, f"{name} (device {dev} of {n})"
    except Exception as exc:
        return False, f"no usable CUDA device ({type(exc).__name__}: {exc})"


class Backend:
    """Array module and device services for one run.

    Attributes:
        name: ``"numpy"`` or ``"cupy"``.
        xp: the array module (numpy or cupy).
        description: one line saying what was chosen and on which device.
        threads: CPU threads of the NumPy path: a batch's events are reduced in that many blocks side
            by side (:meth:`~gpusmall.producer.pipeline.DetectorPipeline.process`); 1 = all in the
            calling thread. The GPU path ignores it.
    """

    def __init__(self, name: str, device_id: int | None = None, threads: int = 1):
        if name not in ("numpy", "cupy"):
            raise BackendError(f"backend must be numpy or cupy, not {name!r}")
        self.name = name
        self.threads = max(1, int(threads))
        self._kernels: dict[tuple[str, str, tuple[str, ...]], Any] = {}
        if name == "cupy":
            ok, why = gpu_status(device_id)
            if not ok:
                raise BackendError(f"backend 'cupy' was asked for but no GPU is usable: {why}")
            import cupy

            if device_id is not None:
                cupy.cuda.Device(device_id).use()
            self.xp = cupy
            self.description = f"cupy on {why}"
        else:
            self.xp = np
            self.description = "numpy (CPU)"

    def __repr__(self) -> str:
        return f"Backend({self.description})"

    @property
    def is_gpu(self) -> bool:
        return self.name == "cupy"

    # ---- transfers -------------------------------------------------------------
    def to_device(self, a, dtype=None):
        """Host array (or scalar) -> C-contiguous backend array; no copy on NumPy when already so.

        Always C order: ``cupy.asarray`` keeps a Fortran-ordered host array Fortran-ordered, and the
        CUDA kernels index every array as C-contiguous.
        """
        if a is None:
            return None
        return self.xp.asarray(a, dtype=dtype, order="C")

    def to_host(self, a) -> np.ndarray:
        """Backend array -> NumPy array (a device->host copy on CuPy)."""
        if a is None:
            return None  # type: ignore[return-value]
        if self.is_gpu and not isinstance(a, np.ndarray):
            return self.xp.asnumpy(a)
        return np.asarray(a)

    def pinned_empty(self, shape, dtype) -> np.ndarray:
        """A host array in page-locked memory on CuPy (fast, asynchronous uploads); plain on NumPy."""
        dtype = np.dtype(dtype)
        if not self.is_gpu:
            return np.empty(shape, dtype)
        import cupy

        n = int(np.prod(shape)) * dtype.itemsize
        mem = cupy.cuda.alloc_pinned_memory(max(n, 1))
        return np.frombuffer(mem, dtype, int(np.prod(shape))).reshape(shape)

    def stream(self, non_blocking: bool = True):
        """A new CUDA stream on CuPy; a do-nothing context on NumPy."""
        if not self.is_gpu:
            return contextlib.nullcontext()
        import cupy

        return cupy.cuda.Stream(non_blocking=non_blocking)

    def synchronize(self) -> None:
        if self.is_gpu:
            self.xp.cuda.Device().synchronize()

    # ---- kernels ---------------------------------------------------------------
    def kernel(self, filename: str, name: str, options: tuple[str, ...] = ()):
        """``cupy.RawKernel`` ``name`` compiled from ``kernels/<filename>``, cached per backend.

        The package launches kernels through their :class:`~gpusmall.kernel_specs.KernelSpec` (arguments by
        name, converted and checked), which calls this."""
        if not self.is_gpu:
            raise BackendError(f"kernel {name!r} asked for on the {self.name} backend")
        key = (filename, name, tuple(options))
        if key not in self._kernels:
            import cupy

            src = find_kernel_source(filename).read_text()
            mod = cupy.RawModule(code=src, options=("--std=c++17",) + tuple(options))
            self._kernels[key] = mod.get_function(name)
        return self._kernels[key]


def resolve_choice(argument: str | None = None, config: str | None = None) -> str:
    """The backend name asked for: argument > $GPUSMALL_BACKEND > config > 'auto'."""
    env = os.environ.get(ENV_VAR) or None
    for where, value in (("--backend", argument), (ENV_VAR, env), ("config backend", config)):
        if value is not None:
            value = value.strip().lower()
            if value not in CHOICES:
                raise BackendError(f"{where}: backend must be one of {', '.join(CHOICES)}, not {value!r}")
            return value
    return "auto"


def cpu_threads(ranks_on_node: int = 1) -> int:
    """CPU threads for one process's NumPy work: the cores it may run on shared by the MPI ranks of its
    node (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (macOS)
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(ranks_on_node)))


def get_backend(
    argument: str | None = None, config: str | None = None, device_id: int | None = None, threads: int = 1
) -> Backend:
    """Choose the backend once for a run (see module docstring) and say what was chosen; ``threads``:
    CPU threads of the NumPy path (:attr:`Backend.threads`)."""
    choice, why = resolve_choice(argument, config), None
    if choice == "auto":
        ok, reason = gpu_status(device_id)
        choice = "cupy" if ok else "numpy"
        if not ok:
            why = reason
            log.info("backend auto: numpy (%s)", why)
    backend = Backend(choice, device_id=device_id, threads=threads)
    if why is not None:  # auto fell back: say why (e.g. CuPy installed, but no driver)
        backend.description = f"numpy (CPU; no GPU used: {why})"
    if not backend.is_gpu and backend.threads > 1:
        backend.description += f", {backend.threads} threads"
    log.info("backend: %s", backend.description)
    return backend
