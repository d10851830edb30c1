"""The one-pass calibration of uint16 raw frames by explicit SIMD (``simd_calib.cpp``, compiled on first use).

What :mod:`gpusmall.calib.cpu_kernels`' ``_calib1`` / ``_calib2`` / ``_calib3`` do, on the same tables and
bit for bit: per pixel the gain key from the raw word, the key's option's pedestal and scale selected,
``out = ok ? (float32(raw & dmask) - P) * S : 0`` and ``good = ok``. The selection happens on the loaded
constants (one subtraction and one multiplication a pixel instead of one per option, and 8 or 16 pixels
per instruction with the widening loads the compiler does not find by itself), which numba's loop cannot
express without gathers.

:func:`available` is False without a C++ compiler (or with ``GPUSMALL_NATIVE=0``); the caller then runs
the numba kernels. One call runs on the calling thread (ctypes releases the GIL).
"""

from __future__ import annotations

import ctypes
import functools
import warnings

import numpy as np

from . import native_build

KINDS = {"single": 1, "one_bit": 2, "two_bits": 3}
"""cpu_kernels' table families -> the C++ template's KIND (options per pixel)."""

SOURCE = (
    '#include "simd_calib.cpp"\n'
    'extern "C" void gs_calib(int32_t kind, const uint16_t* raw, int64_t n_events, int64_t npix, '
    "uint32_t dmask, const float* tab, int64_t stride, const uint8_t* okb, float* out, uint8_t* good, "
    "int64_t block) {\n"
    "    if (kind == 1) calib_u16<1>(raw, n_events, npix, dmask, tab, stride, okb, out, good, block);\n"
    "    else if (kind == 2) calib_u16<2>(raw, n_events, npix, dmask, tab, stride, okb, out, good, block);\n"
    "    else calib_u16<3>(raw, n_events, npix, dmask, tab, stride, okb, out, good, block);\n"
    "}\n"
)

_P = ctypes.c_void_p
_I = ctypes.c_int64
_ARGS = [ctypes.c_int32, _P, _I, _I, ctypes.c_uint32, _P, _I, _P, _P, _P, _I]


@functools.cache
def _entry():
    """The compiled ``gs_calib``, or None; compiled on the first call (about a second), then checked against
    :func:`reference` on a small batch (every kind, key and okb byte, a tail): a build that disagrees (a
    compiler or CPU the code was never run on) is not used, with a warning."""
    lib = native_build.load("simd_calib", SOURCE)
    if lib is None:
        return None
    fn = lib.gs_calib
    fn.argtypes, fn.restype = _ARGS, None
    if not _agrees(fn):
        warnings.warn(
            "gpusmall: the compiled calibration (simd_calib.cpp) disagrees with its reference on this "
            "machine; the numba kernels calibrate instead",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return fn


def reference(kind: str, raw2, dmask: int, tab, okb):
    """(out, good) of :func:`calibrate` in NumPy: key k = (raw >> 14) & bits (0 for one range), option
    min(k, options - 1), ``out = ok ? (float32(raw & dmask) - P) * S : 0``, ok = bit k of okb (one range:
    okb != 0)."""
    n_opt = KINDS[kind]
    w = raw2.astype(np.int64)
    k = np.zeros_like(w) if kind == "single" else (w >> 14) & (1 if kind == "one_bit" else 3)
    opt = np.minimum(k, n_opt - 1)
    cols = np.arange(raw2.shape[1])[None]
    with np.errstate(all="ignore"):
        x = ((w & dmask).astype(np.float32) - tab[opt, cols]) * tab[n_opt + opt, cols]
    ok = okb[None] != 0 if kind == "single" else ((okb[None].astype(np.int64) >> k) & 1) != 0
    return np.where(ok, x, np.float32(0)), np.broadcast_to(ok, raw2.shape)


def _agrees(fn) -> bool:
    rng = np.random.default_rng(18)
    n, npix = 3, 256 + 37  # vectors and a scalar tail
    raw2 = rng.integers(0, 1 << 16, (n, npix), dtype=np.uint16)
    raw2[:, 64:192] &= 0x3FFF  # vectors of one key: key 0, then the top key (1 or 3 for two bits: 0xC000)
    raw2[:, 128:192] |= 0xC000
    okb = rng.integers(0, 16, npix).astype(np.uint8)
    for kind, n_opt in KINDS.items():
        tab = rng.uniform(-100, 3000, (2 * n_opt, npix + 16)).astype(np.float32)
        out, good = np.empty((n, npix), np.float32), np.empty((n, npix), np.bool_)
        dmask = 0xFFFF if kind == "single" else 0x3FFF
        fn(
            n_opt,
            raw2.ctypes.data,
            n,
            npix,
            dmask,
            tab.ctypes.data,
            tab.shape[1],
            okb.ctypes.data,
            out.ctypes.data,
            good.ctypes.data,
            100,
        )
        want, want_good = reference(kind, raw2, dmask, tab, okb)
        if not (np.array_equal(out.view(np.uint32), want.view(np.uint32)) and np.array_equal(good, want_good)):
            return False
    return True


def available() -> bool:
    """Whether the compiled calibration can be used (a compiler built it on this machine)."""
    return _entry() is not None


def calibrate(kind: str, raw2, dmask: int, tab, okb, out2, good2, block: int) -> None:
    """Calibrate ``raw2`` (events, npix) uint16 into ``out2`` float32 and ``good2`` bool (events, npix), all
    C-contiguous; ``tab`` (2 * options, stride >= npix) float32 and ``okb`` (npix,) uint8 are
    :class:`~gpusmall.calib.cpu_kernels.CpuCalibration`'s; ``block`` pixels per pass over the events."""
    fn = _entry()
    n, npix = raw2.shape
    if fn is None or kind not in KINDS:
        raise RuntimeError("the compiled calibration is not available")
    for a, dt, shape in (
        (raw2, np.uint16, (n, npix)),
        (out2, np.float32, (n, npix)),
        (good2, np.bool_, (n, npix)),
        (okb, np.uint8, (npix,)),
        (tab, np.float32, (2 * KINDS[kind], tab.shape[1])),
    ):
        if a.dtype != dt or a.shape != shape or not a.flags.c_contiguous:
            raise ValueError(f"simd_calib: expected C-contiguous {np.dtype(dt)} {shape}, got {a.dtype} {a.shape}")
    if tab.shape[1] < npix or block < 1:
        raise ValueError("simd_calib: tables shorter than a frame, or an empty block")
    fn(
        KINDS[kind],
        raw2.ctypes.data,
        n,
        npix,
        int(dmask),
        tab.ctypes.data,
        tab.shape[1],
        okb.ctypes.data,
        out2.ctypes.data,
        good2.ctypes.data,
        int(block),
    )
