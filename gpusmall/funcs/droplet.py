"""droplet: connected clusters of bright pixels, per event and panel (SPEC section 6).

Whole batch at once:

1. seeds = good pixels with ``s >= threshold`` (times ``noise`` with ``use_rms``);
2. 4-connected labelling of the ``(events * panels, rows, cols)`` stack with a 3-D structure that is zero
   along the first axis, so no droplet crosses an event or a panel edge (``scipy.ndimage.label`` /
   ``cupyx.scipy.ndimage.label``);
3. with ``threshold_low < threshold``: every droplet grows once by its 4-neighbours (same panel) that are good
   with ``s >= threshold_low``, and the grown mask is labelled again (droplets that touch after growing merge);
4. per droplet, segmented reductions (``bincount`` on label ids over the labelled pixels, which scales with
   pixels, not droplets): ``data`` (sum), ``npix``, intensity-weighted ``row`` and ``col``, ``tile`` (panel);
5. ``thres_adu`` vetoes droplets whose total is below it; the kept droplets of each event are written in order
   of their first pixel (row-major over panel, row, col) into arrays padded with 0 to ``max_droplets``.

Outputs: ``nDroplets_all``, ``nDroplets``, ``nDroplets_truncated`` (kept droplets beyond ``max_droplets``)
(events,) int32; ``data``, ``row``, ``col`` (events, max_droplets) float32, ``npix``, ``tile`` int32.
Children (photons) receive :class:`DropletFrames`: the frames plus the labelled pixels of the kept droplets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from ..errors import InputError
from .base import FrameContext, Frames, FunctionParams, ReductionFunction


class DropletParams(FunctionParams):
    threshold: float = 5.0
    threshold_low: float | None = None
    use_rms: bool = True
    thres_adu: float | None = None
    max_droplets: int = Field(1000, ge=1)

    @model_validator(mode="after")
    def _check(self):
        if self.threshold_low is not None and self.threshold_low > self.threshold:
            raise ValueError("threshold_low must not exceed threshold")
        return self


@dataclass
class DropletFrames(Frames):
    """Frames handed to droplet children, with the pixels of the kept droplets.

    Attributes (all 1-D over the labelled pixels of kept droplets, in row-major order of the batch):
        pix_index: flat index into (events, panels, rows, cols).
        pix_value: the pixel's value.
        pix_droplet: id of its droplet, 0..n_droplets-1 in batch order (first pixel, row-major).
        droplet_event: (n_droplets,) event of each kept droplet.
        droplet_sum: (n_droplets,) total of each kept droplet.
    """

    pix_index: Any = None
    pix_value: Any = None
    pix_droplet: Any = None
    droplet_event: Any = None
    droplet_sum: Any = None


def label_stack(xp, mask, idx=None):
    """(labels, n): 4-connected labels of a (events, panels, rows, cols) bool mask, none across events/panels.

    Labels are renumbered 1..n in order of each droplet's first pixel in row-major order of the batch.
    ``idx``: ``flatnonzero(mask)`` when the caller has it (CuPy renumbers with it; saves a pass and a sync).
    """
    e, p, r, c = mask.shape
    if xp is np:
        from scipy import ndimage
    else:  # CuPy backend
        from cupyx.scipy import ndimage
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    labels, n = ndimage.label(mask.reshape(e * p, r, c), structure=structure)
    n = int(n)
    if xp is not np and n:
        # cupyx numbers labels in its own order; renumber by first pixel (row-major)
        flat = labels.ravel()
        if idx is None:
            idx = xp.flatnonzero(flat)
        lab = flat[idx]
        # cupyx.scatter_min takes int32, uint32, uint64, float32 or float64 (not int64)
        first = xp.full(n + 1, flat.size, xp.uint64)
        import cupyx

        cupyx.scatter_min(first, lab, idx.astype(xp.uint64))
        order = xp.argsort(first[1:])
        rank = xp.empty(n + 1, xp.int32)
        rank[0] = 0
        rank[1 + order] = xp.arange(1, n + 1, dtype=xp.int32)
        labels = rank[labels]
    return labels.reshape(e, p, r, c), n


def bincount(xp, x, weights=None, minlength=0):
    """``xp.bincount`` that also takes an empty ``x`` on CuPy (cupy.bincount calls max() on it)."""
    if x.size == 0:
        return xp.zeros(minlength, xp.float64 if weights is not None else xp.int64)
    if weights is not None:
        weights = weights.astype(xp.float64)  # CuPy's atomicAdd overloads: float64 weights only
    return xp.bincount(x, weights=weights, minlength=minlength)


def grow4(xp, seeds, allowed):
    """``seeds`` plus their 4-neighbours (same panel) where ``allowed``; arrays (events, panels, rows, cols)."""
    d = seeds.copy()
    d[..., 1:, :] |= seeds[..., :-1, :]
    d[..., :-1, :] |= seeds[..., 1:, :]
    d[..., :, 1:] |= seeds[..., :, :-1]
    d[..., :, :-1] |= seeds[..., :, 1:]
    return seeds | (d & allowed)


class PadLayout:
    """Where per-item values go in rows padded to ``length``, one row per event (items sorted by event).

    Item ``i`` of an event goes to column ``i`` of the event's row; items past ``length`` are dropped.
    ``items`` maps the items to positions in the arrays that :meth:`pad` will be given (None: the same).
    Found once per item list, with one device->host wait on CuPy (how many fit); every :meth:`pad` after
    that is a gather and a scatter with no wait.

    Attributes:
        counts: (n_events,) int64, items per event (dropped ones included).
    """

    def __init__(self, xp, event, n_events: int, length: int, items=None):
        self.xp, self.shape = xp, (n_events, length)
        self.counts = bincount(xp, event, minlength=n_events)
        start = xp.cumsum(self.counts) - self.counts
        pos = xp.arange(event.size) - start[event]
        fit = xp.flatnonzero(pos < length)
        self.rows, self.cols = event[fit], pos[fit]
        self.source = fit if items is None else items[fit]

    def pad(self, values, fill=0):
        """(n_events, length) array of ``values[items]`` placed by the layout, ``fill`` elsewhere."""
        out = self.xp.full(self.shape, fill, dtype=values.dtype)
        out[self.rows, self.cols] = values[self.source]
        return out


class Droplet(ReductionFunction):
    """Droplet finding; see the module docstring."""

    type = "droplet"
    Params = DropletParams

    def prepare(self, ctx: FrameContext):
        p, xp = self.p, ctx.xp
        low = p.threshold if p.threshold_low is None else p.threshold_low
        if p.use_rms:
            if ctx.noise is None:
                raise InputError(f"detector {ctx.det}: function {self.name}: use_rms needs noise in the constants")
            noise = ctx.noise.astype(xp.float32)[None]
            self.thr, self.thr_low = noise * p.threshold, noise * low
        else:
            self.thr, self.thr_low = xp.float32(p.threshold), xp.float32(low)
        self.grow = low < p.threshold
        return ctx

    def find(self, frames: Frames):
        """Labelled pixels and per-droplet statistics of a batch (all droplets, before the veto)."""
        xp = self.ctx.xp
        data, good = frames.data, frames.good
        e, np_, nr, nc = data.shape
        mask = good & (data >= self.thr)
        if self.grow:
            mask = grow4(xp, mask, good & (data >= self.thr_low))
        idx = xp.flatnonzero(mask)  # the labelled pixels (nonzero of a bool array is the cheaper one)
        labels, n = label_stack(xp, mask, idx)
        lab = labels.ravel()[idx].astype(xp.int64) - 1
        val = data.ravel()[idx].astype(xp.float64)
        col = (idx % nc).astype(xp.float64)
        row = ((idx // nc) % nr).astype(xp.float64)
        ep = idx // (nr * nc)
        total = bincount(xp, lab, weights=val, minlength=n)
        npix = bincount(xp, lab, minlength=n)
        with np.errstate(invalid="ignore", divide="ignore"):
            d_row = bincount(xp, lab, weights=val * row, minlength=n) / total
            d_col = bincount(xp, lab, weights=val * col, minlength=n) / total
        # event*panels + panel of each droplet: the same for all its pixels, any one may write it
        d_ep = xp.zeros(n, xp.int64)
        d_ep[lab] = ep
        return dict(n=n, idx=idx, lab=lab, val=val, total=total, npix=npix, row=d_row, col=d_col,
                    event=d_ep // np_, tile=d_ep % np_, n_events=e, ep=ep)

    def compute(self, frames: Frames):
        xp = self.ctx.xp
        f = self.find(frames)
        e, n, m = f["n_events"], f["n"], self.p.max_droplets
        ev_all = f["event"]
        out = {"nDroplets_all": bincount(xp, ev_all, minlength=e).astype(xp.int32)}
        # kept droplets as indices (integer gathers: no device->host wait per array on CuPy)
        kept = None if self.p.thres_adu is None else xp.flatnonzero(f["total"] >= self.p.thres_adu)
        ev = ev_all if kept is None else ev_all[kept]
        layout = PadLayout(xp, ev, e, m, items=kept)
        cnt = layout.counts
        out["nDroplets"] = cnt.astype(xp.int32)
        out["nDroplets_truncated"] = xp.maximum(cnt - m, 0).astype(xp.int32)
        out["data"] = layout.pad(f["total"].astype(xp.float32))
        out["npix"] = layout.pad(f["npix"].astype(xp.int32))
        out["row"] = layout.pad(f["row"].astype(xp.float32))
        out["col"] = layout.pad(f["col"].astype(xp.float32))
        out["tile"] = layout.pad(f["tile"].astype(xp.int32))
        child = None
        if self.children:
            if kept is None:  # every droplet kept: the labelled pixels as they are
                child = DropletFrames(frames.data, frames.good, frames.raw, pix_index=f["idx"], pix_value=f["val"],
                                      pix_droplet=f["lab"], droplet_event=ev, droplet_sum=f["total"])
            else:
                new_id = xp.full(n, -1, xp.int64)
                new_id[kept] = xp.arange(kept.size)
                pix_id = new_id[f["lab"]]
                pk = xp.flatnonzero(pix_id >= 0)
                child = DropletFrames(frames.data, frames.good, frames.raw, pix_index=f["idx"][pk],
                                      pix_value=f["val"][pk], pix_droplet=pix_id[pk],
                                      droplet_event=ev, droplet_sum=f["total"][kept])
        return out, child

