"""droplet: connected clusters of bright pixels, per event and panel (SPEC section 6).

Whole batch at once:

1. seeds = good pixels with ``s >= threshold`` (times ``noise`` with ``use_rms``); on CuPy steps 1 and 3's
   growth are one ``droplet_mask`` kernel (``kernels/droplet.cu``);
2. 4-connected labelling, no droplet across an event or a panel edge: NumPy labels the
   ``(events * panels, rows, cols)`` stack with ``scipy.ndimage.label`` and a 3-D structure that is zero
   along the first axis; CuPy runs a union-find over the labelled pixels only (``kernels/label.cu``:
   nothing frame-sized is read or written, labels come out numbered as SciPy numbers them);
3. with ``threshold_low < threshold``: every droplet grows once by its 4-neighbours (same panel) that are good
   with ``s >= threshold_low``; the grown mask is what step 2 labels (droplets that touch after growing merge);
4. per droplet, segmented reductions (``bincount`` on label ids over the labelled pixels, which scales with
   pixels, not droplets): ``data`` (sum), ``npix``, intensity-weighted ``row`` and ``col``, ``tile`` (panel);
5. ``thres_adu`` vetoes droplets whose total is below it; the first ``max_droplets`` kept droplets of each
   event, in order of their first pixel (row-major over panel, row, col), are stored (``layout``).

Outputs: ``nDroplets_all``, ``nDroplets``, ``nDroplets_truncated`` (kept droplets beyond ``max_droplets``, not
stored) (events,) int32; per droplet ``data``, ``row``, ``col`` float32, ``npix``, ``tile`` int32, stored as
``layout`` says:

* ``ragged`` (default): flat arrays over the stored droplets of the batch, event after event (``(n_droplets,)``;
  in the file ``/<det>/<name>_data`` etc. of shape (droplets of the run,)), with ``len`` (events,) int32, the
  droplets stored for each event (``nDroplets - nDroplets_truncated``); the writer adds ``offset`` (events,)
  int64, the index of each event's first droplet in the flat arrays (:mod:`gpusmall.io.writer`). Event ``e``'s
  droplets are ``data[offset[e]:offset[e] + len[e]]``. ``max_droplets`` only bounds the memory.
* ``padded``: (events, max_droplets) arrays, the droplets of event ``e`` in row ``e``, padded with 0 (SPEC 6).

smalldata_tools' names of the same datasets (hard links in the file, :class:`SparseOutputs`): padded
``<name>_sparse_data``, ``_sparse_row``, ``_sparse_col``, ``_sparse_tile``, ``_sparse_npix`` (its ``sparsify``
child with ``nData``); ragged ``var_<name>_sparse/data`` (``row``, ...) and ``var_<name>_sparse_len``.

Children receive :class:`DropletFrames`: the droplet image (the calibrated values at the pixels of the kept
droplets, 0 elsewhere; the good mask of the frames), as smalldata_tools' ``unsparsify`` gives it, so image
functions (projection, roi, azav...) work on it; and the lists of those pixels (photons).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from ..errors import InputError
from ..kernel_specs import KernelSpec, blocks_1d
from . import cpu_droplet
from .base import FrameContext, Frames, FunctionParams, ReductionFunction


class DropletParams(FunctionParams):
    """``threshold`` > 0 and ``0 <= threshold_low <= threshold`` (ADU, or noise multiples with ``use_rms``):
    droplet pixels are never negative, so a droplet's photons (``photons``) never exceed its rounded total."""

    threshold: float = Field(5.0, gt=0)
    threshold_low: float | None = Field(None, ge=0)
    use_rms: bool = True
    thres_adu: float | None = None
    max_droplets: int = Field(1000, ge=1, le=1 << 22)
    layout: Literal["ragged", "padded"] = "ragged"

    @model_validator(mode="after")
    def _check(self):
        if self.threshold_low is not None and self.threshold_low > self.threshold:
            raise ValueError("threshold_low must not exceed threshold")
        return self


