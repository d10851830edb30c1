"""The run sums of a batch by explicit SIMD (``simd_sums.cpp``, compiled on first use).

What :mod:`gpusmall.calib.cpu_kernels`' ``_run_sums`` does, on the same arrays and bit for bit: per pixel and
sum a float64 accumulator over the batch's events in order, then added to (max: the maximum taken with) the
run's accumulator. Up to four sums read each event's pixels once, their accumulators in registers; numba's
loop keeps them in memory and does not vectorize the maximum.

:func:`available` is False without a C++ compiler (or with ``GPUSMALL_NATIVE=0``) and where the build has no
AVX (without it the 4-double vectors are emulated and slower than numba's loop); the caller then runs numba's
kernel. A call runs on the calling thread, or on a few threads that take a range of pixels each.
"""

from __future__ import annotations

import ctypes
import functools
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import native_build

SOURCE = (
    '#include "simd_sums.cpp"\n'
    'extern "C" void gs_run_sums(const float* data, int64_t n_events, int64_t npix, int64_t stride, '
    "int64_t n_sums, const int* code, const double* thres, double* acc, int64_t acc_stride) {\n"
    "    run_sums(data, n_events, npix, stride, n_sums, code, thres, acc, acc_stride);\n"
    "}\n"
    'extern "C" int gs_sums_vectors() {\n'
    "#if defined(__AVX__)\n    return 1;\n#else\n    return 0;\n#endif\n}\n"
)

_P = ctypes.c_void_p
_I = ctypes.c_int64
_ARGS = [_P, _I, _I, _I, _I, _P, _P, _P, _I]


def codes(specs) -> tuple[np.ndarray, np.ndarray]:
    """(n_sums,) int32 codes ``2 * kind + has threshold`` (kinds: :data:`gpusmall.funcs.sums.KINDS`) and
    (n_sums,) float64 thresholds of the :class:`~gpusmall.funcs.sums.SumSpec` list ``specs``."""
    code = np.array([2 * s.kernel_kind + (s.thres is not None) for s in specs], np.int32)
    thres = np.array([s.kernel_thres for s in specs], np.float32).astype(np.float64)
    return code, thres


def reference(data, code, thres, acc) -> None:
    """:func:`run_sums` in NumPy, the same operations in the same order (events one after the other, every
    pixel at once): ``data`` (events, npix) float32, ``acc`` (n_sums, npix) float64 updated."""
    x_all = data.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        for k, (c, t) in enumerate(zip(code.tolist(), thres.tolist())):
            kind, has = divmod(c, 2)
            a = np.full(data.shape[1], -np.inf if kind == 2 else 0.0)
            for x in x_all:
                y = np.where(x >= t, x, 0.0) if has else x
                if kind == 0:
                    a = a + y
                elif kind == 1:
                    a = a + y * y
                elif kind == 2:
                    a = np.where((y > a) | (y != y), y, a)
                elif kind == 3:
                    a = a + np.where(x >= t, 1.0, 0.0)
                else:
                    a = a + np.where(x > t, 1.0, 0.0)
            acc[k] = np.where((a > acc[k]) | (a != a), a, acc[k]) if kind == 2 else acc[k] + a


@functools.cache
def _entry():
    """The compiled ``gs_run_sums``, or None; compiled on the first call (about two seconds), used where it
    has AVX and agrees with :func:`reference` on a small batch (every code, NaN, a tail)."""
    lib = native_build.load("simd_sums", SOURCE)
    if lib is None or not lib.gs_sums_vectors():
        return None
    fn = lib.gs_run_sums
    fn.argtypes, fn.restype = _ARGS, None
    if not _agrees(fn):
        warnings.warn(
            "gpusmall: the compiled run sums (simd_sums.cpp) disagree with their reference on this "
            "machine; numba's kernel sums instead",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return fn


def _agrees(fn) -> bool:
    rng = np.random.default_rng(18)
    data = rng.normal(2, 20, (5, 8 * 9 + 3)).astype(np.float32)
    data[1, ::7] = np.nan
    data[2, 3] = 5.0  # on a threshold
    code = np.array([0, 1, 2, 3, 4, 5, 7, 8, 4], np.int32)
    thres = np.array([0, 5, 0, 5, -np.inf, 5, 5, 0, -np.inf], np.float64)
    acc = rng.normal(0, 5, (len(code), data.shape[1]))
    acc[-1, 1] = np.nan
    want = acc.copy()
    reference(data, code, thres, want)
    npix = data.shape[1]
    fn(
        data.ctypes.data,
        data.shape[0],
        npix,
        npix,
        len(code),
        code.ctypes.data,
        thres.ctypes.data,
        acc.ctypes.data,
        npix,
    )
    return bool(np.array_equal(acc.view(np.uint64), want.view(np.uint64)))


def available() -> bool:
    """Whether the compiled run sums can be used (built on this machine, with AVX)."""
    return _entry() is not None


def run_sums(data, code, thres, acc, threads: int = 1) -> None:
    """Update ``acc`` (n_sums, npix) float64 with the events of ``data`` (events, npix) float32, both
    C-contiguous; ``code`` (n_sums,) int32 and ``thres`` (n_sums,) float64 from :func:`codes`. With
    ``threads`` > 1 that many threads take a range of pixels each (ctypes releases the GIL)."""
    fn = _entry()
    if fn is None:
        raise RuntimeError("the compiled run sums are not available")
    n, npix = data.shape
    for a, dt, shape in (
        (data, np.float32, (n, npix)),
        (acc, np.float64, (len(code), npix)),
        (code, np.int32, (len(code),)),
        (thres, np.float64, (len(code),)),
    ):
        if a.dtype != dt or a.shape != shape or not a.flags.c_contiguous:
            raise ValueError(f"simd_sums: expected C-contiguous {np.dtype(dt)} {shape}, got {a.dtype} {a.shape}")
    if code.size and (code.min() < 0 or code.max() > 9):
        raise ValueError(f"simd_sums: sum codes must be 0..9, got {code.tolist()}")

    def part(p0: int, p1: int) -> None:
        fn(
            data.ctypes.data + 4 * p0,
            n,
            p1 - p0,
            npix,
            len(code),
            code.ctypes.data,
            thres.ctypes.data,
            acc.ctypes.data + 8 * p0,
            npix,
        )

    threads = max(1, min(int(threads), npix // 8192))
    if threads == 1:
        part(0, npix)
        return
    edges = [npix * i // threads // 8 * 8 for i in range(threads)] + [npix]  # whole vectors a thread
    with ThreadPoolExecutor(threads, thread_name_prefix="gpusmall-sums") as pool:
        list(pool.map(part, edges[:-1], edges[1:]))
