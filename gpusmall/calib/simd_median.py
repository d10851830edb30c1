"""Group medians by a sorting network over SIMD lanes (``simd_median.cpp``, compiled on first use).

The median common mode's groups on the CPU (:mod:`gpusmall.calib.cpu_median`): ``rows`` groups are
contiguous runs of ``len`` values, ``cols`` groups the columns of a row-major block. Each takes its
values with +inf where a pixel does not enter and the count of used values; the median is the one
NumPy's sort of the group gives, ``(v[(n - 1) // 2] + v[n // 2]) * 0.5`` in float32. The C++ code sorts
8 or 16 groups at once (one per vector lane) through Batcher's odd-even merge sort cut to the comparators
that reach ranks 0 .. len // 2, on int32 keys of the floats.

:func:`available` is False without a C++ compiler (or with ``GPUSMALL_NATIVE=0``); the callers then sort
with NumPy.
"""
from __future__ import annotations

import ctypes
import functools

import numpy as np

from . import native_build

_P = ctypes.c_void_p
_I = ctypes.c_int64
_ARGS: dict[str, list] = {"rows": [_P, _I, _P, _P], "cols": [_P, _I, _I, _P, _P]}
_CALL = {"rows": "medians_rows<Net>(a, b, n, med)", "cols": "medians_cols<Net>(a, b, c, n, med)"}
_SIG = {"rows": "const float* a, int64_t b, const int64_t* n, float* med",
        "cols": "const float* a, int64_t b, int64_t c, const int64_t* n, float* med"}


def source(kind: str, length: int) -> str:
    """The C++ of one entry point ``gs_medians``: ``kind`` ('rows' or 'cols') groups of ``length`` values,
    the network written out comparator by comparator."""
    body = " ".join(f"CX({i}, {j})" for i, j in median_network(length))
    return (f'#include "simd_median.cpp"\n'
            f"struct Net {{ static constexpr int64_t len = {length}; template <class V> static inline void apply(V* b) {{ {body} }} }};\n"
            f'extern "C" void gs_medians({_SIG[kind]}) {{ {_CALL[kind]}; }}\n')


@functools.cache
def _entry(kind: str, length: int):
    """The compiled ``gs_medians`` of (kind, length), or None; compiled on the first call (seconds)."""
    lib = native_build.load(f"simd_median_{kind}{length}", source(kind, length))
    if lib is None:
        return None
    fn = lib.gs_medians
    fn.argtypes, fn.restype = _ARGS[kind], None
    return fn


def available(kind: str = "rows", length: int = 48) -> bool:
    """Whether the compiled medians of (kind, length) can be used (a compiler built them on this machine)."""
    return 2 <= length <= MAX_LENGTH and _entry(kind, length) is not None


MAX_LENGTH = 256
"""Groups longer than this stay on NumPy's sort: a network's code grows as n log^2 n, and so does its compile
(176: 2.5 s, 256: 6.6 s, 352: 22 s here)."""


def odd_even_merge_sort(n: int) -> list[tuple[int, int]]:
    """Batcher's odd-even merge sort for ``n`` inputs: comparators (i, j), i < j, each leaving the smaller
    value at i, in depth-first order (each half sorted, then merged), so that consecutive comparators work
    on few values and the compiler keeps them in registers. Built for the next power of two with the
    comparators that reach an index >= n left out (those positions would hold +inf throughout)."""
    pairs: list[tuple[int, int]] = []

    def merge(lo: int, size: int, r: int) -> None:
        m = 2 * r
        if m < size:
            merge(lo, size, m)
            merge(lo + r, size, m)
            pairs.extend((i, i + r) for i in range(lo + r, lo + size - r, m))
        else:
            pairs.append((lo, lo + r))

    def sort(lo: int, size: int) -> None:
        if size > 1:
            sort(lo, size // 2)
            sort(lo + size // 2, size // 2)
            merge(lo, size, 1)

    sort(0, 1 << max(n - 1, 0).bit_length())
    return [(i, j) for i, j in pairs if j < n]


@functools.cache
def median_network(n: int) -> np.ndarray:
    """(comparators, 2) int32: :func:`odd_even_merge_sort` without the comparators that no output of rank
    0 .. n // 2 depends on (those ranks sorted, the others not)."""
    need = set(range(n // 2 + 1))
    kept = []
    for i, j in reversed(odd_even_merge_sort(n)):
        if i in need or j in need:
            kept.append((i, j))
            need |= {i, j}
    return np.ascontiguousarray(kept[::-1], dtype=np.int32).reshape(-1, 2)


def medians_rows(v: np.ndarray, n: np.ndarray, med: np.ndarray) -> None:
    """v (groups, len) float32 C-contiguous, +inf where unused; n (groups,) int64 used counts; med
    (groups,) float32 written. Needs :func:`available` ('rows', len)."""
    groups, length = v.shape
    for a, dtype in ((v, np.float32), (n, np.int64), (med, np.float32)):
        _check(a, dtype)
    if n.shape != (groups,) or med.shape != (groups,):
        raise ValueError(f"simd_median rows: v {v.shape}, n {n.shape}, med {med.shape}")
    _entry("rows", length)(v.ctypes.data, groups, n.ctypes.data, med.ctypes.data)


def medians_cols(w: np.ndarray, n: np.ndarray, med: np.ndarray) -> None:
    """w (m, rows, cols) float32 C-contiguous, +inf where unused: each column a group; n (m, cols) int64
    used counts; med (m, cols) float32 written. Needs :func:`available` ('cols', rows)."""
    m, rows, cols = w.shape
    for a, dtype in ((w, np.float32), (n, np.int64), (med, np.float32)):
        _check(a, dtype)
    if n.shape != (m, cols) or med.shape != (m, cols):
        raise ValueError(f"simd_median cols: w {w.shape}, n {n.shape}, med {med.shape}")
    _entry("cols", rows)(w.ctypes.data, m, cols, n.ctypes.data, med.ctypes.data)


def _check(a: np.ndarray, dtype) -> None:
    if a.dtype != dtype or not a.flags.c_contiguous:
        raise ValueError(f"simd_median: needs C-contiguous {np.dtype(dtype).name}, got {a.dtype} {a.strides}")