@dataclass
class DropletFrames(Frames):
    """Frames handed to droplet children, with the pixels of the kept droplets.

    ``data`` is the droplet image when a child takes an image (:attr:`image`): the calibrated values at the
    pixels of the kept droplets (all of them, also those beyond ``max_droplets``), 0 elsewhere; otherwise (only
    photons below) the calibrated frames, which photons does not read. ``good`` and ``raw`` are the frames'.

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
    image: bool = False


@dataclass(frozen=True)
class SparseOutputs:
    """How a function's per-item outputs (droplets, photons) are stored (``layout``), for the writer.

    Attributes:
        keys: short keys of the per-item outputs (``data``, ``row``, ...).
        layout: ``ragged`` (flat over the items, with the per-event ``count`` and the ``offset`` the writer
            adds) or ``padded`` ((events, max_items)).
        max_items: items stored per event at most (``max_droplets``, ``max_photons``).
        count: short key of the per-event number of stored items (ragged).
        offset: short key of the per-event index of the first item, added by the writer (ragged).
    """

    keys: tuple[str, ...]
    layout: str
    max_items: int
    count: str = "len"
    offset: str = "offset"


@dataclass
class SparseColumns:
    """:func:`sparse_columns` of a function tree, by full output name (``<name>_<key>``, children included).

    Attributes:
        items: ragged per-item output -> (its per-event count, its per-event offset).
        links: smalldata_tools' name -> our output it names (hard links in the file).
        bounds: ragged per-item output -> items per event at most (what memory estimates must assume).
    """

    items: dict[str, tuple[str, str]] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)
    bounds: dict[str, int] = field(default_factory=dict)


def sparse_columns(functions, prefix: str = "") -> SparseColumns:
    """The per-item outputs of function trees (functions with a ``sparse_outputs`` method) by full name:
    ``<prefix><name>_<key>``. smalldata_tools' names: padded ``<full>_sparse_<key>`` (its sparsify with
    ``nData``), ragged ``var_<full>_sparse/<key>`` and ``var_<full>_sparse_len`` (its variable-length data)."""
    out = SparseColumns()
    for f in functions:
        full = prefix + f.name
        spec = f.sparse_outputs() if hasattr(f, "sparse_outputs") else None
        if spec is not None:
            for k in spec.keys:
                if spec.layout == "ragged":
                    out.items[f"{full}_{k}"] = (f"{full}_{spec.count}", f"{full}_{spec.offset}")
                    out.bounds[f"{full}_{k}"] = spec.max_items
                    out.links[f"var_{full}_sparse/{k}"] = f"{full}_{k}"
                else:
                    out.links[f"{full}_sparse_{k}"] = f"{full}_{k}"
            if spec.layout == "ragged":
                out.links[f"var_{full}_sparse_len"] = f"{full}_{spec.count}"
        sub = sparse_columns(f.children, full + "_")
        out.items.update(sub.items)
        out.links.update(sub.links)
        out.bounds.update(sub.bounds)
    return out


LABEL_THREADS = 256


def _label_launch(a):
    return blocks_1d(int(a["m"]), LABEL_THREADS, 1 << 20), (LABEL_THREADS,), 0


LABEL_UNION = KernelSpec(
    "label.cu",
    "label_union",
    _label_launch,
    "gpusmall.funcs.droplet:label_stack",
    sizes=lambda a: dict(idx=int(a["m"]), parent=int(a["m"])),
)
LABEL_FLATTEN = KernelSpec(
    "label.cu",
    "label_flatten",
    _label_launch,
    "gpusmall.funcs.droplet:label_stack",
    sizes=lambda a: dict(parent=int(a["m"])),
)
DROPLET_MASK = KernelSpec(
    "droplet.cu",
    "droplet_mask",
    lambda a: (blocks_1d(int(a["n"]), 256, 1 << 20), (256,), 0),
    "gpusmall.funcs.droplet:droplet_mask",
    sizes=lambda a: dict(
        data=int(a["n"]), good=int(a["n"]), mask=int(a["n"]), noise=int(a["npix"]) if a["use_rms"] else 0
    ),
)


def label_stack(backend, mask, idx=None):
    """(labels, n): 4-connected labels of a (events, panels, rows, cols) bool mask, none across events/panels,
    at the pixels ``idx`` = ``flatnonzero(mask)`` (computed when not given): (idx.size,) int, 1..n.

    Labels are numbered 1..n in order of each droplet's first pixel in row-major order of the batch (as
    SciPy numbers them). NumPy: ``scipy.ndimage.label`` of the mask; CuPy: :func:`label_pixels` on the
    labelled pixels only (its NumPy twin is the SciPy path).
    """
    xp = backend.xp
    if idx is None:
        idx = xp.flatnonzero(mask)
    if backend.is_gpu:
        return label_pixels(backend, idx, mask.shape[-2], mask.shape[-1])
    from scipy import ndimage

    e, p, r, c = mask.shape
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    labels, n = ndimage.label(mask.reshape(e * p, r, c), structure=structure)
    return labels.ravel()[idx], int(n)


def label_pixels(backend, idx, rows: int, cols: int):
    """(labels, n) of the pixels at the sorted flat indices ``idx`` into a (frames, rows, cols) stack, by
    union-find over their positions (``kernels/label.cu``): (idx.size,) int32 labels 1..n, numbered in order
    of each droplet's first pixel. Nothing frame-sized is touched; one device->host wait (n)."""
    xp = backend.xp
    m = int(idx.size)
    if m == 0:
        return xp.zeros(0, xp.int32), 0
    if m >= 2**31:
        raise ValueError(f"{m} labelled pixels in one batch: more than int32 positions; use a smaller batch")
    parent = xp.arange(m, dtype=xp.int32)
    LABEL_UNION.launch(backend, idx=xp.ascontiguousarray(idx, dtype=xp.int64), parent=parent, m=m, rows=rows, cols=cols)
    LABEL_FLATTEN.launch(backend, parent=parent, m=m)
    number = xp.cumsum(parent == xp.arange(m, dtype=xp.int32), dtype=xp.int32)  # 1..n at the roots
    return number[parent], int(number[-1])


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


