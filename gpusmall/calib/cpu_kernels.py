"""Fused CPU kernels (numba) for the NumPy backend: calibration in one pass, run sums in one pass.

The NumPy path (:func:`gpusmall.calib.calibrate.calibrate_reference`, :func:`gpusmall.funcs.sums.run_sums_numpy`'s
ufunc loop) makes several passes over a batch (gain decode, pedestal, scale, mask), each writing a
temporary; the kernels here do what ``kernels/calib.cu`` (``calibrate_u16``, ``pedestal_u16``,
``scale_apply``) and ``kernels/sums.cu`` (``run_sums``) do on a GPU: each pixel is read once and
every result written once. The arithmetic is the NumPy path's, operation for operation in float32
(``fastmath=False``): the results are bit-identical to it (``tests/test_cpu_kernels.py``).

Gain ranges come from per-pixel tables built by the detector model's own :meth:`gain_index` on every
key its ``gain_bits`` give (the raw word's bits at ``gain_shift``; ePix10ka: bit 14, with each pixel's
control bits; JUNGFRAU: bits 14-15), so the kernels decode exactly as the model does,
``invalid_ranges`` included, and a new detector needs nothing here: its module declares its bits.

numba is optional: :func:`available` is False without it (or with ``GPUSMALL_NUMBA=0``) and the
callers keep the NumPy path. Compiled code is cached on disk (``cache=True``): the first call on a
machine compiles (seconds), later processes load it.

Threads: a kernel runs on :func:`threads_for_call` numba threads: the backend's ``threads`` when
called from the main thread, 1 from any other thread (the pipeline already runs one block of events
per thread; numba's own threads inside those would oversubscribe the cores). A one-thread call runs the
kernel's serial build, which compiles faster (:class:`Kernel`). The one-pass calibration of uint16 raw
and the run sums have compiled C++ kernels (:mod:`~gpusmall.calib.simd_calib`,
:mod:`~gpusmall.calib.simd_sums`) that these functions call where they are built.
"""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path

import numpy as np

from . import simd_calib, simd_sums
from .reusable import ReusableArrays

try:  # optional: without numba the NumPy path stays
    import numba
    from numba import njit, prange, uint64
except Exception:  # ImportError, or a numba that does not match the installed NumPy
    numba = None  # type: ignore[assignment]

ENV_VAR = "GPUSMALL_NUMBA"
"""``GPUSMALL_NUMBA=0`` turns the kernels off (the pure NumPy path, e.g. to compare)."""
BLOCK = 4096
"""Pixels per work item of the pedestal and scale kernels around a common mode."""
CALIB_BLOCK_MAX = 262144
"""At most this many pixels per work item of the one-pass calibration (:func:`calib_block`): the block's
constants come from the L3 cache while each event's raw and output stream through in runs long enough for
the prefetchers (4096-pixel blocks: ePix10ka quad 25-30% slower, BENCHMARKS.md)."""
L3_SHARE = 4
"""A block's constants take at most 1 / L3_SHARE of the L3 cache (:func:`l3_bytes`): larger ones came from
memory for every event (JUNGFRAU's 6.3 MB at 262144 pixels on an 8 MB L3: 1.7x slower, BENCHMARKS.md)."""
TAB_PAD = 16
"""Floats of padding after each row of the per-pixel tables (64 bytes)."""
SUM_BLOCK = 512
"""Pixels per work item of the run sums: the float64 accumulators of up to 8 sums (32 kB) stay in L1."""
KEY_SHIFT = 14
"""The kernels read the gain bits at bit 14 (every gain-switching model's ``gain_shift``; others fall back
to the NumPy path)."""


def available() -> bool:
    """Whether the numba kernels can be used (numba importable, not turned off by ``GPUSMALL_NUMBA=0``)."""
    return numba is not None and os.environ.get(ENV_VAR, "1") != "0"


