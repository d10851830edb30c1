"""The median common mode's steps by a sorting network over SIMD lanes (``simd_median.cpp``, compiled on first use).

The median common mode's rows and cols steps on the CPU (:mod:`gpusmall.calib.cpu_median`), in place:
``rows`` groups are contiguous runs of ``len`` values, ``cols`` groups the columns of a row-major block.
A pixel enters its group's median where it is good and (unless all ranges) its gain range is selected;
the median of the ``n`` used values is the one NumPy's sort of the group (+inf where a pixel does not
enter) gives, ``(v[(n - 1) // 2] + v[n // 2]) * 0.5`` in float32, and it is subtracted from the used
pixels where ``n > min_pixels`` and ``|median| < max_correction``. The C++ code sorts
8 or 16 groups at once (one per vector lane) through Batcher's odd-even merge sort cut to the comparators
that reach ranks 0 .. len // 2, on int32 keys of the floats.

:func:`available` is False without a C++ compiler (or with ``GPUSMALL_NATIVE=0``); the callers then run
numba passes around NumPy's sort.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

from . import native_build

_P = ctypes.c_void_p
_I = ctypes.c_int64
_LIMITS = [ctypes.c_int32, ctypes.c_uint32, _I, ctypes.c_float]  # all ranges?, range mask, min_pixels, max_correction
_ARGS: dict[str, list] = {"rows": [_P, _P, _P, _I, *_LIMITS], "cols": [_P, _P, _P, _I, _I, *_LIMITS]}
_SIG = {
    "rows": "float* s, const uint8_t* good, const int8_t* g, int64_t groups",
    "cols": "float* s, const uint8_t* good, const int8_t* g, int64_t m, int64_t cols",
}
_CALL = {"rows": "rows_step<Net>(s, good, g, groups, use)", "cols": "cols_step<Net>(s, good, g, m, cols, use)"}


def source(kind: str, length: int) -> str:
    """The C++ of one entry point ``gs_step``: the ``kind`` ('rows' or 'cols') step for groups of ``length``
    values, the network written out comparator by comparator."""
    body = " ".join(f"CX({i}, {j})" for i, j in median_network(length))
    return (
        f'#include "simd_median.cpp"\n'
        f"struct Net {{ static constexpr int64_t len = {length}; "
        f"template <class V> __attribute__((always_inline)) static inline void apply(V* b) {{ {body} }} }};\n"
        f'extern "C" void gs_step({_SIG[kind]}, int32_t all_ranges, uint32_t range_mask, int64_t min_pixels, '
        f"float max_correction) {{ const Use use{{all_ranges, range_mask, min_pixels, max_correction}}; "
        f"{_CALL[kind]}; }}\n"
    )


@functools.cache
def _entry(kind: str, length: int):
    """The compiled ``gs_step`` of (kind, length), or None; compiled on the first call (a few seconds)."""
    lib = native_build.load(f"simd_median_{kind}{length}", source(kind, length))
    if lib is None:
        return None
    fn = lib.gs_step
    fn.argtypes, fn.restype = _ARGS[kind], None
    return fn


def available(kind: str = "rows", length: int = 48) -> bool:
    """Whether the compiled step of (kind, length) can be used (a compiler built it on this machine)."""
    return 2 <= length <= MAX_LENGTH and _entry(kind, length) is not None


MAX_LENGTH = 256
"""Groups longer than this stay on NumPy's sort: a network's code grows as n log^2 n, and so does its compile
(the steps of 48 and 64: 1 s, cols of 176: 2.9 s, 256: 5.0 s here)."""


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


def rows_step(s2, good2, g2, limits) -> None:
    """The median's rows step in place on s2 (groups, len) float32, C-contiguous: good2 bool, g2 int8 alike.
    ``limits``: (all ranges?, range mask, min_pixels, max_correction). Needs :func:`available` ('rows', len)."""
    groups, length = s2.shape
    _arrays(s2, good2, g2)
    _entry("rows", length)(s2.ctypes.data, good2.ctypes.data, g2.ctypes.data, groups, *_c_limits(limits))


def cols_step(s3, good3, g3, limits) -> None:
    """The cols step in place on s3 (m, rows, cols) float32, C-contiguous (each column of each of the m
    blocks a group); good3, g3 alike. Needs :func:`available` ('cols', rows)."""
    m, rows, cols = s3.shape
    _arrays(s3, good3, g3)
    _entry("cols", rows)(s3.ctypes.data, good3.ctypes.data, g3.ctypes.data, m, cols, *_c_limits(limits))


def _c_limits(limits):
    all_ranges, range_mask, min_pixels, max_correction = limits
    return int(bool(all_ranges)), int(range_mask) & 0xFFFFFFFF, int(min_pixels), float(max_correction)


def _arrays(s, good, g) -> None:
    for a, dtype in ((s, np.float32), (good, np.bool_), (g, np.int8)):
        _check(a, dtype)
        if a.shape != s.shape:
            raise ValueError(f"simd_median: shapes {s.shape} and {a.shape}")


def _check(a: np.ndarray, dtype) -> None:
    if a.dtype != dtype or not a.flags.c_contiguous:
        raise ValueError(f"simd_median: needs C-contiguous {np.dtype(dtype).name}, got {a.dtype} {a.strides}")
