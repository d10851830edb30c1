"""rebin: block means to a smaller 2-D shape per panel (SPEC section 6). Output ``data``.

``shape`` is the target (rows, cols) of each panel; both must divide the panel's. Each output pixel is the mean of
its block of ``(rows / shape[0]) x (cols / shape[1])`` input pixels, bad pixels counting 0 (as smalldata_tools'
rebin and roi's ``mean``): the block sum divided by the block size. A single-panel input gives (events, rows,
cols), a multi-panel one (events, panels, rows, cols).
"""

from __future__ import annotations

from pydantic import Field

from ..errors import InputError
from . import cpu_rebin
from .base import FrameContext, Frames, FunctionParams, ReductionFunction


class RebinParams(FunctionParams):
    shape: list[int] = Field(min_length=2, max_length=2)


class Rebin(ReductionFunction):
    type = "rebin"
    Params = RebinParams
    p: RebinParams  # ReductionFunction.p, narrowed to this function's parameters

    def prepare(self, ctx: FrameContext):
        _, r, c = ctx.shape
        tr, tc = self.p.shape
        if tr <= 0 or tc <= 0 or r % tr or c % tc:
            raise InputError(
                f"detector {ctx.det}: function {self.name}: shape {self.p.shape} must divide the frame ({r}, {c})"
            )
        self.factors = (r // tr, c // tc)
        return None

    def compute(self, frames: Frames):
        xp = self.ctx.xp
        e, p, r, c = frames.data.shape
        fr, fc = self.factors
        if not self.ctx.backend.is_gpu and cpu_rebin.supports(frames.data):
            out = cpu_rebin.block_means(frames.data, fr, fc, getattr(self.ctx.backend, "threads", 1))
        else:
            out = frames.data.reshape(e, p, r // fr, fr, c // fc, fc).sum(axis=(3, 5))
            out /= xp.float32(fr * fc)
        return {"data": out[:, 0] if p == 1 else out}, None
