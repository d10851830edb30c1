"""projection: sum (or mean) of a frame along one axis, or over all of it (SPEC section 6). Output ``data``.

``axis`` as smalldata_tools takes it: ``0`` or ``1`` is the NumPy axis of each panel's (rows, cols) image that
is summed away (``axis: 0`` gives one value per column, ``axis: 1`` one per row); a single-panel input gives
(events, n), a multi-panel input is projected panel by panel, (events, panels, n). A negative axis (``-1``,
smalldata_tools' default) gives one number per event, (events,) float64: the total of the whole input (every
panel).
The default name is ``pj_ax_<|axis|>``. With ``mean`` the sum is divided by the number of good pixels that
entered it (NumPy's ``nanmean`` with bad pixels as NaN; NaN where there is none).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from ..errors import InputError
from .base import FrameContext, Frames, FunctionParams, ReductionFunction, threshold


class ProjectionParams(FunctionParams):
    axis: int = Field(-1, le=1)
    mean: bool = False
    thres_adu: float | None = None
    thres_rms: float | None = None
    single_photon: bool = False


class Projection(ReductionFunction):
    type = "projection"
    Params = ProjectionParams
    p: ProjectionParams  # ReductionFunction.p, narrowed to this function's parameters

    def default_name(self) -> str:
        return f"pj_ax_{abs(self.p.axis)}"

    def prepare(self, ctx: FrameContext):
        xp = ctx.xp
        self.rms_thres = None
        if self.p.thres_rms is not None:
            if ctx.noise is None:
                raise InputError(f"detector {ctx.det}: function {self.name}: thres_rms needs noise in the constants")
            self.rms_thres = (self.p.thres_rms * ctx.noise).astype(xp.float32)[None]
        # numpy axes of (events, panels, rows, cols) summed away: rows or cols, or all but the events
        self.axis = (1, 2, 3) if self.p.axis < 0 else 2 + self.p.axis
        return None

    def compute(self, frames: Frames):
        xp = self.ctx.xp
        data = threshold(xp, frames.data, self.p.thres_adu)
        if self.rms_thres is not None:
            data = xp.where(data >= self.rms_thres, data, xp.float32(0))
        if self.p.single_photon:
            data = (data > 0).astype(xp.float32)
        # the total of an event in float64 (as roi's sum); the per-row / per-column sums in float32
        total = data.sum(axis=self.axis, dtype=xp.float64 if self.p.axis < 0 else None)
        if self.p.mean:
            n = frames.good.sum(axis=self.axis)
            with np.errstate(invalid="ignore", divide="ignore"):
                out = total / n
        else:
            out = total
        if out.ndim == 3 and out.shape[1] == 1:
            out = out[:, 0]
        return {"data": out}, None
