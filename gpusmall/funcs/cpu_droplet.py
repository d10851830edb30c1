"""Droplet finding on the CPU for the NumPy backend (numba): mask, labels and per-droplet sums in three passes.

:meth:`gpusmall.funcs.droplet.Droplet.find` on NumPy arrays builds the mask with array operations
(:func:`~gpusmall.funcs.droplet.droplet_mask`: seeds, four shifted copies), labels the whole batch with
``scipy.ndimage.label`` and sums per droplet with ``bincount``: a dozen full-frame passes. Here:

1. ``_mask_count`` (frames in parallel): the labelled pixels (seeds ``good & data >= thr``; with ``grow``
   also ``good & data >= thr_low`` pixels next to a seed, 4-neighbours in the same panel) and their count per
   frame (a frame is one panel of one event);
2. ``_label_frames``: per frame, a raster scan with union-find over the labelled pixels only (left and up
   neighbours; the smaller position becomes the root, so each droplet's root is its first pixel in
   row-major order); writes the flat pixel indices and the frame's droplet numbers;
3. ``_droplet_sums``: global droplet numbers (frames in order, then first pixel) and the per-droplet sums
   in float64, adding the pixels in index order.

The numbering is SciPy's (labels in order of each droplet's first pixel in row-major order of the batch) and
the sums add the same values in the same order as ``bincount``, so every output is bit-identical to the
NumPy path (``tests/test_droplet.py``).
"""

from __future__ import annotations

import numpy as np

from ..calib import cpu_kernels

ROW_BLOCK = 32
"""Rows per work item of the mask pass: the block's two thresholds (per pixel) stay in L2 over the events."""

