"""projection: sum (or mean) of a frame along one axis (SPEC section 6). Output ``data``.

``axis`` is the NumPy axis of each panel's (rows, cols) image that is summed away, as in
smalldata_tools: ``axis: -1`` (columns) gives one value per row, ``axis: 0`` one per column.
With ``mean`` the sum is divided by the number of good pixels. A single-panel input gives
(events, n); a multi-panel input is projected panel by panel, (events, panels, n).
"""
from __future__ import annotations

import numpy as np
from pydantic import Field

from ..errors import InputError

from .base import FrameContext, Frames, FunctionParams, ReductionFunction, threshold


class ProjectionParams(FunctionParams):
    axis: int = Field(-1, ge=-2, le=1)
    mean: bool = False
    thres_adu: float | None = None
    thres_rms: float | None = None
    single_photon: bool = False


class Projection(ReductionFunction):
    type = "projection"
    Params = ProjectionParams

    def default_name(self) -> str:
        return f"pj_ax_{abs(self.p.axis)}"

    def prepare(self, ctx: FrameContext):
        xp = ctx.xp
        self.rms_thres = None
        if self.p.thres_rms is not None:
            if ctx.noise is None:
                raise InputError(f"detector {ctx.det}: function {self.name}: thres_rms needs noise in the constants")
            self.rms_thres = (self.p.thres_rms * ctx.noise).astype(xp.float32)[None]
        self.axis = 2 + self.p.axis % 2  # numpy axis of (events, panels, rows, cols)
        return None

    def compute(self, frames: Frames):
        xp = self.ctx.xp
        data = threshold(xp, frames.data, self.p.thres_adu)
        if self.rms_thres is not None:
            data = xp.where(data >= self.rms_thres, data, xp.float32(0))
        if self.p.single_photon:
            data = (data > 0).astype(xp.float32)
        if self.p.mean:
            n = frames.good.sum(axis=self.axis)
            with np.errstate(invalid="ignore", divide="ignore"):
                out = data.sum(axis=self.axis) / n
        else:
            out = data.sum(axis=self.axis)
        if out.shape[1] == 1:
            out = out[:, 0]
        return {"data": out}, None

