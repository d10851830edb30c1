"""Common-mode correction (SPEC section 4), computed per event on pedestal-subtracted ADU.

:func:`make_common_mode` turns the config into a corrector ``(s, good, g) -> s`` working on
(events, panels, rows, cols) arrays of the run's backend, or returns None (``none``) or the
string ``"raw"`` (skip calibration).

Types: ``median`` (:class:`MedianCommonMode`), ``epix100`` (:class:`Epix100CommonMode`), ``zero_peak``
(:class:`ZeroPeakCommonMode`: the fullest bin, or psana's CsPad algorithm with ``method: psana``) and
``unbonded`` (:class:`UnbondedCommonMode`: CsPad's unbonded pixels as reference).

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
from ..kernel_specs import KernelSpec
from . import cpu_median

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

    def __init__(
        self,
        model,
        panel_shape,
        axes=("rows", "cols"),
        max_correction: float = 100.0,
        min_pixels: int = 10,
        gain_ranges: str = "high",
        backend=None,
        det: str = "?",
    ):
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
        br, bc = model.banks(self.panel_shape)
        self.bank = (int(br), int(bc))
        r, c = self.panel_shape
        if r % self.bank[0] or c % self.bank[1]:
            raise InputError(
                f"detector {det}: panel {self.panel_shape} is not a whole number of common-mode banks {self.bank}"
            )
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
            s = self._reference_step(xp, axis, s, use)
        return s

    def _reference_step(self, xp, axis: str, s, use):
        """One step of :meth:`reference` on contiguous float32 ``s``: in place for rows and cols (a view of s),
        a new contiguous array for banks (its groups are a copy); returns the corrected s."""
        sg = _to_groups(s, axis, self.bank)
        ug = _to_groups(use, axis, self.bank)
        med, ok = group_median(xp, sg, ug, self.min_pixels, self.max_correction)
        _subtract_where(xp, sg, xp.where(ok, med, xp.float32(0))[..., None], ug)
        return _from_groups(xp, sg, axis, s.shape, self.bank) if axis == "banks" else s

    def __call__(self, s, good, g):
        if self.backend is None or not self.backend.is_gpu:
            return self.cpu(s, good, g) if cpu_median.supports(s) else self.reference(s, good, g)
        return self.gpu(s, good, g)

    # -- CPU (numba) ------------------------------------------------------------------------
    def cpu(self, s, good, g, inplace: bool = False):
        """NumPy backend with numba: rows and cols steps by :mod:`gpusmall.calib.cpu_median` (bit-identical
        to :meth:`reference`, a fraction of its passes), banks as the reference does it. ``inplace``: correct
        ``s`` itself when it is C-contiguous float32 (the calibration's own pedestal-subtracted batch)."""
        s = np.array(s, dtype=np.float32, order="C", copy=not inplace)
        good = np.ascontiguousarray(good, dtype=np.bool_)
        g = np.ascontiguousarray(g, dtype=np.int8)
        threads = getattr(self.backend, "threads", 1) if self.backend is not None else 1
        for axis in self.axes:
            if axis == "banks":
                s = self._reference_step(np, axis, s, self.use_mask(np, good, g))
            else:
                cpu_median.median_step(self, axis, s, good, g, threads)
        return s

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
                sg, ug = _to_groups(s, axis, self.bank), _to_groups(use, axis, self.bank)  # type: ignore[arg-type]
                med, ok = group_median(xp, sg, ug, self.min_pixels, self.max_correction)
                s = _from_groups(xp, xp.where(ug & ok[..., None], sg - med[..., None], sg), axis, s.shape, self.bank)  # type: ignore[arg-type]
                continue
            if axis == "rows":  # group = (e, p, row, bank col): n = bc contiguous pixels
                n_outer, outer_stride, n_inner, inner_stride, elem_stride = e * p * r, c, c // bc, bc, 1
            else:  # cols: group = (e, p, bank row, col): n = br pixels, one per row
                n_outer, outer_stride, n_inner, inner_stride, elem_stride = e * p * (r // br), br * c, c, 1, c
            launch_median_step(
                self.backend,
                s,
                good,
                g,
                n,
                n_outer,
                outer_stride,
                n_inner,
                inner_stride,
                elem_stride,
                self.range_mask,
                self.min_pixels,
                self.max_correction,
                scale=scale if step == len(self.axes) - 1 else None,
            )
        return s


WARP_GROUP_MAX = 64  # contiguous groups up to this size go to cm_median_rows_warp (2 values per lane)
WARP_KERNEL_THREADS = 256  # 8 warps per block
COLS_WARP_MAX = 256  # columns up to this length go to cm_median_cols_warp (8 values per lane)
COLS_PER_BLOCK = 32  # its tile: 32 neighbouring columns (COLS_PER_BLOCK in common_mode.cu)


def launch_median_step(
    backend,
    s,
    good,
    g,
    n,
    n_outer,
    outer_stride,
    n_inner,
    inner_stride,
    elem_stride,
    range_mask,
    min_pixels,
    max_correction,
    scale=None,
):
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
    common = dict(
        s=s,
        good=good,
        g=g,
        n=n,
        outer_stride=outer_stride,
        range_mask=range_mask & 0xFFFFFFFF,
        min_pixels=min_pixels,
        max_correction=max_correction,
    )
    if inner_stride == 1 and elem_stride == n_inner and n <= COLS_WARP_MAX:  # columns of a bank row
        xp = backend.xp
        scale_arg = scale if scale is not None else xp.zeros(1, xp.float32)  # (not read without apply_scale)
        CM_MEDIAN_COLS_WARP.launch(
            backend,
            **common,
            n_outer=n_outer,
            n_inner=n_inner,
            scale=scale_arg,
            npix=s[0].size,
            apply_scale=scale is not None,
        )
        return
    if scale is not None:
        raise ValueError("the gain scale is applied only by the column kernel (cm_median_cols_warp)")
    if elem_stride == 1 and n <= WARP_GROUP_MAX:
        CM_MEDIAN_ROWS_WARP.launch(backend, **common, n_groups=n_groups, n_inner=n_inner, inner_stride=inner_stride)
        return
    p2 = max(_next_pow2(n), 2)
    CM_MEDIAN_STEP.launch(
        backend,
        **common,
        n_groups=n_groups,
        p2=p2,
        gpb=max(1, 256 // (p2 // 2)),
        n_inner=n_inner,
        inner_stride=inner_stride,
        elem_stride=elem_stride,
        contiguous=elem_stride == 1,
    )


def _cols_warp_launch(a):
    """A block of WARP_KERNEL_THREADS per tile of COLS_PER_BLOCK columns; shared: the tile's values (float)
    and flags (byte), padded to COLS_PER_BLOCK + 1 columns, and a float per column."""
    n, tiles = int(a["n"]), (int(a["n_inner"]) + COLS_PER_BLOCK - 1) // COLS_PER_BLOCK
    return (
        (int(a["n_outer"]) * tiles,),
        (WARP_KERNEL_THREADS,),
        (n * (COLS_PER_BLOCK + 1) + COLS_PER_BLOCK) * 4 + n * (COLS_PER_BLOCK + 1),
    )


def _rows_warp_launch(a):
    """A warp per group, WARP_KERNEL_THREADS per block."""
    return ((int(a["n_groups"]) * 32 + WARP_KERNEL_THREADS - 1) // WARP_KERNEL_THREADS,), (WARP_KERNEL_THREADS,), 0


def _median_step_launch(a):
    """``gpb`` groups per block, p2 / 2 threads per group; shared: gpb rows of p2 + 1 floats, 8 bytes per group."""
    gpb, p2 = int(a["gpb"]), int(a["p2"])
    return ((int(a["n_groups"]) + gpb - 1) // gpb,), (gpb * (p2 // 2),), gpb * (p2 + 1) * 4 + gpb * 8


def _groups_extent(a, elem_stride):
    """Elements of s, good and g up to the last one a group holds (group ``outer * n_inner + inner``: pixels
    ``outer * outer_stride + inner * inner_stride + k * elem_stride``, k < n)."""
    n_groups, n_inner = int(a["n_groups"]), int(a["n_inner"])
    if n_groups < 1:
        return dict(s=0, good=0, g=0)
    last = (
        (n_groups - 1) // n_inner * int(a["outer_stride"])
        + min(n_groups - 1, n_inner - 1) * int(a["inner_stride"])
        + (int(a["n"]) - 1) * elem_stride
        + 1
    )
    return dict(s=last, good=last, g=last)


def _cols_warp_sizes(a):
    n_inner = int(a["n_inner"])  # the group (outer, c): pixels outer * outer_stride + k * n_inner + c
    ext = _groups_extent(dict(a, n_groups=int(a["n_outer"]) * n_inner, inner_stride=1), n_inner)
    return dict(ext, scale=int(a["npix"]) if a["apply_scale"] else 1)


_CM_REFERENCE = "gpusmall.calib.common_mode:group_median"
CM_MEDIAN_COLS_WARP = KernelSpec(
    "common_mode.cu", "cm_median_cols_warp", _cols_warp_launch, _CM_REFERENCE, sizes=_cols_warp_sizes
)
CM_MEDIAN_ROWS_WARP = KernelSpec(
    "common_mode.cu", "cm_median_rows_warp", _rows_warp_launch, _CM_REFERENCE, sizes=lambda a: _groups_extent(a, 1)
)
CM_MEDIAN_STEP = KernelSpec(
    "common_mode.cu",
    "cm_median_step",
    _median_step_launch,
    _CM_REFERENCE,
    sizes=lambda a: _groups_extent(a, int(a["elem_stride"])),
)


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

    def __init__(
        self,
        model,
        panel_shape,
        noise=None,
        max_correction: float = 30.0,
        histo_range: float = 30.0,
        min_fraction: float = 0.25,
        norm_all: bool = False,
        backend=None,
        det: str = "?",
    ):
        self.bank = tuple(int(v) for v in model.banks(tuple(panel_shape)))
        r, c = (int(v) for v in panel_shape)
        if r % 2 or c % self.bank[1]:
            raise InputError(
                f"detector {det}: panel {(r, c)} does not fit the epix100 common mode: it needs an "
                f"even number of rows (two halves) and columns in whole segments of {self.bank[1]}"
            )
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


def _cummax(xp, a):
    """Running maximum along the last axis (NumPy's ``maximum.accumulate``; elsewhere log2(n) passes)."""
    if xp is np:
        return np.maximum.accumulate(a, axis=-1)
    out = a.copy()
    k = 1
    while k < a.shape[-1]:
        out[..., k:] = xp.maximum(out[..., k:], out[..., :-k])  # the right side is a new array: no aliasing
        k *= 2
    return out


def _round_half_away(xp, s):
    """Float32 ``s`` rounded to whole numbers, halves away from zero (psana's ``int(v +- 0.5)``), exactly."""
    t = xp.trunc(s)
    frac = s - t  # exact: t and s share the integer part
    return t + xp.where(xp.abs(frac) >= xp.float32(0.5), xp.sign(s), xp.float32(0)).astype(xp.float32)


ZERO_PEAK_METHODS = ("fullest", "psana")
PSANA_HISTO_RANGE = (-1000, 2000)
PSANA_MIN_COUNT, PSANA_MAX_CORRECTION, PSANA_MAX_SIGMA = 100, 25.0, 40.0
"""psana's CsPad common mode 1 parameters (smalldata_tools: ``cmpars = [1, 25, 40, 100]``)."""


class ZeroPeakCommonMode:
    """``zero_peak`` common mode (smalldata_tools CsPad mode 1), vectorised on either backend.

    Per event and bank, a histogram of the used pixels' ``s`` (good pixels in the selected gain ranges;
    values outside the histogram range are left out); the position of its zero-photon peak is
    subtracted from the used pixels of the bank (bad pixels are 0 in the output whatever they hold).
    Two methods (``method``):

    ``fullest`` (the default, except for CsPad): 1-ADU bins over ``histo_range`` ``[lo, hi]`` (default
    ``[-max_correction, max_correction]``) with edges ``lo + k``, the last bin ending at ``hi`` (shorter
    than 1 ADU when ``hi - lo`` is not an integer; closed on the right, as ``numpy.histogram``). The
    peak is the centre of the fullest bin (the first on ties); a bank whose fullest bin holds no more
    than ``min_count`` (default 0) values, or whose peak lies beyond ``max_correction`` (default 100),
    is left as it is.

    ``psana`` (psana's ``findCommonMode``, smalldata_tools CsPad mode 1; the CsPad default): values are
    rounded to whole ADU (halves away from zero) and counted in the bins ``lo, lo + 1, ..., hi - 1`` of
    ``histo_range`` (whole numbers, default ``[-1000, 2000]``). Scanning the bins upwards, a bin with
    more than ``min_count`` (default 100) values and more than the peak so far becomes the peak; the scan
    stops at the first later bin holding at most half the peak count (integer halves), ``right`` (the
    end of the histogram if none). ``left`` is the last bin at or below the peak bin holding at most half
    the peak count (one below the first bin if none). Then ``sigma = (right - left) / 2.36`` and, twice,
    over the bins within ``d = int(2 sigma + 0.5)`` of the peak bin, ``mean += sum((i - mean) h_i) /
    sum(h_i)`` (from the peak bin) and ``sigma = sqrt(sum((i - mean)^2 h_i) / sum(h_i) - (that step)^2)``
    (0 where rounding makes it negative). The correction ``mean`` (ADU) is applied unless no bin exceeds
    ``min_count``, ``|mean| > max_correction`` (default 25) or ``sigma > max_sigma`` (default 40). A
    CsPad bank is its whole 2x1 section (185 x 388).

    The same array code runs on NumPy and CuPy.
    """

    def __init__(
        self,
        model,
        panel_shape,
        max_correction: float | None = None,
        gain_ranges: str = "high",
        backend=None,
        det: str = "?",
        *,
        method: str = "fullest",
        histo_range=None,
        min_count: int | None = None,
        max_sigma: float | None = None,
    ):
        if method not in ZERO_PEAK_METHODS:
            raise InputError(
                f"detector {det}: common_mode.method must be one of {', '.join(ZERO_PEAK_METHODS)}, not {method!r}"
            )
        self.method = method
        psana = method == "psana"
        if max_correction is None:
            max_correction = PSANA_MAX_CORRECTION if psana else 100.0
        self.max_correction = float(max_correction)
        if not self.max_correction > 0:
            raise InputError(
                f"detector {det}: common_mode.max_correction must be > 0 for zero_peak, not {max_correction}"
            )
        self.median = MedianCommonMode(
            model, panel_shape, ("banks",), self.max_correction, 0, gain_ranges, backend, det
        )
        self.bank = self.median.bank
        if histo_range is None:
            lo, hi = PSANA_HISTO_RANGE if psana else (-self.max_correction, self.max_correction)
        elif np.ndim(histo_range) == 0:
            lo, hi = -float(histo_range), float(histo_range)
        else:
            lo, hi = (float(v) for v in histo_range)
        if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
            raise InputError(
                f"detector {det}: common_mode.histo_range must be a range [low, high] with low < high, "
                f"not {histo_range}"
            )
        if psana and (lo != round(lo) or hi != round(hi)):
            raise InputError(
                f"detector {det}: common_mode.histo_range for method psana is whole ADU (its bins are "
                f"the whole values low .. high - 1), not {histo_range}"
            )
        self.lo, self.hi = lo, hi
        self.min_count = int(min_count) if min_count is not None else (PSANA_MIN_COUNT if psana else 0)
        if self.min_count < 0:
            raise InputError(f"detector {det}: common_mode.min_count must be >= 0, not {min_count}")
        if max_sigma is not None and not psana:
            raise InputError(
                f"detector {det}: common_mode.max_sigma is for method psana (the fullest bin has no width)"
            )
        self.max_sigma = float(max_sigma) if max_sigma is not None else (PSANA_MAX_SIGMA if psana else np.inf)
        if psana:
            self.nbins = int(round(hi - lo))
            self.centres = None
        else:
            self.nbins = max(int(np.ceil(hi - lo - 1e-9)), 1)
            edges = np.append(lo + np.arange(self.nbins, dtype=np.float64), hi)
            self.centres = ((edges[:-1] + edges[1:]) / 2).astype(np.float32)  # (nbins,) bin centres, ADU, host
        self.backend = backend
        # the same on the device, once (None on NumPy)
        on_device = backend is not None and backend.xp is not np
        self._centres_dev = backend.to_device(self.centres) if on_device and self.centres is not None else None

    def _histogram(self, xp, b, inr):
        """(groups..., nbins) int64 counts of bin indices ``b`` where ``inr`` along the last axis."""
        nbins = self.nbins
        n_groups = int(np.prod(b.shape[:-1]))
        gid = xp.arange(n_groups, dtype=xp.int64).reshape(b.shape[:-1])[..., None]
        flat = xp.where(inr, gid * nbins + b, n_groups * nbins)
        return xp.bincount(flat.ravel(), minlength=n_groups * nbins + 1)[:-1].reshape(*b.shape[:-1], nbins)

    def __call__(self, s, good, g):
        xp = np if isinstance(s, np.ndarray) else self.backend.xp
        s = xp.ascontiguousarray(s, dtype=xp.float32)
        use = self.median.use_mask(xp, good, g)
        sg, ug = _to_groups(s, "banks", self.bank), _to_groups(use, "banks", self.bank)
        if self.method == "psana":
            peak, ok = self._psana_peak(xp, sg, ug)
        else:
            peak, ok = self._fullest_peak(xp, sg, ug)
        sg = xp.where(ug & ok[..., None], sg - peak[..., None], sg)
        return _from_groups(xp, sg, "banks", s.shape, self.bank)

    def _fullest_peak(self, xp, sg, ug):
        lo, hi = xp.float32(self.lo), xp.float32(self.hi)
        # only values within [lo, hi] enter; bin k = [lo + k, lo + k + 1), s == hi in the last
        inr = ug & (sg >= lo) & (sg <= hi)
        b = xp.clip(xp.floor(sg - lo), 0, self.nbins - 1).astype(xp.int64)
        hist = self._histogram(xp, b, inr)
        peak = (self.centres if xp is np else self._centres_dev)[xp.argmax(hist, axis=-1)]
        ok = (hist.max(axis=-1) > self.min_count) & (xp.abs(peak) <= xp.float32(self.max_correction))
        return peak, ok

    def _psana_peak(self, xp, sg, ug):
        """(mean, ok) per group: psana's findCommonMode on the rounded values (class docstring)."""
        lo, nbins = int(self.lo), self.nbins
        v = _round_half_away(xp, sg)
        inr = ug & (v >= xp.float32(lo)) & (v < xp.float32(lo + nbins))
        b = xp.clip(v - xp.float32(lo), 0, nbins - 1).astype(xp.int64)
        hist = self._histogram(xp, b, inr)  # (..., nbins)
        j = xp.arange(nbins, dtype=xp.int64)
        # the peak so far after each bin: bins above min_count raise it (strictly: the first wins a tie)
        above = xp.where(hist > self.min_count, hist, -1)
        run = _cummax(xp, above)
        before = xp.concatenate([xp.full(run.shape[:-1] + (1,), -1, run.dtype), run[..., :-1]], axis=-1)
        stop = (before > 0) & (hist <= before // 2)
        right = xp.where(stop.any(axis=-1), xp.argmax(stop.astype(xp.int8), axis=-1), nbins)
        upto = xp.where(j < right[..., None], above, -1)
        count = upto.max(axis=-1)
        pos = xp.argmax(upto, axis=-1)
        found = count > 0
        half = xp.where(found, count // 2, -1)
        left = xp.where((hist <= half[..., None]) & (j <= pos[..., None]), j, -1).max(axis=-1)
        sigma = (right - left).astype(xp.float64) / 2.36
        mean = pos.astype(xp.float64)
        jf = j.astype(xp.float64)
        histf = hist.astype(xp.float64)
        for _ in range(2):
            d = xp.floor(sigma * 2 + 0.5).astype(xp.int64)
            win = (j >= (pos - d)[..., None]) & (j <= (pos + d)[..., None])
            h = xp.where(win, histf, 0.0)
            s0 = xp.maximum(h.sum(axis=-1), 1.0)  # > 0 where found (the peak bin is in the window)
            x = jf - mean[..., None]
            s1 = (x * h).sum(axis=-1) / s0
            s2 = (x * x * h).sum(axis=-1) / s0
            mean = mean + s1
            sigma = xp.sqrt(xp.maximum(s2 - s1 * s1, 0.0))
        mean = mean + lo
        ok = found & (xp.abs(mean) <= self.max_correction) & (sigma <= self.max_sigma)
        return xp.where(ok, mean, 0.0).astype(xp.float32), ok


class UnbondedCommonMode:
    """``unbonded`` common mode (smalldata_tools CsPad mode 5, psana's ``applyCModeUnbond``).

    Per event and panel (CsPad: 2x1 section), the mean of ``s`` over the model's unbonded pixels (CsPad:
    (r, r) and (r, r + 194) for r = 10, 20, ..., 180; they see no charge, only the common mode; they
    are bad pixels of the mask and enter whatever their status) is subtracted from every pixel of the
    panel, unless ``|mean| > max_correction`` (default 100 ADU).

    Args:
        model: a model with ``unbonded_pixels`` (InputError otherwise).
        panel_shape: (rows, cols) of a panel; must hold the unbonded pixels.
    """

    def __init__(self, model, panel_shape, max_correction: float = 100.0, backend=None, det: str = "?"):
        if not model.unbonded_pixels:
            raise InputError(
                f"detector {det}: common_mode.type unbonded needs unbonded reference pixels, which a "
                f"{model.type} does not have (cspad, cs140k have them)"
            )
        rows, cols = (np.asarray(a, np.intp) for a in zip(*model.unbonded_pixels))
        r, c = (int(v) for v in panel_shape)
        if rows.max() >= r or cols.max() >= c:
            raise InputError(
                f"detector {det}: panel {(r, c)} does not hold the {model.type}'s unbonded pixels "
                f"(up to row {rows.max()}, col {cols.max()})"
            )
        self.max_correction = float(max_correction)
        self.rows, self.cols = rows, cols
        self.backend = backend
        on_device = backend is not None and backend.xp is not np
        self._index_dev = (backend.to_device(rows), backend.to_device(cols)) if on_device else None

    def __call__(self, s, good, g):
        xp = np if isinstance(s, np.ndarray) else self.backend.xp
        s = xp.ascontiguousarray(s, dtype=xp.float32)
        rows, cols = (self.rows, self.cols) if xp is np else self._index_dev
        ref = s[:, :, rows, cols]  # (events, panels, unbonded pixels)
        mean = ref.sum(axis=-1, dtype=xp.float64) / ref.shape[-1]
        cm = xp.where(xp.abs(mean) <= self.max_correction, mean, 0.0).astype(xp.float32)
        return s - cm[:, :, None, None]


def common_mode_params(cfg, model) -> dict:
    """The parameters of ``cfg`` (a CommonModeConfig, a mapping, or None = the model's default): those the
    config gives, then for the parameters it does not give, the model's default common mode when it is
    of the same type (a CsPad's ``{type: zero_peak}`` is psana's method), then the type's own defaults
    (in :func:`make_common_mode`)."""
    if cfg is None:
        return dict(model.default_common_mode)
    if hasattr(cfg, "model_fields_set"):  # pydantic: only what the config gives
        given = cfg.model_dump(include=set(cfg.model_fields_set) | {"type"})
    else:
        given = dict(cfg.model_dump() if hasattr(cfg, "model_dump") else cfg)
    base = model.default_common_mode if model.default_common_mode.get("type") == given.get("type") else {}
    return {**base, **given}


def make_common_mode(det: str, cfg, model, constants, backend, panel_shape=None):
    """A corrector for ``cfg`` (a CommonModeConfig or None = the model's default; see
    :func:`common_mode_params`).

    Returns None (``none``), ``"raw"``, or a callable ``(s, good, g) -> s`` on (events, panels,
    rows, cols) float32 arrays of ``backend``.
    """
    params = common_mode_params(cfg, model)
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
        return MedianCommonMode(
            model,
            panel_shape,
            params.get("axes") or ("rows", "cols"),
            100.0 if maxc is None else maxc,
            params.get("min_pixels", 10),
            params.get("gain_ranges") or default_ranges,
            backend,
            det,
        )
    if ctype == "zero_peak":
        return ZeroPeakCommonMode(
            model,
            panel_shape,
            maxc,
            params.get("gain_ranges") or default_ranges,
            backend,
            det,
            method=params.get("method") or "fullest",
            histo_range=params.get("histo_range"),
            min_count=params.get("min_count"),
            max_sigma=params.get("max_sigma"),
        )
    if ctype == "unbonded":
        return UnbondedCommonMode(model, panel_shape, 100.0 if maxc is None else maxc, backend, det)
    if ctype == "epix100":
        noise = None if constants is None else constants.noise
        if noise is not None:
            noise = np.asarray(noise, np.float32)
            noise = backend.to_device(noise if noise.ndim == 3 else noise[0])
        return Epix100CommonMode(
            model,
            panel_shape,
            noise,
            30.0 if maxc is None else maxc,
            params.get("histo_range", 30.0),
            params.get("min_fraction", 0.25),
            params.get("norm_all", False),
            backend,
            det,
        )
    raise InputError(f"detector {det}: common_mode.type {ctype!r} is not known")
