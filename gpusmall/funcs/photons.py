"""photons: photons in droplets (child of droplet, SPEC section 6).

A droplet of total ``A`` holds ``n = floor(A / adu_per_photon + 0.5)`` photons. They are placed on its
pixels by largest remainders: pixel ``i`` of value ``v_i`` first gets ``floor(r_i)`` photons, ``r_i =
v_i / adu_per_photon`` (0 for negative values); the ``n - sum(floor)`` photons left over (never negative, and
never more than the droplet's pixel count) go one each to the pixels with the largest remainders
``r_i - floor(r_i)`` (ties: the earlier pixel, row-major). So the brightest pixels hold the photons and every
droplet keeps exactly ``n``. ("Never negative" holds because droplet pixels are never negative: ``droplet``
takes only ``threshold_low >= 0``.)

Exact, whatever the batch, the thread blocks or the order of the GPU's atomic adds: the remainders are
truncated to integers ``q_i = floor(2**32 (r_i - floor(r_i)))`` (units of 2**-32 photon) and all that follows
is integer arithmetic:

* ``n = sum(floor(r_i)) + floor(sum(q_i) / 2**32 + 1/2)``, summed from the pixels (int64 prefix sums), i.e.
  ``floor(A / adu_per_photon + 0.5)`` up to 2**-32 photon a pixel, with no float sum whose rounding depends
  on the order of the additions;
* the ranking is one stable sort by the int64 key ``droplet * 2**32 + (2**32 - 1 - q_i)`` (droplet, then
  remainder descending, then pixel): remainders closer than 2**-32 photon are equal (earlier pixel first),
  and nothing depends on the size of the droplet id, which is numbered per batch and per thread block (a
  float key ``droplet + remainder`` rounds the remainder's low bits away for large ids);
* a pixel holds at most ``2**30`` photons (larger values, ``inf`` included, count as ``2**30``), so that no
  integer overflows.

Memory is bounded by ``max_photons``: no entry per photon is ever made (a saturated frame holds ~1e10).
Each of the (events, max_photons) slots (ragged: each stored photon) looks its photon up in the pixels' cumulative photon counts
(``searchsorted``): the first ``max_photons`` photons of each event, in row-major pixel order (a pixel with k
photons k times in a row), are placed, the others only counted. Memory O(events x max_photons + labelled
pixels), and no device->host wait on the GPU.

Outputs: ``nPhotons`` (events,) int64, every photon of the event; ``nPhotons_truncated`` (events,) int64, the
photons beyond ``max_photons`` (not stored); ``row``, ``col``, ``tile`` int32, one entry per stored photon (a
pixel with k photons appears k times), in row-major pixel order per event, and ``data`` uint8, the photons of
each entry: 1 (0 in padding), so that smalldata_tools' ``sum(data)`` is the stored photons as with its
one-entry-per-pixel counts (1 byte per photon beside the 12 of the positions). Stored as ``layout`` says:

* ``ragged`` (default): flat over the stored photons of the batch, event after event, with ``len`` (events,)
  int32 (``nPhotons - nPhotons_truncated``) and the ``offset`` (events,) int64 the writer adds, as droplet's
  (:mod:`gpusmall.funcs.droplet`). The flat list is found with one device->host wait per batch (its length).
  smalldata_tools' names (hard links): ``var_<name>_sparse/data`` (``row``, ``col``, ``tile``), ``var_<name>_sparse_len``.
* ``padded``: (events, max_photons), padded with 0; smalldata_tools' names ``<name>_sparse_data`` (``_row``,
  ``_col``, ``_tile``). No device->host wait.

The counts are int64: a saturated 256 x 256 frame at 1e6 photons a pixel holds 6.6e10, beyond int32.

``prob`` (events, 12) float32, smalldata_tools' ``prob`` (its getProb): over the good pixels of the frame the
droplets were found in (the detector's, or the ROI's when droplet is under a roi; ``G`` of them in an event),
entry ``k`` (0..10) is the fraction of those pixels that hold exactly ``k`` photons (pixels outside every
droplet hold 0; pixels with more than 10 photons are in no entry), and the last entry (11) is ``kavg``, the mean
photons per good pixel (every photon of the event, ``nPhotons / G``). NaN in an event without a good pixel.
Found on the device for the whole batch, one ``bincount`` of (event, photons) over the droplet pixels.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from ..errors import InputError
from .base import FrameContext, FunctionParams, ReductionFunction
from .droplet import DropletFrames, SparseOutputs, bincount

MAX_PHOTONS_PER_PIXEL = float(2**30)
"""Photons one pixel may hold (larger values count as this): sums over < 2**31 pixels stay below 2**63."""
REMAINDER_BITS = 32
"""Remainders are compared and summed as integers in units of ``2**-REMAINDER_BITS`` photon (exact sums for
fewer than 2**31 labelled pixels a batch, the GPU labelling's limit; droplet ids below 2**31 fit the sort
key)."""


PROB_MAX_PHOTONS = 10
"""``prob`` has the fractions of the pixels holding 0..PROB_MAX_PHOTONS photons, then the mean (12 entries)."""


class PhotonsParams(FunctionParams):
    adu_per_photon: float = Field(gt=0)
    max_photons: int = Field(2000, ge=1, le=1 << 24)
    layout: Literal["ragged", "padded"] = "ragged"


def good_per_event(xp, good):
    """(events,) int64: the True pixels of each event of ``good`` (events, ...) bool. On NumPy one
    ``count_nonzero`` per event (its SIMD count: a bool ``sum(axis=1)`` converts every pixel to an integer
    first, ~7x slower on an ePix10k2M frame)."""
    flat = good.reshape(good.shape[0], -1)
    if xp is np:
        return np.fromiter((np.count_nonzero(row) for row in flat), np.int64, count=flat.shape[0])
    return flat.sum(axis=1)


def segment_sums(xp, values, counts):
    """Exact sums of consecutive segments of the int64 ``values``, ``counts[j]`` items in segment ``j``
    (int64 prefix sums: no float rounding, no dependence on the order of additions)."""
    cs = xp.concatenate([xp.zeros(1, xp.int64), xp.cumsum(values, dtype=xp.int64)])
    end = xp.cumsum(counts)
    return cs[end] - cs[end - counts]


def photons_per_pixel(xp, value, droplet, droplet_sum, adu):
    """Photons on each labelled pixel (largest-remainder rule of the module docstring), int64.

    ``value``, ``droplet``: (pixels,) value and droplet id (0 .. n_droplets - 1) of each labelled pixel, in
    row-major order; ``droplet_sum``: (n_droplets,) the droplet totals, of which only the length is used (the
    total is summed again from the pixels, exactly: see the module docstring).
    """
    nd = droplet_sum.size
    m = value.size
    if m == 0:
        return xp.zeros(0, xp.int64)
    r = value.astype(xp.float64, copy=False) / adu
    r = xp.where(r > 0, xp.minimum(r, MAX_PHOTONS_PER_PIXEL), 0.0)  # NaN (never labelled) -> 0, inf -> cap
    base_f = xp.floor(r)
    base = base_f.astype(xp.int64)
    q = xp.floor((r - base_f) * float(1 << REMAINDER_BITS)).astype(xp.int64)  # 0 .. 2**32 - 1
    # pixels by droplet, then decreasing remainder, then pixel (stable sort): one exact integer key
    key = droplet.astype(xp.int64) << REMAINDER_BITS
    key += (1 << REMAINDER_BITS) - 1 - q
    order = xp.argsort(key, kind="stable")
    del key
    seg_count = bincount(xp, droplet, minlength=nd)
    left = (segment_sums(xp, q[order], seg_count) + (1 << (REMAINDER_BITS - 1))) >> REMAINDER_BITS
    rank = xp.empty(m, xp.int64)
    rank[order] = xp.arange(m) - (xp.cumsum(seg_count) - seg_count)[droplet[order]]
    return base + (rank < left[droplet]).astype(xp.int64)


class Photons(ReductionFunction):
    """Photon positions from droplets; see the module docstring."""

    type = "photons"
    Params = PhotonsParams
    p: PhotonsParams  # ReductionFunction.p, narrowed to this function's parameters
    takes = ("droplets",)

    def sparse_outputs(self) -> SparseOutputs:
        return SparseOutputs(("data", "row", "col", "tile"), self.p.layout, self.p.max_photons)

    def prepare(self, ctx: FrameContext):
        self.shape = ctx.shape
        return None

    def compute(self, frames):
        if not isinstance(frames, DropletFrames):
            raise InputError(f"function {self.name}: photons must be a child of droplet")
        xp = self.ctx.xp
        e = frames.data.shape[0]
        p, r, c = self.shape
        m = self.p.max_photons
        n_good = good_per_event(xp, frames.good)
        ragged = self.p.layout == "ragged"
        if frames.pix_value.size == 0:
            zeros = xp.zeros(0 if ragged else (e, m), xp.int32)
            return {
                "nPhotons": xp.zeros(e, xp.int64),
                "nPhotons_truncated": xp.zeros(e, xp.int64),
                "data": zeros.astype(xp.uint8),
                "row": zeros,
                "col": zeros.copy(),
                "tile": zeros.copy(),
                **({"len": xp.zeros(e, xp.int32)} if ragged else {}),
                "prob": self.prob(xp.zeros((e, PROB_MAX_PHOTONS + 2), xp.int64), xp.zeros(e, xp.int64), n_good),
            }, None
        k = photons_per_pixel(xp, frames.pix_value, frames.pix_droplet, frames.droplet_sum, self.p.adu_per_photon)
        # pixels are in row-major order of the batch, hence grouped by event; photon j of the batch sits on
        # the pixel i with before[i] <= j < before[i + 1] (exact int64 prefix sums)
        before = xp.concatenate([xp.zeros(1, xp.int64), xp.cumsum(k)])
        pix_event = frames.pix_index // (p * r * c)  # the event of each labelled pixel
        pix_per_event = bincount(xp, pix_event, minlength=e)
        start = xp.cumsum(pix_per_event) - pix_per_event  # first pixel of each event
        first = before[start]  # photons before each event
        total = before[start + pix_per_event] - first  # photons of each event
        idx = frames.pix_index
        if ragged:  # the first max_photons photons of each event, event after event
            stored = xp.minimum(total, m)
            ends = xp.cumsum(stored)
            n_flat = int(ends[-1])  # the ragged layout's one device->host wait: how many photons are stored
            q = xp.arange(n_flat, dtype=xp.int64)
            ev = xp.searchsorted(ends, q, side="right")  # the event of each stored photon
            j = first[ev] + q - (ends - stored)[ev]  # ... its photon in the batch
            pix = xp.searchsorted(before[1:], j, side="right")  # ... and its pixel
            del q, ev, j

            def put(per_pixel):  # per labelled pixel -> per stored photon (int32 gathers)
                return per_pixel.astype(xp.int32)[pix]

            data = xp.ones(n_flat, xp.uint8)
        else:
            slot = xp.arange(m, dtype=xp.int64)
            held = slot[None, :] < total[:, None]  # (events, max_photons)
            j = (first[:, None] + slot[None, :]).ravel()  # the photon of the batch each slot holds
            pix = xp.searchsorted(before[1:], j, side="right").reshape(e, m)  # ... and its pixel
            del j
            pix = xp.minimum(pix, k.size - 1, out=pix)  # (slots past the batch's last photon hold nothing)

            def put(per_pixel):  # per labelled pixel -> per slot (int32 gathers: (events, max_photons) each)
                return xp.where(held, per_pixel.astype(xp.int32)[pix], xp.int32(0))

            data = held.astype(xp.uint8)

        out = {
            "nPhotons": total,
            "nPhotons_truncated": xp.maximum(total - m, 0),
            "data": data,
            "row": put((idx // c) % r),
            "col": put(idx % c),
            "tile": put((idx // (r * c)) % p),
        }
        if ragged:
            out["len"] = stored.astype(xp.int32)
        # droplet pixels holding k = 0..10 photons (column k) and more than 10 (column 11), per event: one
        # bincount of event * 12 + min(k, 11)
        width = PROB_MAX_PHOTONS + 2
        code = pix_event * width
        code += xp.minimum(k, width - 1)
        per_k = bincount(xp, code, minlength=e * width).reshape(e, width)
        out["prob"] = self.prob(per_k, total, n_good)
        return out, None

    def prob(self, per_k, total, n_good):
        """``prob`` (events, 12) float32 (module docstring) from ``per_k`` (events, 12) int64, the droplet pixels
        holding k = 1..10 photons in column k and more than 10 in column 11 (column 0 is not read), the photons
        of each event ``total`` and its good pixels ``n_good`` (events,)."""
        xp = self.ctx.xp
        count = per_k.astype(xp.float64)
        count[:, 0] = n_good - per_k[:, 1:].sum(axis=1)  # no photon: every other good pixel
        count[:, -1] = total  # kavg's numerator, in place of the pixels with more than 10
        with np.errstate(invalid="ignore", divide="ignore"):
            count /= n_good[:, None]
        return count.astype(xp.float32)
