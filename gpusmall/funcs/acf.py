"""acf: autocorrelation of each event's image by FFT (SPEC section 6).

Per event and panel, ``x = image - mean(image)`` over its good pixels (bad pixels 0 after the
subtraction), then ``acf = x (*) x`` (correlation of x with itself, not normalised), computed for the whole
batch at once in float32 by ``rfft2`` zero-padded to at least ``2 * shape - 1`` (the next fast FFT length:
no wrap-around), ``|F|^2``, ``irfft2`` (``scipy.fft`` with all cores on NumPy, ``cupyx.scipy.fft`` on CuPy).
It equals ``scipy.signal.fftconvolve(x, x[::-1, ::-1])`` with zero lag in the middle.

Outputs: ``acf`` (events, window, window), the central crop: lags ``-(window // 2) ..`` along rows and columns
(zero lag at index ``window // 2``); ``profile`` (events, nbins): the mean of the crop over rings of
``resolution`` pixels of lag radius (bin k holds radii in ``[k, k + 1) * resolution``; NaN for a ring
that holds no lag on the pixel grid, as some do with ``resolution < 1``); a multi-panel input
keeps a panels axis after events. Static output ``profile_r``: bin centres in pixels.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from ..errors import InputError
from .base import FrameContext, FunctionParams, ReductionFunction


class AcfParams(FunctionParams):
    window: int = Field(21, ge=1, le=1 << 12)
    resolution: float = Field(1.0, gt=0)


class Acf(ReductionFunction):
    type = "acf"
    Params = AcfParams
    p: AcfParams  # ReductionFunction.p, narrowed to this function's parameters

    def prepare(self, ctx: FrameContext):
        xp = ctx.xp
        p, r, c = ctx.shape
        w = self.p.window
        if w > 2 * r - 1 or w > 2 * c - 1:
            raise InputError(f"detector {ctx.det}: function {self.name}: window {w} exceeds 2*shape-1 of {ctx.shape}")
        # any FFT size >= 2n-1 avoids wrap-around; take the next fast one (2*352-1 = 703 = 19*37 is slow)
        if ctx.backend.is_gpu:
            import cupyx.scipy.fft as fft_mod  # only reached on the CuPy backend
        else:
            import scipy.fft as fft_mod
        self.fft = fft_mod
        self.workers = {} if ctx.backend.is_gpu else {"workers": -1}
        self.fshape = tuple(fft_mod.next_fast_len(2 * n - 1, real=True) for n in (r, c))
        lags = np.arange(w) - w // 2
        self.ri = xp.asarray(lags % self.fshape[0])
        self.ci = xp.asarray(lags % self.fshape[1])
        rad = np.hypot(lags[:, None], lags[None, :]).ravel()
        b = np.floor(rad / self.p.resolution).astype(int)
        nb = b.max() + 1
        weights = np.zeros((w * w, nb))
        weights[np.arange(w * w), b] = 1
        count = weights.sum(axis=0, keepdims=True)
        weights = np.where(count > 0, weights / np.maximum(count, 1), np.nan)  # a ring with no lag: NaN
        self.weights = xp.asarray(weights)
        self.r_centres = (np.arange(nb) + 0.5) * self.p.resolution
        return None

    def compute(self, frames):
        xp = self.ctx.xp
        d = frames.data.astype(xp.float32)
        g = frames.good
        e, p = d.shape[:2]
        ng = g.sum(axis=(2, 3))
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = xp.where(ng > 0, xp.where(g, d, 0).sum(axis=(2, 3), dtype=xp.float64) / xp.maximum(ng, 1), 0)
        x = xp.where(g, d - mean[:, :, None, None].astype(xp.float32), xp.float32(0))
        x = x.astype(xp.float32)
        f = self.fft.rfft2(x, s=self.fshape, **self.workers)
        full = self.fft.irfft2(f.real**2 + f.imag**2, s=self.fshape, **self.workers)
        crop = full[:, :, self.ri][:, :, :, self.ci]
        w = self.p.window
        prof = crop.reshape(e, p, w * w).astype(xp.float64) @ self.weights
        if p == 1:
            crop, prof = crop[:, 0], prof[:, 0]
        return {"acf": crop.astype(xp.float32), "profile": prof.astype(xp.float32)}, None

    def static_outputs(self):
        return {"profile_r": self.r_centres}