def droplet_mask(xp, data, good, thr, thr_low, grow: bool):
    """NumPy twin of the ``droplet_mask`` kernel: the pixels that are labelled, (events, panels, rows, cols)
    bool. Seeds are good pixels with ``data >= thr``; with ``grow`` a good pixel with ``data >= thr_low``
    joins when one of its 4 neighbours (same panel) is a seed. ``thr``, ``thr_low``: float32 scalars or
    (1, panels, rows, cols) (noise-scaled)."""
    mask = good & (data >= thr)
    if grow:
        mask = grow4(xp, mask, good & (data >= thr_low))
    return mask


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

    def flat(self, values):
        """The items that fit, event after event: ``values[items]`` of those :meth:`pad` places (no wait)."""
        return values[self.source]

    def stored(self):
        """(n_events,) int32: the items of each event that fit (``min(counts, length)``)."""
        return self.xp.minimum(self.counts, self.shape[1]).astype(self.xp.int32)


class Droplet(ReductionFunction):
    """Droplet finding; see the module docstring."""

    type = "droplet"
    passes = ("droplets", "image")
    Params = DropletParams
    p: DropletParams  # ReductionFunction.p, narrowed to this function's parameters
    FIELDS = ("data", "npix", "row", "col", "tile")

    def sparse_outputs(self) -> SparseOutputs:
        return SparseOutputs(self.FIELDS, self.p.layout, self.p.max_droplets)

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
        if ctx.backend.is_gpu:  # what the kernel reads: noise (per pixel, with use_rms) and the two factors
            self.kernel_noise = (
                xp.ascontiguousarray(ctx.noise, dtype=xp.float32) if p.use_rms else xp.zeros(1, xp.float32)
            )
            self.kernel_thr = (np.float32(p.threshold), np.float32(low))
        return ctx

    def mask(self, data, good):
        """The labelled pixels of a batch (:func:`droplet_mask`): one ``droplet_mask`` kernel on CuPy."""
        xp = self.ctx.xp
        if not self.ctx.backend.is_gpu:
            return droplet_mask(xp, data, good, self.thr, self.thr_low, self.grow)
        e, np_, nr, nc = data.shape
        out = xp.empty(data.shape, xp.bool_)
        threshold, threshold_low = self.kernel_thr
        DROPLET_MASK.launch(
            self.ctx.backend,
            data=xp.ascontiguousarray(data, dtype=xp.float32),
            good=xp.ascontiguousarray(good, dtype=xp.bool_),
            noise=self.kernel_noise,
            threshold=threshold,
            threshold_low=threshold_low,
            use_rms=self.p.use_rms,
            n=data.size,
            rows=nr,
            cols=nc,
            npix=np_ * nr * nc,
            grow=self.grow,
            mask=out,
        )
        return out

    def find(self, frames: Frames):
        """Labelled pixels and per-droplet statistics of a batch (all droplets, before the veto); on NumPy
        arrays with numba by :mod:`gpusmall.funcs.cpu_droplet` (bit-identical to :meth:`find_arrays`)."""
        data, good = frames.data, frames.good
        if not self.ctx.backend.is_gpu and cpu_droplet.supports(data):
            return cpu_droplet.find(
                data, good, self.thr, self.thr_low, self.grow, getattr(self.ctx.backend, "threads", 1)
            )
        return self.find_arrays(frames)

    def find_arrays(self, frames: Frames):
        """:meth:`find` with array operations (NumPy or CuPy): the reference of the numba path."""
        xp = self.ctx.xp
        data, good = frames.data, frames.good
        e, np_, nr, nc = data.shape
        mask = self.mask(data, good)
        idx = xp.flatnonzero(mask)  # the labelled pixels (nonzero of a bool array is the cheaper one)
        lab, n = label_stack(self.ctx.backend, mask, idx)
        lab = lab.astype(xp.int64) - 1
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
        return dict(
            n=n,
            idx=idx,
            lab=lab,
            val=val,
            total=total,
            npix=npix,
            row=d_row,
            col=d_col,
            event=d_ep // np_,
            tile=d_ep % np_,
            n_events=e,
            ep=ep,
        )

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
        store = layout.pad if self.p.layout == "padded" else layout.flat
        if self.p.layout == "ragged":
            out["len"] = layout.stored()
        out["data"] = store(f["total"].astype(xp.float32))
        out["npix"] = store(f["npix"].astype(xp.int32))
        out["row"] = store(f["row"].astype(xp.float32))
        out["col"] = store(f["col"].astype(xp.float32))
        out["tile"] = store(f["tile"].astype(xp.int32))
        child = None
        if self.children:
            if kept is None:  # every droplet kept: the labelled pixels as they are
                pix, val, pix_id, d_sum = f["idx"], f["val"], f["lab"], f["total"]
            else:
                new_id = xp.full(n, -1, xp.int64)
                new_id[kept] = xp.arange(kept.size)
                pix_id = new_id[f["lab"]]
                pk = xp.flatnonzero(pix_id >= 0)
                pix, val, pix_id, d_sum = f["idx"][pk], f["val"][pk], pix_id[pk], f["total"][kept]
            image = any("image" in c.takes for c in self.children)
            data = droplet_image(xp, frames.data, pix) if image else frames.data
            child = DropletFrames(
                data,
                frames.good,
                frames.raw,
                frames.events,
                pix_index=pix,
                pix_value=val,
                pix_droplet=pix_id,
                droplet_event=ev,
                droplet_sum=d_sum,
                image=image,
            )
        return out, child


def droplet_image(xp, data, pix):
    """The droplet image: float32 like ``data`` (events, panels, rows, cols), ``data``'s values at the flat
    indices ``pix`` (the pixels of the kept droplets), 0 elsewhere (smalldata_tools' unsparsify)."""
    img = xp.zeros(data.shape, xp.float32)
    img.reshape(-1)[pix] = data.reshape(-1)[pix]
    return img
