"""Run the CUDA kernels of ``kernels/*.cu`` on the CPU, for tests on machines without a GPU.

A kernel source is compiled by g++ (C++20) behind ``runtime.h``, a small CUDA execution model: blocks
spread over OS threads, the threads of a block as fibers that switch at ``__syncthreads()``, block
shared memory, ``threadIdx``/``blockIdx``/``blockDim``/``gridDim``, atomics and the float intrinsics the
kernels use. :class:`CpuKernel` is launched like ``cupy.RawKernel`` (``kernel(grid, block, args,
shared_mem=...)``) on NumPy arrays, so the package's CuPy code paths can drive the real kernel code.

The order in which a block's threads run between barriers is forward, reverse or shuffled; running a
kernel in two orders and comparing finds results that depend on it (a missing ``__syncthreads``, or a
``__syncwarp`` where threads of another warp are involved: warps pass their own barriers independently).
Divergent barriers raise :class:`BarrierDeadlock`. Dynamic shared memory starts as 0xFF bytes and has guard bytes behind it that are
checked after every block (:class:`SharedMemoryOverrun`). Every array argument is handed to the kernel
as a copy with 4 KiB of 0xFF bytes on either side (reading past an array gives NaN or -1, writing there
raises :class:`GlobalMemoryOverrun`), at a 256-byte aligned address as cudaMalloc gives; arguments
that are one array share one copy.

What this does not model: warp shuffles and votes (not supported), the memory model beyond "a barrier
orders what its threads did before it", timing, and float contraction (kernels must not rely on FMA; nvcc contracts ``a*b+c``
unless written with ``__f*_rn`` intrinsics, which these kernels do where bits matter).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np

from gpusmall.calib import native_build
from gpusmall.kernel_specs import POINTER_DTYPES, SCALAR_TYPES, parse_signatures

HERE = Path(__file__).resolve().parent
RUNTIME = HERE / "runtime.h"

POINTER = POINTER_DTYPES  # C type of a pointer parameter -> array dtype (the package's table)
SCALAR = SCALAR_TYPES
CTYPES = {
    "long long": ctypes.c_longlong,
    "int": ctypes.c_int32,
    "unsigned int": ctypes.c_uint32,
    "float": ctypes.c_float,
}
ORDERS = {"forward": 0, "reverse": 1, "shuffle": 2}
_lock = threading.Lock()
_built: dict[str, CompiledSource] = {}


class SharedMemoryOverrun(RuntimeError):
    """A block wrote past the dynamic shared memory it was launched with."""


class BarrierDeadlock(RuntimeError):
    """The threads of a block wait at barriers they can never all reach (divergent barriers)."""


class GlobalMemoryOverrun(RuntimeError):
    """A kernel wrote outside an array it was given."""


GUARD_BYTES = 4096


class _Guarded:
    """A copy of an array between two guard zones of 0xFF bytes, 256-byte aligned."""

    def __init__(self, a: np.ndarray):
        self.array = a
        self.raw = np.full(a.nbytes + 2 * GUARD_BYTES + 256, 0xFF, np.uint8)
        start = GUARD_BYTES + (-(self.raw.ctypes.data + GUARD_BYTES) % 256)
        self.lo, self.hi = start, start + a.nbytes
        self.raw[self.lo : self.hi] = a.reshape(-1).view(np.uint8)
        self.address = self.raw.ctypes.data + self.lo

    def finish(self, what: str) -> None:
        below, above = self.raw[self.lo - GUARD_BYTES : self.lo], self.raw[self.hi : self.hi + GUARD_BYTES]
        if (below != 0xFF).any() or (above != 0xFF).any():
            where = np.flatnonzero(below != 0xFF).size, np.flatnonzero(above != 0xFF).size
            raise GlobalMemoryOverrun(f"{what}: {where[0]} bytes written before the array, {where[1]} after it")
        if not self.array.flags.writeable:  # a read-only view (e.g. broadcast): the kernel must not change it
            if (self.raw[self.lo : self.hi] != self.array.reshape(-1).view(np.uint8)).any():
                raise GlobalMemoryOverrun(f"{what}: written to, but the array is read-only")
            return
        self.array.reshape(-1).view(np.uint8)[:] = self.raw[self.lo : self.hi]


def compiler() -> str | None:
    """The C++ compiler used (``$CXX`` or g++), None when there is none."""
    return shutil.which(os.environ.get("CXX", "g++"))


def signatures(src: str) -> dict[str, list[tuple[str, str, bool]]]:
    """name -> [(parameter, C type, is pointer)] of every ``extern "C" __global__`` kernel in CUDA source (the
    package's parser, :func:`gpusmall.kernel_specs.parse_signatures`)."""
    return {name: [(p.name, p.ctype, p.pointer) for p in params] for name, params in parse_signatures(src).items()}


def _rewrite(src: str) -> str:
    """CUDA source as C++ for runtime.h: ``extern __shared__ T x[];`` becomes a pointer to block memory."""
    return re.sub(
        r"extern\s+__shared__\s+([\w ]+?)\s+(\w+)\s*\[\s*\]\s*;", r"\1* \2 = (\1*)cudacpu::dynamic_shared();", src
    )


def _launcher(name: str, sig, uses_barrier: bool) -> str:
    casts = ", ".join(
        f"*({ctype}**)args[{i}]" if ptr else f"*({ctype}*)args[{i}]" for i, (_, ctype, ptr) in enumerate(sig)
    )
    return f"""
extern "C" int cudacpu_launch_{name}(const unsigned* g, const unsigned* b, unsigned long long shared,
                                      int order, unsigned seed, int workers, void** args)
{{
    cudacpu::Launch L;
    L.grid = dim3{{g[0], g[1], g[2]}};
    L.block = dim3{{b[0], b[1], b[2]}};
    L.shared_bytes = shared;
    L.order = order;
    L.seed = seed;
    L.uses_barrier = {"true" if uses_barrier else "false"};
    L.body = [args] {{ {name}({casts}); }};
    return cudacpu::launch(L, workers);
}}
"""


class CompiledSource:
    """One CUDA source compiled for the CPU; ``kernel(name)`` gives a launchable :class:`CpuKernel`."""

    def __init__(self, src: str, label: str = "kernel", ucontext: bool = False):
        self.label = label
        self.warnings = ""  # g++'s warnings when this process compiled it (empty when taken from the cache)
        self.signatures = signatures(src)
        if not self.signatures:
            raise ValueError(f'{label}: no extern "C" __global__ kernels')
        uses_barrier = any(w in src for w in ("__syncthreads", "__syncwarp", "__shfl", "__ballot"))
        code = (
            '#include "runtime.h"\n#line 1 "'
            + label
            + '"\n'
            + _rewrite(src)
            + "\n"
            + "".join(_launcher(n, s, uses_barrier) for n, s in self.signatures.items())
        )
        flags = [
            "-std=c++20",
            "-O2",
            "-g",
            "-fPIC",
            "-shared",
            "-pthread",
            "-ffp-contract=off",
            "-fno-fast-math",
            "-Wall",
            "-Wno-unused-function",
            f"-I{HERE}",
        ] + (["-DCUDACPU_UCONTEXT"] if ucontext else [])
        cxx = compiler()
        if cxx is None:
            raise RuntimeError("no C++ compiler (g++) to build CUDA kernels for the CPU")
        key = hashlib.sha256((code + RUNTIME.read_text() + " ".join(flags) + cxx).encode()).hexdigest()[:20]
        lib = Path(tempfile.gettempdir()) / f"gpusmall-cuda-cpu-{os.getuid()}" / f"{key}.so"
        # one compile per source, whichever process asks first (the tests' background prebuild,
        # tests/cuda_cpu/__main__.py, or a test); the others wait for it (the package's compile cache)
        try:
            self.warnings = native_build.compile_once(cxx, flags, code, lib)
        except native_build.CompileError as e:
            raise RuntimeError(f"{self.label}: g++ failed:\n{e}") from None
        self.lib = ctypes.CDLL(str(lib))

    def kernel(self, name: str) -> CpuKernel:
        if name not in self.signatures:
            raise KeyError(f"{self.label} has no kernel {name!r} (it has {sorted(self.signatures)})")
        return CpuKernel(self, name)


def build(src: str, label: str = "kernel", ucontext: bool = False) -> CompiledSource:
    """CUDA source text compiled for the CPU (cached per text, here and on disk)."""
    key = f"{label}\0{ucontext}\0{src}"
    with _lock:
        if key not in _built:
            _built[key] = CompiledSource(src, label, ucontext)
        return _built[key]


def build_file(path: Path | str, ucontext: bool = False) -> CompiledSource:
    path = Path(path)
    return build(path.read_text(), path.name, ucontext)


class CpuKernel:
    """A kernel launched like ``cupy.RawKernel`` on NumPy arrays: ``k(grid, block, args, shared_mem=0)``.

    ``order`` ("forward", "reverse", "shuffle") and ``seed`` choose how a block's threads are ordered
    inside a phase; ``workers`` OS threads run blocks in parallel.
    """

    def __init__(self, compiled: CompiledSource, name: str):
        self.name, self.sig = name, compiled.signatures[name]
        self.label = compiled.label
        self._fn = getattr(compiled.lib, f"cudacpu_launch_{name}")
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = [
            ctypes.POINTER(ctypes.c_uint),
            ctypes.POINTER(ctypes.c_uint),
            ctypes.c_ulonglong,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_void_p),
        ]
        self.order, self.seed, self.workers = "forward", 1, min(4, os.cpu_count() or 1)

    def __call__(self, grid, block, args, shared_mem: int = 0, order: str | None = None, seed: int | None = None):
        grid = tuple(int(v) for v in grid) + (1,) * (3 - len(grid))
        block = tuple(int(v) for v in block) + (1,) * (3 - len(block))
        if len(args) != len(self.sig):
            raise TypeError(f"{self.name}: {len(args)} arguments for {len(self.sig)} parameters")
        holders, guarded = [], {}
        for a, (pname, ctype, ptr) in zip(args, self.sig):
            if ptr:
                if not (isinstance(a, np.ndarray) and a.dtype == POINTER[ctype] and a.flags.c_contiguous):
                    raise TypeError(f"{self.name}({pname}): needs a C-contiguous {np.dtype(POINTER[ctype])} array")
                key = (a.ctypes.data, a.nbytes)
                if key not in guarded:
                    for other, n in guarded:
                        if other < key[0] + key[1] and key[0] < other + n:
                            raise ValueError(f"{self.name}({pname}): overlaps another argument without being it")
                    guarded[key] = _Guarded(a)
                    guarded[key].name = pname
                holders.append(ctypes.c_void_p(guarded[key].address))
            else:
                holders.append(CTYPES[ctype](a.item() if isinstance(a, np.generic) else a))
        argv = (ctypes.c_void_p * len(holders))(*[ctypes.addressof(h) for h in holders])
        rc = self._fn(
            (ctypes.c_uint * 3)(*grid),
            (ctypes.c_uint * 3)(*block),
            int(shared_mem),
            ORDERS[order or self.order],
            int(self.seed if seed is None else seed),
            int(self.workers),
            argv,
        )
        for g in guarded.values():
            g.finish(f"{self.label}:{self.name}({g.name})")
        if rc == 2:
            raise BarrierDeadlock(f"{self.label}:{self.name}: threads wait at barriers the others never reach")
        if rc == 1:
            raise SharedMemoryOverrun(f"{self.label}:{self.name} wrote past its {shared_mem} bytes of shared memory")
