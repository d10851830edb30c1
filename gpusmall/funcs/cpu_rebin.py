"""rebin's block sums on the CPU for the NumPy backend (numba): one pass over each frame, float64 sums.

NumPy's ``reshape(...).sum(axis=(3, 5))`` reduces over two strided axes of a six-dimensional view (several
passes over the batch). Here each frame (one panel of one event) is read once in memory order: per row of blocks,
each column's values are summed in float64 (the columns side by side, SIMD), then each block's column sums;
divided by the block size and rounded to float32 once: equal to the NumPy path within float32 rounding (``tests/test_funcs_basic.py``).
"""

from __future__ import annotations

import numpy as np

from ..calib import cpu_kernels

if cpu_kernels.numba is not None:
    from numba import prange

    @cpu_kernels.Kernel
    def _block_means(data, fr, fc, out):
        """data (F, R, C) float32; out (F, R // fr, C // fc) float32: block means. Per block row, each column's
        fr values are summed first (float64, the columns side by side: SIMD), then each block's fc column sums."""
        nf, nr, nc = data.shape
        orow, ocol = out.shape[1], out.shape[2]
        scale = 1.0 / (fr * fc)
        for f in prange(nf):
            col = np.empty(nc, np.float64)
            d = data[f]
            for i in range(orow):
                col[:] = 0.0
                for r in range(i * fr, i * fr + fr):
                    dr = d[r]
                    for c in range(nc):
                        col[c] += np.float64(dr[c])
                for j in range(ocol):
                    s = 0.0
                    for k in range(j * fc, j * fc + fc):
                        s += col[k]
                    out[f, i, j] = np.float32(s * scale)


def supports(data) -> bool:
    """Whether :func:`block_means` can run on ``data``: numba there and on, NumPy (events, panels, rows, cols)."""
    return cpu_kernels.available() and isinstance(data, np.ndarray) and data.ndim == 4


def block_means(data, fr: int, fc: int, threads: int = 1):
    """(events, panels, rows // fr, cols // fc) float32 block means of ``data`` (events, panels, rows, cols)."""
    e, p, r, c = data.shape
    out = np.empty((e * p, r // fr, c // fc), np.float32)
    with cpu_kernels._threads(threads):
        _block_means(np.ascontiguousarray(data, dtype=np.float32).reshape(e * p, r, c), np.int64(fr), np.int64(fc), out)
    return out.reshape(e, p, r // fr, c // fc)
