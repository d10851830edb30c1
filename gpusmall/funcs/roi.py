"""roi: a rectangular region of interest (SPEC section 6).

Parameters: ``bounds`` (``[[p0,p1],[r0,r1],[c0,c1]]`` or ``[[r0,r1],[c0,c1]]`` on panel 0, half-open; without
it the whole detector), ``thres_adu`` (a number ``t``: pixels below ``t`` count 0; ``[lo, hi]``: pixels below
``lo`` or above ``hi`` count 0), ``write_area``, ``calc_pars``, ``user_mask``.

Outputs per event: ``sum``, ``mean`` (over all ROI pixels, bad ones as 0), ``max``, ``com`` (2 values:
intensity-weighted row and column relative to the ROI origin), ``nsat`` (good pixels whose raw value ``v`` is at
or above the detector's saturation value; bad and masked pixels never count, SPEC 3), ``area`` (the ROI image,
only with ``write_area``). Children receive the ROI image (thresholded). smalldata_tools' names of the parameters
(:meth:`~gpusmall.funcs.base.ReductionFunction.smalldata_params`): ``bound``, ``thresADU``.
"""

from __future__ import annotations

import numpy as np
from pydantic import field_validator

from ..detectors.masks import read_user_mask
from ..errors import InputError
from .base import FrameContext, Frames, FunctionParams, ReductionFunction, threshold


class RoiParams(FunctionParams):
    bounds: list[list[int]] | None = None
    thres_adu: float | list[float] | None = None
    write_area: bool = False
    calc_pars: bool = True
    user_mask: str | None = None

    @field_validator("bounds")
    @classmethod
    def _bounds(cls, v):
        if v is None:
            return v
        if len(v) not in (2, 3) or any(len(b) != 2 for b in v):
            raise ValueError("bounds must be [[p0,p1],[r0,r1],[c0,c1]] or [[r0,r1],[c0,c1]]")
        if any(b[0] < 0 or b[1] <= b[0] for b in v):
            raise ValueError("each bound must be [start, stop] with 0 <= start < stop")
        return v

    @field_validator("thres_adu")
    @classmethod
    def _thres(cls, v):
        if isinstance(v, list) and (len(v) != 2 or v[0] > v[1]):
            raise ValueError("thres_adu must be a number or [lo, hi] with lo <= hi")
        return v


def roi_threshold(xp, data, thres):
    """``data`` with the pixels outside ``thres`` set to 0: a number ``t`` keeps ``data >= t``, ``[lo, hi]``
    keeps ``lo <= data <= hi``; None keeps everything (no copy)."""
    if isinstance(thres, (list, tuple)):
        lo, hi = (xp.float32(t) for t in thres)
        return xp.where((data >= lo) & (data <= hi), data, xp.float32(0))
    return threshold(xp, data, thres)


class Roi(ReductionFunction):
    type = "roi"
    passes = "image"
    Params = RoiParams
    p: RoiParams  # ReductionFunction.p, narrowed to this function's parameters
    SMALLDATA_PARAM_NAMES = {**ReductionFunction.SMALLDATA_PARAM_NAMES, "bounds": "bound"}

    def prepare(self, ctx: FrameContext) -> FrameContext:
        if self.p.bounds is None:  # the whole detector
            b = [[0, n] for n in ctx.shape]
        else:
            b = self.p.bounds if len(self.p.bounds) == 3 else [[0, 1], *self.p.bounds]
        for (_lo, hi), n in zip(b, ctx.shape):
            if hi > n:
                raise InputError(
                    f"detector {ctx.det}: function {self.name}: bounds {self.p.bounds} exceed the frame shape {ctx.shape}"
                )
        self.index = tuple(slice(lo, hi) for lo, hi in b)
        sub = ctx.crop(self.index)  # type: ignore[arg-type]
        xp = ctx.xp
        if self.p.user_mask is not None:
            m = read_user_mask(
                self.p.user_mask, ctx.det, ctx.shape if not _roi_shaped(self.p.user_mask, sub.shape) else sub.shape
            )
            m = m[self.index] if m.shape == ctx.shape else m
            sub.mask = sub.mask & ctx.backend.to_device(m)
        self.user_mask = None if self.p.user_mask is None else sub.mask
        p, r, c = sub.shape
        self.rows = xp.arange(r, dtype=xp.float64)  # row / column index, for the centre of mass
        self.cols = xp.arange(c, dtype=xp.float64)
        self.sat = ctx.saturation
        return sub

    def compute(self, frames: Frames):
        xp = self.ctx.xp
        sub = frames.crop(self.index)
        data, good = sub.data, sub.good
        if self.user_mask is not None:
            good = good & self.user_mask[None]
            data = xp.where(good, data, xp.float32(0))
        data = roi_threshold(xp, data, self.p.thres_adu)
        out = {}
        if self.p.calc_pars:
            n_events = data.shape[0]
            flat = data.reshape(n_events, -1)
            total = flat.sum(axis=1, dtype=xp.float64)
            out["sum"] = total
            out["mean"] = total / flat.shape[1]
            out["max"] = flat.max(axis=1)
            # centre of mass from the row and column profiles of w = max(data, 0), summed in float64
            # (two reads of w, no float64 copy of the ROI)
            w = xp.maximum(data, xp.float32(0))
            by_row = w.sum(axis=3, dtype=xp.float64)  # (events, panels, rows)
            by_col = w.sum(axis=2, dtype=xp.float64)  # (events, panels, cols)
            wsum = by_row.reshape(n_events, -1).sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                com_r = (by_row * self.rows).reshape(n_events, -1).sum(axis=1) / wsum
                com_c = (by_col * self.cols).reshape(n_events, -1).sum(axis=1) / wsum
            out["com"] = xp.stack([com_r, com_c], axis=1)
            if sub.raw is not None:
                v = self.ctx.model.data(sub.raw, xp)
                out["nsat"] = ((v >= self.sat) & good).reshape(n_events, -1).sum(axis=1).astype(xp.int32)
        if self.p.write_area:
            area = self.ctx.stored_image(data, good)  # bad pixels 0 or NaN (mask_value)
            out["area"] = area if area.shape[1] > 1 else area[:, 0]
        return out, Frames(data, good, sub.raw, frames.events)


def _roi_shaped(path: str, shape) -> bool:
    try:
        return tuple(np.load(path, mmap_mode="r").shape) == tuple(shape)
    except Exception:
        return False
