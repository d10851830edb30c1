"""photons: photons in droplets (child of droplet, SPEC section 6).

A droplet of total ``A`` holds ``n = floor(A / adu_per_photon + 0.5)`` photons. They are placed on its
pixels by largest remainders: pixel ``i`` of value ``v_i`` first gets ``floor(v_i / adu_per_photon)``
photons (0 for negative values); the ``n - sum(floor)`` photons left over (never negative, and never more
than the droplet's pixel count) go one each to the pixels with the largest remainders
``v_i / adu_per_photon - floor(v_i / adu_per_photon)`` (ties: the earlier pixel, row-major). So the
brightest pixels hold the photons and every droplet keeps exactly ``n``. ("Never negative" holds because
droplet pixels are never negative: ``droplet`` takes only ``threshold_low >= 0``.)

Outputs: ``nPhotons`` (events,) int32; ``row``, ``col``, ``tile`` (events, max_photons) int32, one entry per
photon (a pixel with k photons appears k times), in row-major pixel order per event, padded with 0.
"""
from __future__ import annotations

from pydantic import Field

from ..errors import InputError
from .base import FrameContext, FunctionParams, ReductionFunction
from .droplet import DropletFrames, PadLayout, bincount


class PhotonsParams(FunctionParams):
    adu_per_photon: float = Field(gt=0)
    max_photons: int = Field(2000, ge=1)


def expand(xp, counts):
    """Index array repeating ``i`` ``counts[i]`` times (``np.repeat(arange, counts)`` that also runs on CuPy)."""
    total = int(counts.sum()) if counts.size else 0
    if total == 0:
        return xp.zeros(0, xp.int64)
    ends = xp.cumsum(counts)
    return xp.searchsorted(ends, xp.arange(total), side="right")


def photons_per_pixel(xp, value, droplet, droplet_sum, adu):
    """Photons on each labelled pixel (largest-remainder rule of the module docstring), int64."""
    nd = droplet_sum.size
    if value.size == 0:
        return xp.zeros(0, xp.int64)
    n = xp.floor(droplet_sum / adu + 0.5).astype(xp.int64)
    r = value / adu
    base = xp.maximum(xp.floor(r), 0).astype(xp.int64)
    frac = xp.where(r > 0, r - xp.floor(r), 0.0)
    left = n - bincount(xp, droplet, weights=base, minlength=nd).astype(xp.int64)
    # rank pixels inside each droplet by decreasing remainder (stable: earlier pixel first)
    key = droplet.astype(xp.float64) + (1.0 - frac) * 0.999
    order = xp.argsort(key, kind="stable") if xp.__name__ == "numpy" else xp.argsort(key)
    sd = droplet[order]
    seg_count = bincount(xp, droplet, minlength=nd)
    seg_start = xp.cumsum(seg_count) - seg_count
    rank_sorted = xp.arange(sd.size) - seg_start[sd]
    rank = xp.empty_like(rank_sorted)
    rank[order] = rank_sorted
    return base + (rank < left[droplet]).astype(xp.int64)


class Photons(ReductionFunction):
    """Photon positions from droplets; see the module docstring."""

    type = "photons"
    Params = PhotonsParams

    def prepare(self, ctx: FrameContext):
        self.shape = ctx.shape
        return None

    def compute(self, frames):
        if not isinstance(frames, DropletFrames):
            raise InputError(f"function {self.name}: photons must be a child of droplet")
        xp = self.ctx.xp
        e = frames.data.shape[0]
        p, r, c = self.shape
        k = photons_per_pixel(xp, frames.pix_value, frames.pix_droplet, frames.droplet_sum, self.p.adu_per_photon)
        which = expand(xp, k)
        idx = frames.pix_index[which] if which.size else xp.zeros(0, xp.int64)
        ev = idx // (p * r * c)
        m = self.p.max_photons
        layout = PadLayout(xp, ev, e, m)
        out = {"nPhotons": layout.counts.astype(xp.int32),
               "row": layout.pad(((idx // c) % r).astype(xp.int32)),
               "col": layout.pad((idx % c).astype(xp.int32)),
               "tile": layout.pad(((idx // (r * c)) % p).astype(xp.int32))}
        return out, None
