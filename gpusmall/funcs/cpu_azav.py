"""azav's numerators on the CPU for the NumPy backend (numba): one pass over each event's pixels.

The ``csr`` engine on NumPy multiplies the bin matrix with a transposed copy of the batch (two passes, the
copy the costlier) and sums in float32. Here each event's pixels are read once, in memory order, and added
into its bins in float64, spread over :data:`COPIES` interleaved histograms (pixel ``i`` into copy
``i % COPIES``) so that neighbouring pixels of one bin do not wait for each other's add; the copies are added
at the end. The sums are float64, so they equal the float32 product of the ``csr`` engine within float32
rounding (``tests/test_azav.py`` holds both to the SPEC formula).
"""

from __future__ import annotations

import numpy as np

from ..calib import cpu_kernels

COPIES = 4
"""Interleaved histograms per event (float64: 4 x bins x 8 bytes stays in L1 for a few hundred bins)."""

if cpu_kernels.numba is not None:
    from numba import prange

    @cpu_kernels.Kernel
    def _numerators(data, bin_index, num):
        """data (E, N) float32 (0 at bad pixels); bin_index (N,) int16/32/64, -1 = in no bin; num (E, bins)
        float64 out: the sum of each bin's pixels."""
        ne, npix = data.shape
        nb = num.shape[1]
        for e in prange(ne):
            acc = np.zeros((COPIES, nb), np.float64)
            d = data[e]
            full = npix - npix % COPIES
            for i in range(0, full, COPIES):
                for k in range(COPIES):
                    b = bin_index[i + k]
                    if b >= 0:
                        acc[k, b] += np.float64(d[i + k])
            for i in range(full, npix):
                b = bin_index[i]
                if b >= 0:
                    acc[0, b] += np.float64(d[i])
            for j in range(nb):
                s = 0.0
                for k in range(COPIES):
                    s += acc[k, j]
                num[e, j] = s


def supports(data) -> bool:
    """Whether :func:`numerators` can run on ``data``: numba there and on, a NumPy (events, pixels) array."""
    return cpu_kernels.available() and isinstance(data, np.ndarray) and data.ndim == 2


def numerators(data, bin_index, nbins: int, threads: int = 1):
    """(events, nbins) float64: per event the sum of ``data`` (events, pixels) float32 over each bin's
    pixels, ``bin_index`` (pixels,) int16, int32 or int64 (-1: in no bin; narrower: fewer bytes read)."""
    num = np.empty((data.shape[0], nbins), np.float64)
    with cpu_kernels._threads(threads):
        bins = np.ascontiguousarray(bin_index)
        if bins.dtype not in (np.int16, np.int32, np.int64):
            bins = bins.astype(np.int64)
        _numerators(np.ascontiguousarray(data, dtype=np.float32), bins, num)
    return num
