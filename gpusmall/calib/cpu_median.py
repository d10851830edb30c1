"""The median common mode's rows and cols steps on the CPU, for the NumPy backend (numba + compiled group medians).

:meth:`gpusmall.calib.common_mode.MedianCommonMode.reference` builds the groups with array operations
(the use mask, ``where`` with +inf, a contiguous copy of the transposed cols, a count, gathers, a
masked subtraction): several full-frame passes and temporaries around the sort. Here each step is one
pass of :mod:`~gpusmall.calib.simd_median` (a sorting network over SIMD lanes, compiled for the machine:
the groups' used values in, each median subtracted in place). Without a compiler one numba pass writes
each group's values (+inf where a pixel does not enter the median) and counts them, NumPy sorts the
groups (the cols transposed first), and a second numba pass subtracts each median.
:func:`calibrate_blocked` runs the whole calibration around these steps one block of pixels at a time
(the NumPy backend's path).

The values sorted and the arithmetic are the reference's, so the result is bit-identical
(``tests/test_cpu_kernels.py``, ``tests/test_simd_median.py``): the median of ``n`` used values is ``(v[(n - 1) // 2] + v[n // 2]) * 0.5``
in float32, a group is corrected where ``n > min_pixels`` and ``|median| < max_correction``, and
``x -= median`` in float32 on the used pixels (the sign of a zero aside where the middle values are a
-0/+0 tie: NumPy's sort orders such ties by its algorithm). ``banks`` steps stay on the reference.
"""

from __future__ import annotations

import numpy as np

from . import cpu_kernels, simd_median