if cpu_kernels.numba is not None:
    from numba import njit, prange

    _jit = cpu_kernels.Kernel

    @njit(inline="always")
    def _seed(d, gd, t):
        return gd and d >= t

    @_jit
    def _mask_count(data, good, thr, thr_low, grow, mask, mask64, counts):
        """data (F, R, C) float32, good (F, R, C) bool; thr, thr_low (P, R, C) float32 (P divides F: frame f
        is panel f % P); mask (F, R, C) bool out, mask64 the same memory as (F, R, C // 8) uint64 words;
        counts (F, blocks) int64 out, per block of ROW_BLOCK rows. Work items are (panel, row block), every
        event inside: the block's thresholds stay in cache."""
        nf, nr, nc = data.shape
        npan = thr.shape[0]
        nblk = counts.shape[1]
        for task in prange(npan * nblk):
            pan, blk = task // nblk, task % nblk
            t, tl = thr[pan], thr_low[pan]
            pre = tl if grow else t  # with grow thr_low < thr: below it a pixel is neither seed nor grown
            for f in range(pan, nf, npan):
                d, gd, m, m64 = data[f], good[f], mask[f], mask64[f]
                cnt = 0
                for r in range(blk * ROW_BLOCK, min(nr, blk * ROW_BLOCK + ROW_BLOCK)):
                    mr = m[r]
                    for c in range(nc):  # SIMD; the few pixels at or above pre are looked at below
                        mr[c] = d[r, c] >= pre[r, c]
                    c = 0
                    while c < nc:
                        if c & 7 == 0 and c + 8 <= nc and m64[r, c >> 3] == 0:  # 8 pixels below pre
                            c += 8
                            continue
                        if mr[c]:
                            x = d[r, c]
                            ok = gd[r, c]
                            on = ok and x >= t[r, c]
                            if grow and not on and ok:
                                on = (
                                    (r > 0 and _seed(d[r - 1, c], gd[r - 1, c], t[r - 1, c]))
                                    or (r + 1 < nr and _seed(d[r + 1, c], gd[r + 1, c], t[r + 1, c]))
                                    or (c > 0 and _seed(d[r, c - 1], gd[r, c - 1], t[r, c - 1]))
                                    or (c + 1 < nc and _seed(d[r, c + 1], gd[r, c + 1], t[r, c + 1]))
                                )
                            mr[c] = on
                            cnt += on
                        c += 1
                counts[f, blk] = cnt

    @njit(inline="always")
    def _root(parent, k):
        while parent[k] != k:
            k = parent[k]
        return k

    @njit(inline="always")
    def _union(parent, a, b):
        ra, rb = _root(parent, a), _root(parent, b)
        if ra < rb:
            parent[rb] = ra
        elif rb < ra:
            parent[ra] = rb

    @_jit
    def _label_frames(mask, mask64, start, idx, lab, n_frame):
        """mask (F, R, C) bool, mask64 the same memory as (F, R, C // 8) uint64 words; start (F + 1,) int64
        (each frame's first labelled pixel); idx (M,) int64 out, the flat indices into (F, R, C); lab (M,)
        int64 out, droplet numbers 0.. within the frame; n_frame (F,) int64 out, droplets per frame."""
        nf, nr, nc = mask.shape
        for f in prange(nf):
            o = start[f]
            parent = lab[o : start[f + 1]]  # union-find forest over the frame's labelled pixels, in place
            above = np.empty(nc, np.int64)  # the labelled pixel last seen in each column, and its row
            above_row = np.full(nc, -2, np.int64)
            m, m64 = mask[f], mask64[f]
            k = 0
            for r in range(nr):
                left_col = -2
                c = 0
                while c < nc:
                    if c & 7 == 0 and c + 8 <= nc and m64[r, c >> 3] == 0:  # 8 unlabelled pixels
                        c += 8
                        continue
                    if m[r, c]:
                        idx[o + k] = (f * nr + r) * nc + c
                        parent[k] = k
                        if left_col == c - 1:
                            _union(parent, k, k - 1)
                        if above_row[c] == r - 1:
                            _union(parent, k, above[c])
                        above[c] = k
                        above_row[c] = r
                        left_col = c
                        k += 1
                    c += 1
            n = 0
            for j in range(k):  # parent[j] <= j: roots first, each the first pixel of its droplet
                p = parent[j]
                if p == j:
                    parent[j] = n
                    n += 1
                else:  # p < j holds its droplet's number already
                    parent[j] = parent[p]
            n_frame[f] = n

    @_jit
    def _droplet_sums(data, idx, lab, start, first, total, npix, wrow, wcol, ep):
        """Global droplet numbers (lab += the frame's first droplet) and float64 sums per droplet: total
        ``sum(v)``, npix, ``sum(v * row)``, ``sum(v * col)``, and each droplet's frame ep."""
        nf = start.shape[0] - 1
        nrc = data.shape[1] * data.shape[2]
        nc = data.shape[2]
        flat = data.reshape(-1)
        for f in prange(nf):
            d0 = first[f]
            for k in range(start[f], start[f + 1]):
                i = lab[k] + d0
                lab[k] = i
                p = idx[k]
                v = np.float64(flat[p])
                rc = p % nrc
                total[i] += v
                npix[i] += 1
                wrow[i] += v * np.float64(rc // nc)
                wcol[i] += v * np.float64(rc % nc)
                ep[i] = f


def supports(data) -> bool:
    """Whether :func:`find` can run on ``data``: numba there and on, NumPy arrays (events, panels, rows, cols)."""
    return cpu_kernels.available() and isinstance(data, np.ndarray) and data.ndim == 4


def _per_panel(t, panel_shape):
    """A threshold (scalar or (1, panels, rows, cols)) as a (panels, rows, cols) float32 array (a view)."""
    t = np.asarray(t, np.float32)
    return np.broadcast_to(t.reshape(t.shape[1:]) if t.ndim == 4 else t, panel_shape)


def find(data, good, thr, thr_low, grow: bool, threads: int = 1) -> dict:
    """Labelled pixels and per-droplet sums of a batch, the dict of
    :meth:`gpusmall.funcs.droplet.Droplet.find`: data (events, panels, rows, cols) float32, good bool;
    thr, thr_low float32 scalars or (1, panels, rows, cols)."""
    e, p, r, c = data.shape
    frames = (e * p, r, c)
    d = np.ascontiguousarray(data, dtype=np.float32).reshape(frames)
    gd = np.ascontiguousarray(good, dtype=np.bool_).reshape(frames)
    t, tl = _per_panel(thr, (p, r, c)), _per_panel(thr_low, (p, r, c))
    wide = -(-c // 8) * 8  # rows padded to whole uint64 words (the padding stays False)
    mask_rows = np.empty((e * p, r, wide), np.bool_)
    mask_rows[:, :, c:] = False
    mask = mask_rows[:, :, :c]
    mask64 = mask_rows.view(np.uint64)
    counts = np.empty((e * p, -(-r // ROW_BLOCK)), np.int64)
    with cpu_kernels._threads(threads):
        _mask_count(d, gd, t, tl, bool(grow), mask, mask64, counts)
        start = np.zeros(e * p + 1, np.int64)
        np.cumsum(counts.sum(axis=1), out=start[1:])
        m = int(start[-1])
        idx = np.empty(m, np.int64)
        lab = np.empty(m, np.int64)
        n_frame = np.empty(e * p, np.int64)
        _label_frames(mask, mask64, start, idx, lab, n_frame)
        first = np.zeros(e * p + 1, np.int64)
        np.cumsum(n_frame, out=first[1:])
        n = int(first[-1])
        total, wrow, wcol = np.zeros(n), np.zeros(n), np.zeros(n)
        npix = np.zeros(n, np.int64)
        d_ep = np.zeros(n, np.int64)
        _droplet_sums(d, idx, lab, start, first, total, npix, wrow, wcol, d_ep)
    with np.errstate(invalid="ignore", divide="ignore"):
        d_row, d_col = wrow / total, wcol / total
    return dict(
        n=n,
        idx=idx,
        lab=lab,
        val=d.reshape(-1)[idx].astype(np.float64),
        total=total,
        npix=npix,
        row=d_row,
        col=d_col,
        event=d_ep // p,
        tile=d_ep % p,
        n_events=e,
        ep=idx // (r * c),
    )
