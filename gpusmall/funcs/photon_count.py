"""photon_count: photons per pixel by rounding with a threshold fraction (SPEC section 6, ``name`` ``photon``).

Per good pixel ``n = floor(s / adu_per_photon + (1 - thr_fraction))``, clipped at 0 (bad pixels count 0).
Outputs: ``nPhot`` (events,) int64, the total per event; with ``hist_max: K`` also ``hist`` (events, K + 1)
int32, the number of good pixels holding 0, 1, ..., K photons (pixels above K count in the last bin).
"""

from __future__ import annotations

from pydantic import Field

from .base import FrameContext, FunctionParams, ReductionFunction
from .droplet import bincount


class PhotonCountParams(FunctionParams):
    adu_per_photon: float = Field(gt=0)
    thr_fraction: float = Field(0.9, ge=0, le=1)
    hist_max: int | None = Field(None, ge=1, le=1 << 16)


class PhotonCount(ReductionFunction):
    type = "photon_count"
    Params = PhotonCountParams
    p: PhotonCountParams  # ReductionFunction.p, narrowed to this function's parameters

    def default_name(self) -> str:
        return "photon"

    def prepare(self, ctx: FrameContext):
        return None

    def photons(self, frames):
        """(events, panels, rows, cols) int32 photons per pixel."""
        xp = self.ctx.xp
        n = frames.data / xp.float32(self.p.adu_per_photon)  # one temporary, then in place
        n += xp.float32(1 - self.p.thr_fraction)
        xp.floor(n, out=n)
        xp.maximum(n, 0, out=n)
        n *= frames.good
        return n.astype(xp.int32)

    def compute(self, frames):
        xp = self.ctx.xp
        n = self.photons(frames)
        e = n.shape[0]
        flat = n.reshape(e, -1)
        out = {"nPhot": flat.sum(axis=1, dtype=xp.int64)}
        if self.p.hist_max is not None:
            k = self.p.hist_max + 1
            b = xp.minimum(flat, k - 1) + (xp.arange(e, dtype=xp.int32) * k)[:, None]
            g = frames.good.reshape(e, -1)
            out["hist"] = bincount(xp, b[g], minlength=e * k).reshape(e, k).astype(xp.int32)
        return out, None