if cpu_kernels.numba is not None:
    from numba import njit, prange, uint64

    _jit = cpu_kernels.Kernel

    @njit(inline="always")
    def _used(good, g, all_ranges, range_mask):
        """Whether a pixel enters the median: good, and (unless all ranges) its gain range selected.
        Branch-free (bitwise operators on bools), so the loops around it stay SIMD."""
        gi = np.int32(g)
        in_range = (gi >= 0) & (gi < 32) & (((range_mask >> np.uint32(gi & 31)) & np.uint32(1)) != 0)
        return good & (all_ranges | in_range)

    @njit(inline="always")
    def _median(v, n, half):
        return (v[max((n - 1) // 2, 0)] + v[n // 2 if n // 2 < v.size else v.size - 1]) * half

    @_jit
    def _gather_rows(s, good, g, all_ranges, range_mask, v, n):
        """s, good, g (N, C); v (N, C) the values or +inf; n (N, C // bc) used values per group of bc."""
        rows, c = s.shape
        nb = n.shape[1]
        bc = c // nb
        inf = np.float32(np.inf)
        for i in prange(rows):
            si, gdi, gi, vi = s[i], good[i], g[i], v[i]
            for j in range(nb):
                cnt = 0
                for k in range(uint64(j * bc), uint64(j * bc + bc)):
                    u = _used(gdi[k], gi[k], all_ranges, range_mask)
                    vi[k] = si[k] if u else inf
                    cnt += np.int64(u)
                n[i, j] = cnt

    @_jit
    def _medians_sorted(v, n, med):
        """med (G,) the median of each sorted group of v (G, L) with n (G,) used values."""
        half = np.float32(0.5)
        for i in prange(v.shape[0]):
            med[i] = _median(v[i], n[i], half)

    @_jit
    def _apply_rows(s, good, g, all_ranges, range_mask, med, n, min_pixels, max_correction):
        """s -= med of each group of bc (med, n (N, C // bc)) on its used pixels, where the group is corrected."""
        rows, c = s.shape
        nb = n.shape[1]
        bc = c // nb
        zero = np.float32(0.0)
        for i in prange(rows):
            for j in range(nb):
                m = med[i, j]
                if n[i, j] <= min_pixels or not abs(m) < max_correction:
                    continue
                si, gdi, gi = s[i], good[i], g[i]
                for k in range(uint64(j * bc), uint64(j * bc + bc)):  # x - 0 == x exactly: branch-free
                    si[k] -= m if _used(gdi[k], gi[k], all_ranges, range_mask) else zero

    @_jit
    def _apply_cols(s, good, g, all_ranges, range_mask, med, n, min_pixels, max_correction):
        """s -= med of each column group (med, n (M, C)) on its used pixels, where corrected."""
        groups, br, c = s.shape
        zero = np.float32(0.0)
        for q in prange(groups):
            d = np.empty(c, np.float32)  # each column's median, 0 where not corrected (x - 0 == x exactly)
            for j in range(c):
                m = med[q, j]
                d[j] = m if n[q, j] > min_pixels and abs(m) < max_correction else zero
            for r in range(br):
                sr, gdr, gr = s[q, r], good[q, r], g[q, r]
                for j in range(uint64(0), uint64(c)):
                    sr[j] -= d[j] if _used(gdr[j], gr[j], all_ranges, range_mask) else zero

    @_jit
    def _where_cols(s, good, g, all_ranges, range_mask, w, n):
        """s, good, g, w (M, BR, C): w = s or +inf where a pixel does not enter; n (M, C) used per column.
        Row-major (SIMD); the caller transposes w into the contiguous groups."""
        groups, br, c = s.shape
        inf = np.float32(np.inf)
        for q in prange(groups):
            nq = n[q]
            for j in range(c):
                nq[j] = 0
            for r in range(br):
                sr, gdr, gr, wr = s[q, r], good[q, r], g[q, r], w[q, r]
                for j in range(uint64(0), uint64(c)):
                    u = _used(gdr[j], gr[j], all_ranges, range_mask)
                    wr[j] = sr[j] if u else inf
                    nq[j] += np.int64(u)


def supports(s) -> bool:
    """Whether the kernels can run a median's rows/cols steps on ``s``: numba there and on, NumPy arrays."""
    return cpu_kernels.available() and isinstance(s, np.ndarray) and s.ndim == 4


def _limits(cm) -> tuple[tuple[bool, np.uint32], tuple[np.int64, np.float32]]:
    """(selection, limits) arguments of the kernels for ``cm``: (all ranges?, range mask), (min_pixels, max_correction)."""
    return (
        (cm.gain_ranges == "all", np.uint32(cm.range_mask & 0xFFFFFFFF)),
        (np.int64(cm.min_pixels), np.float32(cm.max_correction)),
    )


def _rows(cm, s2, good2, g2, v, n, med) -> None:
    """The rows step in place on s2 (N, C) (good2, g2 alike): v (N, C) float32, n (N, C // bc) int64 and
    med (N, C // bc) float32 scratch (used without the compiled step)."""
    (all_ranges, range_mask), (min_pixels, max_correction) = _limits(cm)
    bc = cm.bank[1]
    if simd_median.available("rows", bc):
        groups = (s2.size // bc, bc)
        simd_median.rows_step(
            s2.reshape(groups),
            good2.reshape(groups),
            g2.reshape(groups),
            (all_ranges, range_mask, min_pixels, max_correction),
        )
        return
    _gather_rows(s2, good2, g2, all_ranges, range_mask, v, n)
    groups = v.reshape(-1, bc)
    groups.sort(axis=-1)
    _medians_sorted(groups, n.reshape(-1), med.reshape(-1))
    _apply_rows(s2, good2, g2, all_ranges, range_mask, med, n, min_pixels, max_correction)


def _cols(cm, s3, good3, g3, w, v, n, med) -> None:
    """The cols step in place on s3 (M, BR, C) (good3, g3 alike): w (M, BR, C), v (M, C, BR) float32,
    n (M, C) int64 and med (M, C) float32 scratch (used without the compiled step)."""
    (all_ranges, range_mask), (min_pixels, max_correction) = _limits(cm)
    if simd_median.available("cols", s3.shape[1]):
        simd_median.cols_step(s3, good3, g3, (all_ranges, range_mask, min_pixels, max_correction))
        return
    _where_cols(s3, good3, g3, all_ranges, range_mask, w, n)
    np.copyto(v, w.transpose(0, 2, 1))
    v.sort(axis=-1)
    _medians_sorted(v.reshape(-1, v.shape[-1]), n.reshape(-1), med.reshape(-1))
    _apply_cols(s3, good3, g3, all_ranges, range_mask, med, n, min_pixels, max_correction)


def median_step(cm, axis: str, s, good, g, threads: int = 1) -> None:
    """One ``rows`` or ``cols`` step of :class:`~gpusmall.calib.common_mode.MedianCommonMode` ``cm`` in place
    on C-contiguous float32 ``s`` (events, panels, rows, cols); good bool and g int8, same shape, C-contiguous."""
    e, p, r, c = s.shape
    br, bc = cm.bank
    with cpu_kernels._threads(threads):
        if axis == "rows":
            flat = (e * p * r, c)
            _rows(
                cm,
                s.reshape(flat),
                good.reshape(flat),
                g.reshape(flat),
                np.empty(flat, np.float32),
                np.empty((flat[0], c // bc), np.int64),
                np.empty((flat[0], c // bc), np.float32),
            )
        else:
            shape = (e * p * (r // br), br, c)
            _cols(
                cm,
                s.reshape(shape),
                good.reshape(shape),
                g.reshape(shape),
                np.empty(shape, np.float32),
                np.empty((shape[0], c, br), np.float32),
                np.empty((shape[0], c), np.int64),
                np.empty((shape[0], c), np.float32),
            )


def blocked(cm) -> bool:
    """Whether :func:`calibrate_blocked` takes this common mode: rows and/or cols steps only (banks need
    a whole panel)."""
    return cpu_kernels.available() and bool(cm.axes) and set(cm.axes) <= {"rows", "cols"}


def calibrate_blocked(cpu, cm, raw, out, good, threads: int = 1, events: int = 2) -> None:
    """pedestal -> ``cm``'s rows/cols steps -> scale, bit-identical to the steps one after the other on the
    whole batch, one block of pixels for ``events`` events at a time: a panel's ``bank rows`` rows
    (contiguous pixels, every row and column group whole). The block's constants are read once per
    ``events`` events, and its s, groups and counts stay in cache between the steps.

    cpu: the run's :class:`~gpusmall.calib.cpu_kernels.CpuCalibration`; raw (events, panels, rows, cols)
    integer; out float32 and good bool of the same shape, C-contiguous, written.
    """
    n, p, r, c = raw.shape
    br, bc = cm.bank
    npix = p * r * c
    size = br * c
    raw2 = cpu._flat(raw)
    out2, good2 = out.reshape(n, npix), good.reshape(n, npix)
    e = max(1, min(int(events), n))
    s = np.empty((e, size), np.float32)  # the block of e events
    g = np.empty((e, size), np.int8)
    gd = np.empty((e, size), np.bool_)
    v = np.empty((e, size), np.float32)  # rows: the sorted groups; cols: the row-major values
    vt = np.empty((e, c, br), np.float32)  # cols: each column contiguous
    n_r = np.empty((e * br, c // bc), np.int64)
    n_c = np.empty((e, c), np.int64)
    m_r = np.empty((e * br, c // bc), np.float32)  # the groups' medians
    m_c = np.empty((e, c), np.float32)
    with cpu_kernels._threads(threads):
        for e0 in range(0, n, e):
            k = min(e, n - e0)
            bs, bg, bgd, bv, bvt = s[:k], g[:k], gd[:k], v[:k], vt[:k]
            as_rows = (bs.reshape(k * br, c), bgd.reshape(k * br, c), bg.reshape(k * br, c))
            as_cols = (bs.reshape(k, br, c), bgd.reshape(k, br, c), bg.reshape(k, br, c))
            r2, o2 = raw2[e0 : e0 + k], out2[e0 : e0 + k]
            for lo in range(0, npix, size):
                cpu.pedestal_pixels(r2, lo, bs, bg, bgd)
                if "rows" in cm.axes:
                    _rows(cm, *as_rows, bv.reshape(k * br, c), n_r[: k * br], m_r[: k * br])
                if "cols" in cm.axes:
                    _cols(cm, *as_cols, bv.reshape(k, br, c), bvt, n_c[:k], m_c[:k])
                cpu.scale_pixels(r2, lo, bs, bgd, o2)
                good2[e0 : e0 + k, lo : lo + size] = bgd
