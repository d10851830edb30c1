"""Common-mode correction (SPEC section 4), computed per event on pedestal-subtracted ADU.

:func:`make_common_mode` turns the config into a corrector ``(s, good, g) -> s`` working on
(events, panels, rows, cols) arrays of the run's backend, or returns None (``none``) or the
string ``"raw"`` (skip calibration).

Every corrector has a vectorised array-module reference (``reference``, the same code on NumPy and
CuPy, written like the SPEC) and, for ``median``, a CUDA kernel (``kernels/common_mode.cu``) used on
CuPy. Groups (a bank, a row segment within a bank, a column within a half-panel) are cut out of the
batch by reshapes, so no Python loop runs per event or per group.

Medians are exact: excluded pixels are set to +inf, each group is sorted, and the median of the
``n`` good values is ``(v[(n - 1) // 2] + v[n // 2]) * 0.5`` in float32, which equals
``numpy.median`` of the good values (the mean of the two middle values for an even count).
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError

AXES_ORDER = ("banks", "rows", "cols")
KERNEL_MAX_GROUP = 1024
"""Largest group (pixels) the CUDA median kernel sorts in shared memory; larger groups use the xp path."""


def _next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p <<= 1
    return p


def group_median(xp, values, use, min_pixels: int, max_correction: float):
    """Exact median per group of the ``use`` values along the last axis.

    Args:
        values: (..., n) float32.
        use: (..., n) bool, True where the value enters the median.
        min_pixels: a group needs more than this many used values.
        max_correction: and ``|median| < max_correction`` (ADU).
    Returns:
        (median, ok): (...) float32 medians (meaningless where not ok) and (...) bool.
    """
    v = xp.ascontiguousarray(xp.where(use, values, xp.float32(np.inf)), dtype=xp.float32)
    v.sort(axis=-1)
    n = use.sum(axis=-1, dtype=xp.int32)
    size = values.shape[-1]
    first = xp.arange(0, v.size, size).reshape(n.shape)  # flat index of each group's first value
    a = v.reshape(-1)[first + xp.clip((n - 1) // 2, 0, size - 1)]
    b = v.reshape(-1)[first + xp.clip(n // 2, 0, size - 1)]
    med = ((a + b) * xp.float32(0.5)).astype(xp.float32)
    ok = (n > min_pixels) & (xp.abs(med) < xp.float32(max_correction))
    return med, ok


def _subtract_where(xp, x, d, where):
    """``x[where] -= d`` in place (d broadcast); the other values keep their bits."""
    if xp is np:
        np.subtract(x, d, out=x, where=where)
    else:  # x - 0 == x exactly
        x -= xp.where(where, d, xp.float32(0))


def _to_groups(x, axis: str, bank: tuple[int, int]):
    """View/copy of (events, panels, rows, cols) ``x`` with one group per row of the last axis.

    rows: (E, P, R, nbc, bc); cols: (E, P, nbr, C, br); banks: (E, P, nbr, nbc, br * bc).
    """
    e, p, r, c = x.shape
    br, bc = bank
    nbr, nbc = r // br, c // bc
    if axis == "rows":
        return x.reshape(e, p, r, nbc, bc)
    if axis == "cols":
        return x.reshape(e, p, nbr, br, c).swapaxes(3, 4)
    return x.reshape(e, p, nbr, br, nbc, bc).transpose(0, 1, 2, 4, 3, 5).reshape(e, p, nbr, nbc, br * bc)


def _from_groups(xp, y, axis: str, shape, bank: tuple[int, int]):
    """Inverse of :func:`_to_groups`: back to a contiguous (events, panels, rows, cols) array."""
    e, p, r, c = shape
    br, bc = bank
    nbr, nbc = r // br, c // bc
    if axis == "rows":
        return y.reshape(shape)
    if axis == "cols":
        return xp.ascontiguousarray(y.swapaxes(3, 4)).reshape(shape)
    return xp.ascontiguousarray(y.reshape(e, p, nbr, nbc, br, bc).transpose(0, 1, 2, 4, 3, 5)).reshape(shape)


class MedianCommonMode:
    """``median`` common mode (psana algorithm 7): banks, rows, cols, in that order.

    Args:
        model: the detector model (banks from ``model.banks(panel_shape)``).
        panel_shape: (rows, cols) of a panel; must be a whole number of banks.
        axes: any of ``banks``, ``rows``, ``cols``; applied in that order whatever the order given.
        max_correction: ADU; a group is corrected only where ``|median| < max_correction``.
        min_pixels: a group is corrected only where more than this many good pixels entered its median.
        gain_ranges: ``all`` or ``high`` (only ``model.high_gain_ranges`` are used and corrected).
        backend: the run's backend; on CuPy rows/cols steps run the CUDA kernel.

    Call with ``(s, good, g)``: s (events, panels, rows, cols) float32 ADU above pedestal, good bool,
    g int8 gain index; returns the corrected s (float32, a new array, same shape).
    """

    def __init__(self, model, panel_shape, axes=("rows", "cols"), max_correction: float = 100.0,
                 min_pixels: int = 10, gain_ranges: str = "high", backend=None, det: str = "?"):
        unknown = [a for a in axes if a not in AXES_ORDER]
        if unknown:
            raise InputError(f"detector {det}: common_mode.axes {unknown} unknown; use {AXES_ORDER}")
        self.axes = tuple(a for a in AXES_ORDER if a in axes)
        self.max_correction = float(max_correction)
        self.min_pixels = int(min_pixels)
        if gain_ranges not in ("all", "high"):
            raise InputError(f"detector {det}: common_mode.gain_ranges must be all or high, not {gain_ranges!r}")
        self.gain_ranges = gain_ranges
        self.ranges = tuple(range(model.n_gains)) if gain_ranges == "all" else tuple(model.high_gain_ranges)
        self.range_mask = sum(1 << r for r in self.ranges) if gain_ranges == "high" else 0xFFFFFFFF
        self.panel_shape = tuple(int(v) for v in panel_shape)
        self.bank = tuple(int(v) for v in model.banks(self.panel_shape))
        r, c = self.panel_shape
        if r % self.bank[0] or c % self.bank[1]:
            raise InputError(f"detector {det}: panel {self.panel_shape} is not a whole number of "
                             f"common-mode banks {self.bank}")
        self.backend = backend

    # -- which pixels take part -------------------------------------------------------
    def use_mask(self, xp, good, g):
        """(events, panels, rows, cols) bool: good pixels in the selected gain ranges."""
        if self.gain_ranges == "all":
            return good
        in_ranges = g == self.ranges[0]
        for r in self.ranges[1:]:
            in_ranges |= g == r
        return good & in_ranges

    # -- readable reference (NumPy or CuPy arrays) -----------------------------------------
    def reference(self, s, good, g):
        """The SPEC, vectorised with array operations; works on NumPy and CuPy arrays."""
        xp = np if isinstance(s, np.ndarray) else self.backend.xp
        s = xp.array(s, dtype=xp.float32, order="C", copy=True)
        use = self.use_mask(xp, good, g)
        for axis in self.axes:
            sg = _to_groups(s, axis, self.bank)  # a view of s for rows and cols, a copy for banks
            ug = _to_groups(use, axis, self.bank)
            med, ok = group_median(xp, sg, ug, self.min_pixels, self.max_correction)
            _subtract_where(xp, sg, xp.where(ok, med, xp.float32(0))[..., None], ug)
            if axis == "banks":
                s = _from_groups(xp, sg, axis, s.shape, self.bank)
        return s

    def __call__(self, s, good, g):
        if self.backend is None or not self.backend.is_gpu:
            return self.reference(s, good, g)
        return self.gpu(s, good, g)

    # -- CUDA -------------------------------------------------------------------------------
    def fuses_scale(self) -> bool:
        """Whether :meth:`gpu` can also apply the gain scale (``scale=``): the last step is ``cols`` in
        ``cm_median_cols_warp``, whose write-back then does what ``scale_apply`` would."""
        return bool(self.axes) and self.axes[-1] == "cols" and self.bank[0] <= COLS_WARP_MAX

    def gpu(self, s, good, g, inplace: bool = False, scale=None):
        """CuPy path: one kernel launch per rows/cols step (:func:`launch_median_step`; banks: the xp reference).

        With ``inplace`` a contiguous float32 ``s`` is corrected in place (no copy). With ``scale``
        ((ranges, panels, rows, cols) float32; only when :meth:`fuses_scale`) the result is calibrated
        as well: ``good ? corrected * scale[range] : 0``, as ``scale_apply`` gives it.
        """
        xp = self.backend.xp
        if scale is not None and not self.fuses_scale():
            raise ValueError("the gain scale is applied with the median only when the last step is cols")
        if not (inplace and s.dtype == xp.float32 and s.flags.c_contiguous):
            s = xp.array(s, dtype=xp.float32, copy=True, order="C")
        good = xp.ascontiguousarray(good)
        g = xp.ascontiguousarray(g, dtype=xp.int8)
        e, p, r, c = s.shape
        br, bc = self.bank
        for step, axis in enumerate(self.axes):
            n = {"rows": bc, "cols": br, "banks": br * bc}[axis]
            if axis == "banks" or n > KERNEL_MAX_GROUP:
                use = self.use_mask(xp, good, g)
                sg, ug = _to_groups(s, axis, self.bank), _to_groups(use, axis, self.bank)
                med, ok = group_median(xp, sg, ug, self.min_pixels, self.max_correction)
                s = _from_groups(xp, xp.where(ug & ok[..., None], sg - med[..., None], sg), axis, s.shape, self.bank)
                continue
            if axis == "rows":  # group = (e, p, row, bank col): n = bc contiguous pixels
                n_outer, outer_stride, n_inner, inner_stride, elem_stride = e * p * r, c, c // bc, bc, 1
            else:  # cols: group = (e, p, bank row, col): n = br pixels, one per row
                n_outer, outer_stride, n_inner, inner_stride, elem_stride = e * p * (r // br), br * c, c, 1, c
            launch_median_step(self.backend, s, good, g, n, n_outer, outer_stride, n_inner, inner_stride,
                               elem_stride, self.range_mask, self.min_pixels, self.max_correction,
                               scale=scale if step == len(self.axes) - 1 else None)
        return s


WARP_GROUP_MAX = 64  # contiguous groups up to this size go to cm_median_rows_warp (2 values per lane)
WARP_KERNEL_THREADS = 256  # 8 warps per block
COLS_WARP_MAX = 256  # columns up to this length go to cm_median_cols_warp (8 values per lane)
COLS_PER_BLOCK = 32  # its tile: 32 neighbouring columns (COLS_PER_BLOCK in common_mode.cu)


def launch_median_step(backend, s, good, g, n, n_outer, outer_stride, n_inner, inner_stride, elem_stride,
                       range_mask, min_pixels, max_correction, scale=None):
    """Run the median step of ``kernels/common_mode.cu`` in place on contiguous ``s``.

    Group ``gid = outer * n_inner + inner`` holds the ``n`` pixels at
    ``outer * outer_stride + inner * inner_stride + k * elem_stride`` (k < n) of the flat batch.
    Groups of at most 64 contiguous pixels (rows of a bank) run ``cm_median_rows_warp``, a warp per group
    sorting in registers; columns of at most 256 (one pixel per row, ``elem_stride == n_inner``) run
    ``cm_median_cols_warp``, tiles of 32 columns through shared memory, each column sorted in a warp's
    registers; the others ``cm_median_step``, a shared-memory sort per group. With ``scale`` ((ranges, pixels
    of an event) float32; columns only) the column kernel also applies it (see ``cm_median_cols_warp``).
    """
    n_groups = n_outer * n_inner
    if inner_stride == 1 and elem_stride == n_inner and n <= COLS_WARP_MAX:  # columns of a bank row
        tiles = (n_inner + COLS_PER_BLOCK - 1) // COLS_PER_BLOCK
        xp = backend.xp
        npix = s[0].size
        scale_arg = scale if scale is not None else xp.zeros(1, xp.float32)  # (not read without apply_scale)
        backend.kernel("common_mode.cu", "cm_median_cols_warp")(
            (n_outer * tiles,), (WARP_KERNEL_THREADS,),
            (s, good, g, np.int64(n_outer), np.int32(n), np.int64(n_inner), np.int64(outer_stride),
             np.uint32(range_mask & 0xFFFFFFFF), np.int32(min_pixels), np.float32(max_correction), scale_arg,
             np.int64(npix), np.int32(scale is not None)),
            shared_mem=(n * (COLS_PER_BLOCK + 1) + COLS_PER_BLOCK) * 4 + n * (COLS_PER_BLOCK + 1))
        return
    if scale is not None:
        raise ValueError("the gain scale is applied only by the column kernel (cm_median_cols_warp)")
    if elem_stride == 1 and n <= WARP_GROUP_MAX:
        threads = WARP_KERNEL_THREADS
        blocks = (n_groups * 32 + threads - 1) // threads
        backend.kernel("common_mode.cu", "cm_median_rows_warp")(
            (blocks,), (threads,),
            (s, good, g, np.int64(n_groups), np.int32(n), np.int64(n_inner), np.int64(outer_stride),
             np.int64(inner_stride), np.uint32(range_mask & 0xFFFFFFFF), np.int32(min_pixels),
             np.float32(max_correction)))
        return
    p2 = max(_next_pow2(n), 2)
    half = p2 // 2
    gpb = max(1, 256 // half)  # groups per block
    threads = gpb * half
    blocks = (n_groups + gpb - 1) // gpb
    shared = gpb * (p2 + 1) * 4 + gpb * 8
    k = backend.kernel("common_mode.cu", "cm_median_step")
    k((blocks,), (threads,),
      (s, good, g, np.int64(n_groups), np.int32(n), np.int32(p2), np.int32(gpb),
       np.int64(n_inner), np.int64(outer_stride), np.int64(inner_stride), np.int64(elem_stride),
       np.int32(elem_stride == 1), np.uint32(range_mask & 0xFFFFFFFF), np.int32(min_pixels),
       np.float32(max_correction)), shared_mem=shared)


class Epix100CommonMode:
    """``epix100`` common mode (smalldata_tools 45-47), vectorised on either backend.

    Pixels are *included* when good, ``s < 10 * noise``, not a 4-neighbour of a pixel with
    ``s >= 10 * noise``, and ``|s| <= histo_range`` (decided once, on the input ``s``). With ``norm_all``
    the mean of the included pixels is subtracted from the whole frame; then per column within each
    half of the rows, then per row segment of ``bank cols`` (96) pixels, the median of the included
    pixels is subtracted from every pixel of the group, unless ``|median| > max_correction`` or fewer
    than ``min_fraction`` of the group's pixels are included.

    Args:
        panel_shape: (rows, cols); rows must be even and cols a whole number of row segments
            (InputError otherwise).
        noise: (panels, rows, cols) ADU rms on the device, or None (no photon cut then).
    """

    def __init__(self, model, panel_shape, noise=None, max_correction: float = 30.0, histo_range: float = 30.0,
                 min_fraction: float = 0.25, norm_all: bool = False, backend=None, det: str = "?"):
        self.bank = tuple(int(v) for v in model.banks(tuple(panel_shape)))
        r, c = (int(v) for v in panel_shape)
        if r % 2 or c % self.bank[1]:
            raise InputError(f"detector {det}: panel {(r, c)} does not fit the epix100 common mode: it needs an "
                             f"even number of rows (two halves) and columns in whole segments of {self.bank[1]}")
        self.half = (r // 2, self.bank[1])
        self.noise, self.max_correction = noise, float(max_correction)
        self.histo_range, self.min_fraction, self.norm_all = float(histo_range), float(min_fraction), norm_all
        self.backend = backend

    def __call__(self, s, good, g):
        xp = np if isinstance(s, np.ndarray) else self.backend.xp
        s = xp.ascontiguousarray(s, dtype=xp.float32)
        inc = good & (xp.abs(s) <= xp.float32(self.histo_range))
        if self.noise is not None:
            hot = s >= xp.float32(10.0) * self.noise[None]
            near = hot.copy()
            near[..., 1:, :] |= hot[..., :-1, :]
            near[..., :-1, :] |= hot[..., 1:, :]
            near[..., :, 1:] |= hot[..., :, :-1]
            near[..., :, :-1] |= hot[..., :, 1:]
            inc &= ~near
        if self.norm_all:
            n = inc.sum(axis=(1, 2, 3))
            tot = xp.where(inc, s, xp.float32(0)).sum(axis=(1, 2, 3), dtype=xp.float64)
            mean = xp.where(n > 0, tot / xp.maximum(n, 1), 0).astype(xp.float32)
            s = s - mean[:, None, None, None]
        # per column within each half (groups of rows/2), then per row segment of bank cols
        for axis, bank in (("cols", self.half), ("rows", self.bank)):
            sg, ig = _to_groups(s, axis, bank), _to_groups(inc, axis, bank)
            need = int(np.ceil(self.min_fraction * sg.shape[-1]))
            med, ok = group_median(xp, sg, ig, need - 1, np.inf)
            ok &= xp.abs(med) <= xp.float32(self.max_correction)
            s = _from_groups(xp, xp.where(ok[..., None], sg - med[..., None], sg), axis, s.shape, bank)
        return s


class ZeroPeakCommonMode:
    """``zero_peak`` common mode (smalldata_tools CsPad mode 1), vectorised on either backend.

    Per event and bank, a histogram of the used pixels' ``s`` within ``[-max_correction,
    max_correction]``: 1-ADU bins with edges ``-max_correction + k``, the last bin ending at
    ``max_correction`` (shorter than 1 ADU when ``2 * max_correction`` is not an integer; closed on the
    right, as ``numpy.histogram``); values outside the range are left out. The centre of its fullest
    bin (the first on ties) is subtracted from the used pixels of the bank. A bank without any value
    in range is left as it is. The same array code runs on NumPy and CuPy.
    """

    def __init__(self, model, panel_shape, max_correction: float = 100.0, gain_ranges: str = "high", backend=None,
                 det: str = "?"):
        self.median = MedianCommonMode(model, panel_shape, ("banks",), max_correction, 0, gain_ranges, backend, det)
        self.bank = self.median.bank
        self.max_correction = float(max_correction)
        if not self.max_correction > 0:
            raise InputError(f"detector {det}: common_mode.max_correction must be > 0 for zero_peak, "
                             f"not {max_correction}")
        maxc = self.max_correction
        self.nbins = max(int(np.ceil(2 * maxc - 1e-9)), 1)
        edges = np.append(-maxc + np.arange(self.nbins, dtype=np.float64), maxc)
        self.centres = ((edges[:-1] + edges[1:]) / 2).astype(np.float32)  # (nbins,) bin centres, ADU, host
        self.backend = backend
        # the same on the device, once (None on NumPy)
        self._centres_dev = None if backend is None or backend.xp is np else backend.to_device(self.centres)

    def __call__(self, s, good, g):
        xp = np if isinstance(s, np.ndarray) else self.backend.xp
        s = xp.ascontiguousarray(s, dtype=xp.float32)
        use = self.median.use_mask(xp, good, g)
        sg, ug = _to_groups(s, "banks", self.bank), _to_groups(use, "banks", self.bank)
        nbins, maxc = self.nbins, xp.float32(self.max_correction)
        # only values within [-maxc, maxc] enter; bin k = [-maxc + k, -maxc + k + 1), s == maxc in the last
        inr = ug & (sg >= -maxc) & (sg <= maxc)
        b = xp.clip(xp.floor(sg + maxc), 0, nbins - 1).astype(xp.int64)
        n_groups = int(np.prod(sg.shape[:-1]))
        gid = xp.arange(n_groups, dtype=xp.int64).reshape(sg.shape[:-1])[..., None]
        flat = xp.where(inr, gid * nbins + b, n_groups * nbins)
        hist = xp.bincount(flat.ravel(), minlength=n_groups * nbins + 1)[:-1].reshape(*sg.shape[:-1], nbins)
        peak = (self.centres if xp is np else self._centres_dev)[xp.argmax(hist, axis=-1)]
        ok = hist.max(axis=-1) > 0
        sg = xp.where(ug & ok[..., None], sg - peak[..., None], sg)
        return _from_groups(xp, sg, "banks", s.shape, self.bank)


def make_common_mode(det: str, cfg, model, constants, backend, panel_shape=None):
    """A corrector for ``cfg`` (a CommonModeConfig or None = the model's default).

    Returns None (``none``), ``"raw"``, or a callable ``(s, good, g) -> s`` on (events, panels,
    rows, cols) float32 arrays of ``backend``.
    """
    if cfg is not None:
        params = cfg.model_dump() if hasattr(cfg, "model_dump") else dict(cfg)
    else:
        params = dict(model.default_common_mode)
    ctype = params.get("type", "none")
    if ctype == "none":
        return None
    if ctype == "raw":
        return "raw"
    if panel_shape is None:
        if constants is not None and constants.pedestal is not None:
            panel_shape = constants.pedestal.shape[-2:]
        else:
            panel_shape = model.panel_shape
    default_ranges = "high" if model.n_gains > 1 else "all"
    maxc = params.get("max_correction")
    if ctype == "median":
        return MedianCommonMode(model, panel_shape, params.get("axes") or ("rows", "cols"),
                                100.0 if maxc is None else maxc, params.get("min_pixels", 10),
                                params.get("gain_ranges") or default_ranges, backend, det)
    if ctype == "zero_peak":
        return ZeroPeakCommonMode(model, panel_shape, 100.0 if maxc is None else maxc,
                                  params.get("gain_ranges") or default_ranges, backend, det)
    if ctype == "epix100":
        noise = None if constants is None else constants.noise
        if noise is not None:
            noise = np.asarray(noise, np.float32)
            noise = backend.to_device(noise if noise.ndim == 3 else noise[0])
        return Epix100CommonMode(model, panel_shape, noise, 30.0 if maxc is None else maxc,
                                 params.get("histo_range", 30.0), params.get("min_fraction", 0.25),
                                 params.get("norm_all", False), backend, det)
    raise InputError(f"detector {det}: common_mode.type {ctype!r} is not known")
