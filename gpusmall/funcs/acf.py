"""acf: autocorrelation of each event's image by FFT (SPEC section 6).

Per event and panel, ``x = image - mean(image)`` over its good pixels (bad pixels 0 after the
subtraction), then ``acf = x (*) x`` (correlation of x with itself, not normalised), computed for the whole
batch at once by ``rfft2`` zero-padded to ``2 * shape - 1`` (no wrap-around), ``|F|^2``, ``irfft2``.
It equals ``scipy.signal.fftconvolve(x, x[::-1, ::-1])`` with zero lag in the middle.

Outputs: ``acf`` (events, window, window), the central crop: lags ``-(window // 2) ..`` along rows and columns
(zero lag at index ``window // 2``); ``profile`` (events, nbins): the mean of the crop over rings of
``resolution`` pixels of lag radius (bin k holds radii in ``[k, k + 1) * resolution``); a multi-panel input
keeps a panels axis after events. Static output ``profile_r``: bin centres in pixels.
"""
from __future__ import annotations

import numpy as np
from pydantic import Field

from ..errors import InputError
from .base import FrameContext, FunctionParams, ReductionFunction


class AcfParams(FunctionParams):
    window: int = Field(21, ge=1)
    resolution: float = Field(1.0, gt=0)


class Acf(ReductionFunction):
    type = "acf"
    Params = AcfParams

    def prepare(self, ctx: FrameContext):
        xp = ctx.xp
        p, r, c = ctx.shape
        w = self.p.window
        if w > 2 * r - 1 or w > 2 * c - 1:
            raise InputError(f"detector {ctx.det}: function {self.name}: window {w} exceeds 2*shape-1 of {ctx.shape}")
        self.fshape = (2 * r - 1, 2 * c - 1)
        lags = np.arange(w) - w // 2
        self.ri = xp.asarray(lags % self.fshape[0])
        self.ci = xp.asarray(lags % self.fshape[1])
        rad = np.hypot(lags[:, None], lags[None, :]).ravel()
        b = np.floor(rad / self.p.resolution).astype(int)
        nb = b.max() + 1
        weights = np.zeros((w * w, nb))
        weights[np.arange(w * w), b] = 1
        weights /= weights.sum(axis=0, keepdims=True).clip(1)
        self.weights = xp.asarray(weights)
        self.r_centres = (np.arange(nb) + 0.5) * self.p.resolution
        return None

    def compute(self, frames):
        xp = self.ctx.xp
        d = frames.data.astype(xp.float64)
        g = frames.good
        e, p = d.shape[:2]
        ng = g.sum(axis=(2, 3))
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = xp.where(ng > 0, xp.where(g, d, 0).sum(axis=(2, 3)) / xp.maximum(ng, 1), 0)
        x = xp.where(g, d - mean[:, :, None, None], 0)
        f = xp.fft.rfft2(x, s=self.fshape)
        full = xp.fft.irfft2(f.real ** 2 + f.imag ** 2, s=self.fshape)
        crop = full[:, :, self.ri][:, :, :, self.ci]
        w = self.p.window
        prof = crop.reshape(e, p, w * w) @ self.weights
        if p == 1:
            crop, prof = crop[:, 0], prof[:, 0]
        return {"acf": crop.astype(xp.float32), "profile": prof.astype(xp.float32)}, None

    def static_outputs(self):
        return {"profile_r": self.r_centres}