@functools.cache
def l3_bytes() -> int:
    """The L3 cache of CPU 0 in bytes (Linux sysfs, read once a process), 8 MiB where unknown."""
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        return int(text.rstrip("KMG")) * scale
    except (OSError, ValueError):
        return 8 << 20


def calib_block(npix: int, threads: int, bytes_per_pixel: int = 25) -> int:
    """Pixels per work item of the one-pass calibration (whole multiples of 4096, at least 4096): at most
    :data:`CALIB_BLOCK_MAX` and as many as keep the block's ``bytes_per_pixel`` of constants within
    1 / :data:`L3_SHARE` of the L3 cache, fewer so that ``threads`` threads get four work items each."""
    fit = l3_bytes() // L3_SHARE // max(1, bytes_per_pixel)
    per_item = npix // (4 * threads) if threads > 1 else CALIB_BLOCK_MAX
    return max(4096, min(CALIB_BLOCK_MAX, fit, per_item) // 4096 * 4096)


def threads_for_call(backend_threads: int) -> int:
    """numba threads for one kernel call: the backend's threads from the main thread, 1 elsewhere,
    at most numba's thread count (``NUMBA_NUM_THREADS``)."""
    n = max(1, int(backend_threads)) if threading.current_thread() is threading.main_thread() else 1
    return min(n, numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]


class Kernel:
    """A numba kernel compiled as it is called: for one thread (``parallel=False``: ``prange`` is ``range``)
    when the calling thread has one numba thread (:class:`_threads`; the pipeline's worker threads), with
    numba's parallel loops otherwise. The serial build compiles 2-3x faster, and most calls take one
    thread; each build is cached on disk under a name of its own."""

    def __init__(self, py_func):
        self.py_func = py_func
        functools.update_wrapper(self, py_func)
        self._builds: dict[bool, object] = {}
        self._lock = threading.Lock()

    def build(self, parallel: bool):
        """The numba dispatcher of one build (created on first use)."""
        with self._lock:
            if parallel not in self._builds:
                f = self.py_func
                if not parallel:  # a copy under another name: numba's cache files are named after it
                    f = type(f)(f.__code__, f.__globals__, f.__name__, f.__defaults__, f.__closure__)
                    f.__qualname__ = self.py_func.__qualname__ + "_one_thread"
                    f.__module__ = self.py_func.__module__
                self._builds[parallel] = njit(parallel=parallel, cache=True, fastmath=False, nogil=True)(f)
            return self._builds[parallel]

    def __call__(self, *args):
        return self.build(numba.get_num_threads() > 1)(*args)


if numba is not None:
    _jit = Kernel
    # Loop indices are unsigned (no negative-index wrap-around check, which stops LLVM vectorizing) and
    # the gain-switching kernels compute every option's value and select the result (a select of loads
    # would become a gather): both keep the inner loop SIMD. Selecting among exactly computed values is
    # exact.

    @_jit
    def _calib1(raw, dmask, tab, okb, out, good, block):
        """One gain range, any integer raw (events, npix): out = ok ? (float32(w & dmask) - P) * S : 0."""
        n_events, npix = raw.shape
        nblocks = (npix + block - 1) // block
        zero = np.float32(0.0)
        for b in prange(nblocks):
            p0 = uint64(b * block)
            p1 = uint64(min(b * block + block, npix))
            for e in range(n_events):
                r, o_, g_ = raw[e], out[e], good[e]
                for p in range(p0, p1):
                    ok = okb[p] != 0
                    o = (np.float32(r[p] & dmask) - tab[0, p]) * tab[1, p]
                    o_[p] = o if ok else zero
                    g_[p] = ok

    @_jit
    def _calib2(raw, dmask, tab, okb, out, good, block):
        """ePix10ka, uint16 raw: option k = bit 14 (the pixel's config bits are in the tables)."""
        n_events, npix = raw.shape
        nblocks = (npix + block - 1) // block
        zero = np.float32(0.0)
        dm = np.uint32(dmask)
        for b in prange(nblocks):
            p0 = uint64(b * block)
            p1 = uint64(min(b * block + block, npix))
            for e in range(n_events):
                r, o_, g_ = raw[e], out[e], good[e]
                for p in range(p0, p1):
                    w = np.uint32(r[p])
                    k = (w >> np.uint32(KEY_SHIFT)) & np.uint32(1)
                    v = np.float32(w & dm)
                    o0 = (v - tab[0, p]) * tab[2, p]
                    o1 = (v - tab[1, p]) * tab[3, p]
                    o = o1 if k == 1 else o0
                    ok = ((np.uint32(okb[p]) >> k) & np.uint32(1)) != 0
                    o_[p] = o if ok else zero
                    g_[p] = ok

    @_jit
    def _calib3(raw, dmask, tab, okb, out, good, block):
        """JUNGFRAU, uint16 raw: key k = bits 14-15, options 0, 1 and 2 (k = 2 and 3; k = 2 is invalid,
        its okb bit 0, so its value does not matter)."""
        n_events, npix = raw.shape
        nblocks = (npix + block - 1) // block
        zero = np.float32(0.0)
        dm = np.uint32(dmask)
        for b in prange(nblocks):
            p0 = uint64(b * block)
            p1 = uint64(min(b * block + block, npix))
            for e in range(n_events):
                r, o_, g_ = raw[e], out[e], good[e]
                for p in range(p0, p1):
                    w = np.uint32(r[p])
                    k = (w >> np.uint32(KEY_SHIFT)) & np.uint32(3)
                    v = np.float32(w & dm)
                    o0 = (v - tab[0, p]) * tab[3, p]
                    o1 = (v - tab[1, p]) * tab[4, p]
                    o2 = (v - tab[2, p]) * tab[5, p]
                    oa = o1 if k == 1 else o0
                    o = o2 if k >= 2 else oa
                    ok = ((np.uint32(okb[p]) >> k) & np.uint32(1)) != 0
                    o_[p] = o if ok else zero
                    g_[p] = ok

    @njit(inline="always")
    def _by_key(k, a0, a1, a2, a3):
        """The value of key k (0-3) among four computed ones: a select, not a load that depends on k."""
        a01 = a1 if k == 1 else a0
        a23 = a3 if k == 3 else a2
        return a23 if k >= 2 else a01

    @_jit
    def _pedestal(raw, lo, dmask, kbits, n_opt, opt_of_key, tab, okb, gk, s, g, good):
        """First half around a common mode (any table), on the pixels lo .. lo + L of raw (events, npix) into
        s, g, good (events, L): s = float32(w & dmask) - P[option], g = the model's gain index (-1 invalid),
        good = its okb bit. Every key's value is computed and the key's selected (keys absent from ``kbits``
        read key 0's rows), so the loop stays SIMD."""
        n_events, npix = s.shape
        nblocks = (npix + BLOCK - 1) // BLOCK
        kb = np.uint32(kbits)
        o = uint64(lo)
        p0r, p1r = tab[opt_of_key[0]], tab[opt_of_key[1 if kbits & 1 else 0]]
        p2r, p3r = tab[opt_of_key[2 if kbits & 2 else 0]], tab[opt_of_key[3 if kbits == 3 else 0]]
        g0, g1 = gk[0], gk[1 if kbits & 1 else 0]
        g2, g3 = gk[2 if kbits & 2 else 0], gk[3 if kbits == 3 else 0]
        for b in prange(nblocks):
            q0 = uint64(b * BLOCK)
            q1 = uint64(min(b * BLOCK + BLOCK, npix))
            for e in range(n_events):
                r, s_, gi_, g_ = raw[e], s[e], g[e], good[e]
                for p in range(q0, q1):
                    x = p + o
                    w = r[x]
                    k = (np.uint32(w) >> np.uint32(KEY_SHIFT)) & kb
                    v = np.float32(w & dmask)
                    s_[p] = _by_key(k, v - p0r[x], v - p1r[x], v - p2r[x], v - p3r[x])
                    gi_[p] = _by_key(k, g0[x], g1[x], g2[x], g3[x])
                    g_[p] = ((np.uint32(okb[x]) >> k) & np.uint32(1)) != 0

    @_jit
    def _scale_apply(raw, lo, kbits, n_opt, opt_of_key, s, good, tab, out):
        """Second half on the pixels lo .. lo + L of s and good (events, L) into out (events, npix) at lo:
        out = good ? s * S[option] : 0, the option from the raw word again (selected, as in :func:`_pedestal`)."""
        n_events, npix = s.shape
        nblocks = (npix + BLOCK - 1) // BLOCK
        zero = np.float32(0.0)
        kb = np.uint32(kbits)
        o = uint64(lo)
        s0r, s1r = tab[n_opt + opt_of_key[0]], tab[n_opt + opt_of_key[1 if kbits & 1 else 0]]
        s2r, s3r = tab[n_opt + opt_of_key[2 if kbits & 2 else 0]], tab[n_opt + opt_of_key[3 if kbits == 3 else 0]]
        for b in prange(nblocks):
            q0 = uint64(b * BLOCK)
            q1 = uint64(min(b * BLOCK + BLOCK, npix))
            for e in range(n_events):
                r, s_, g_, o_ = raw[e], s[e], good[e], out[e]
                for p in range(q0, q1):
                    x = p + o
                    k = (np.uint32(r[x]) >> np.uint32(KEY_SHIFT)) & kb
                    y = s_[p]
                    v = _by_key(k, y * s0r[x], y * s1r[x], y * s2r[x], y * s3r[x])
                    o_[x] = v if g_[p] else zero

    @_jit
    def _run_sums(data, kinds, thres, has_thres, acc):
        """kernels/sums.cu run_sums on the CPU, in the NumPy path's arithmetic: per pixel block and sum,
        a float64 accumulator over the events in order (``sum(axis=0, dtype=float64)``), x = v (no
        threshold: NaN stays) or v >= t ? v : 0, max NaN-propagating (``np.maximum``); then added to acc."""
        n_events, npix = data.shape
        n_sums = kinds.shape[0]
        nblocks = (npix + SUM_BLOCK - 1) // SUM_BLOCK
        for b in prange(nblocks):
            p0 = b * SUM_BLOCK
            n = uint64(min(p0 + SUM_BLOCK, npix) - p0)
            a = np.empty((n_sums, SUM_BLOCK), np.float64)
            for k in range(n_sums):
                a[k, :] = -np.inf if kinds[k] == 2 else 0.0
            for e in range(n_events):
                row = data[e, p0 : p0 + n]
                for k in range(n_sums):
                    kind, t, ak = kinds[k], thres[k], a[k]
                    if has_thres[k]:
                        if kind == 0:
                            for i in range(n):
                                v = row[i]
                                ak[i] += np.float64(v) if v >= t else 0.0
                        elif kind == 1:
                            for i in range(n):
                                v = row[i]
                                d = np.float64(v) if v >= t else 0.0
                                ak[i] += d * d
                        elif kind == 2:
                            for i in range(n):
                                v = row[i]
                                d = np.float64(v) if v >= t else 0.0
                                ak[i] = d if d > ak[i] else ak[i]  # no NaN after the threshold
                        elif kind == 3:
                            for i in range(n):
                                ak[i] += 1.0 if row[i] >= t else 0.0
                        else:
                            for i in range(n):
                                ak[i] += 1.0 if row[i] > t else 0.0
                    else:
                        if kind == 0:
                            for i in range(n):
                                ak[i] += np.float64(row[i])
                        elif kind == 1:
                            for i in range(n):
                                d = np.float64(row[i])
                                ak[i] += d * d
                        elif kind == 2:
                            for i in range(n):
                                d = np.float64(row[i])
                                m = ak[i]
                                ak[i] = d if (d > m or d != d) else m  # np.maximum: NaN wins
                        elif kind == 3:
                            for i in range(n):
                                ak[i] += 1.0 if row[i] >= t else 0.0
                        else:
                            for i in range(n):
                                ak[i] += 1.0 if row[i] > t else 0.0
            for k in range(n_sums):
                out = acc[k]
                for i in range(n):
                    p = p0 + i
                    if kinds[k] == 2:
                        m, c = a[k, i], out[p]
                        out[p] = m if (m > c or m != m) else c
                    else:
                        out[p] += a[k, i]


def run_sums(data, specs, acc, threads: int = 1) -> bool:
    """All run sums of ``specs`` over ``data`` (events, pixels) in one pass into ``acc`` (sums, pixels)
    float64 (see :func:`gpusmall.funcs.sums.run_sums_numpy`); False (nothing done) where the kernel does
    not take these arrays (then the caller's NumPy path runs)."""
    if not available() or not isinstance(data, np.ndarray) or not isinstance(acc, np.ndarray):
        return False
    if data.ndim != 2 or acc.ndim != 2 or acc.shape != (len(specs), data.shape[1]) or acc.dtype != np.float64:
        return False
    if not acc.flags.c_contiguous or not specs:
        return False
    data = np.ascontiguousarray(data, np.float32)
    if simd_sums.available():  # compiled: up to four sums in registers, a range of pixels a thread
        simd_sums.run_sums(data, *simd_sums.codes(specs), acc, threads_for_call(threads))
        return True
    with _threads(threads):
        kinds = np.array([s.kernel_kind for s in specs], np.int64)
        thres = np.array([s.kernel_thres for s in specs], np.float32)
        has = np.array([s.thres is not None for s in specs], np.bool_)
        _run_sums(data, kinds, thres, has, acc)
    return True


# -- per-pixel tables ---------------------------------------------------------------------------------------

FAMILIES = {  # model.gain_bits -> (its kernel, the key each option row stands for); key = (raw >> 14) & gain_bits
    0: ("single", (0,)),  # the raw word says nothing about the range (the config byte may: in the tables)
    1: ("one_bit", (0, 1)),  # ePix10ka: bit 14
    3: ("two_bits", (0, 1, 3)),  # JUNGFRAU: bits 14-15; a key without a row of its own shares one (exact check)
}


def supports(model, raw_dtype, pedestal_gains: int) -> bool:
    """Whether the kernels calibrate this model's raw data exactly as the NumPy path: gain bits the
    kernels read (the model's ``gain_bits`` 0, 1 or 3 at ``gain_shift`` 14; the tables come from its
    own ``gain_index``), uint16 raw when the raw word holds gain bits (any integer otherwise),
    constants for every range."""
    dt = np.dtype(raw_dtype)
    if model.gain_bits not in FAMILIES or dt.kind not in "iu" or pedestal_gains != model.n_gains:
        return False
    if model.gain_bits == 0:
        return model.data_mask == 0 or dt.itemsize >= 2
    return model.gain_shift == KEY_SHIFT and dt == np.uint16


def for_calibrator(model, pedestal, scale, mask, config_bits, threads: int = 1):
    """A :class:`CpuCalibration` for these host constants, or None where the kernels cannot be used
    (numba missing or turned off, a model they do not decode, constants not (gains, *mask shape))."""
    if not available() or not isinstance(pedestal, np.ndarray):
        return None
    mask = np.asarray(mask)
    if pedestal.ndim != mask.ndim + 1 or pedestal.shape[1:] != mask.shape or scale.shape != pedestal.shape:
        return None
    if not supports(model, np.uint16 if model.n_gains > 1 else np.int64, pedestal.shape[0]):
        return None
    cal = CpuCalibration(model, pedestal, scale, mask, config_bits, threads)
    return cal if cal.exact else None


class CpuCalibration:
    """One run's constants laid out for the kernels, pixels flat: ``calibrate(raw)`` and the two halves
    around a common mode, ``pedestal_subtract(raw)`` / ``scale_apply(raw, s, good, out)``, all
    bit-identical to the NumPy path.

    The gain range of a pixel depends on its raw word only through the key ``(raw >> 14) & kbits``
    (and, for ePix10ka, on its static config bits), so per key ("option") and pixel the tables hold
    what the NumPy path would use: ``tab`` rows pedestal[clip(g)] (one per option) then scale[clip(g)],
    ``okb`` bit k = mask & (g >= 0) for key k, ``gk`` the gain index g per key. They are built with
    the model's own :meth:`gain_index` on each key, for every pixel's config bits.
    """

    def __init__(self, model, pedestal, scale, mask, config_bits, threads: int = 1):
        npix = int(np.prod(mask.shape))
        self.npix, self.threads, self.model, self.shape = npix, threads, model, tuple(mask.shape)
        self._reuse = {
            name: ReusableArrays(self.shape, dtype)
            for name, dtype in (
                ("out", np.float32),
                ("good", np.bool_),
                ("s", np.float32),
                ("g", np.int8),
                ("sgood", np.bool_),
            )
        }
        self.kbits = model.gain_bits
        self.kind, opt_keys = FAMILIES[self.kbits]
        ped = np.asarray(pedestal, np.float32).reshape(-1, npix)
        sc = np.asarray(scale, np.float32).reshape(-1, npix)
        keep = np.asarray(mask, bool).reshape(npix)
        cfg = None if config_bits is None else np.asarray(config_bits, np.uint8).reshape(1, *mask.shape)
        n_keys = self.kbits + 1
        self.gk = np.empty((4, npix), np.int8)  # gain index per key (rows beyond the keys: key 0's)
        for key in range(n_keys):
            words = np.full((1, *mask.shape), key << KEY_SHIFT, np.uint16)
            self.gk[key] = np.asarray(model.gain_index(words, cfg, np)).reshape(npix)
        self.gk[n_keys:] = self.gk[0]
        okb = np.zeros(npix, np.uint8)
        for key in range(n_keys):
            okb |= (keep & (self.gk[key] >= 0)).astype(np.uint8) << key
        self.okb = okb
        idx = np.clip(self.gk, 0, model.n_gains - 1).astype(np.intp)
        cols = np.arange(npix)
        n_opt = len(opt_keys)
        # rows padded by TAB_PAD floats: with npix a multiple of 1024 (every detector here) unpadded rows
        # would sit at the same offset within a 4 kB page and compete for the same L1 sets
        self.tab = np.zeros((2 * n_opt, npix + TAB_PAD), np.float32)
        for o, key in enumerate(opt_keys):
            self.tab[o, :npix] = ped[idx[key], cols]
            self.tab[n_opt + o, :npix] = sc[idx[key], cols]
        self.n_opt = n_opt
        # a key without a row of its own (JUNGFRAU's invalid key 2) reads a row with the same ranges
        # (there: key 0's, range 0 = clip(-1)); where none has them the tables are not exact
        self.opt_of_key = np.zeros(4, np.intp)
        self.exact = True
        for key in range(n_keys):
            same = [o for o, k in enumerate(opt_keys) if (idx[k] == idx[key]).all()]
            self.opt_of_key[key] = same[0] if same else 0
            self.exact &= bool(same)

    def supports(self, raw) -> bool:
        """Whether this raw batch (its pixel shape and dtype) goes through the kernels."""
        return raw.shape[1:] == self.shape and supports(self.model, raw.dtype, self.model.n_gains)

    def _dmask(self, dtype):
        """data_mask in the raw dtype; all bits where the model has none (0)."""
        dtype = np.dtype(dtype)
        m = self.model.data_mask
        return dtype.type(m) if m else dtype.type(-1 if dtype.kind == "i" else np.iinfo(dtype).max)

    def _flat(self, raw):
        return np.ascontiguousarray(raw).reshape(raw.shape[0], self.npix)

    def outputs(self, n_events: int):
        """(out, good): uninitialised (events, *pixel shape) float32 and bool arrays, reused once the
        caller has dropped the previous ones (:mod:`gpusmall.calib.reusable`: no page faults per batch)."""
        return self._reuse["out"].empty(n_events), self._reuse["good"].empty(n_events)

    def calibrate(self, raw):
        """(out, good) of a raw batch (events, *pixel shape)."""
        n = raw.shape[0]
        out, good = self.outputs(n)
        raw2, out2, good2 = self._flat(raw), out.reshape(n, self.npix), good.reshape(n, self.npix)
        with _threads(self.threads) as threads:
            block = calib_block(self.npix, threads, self.tab.shape[0] * 4 + 1)
            if threads == 1 and raw2.dtype == np.uint16 and simd_calib.available():
                simd_calib.calibrate(self.kind, raw2, self._dmask(raw2.dtype), self.tab, self.okb, out2, good2, block)
            else:  # numba's threads over the blocks, or a raw dtype the compiled kernel does not take
                {"single": _calib1, "one_bit": _calib2, "two_bits": _calib3}[self.kind](
                    raw2, self._dmask(raw2.dtype), self.tab, self.okb, out2, good2, block
                )
        return out, good

    def pedestal_subtract(self, raw):
        """(s, g, good): s and g as :func:`gpusmall.calib.calibrate.pedestal_subtract`, good = mask & (g >= 0)."""
        n = raw.shape[0]
        s, g, good = (self._reuse[k].empty(n) for k in ("s", "g", "sgood"))
        with _threads(self.threads):
            self.pedestal_pixels(
                self._flat(raw), 0, s.reshape(n, self.npix), g.reshape(n, self.npix), good.reshape(n, self.npix)
            )
        return s, g, good

    def pedestal_pixels(self, raw2, lo, s, g, good):
        """:meth:`pedestal_subtract` of the pixels lo .. lo + L of ``raw2`` (events, npix) into C-contiguous
        s float32, g int8, good bool (events, L); the caller sets the threads."""
        _pedestal(
            raw2,
            lo,
            self._dmask(raw2.dtype),
            self.kbits,
            self.n_opt,
            self.opt_of_key,
            self.tab,
            self.okb,
            self.gk,
            s,
            g,
            good,
        )

    def scale_apply(self, raw, s, good, out):
        """out = good ? s * scale[clip(g)] : 0 in place (g from ``raw`` again); returns out."""
        n = raw.shape[0]
        with _threads(self.threads):
            self.scale_pixels(
                self._flat(raw),
                0,
                np.ascontiguousarray(s, np.float32).reshape(n, self.npix),
                np.ascontiguousarray(good).reshape(n, self.npix),
                out.reshape(n, self.npix),
            )
        return out

    def scale_pixels(self, raw2, lo, s, good, out):
        """:meth:`scale_apply` of the pixels lo .. lo + L of s and good (events, L) into out (events, npix)
        at lo; all C-contiguous."""
        _scale_apply(raw2, lo, self.kbits, self.n_opt, self.opt_of_key, s, good, self.tab, out)


class _threads:
    """numba threads for the calls inside (thread-local in numba), restored afterwards."""

    def __init__(self, backend_threads):
        self.n = threads_for_call(backend_threads)

    def __enter__(self) -> int:
        self.before = numba.get_num_threads()
        if self.n != self.before:
            numba.set_num_threads(self.n)
        return self.n

    def __exit__(self, *exc):
        if self.n != self.before:
            numba.set_num_threads(self.before)
