"""Run sums (SPEC section 6, ``sums``): images accumulated over all events of a run.

Names as smalldata_tools names them (config name -> written ``/Sums/<det>_<name>``):

* ``calib``: sum of the calibrated values ``out``;
* ``calib_square`` (also ``square``): sum of ``out**2``;
* ``calib_max`` (also ``max``): the pixel's maximum;
* ``nhits``: count of the events in which the pixel is ``> 0``;

each optionally with ``_thresADU<t>`` (``calib_thresADU5``, ``calib_max_thresADU5``, also ``max_thresADU5``,
``square_thresADU5``): pixels below ``t`` count 0, i.e. values ``>= t`` are kept; ``nhits_thresADU<t>`` counts the
values ``>= t``. The file always has smalldata_tools' name (``square`` is written ``calib_square``, ``max``
``calib_max``, ``max_thresADU5`` ``calib_max_thresADU5``); two config names that mean the same sum (``max`` and
``calib_max``, ``calib_thresADU5`` and ``calib_thresADU5.0``) are a config error.

Sums over a selection of events (SPEC 10): ``<sum>:<selection>`` (``calib:laser_on``, ``nhits_thresADU10:good_i0``) is
written ``<sum>_<selection>``; smalldata_tools' ``calib_dropped`` and ``calib_dropped_square`` (the dropped X-ray
shots: the built-in selection ``dropped``, ``lightStatus/xray == 0``) keep their names.

A camera's sums have the camera's (rows, cols) shape, as smalldata_tools writes them; every other detector's
(panels, rows, cols). Statically masked pixels are 0 in the float sums (calib, square, max), NaN with the
detector's ``mask_value: nan`` (SPEC section 3); nhits is a count and keeps 0 there.

All sums of a detector are one :class:`RunSums`: on CuPy one ``run_sums`` kernel (``kernels/sums.cu``)
reads the calibrated batch once and updates every sum; :func:`run_sums_numpy` is its NumPy twin.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np

from ..backend import Backend
from ..kernel_specs import KernelSpec, blocks_1d

_NAME = re.compile(r"^(?:calib_(square|max)|(calib|square|max|nhits))(?:_thresADU(-?\d+(?:\.\d+)?))?$")
"""A config's sum name: smalldata_tools' (``calib``, ``calib_square``, ``calib_max``, ``nhits``) or gpusmall's
older short ones (``square``, ``max``), optionally ``_thresADU<t>``."""
WRITTEN = {"calib": "calib", "square": "calib_square", "max": "calib_max", "nhits": "nhits"}
"""Each kind's name in the file (smalldata_tools')."""
KINDS = ("calib", "square", "max", "nhits", "nhits_above_zero")
"""The kernel's kind codes 0..4: ``nhits`` with a threshold counts ``v >= t`` (3), without one ``v > 0`` (4)."""
KERNEL_MAX_SUMS = 8  # sums per kernel launch (MAX_SUMS in kernels/sums.cu)
KERNEL_THREADS = 256
RUN_SUMS = KernelSpec(
    "sums.cu",
    "run_sums",
    lambda a: (blocks_1d(int(a["npix"]), KERNEL_THREADS, 65535), (KERNEL_THREADS,), 0),
    "gpusmall.funcs.sums:run_sums_numpy",
    sizes=lambda a: dict(
        data=int(a["events"]) * int(a["npix"]),
        keep=int(a["events"]),
        kinds=int(a["n_sums"]),
        thres=int(a["n_sums"]),
        acc=int(a["n_sums"]) * int(a["npix"]),
    ),
)
SMALLDATA_SELECTED = {"calib_dropped": ("calib", "dropped"), "calib_dropped_square": ("calib_square", "dropped")}
"""smalldata_tools' sums over the dropped X-ray shots: config (and written) name -> (sum, selection)."""
_SELECTION = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SUM_NAMES_HELP = (
    "calib, calib_square, calib_max, nhits (or square, max), each optionally with _thresADU<t>, "
    "e.g. calib_thresADU5, nhits_thresADU10; over a selection <sum>:<selection> or calib_dropped"
)


@dataclass(frozen=True)
class SumSpec:
    """One run sum: its name (as written: smalldata_tools'), kind and optional threshold (ADU)."""

    name: str
    kind: str
    thres: float | None
    selection: str | None = None

    @classmethod
    def parse(cls, name: str) -> SumSpec:
        """The sum a config name means; ValueError (with the names there are) when it means none."""
        if not isinstance(name, str):
            raise ValueError(f"a sum name must be a string, not {name!r}")
        if name in SMALLDATA_SELECTED:
            base, selection = SMALLDATA_SELECTED[name]
            return replace(cls.parse(base), name=name, selection=selection)
        base, colon, selection = name.partition(":")
        if colon:
            if not _SELECTION.match(selection):
                raise ValueError(f"sum {name!r}: {selection!r} after ':' must name a selection")
            spec = cls.parse(base)
            return replace(spec, name=f"{spec.name}_{selection}", selection=selection)
        m = _NAME.match(name)
        if not m:
            raise ValueError(f"unknown sum {name!r}: use {SUM_NAMES_HELP}")
        kind = m.group(1) or m.group(2)
        t = m.group(3)
        written = WRITTEN[kind] + ("" if t is None else f"_thresADU{t}")
        return cls(written, kind, float(t) if t is not None else None)

    @property
    def kernel_kind(self) -> int:
        """The kernel's kind code (:data:`KINDS`)."""
        if self.kind == "nhits" and self.thres is None:
            return KINDS.index("nhits_above_zero")
        return KINDS.index(self.kind)

    @property
    def kernel_thres(self) -> float:
        """The threshold as the kernel takes it: values ``>=`` it count (``-inf``: all) for calib/square/max and a
        thresholded nhits; a plain nhits counts values ``>`` it (0)."""
        if self.thres is not None:
            return self.thres
        return 0.0 if self.kind == "nhits" else -np.inf

    def start(self) -> float:
        """The accumulator's value before any event."""
        return -np.inf if self.kind == "max" else 0.0

    def host_result(self, acc: np.ndarray) -> np.ndarray:
        """The written dataset from the float64 accumulator: max as float32 (exact: a maximum of float32
        values), nhits as int64 (exact below 2**53 counts), calib/square as float64."""
        if self.kind == "max":
            return acc.astype(np.float32)
        if self.kind == "nhits":
            return acc.astype(np.int64)
        return acc


def parse_sums(names) -> list[SumSpec]:
    """The sums of a config's ``sums`` list, in order; ValueError for an unknown name or two names that mean the
    same sum (they would write the same dataset)."""
    specs: list = []
    seen: dict = {}
    for n in names:
        s = SumSpec.parse(n)
        key = (s.kind, s.thres, s.selection)
        if key in seen:
            raise ValueError(f"sums {seen[key]!r} and {n!r} are the same sum ({s.name}): give it once")
        seen[key] = n
        specs.append(s)
    return specs


def run_sums_numpy(data: np.ndarray, keep, specs: list[SumSpec], acc: np.ndarray, threads: int = 1) -> None:
    """NumPy twin of the ``run_sums`` kernel: update ``acc`` (sums, pixels) float64 in place with the
    events of ``data`` (events, pixels) float32 ADU where ``keep`` (events,) bool (None: all); the CPU
    kernels on up to ``threads`` threads."""
    if keep is not None:
        data = data[keep]
    if data.shape[0] == 0:
        return
    from ..calib import cpu_kernels  # numba (optional): one pass over the batch for all sums

    if cpu_kernels.available() and cpu_kernels.run_sums(data, specs, acc, threads):
        return
    for k, s in enumerate(specs):
        t = np.float32(s.kernel_thres)
        if s.kind == "nhits":
            acc[k] += (data >= t if s.thres is not None else data > t).sum(axis=0)
            continue
        x = data if s.thres is None else np.where(data >= t, data, np.float32(0))
        if s.kind == "calib":
            acc[k] += x.sum(axis=0, dtype=np.float64)
        elif s.kind == "square":
            acc[k] += np.einsum("ep,ep->p", x, x, dtype=np.float64)  # products in float64
        else:
            np.maximum(acc[k], x.max(axis=0), out=acc[k])


class RunSums:
    """Every run sum of one detector, on the device: ``update`` per batch, ``results`` on the host.

    Iterating gives the :class:`SumSpec` of each sum, in config order. ``mask`` ((panels, rows, cols) host
    bool, True = keep: the static mask) and ``mask_value`` (``"zero"`` or ``"nan"``) say what
    :meth:`results` writes at masked pixels. ``camera``: the detector is a camera, whose sums are written
    (rows, cols) (one panel, as smalldata_tools writes a camera's); otherwise (panels, rows, cols).
    """

    def __init__(
        self, names, shape, backend: Backend, mask=None, mask_value: str = "zero", camera: bool = False, selections=None
    ):
        """``selections``: the run's :class:`~gpusmall.selections.Selections`, for sums over a selection."""
        specs = parse_sums(names)
        self.selections = selections
        # accumulator rows grouped by selection (None first), config order within a group
        self._row = {}
        self.specs = specs
        grouped = sorted(range(len(specs)), key=lambda k: (specs[k].selection is not None, specs[k].selection or ""))
        self._groups: list[tuple[str | None, int, int]] = []  # (selection, first row, end row)
        for row, k in enumerate(grouped):
            self._row[k] = row
            sel = specs[k].selection
            if self._groups and self._groups[-1][0] == sel:
                self._groups[-1] = (sel, self._groups[-1][1], row + 1)
            else:
                self._groups.append((sel, row, row + 1))
        for sel, _, _ in self._groups:
            if sel is not None and (selections is None or sel not in selections):
                raise ValueError(f"sum over selection {sel!r}: the run has no such selection")
        specs = [specs[k] for k in grouped]  # in row order, for the accumulators
        self.shape, self.backend = tuple(shape), backend
        if camera and self.shape[0] != 1:
            raise ValueError(f"a camera has one panel, not {self.shape[0]}")
        self.result_shape = self.shape[1:] if camera else self.shape
        if mask_value not in ("zero", "nan"):
            raise ValueError(f"mask_value must be 'zero' or 'nan', not {mask_value!r}")
        self.mask = None if mask is None else np.asarray(mask, bool).reshape(self.shape)
        self.mask_value = mask_value
        npix = int(np.prod(self.shape))
        start = np.array([s.start() for s in specs], np.float64)
        self.acc = backend.to_device(np.repeat(start[:, None], npix, axis=1))  # (sums, pixels) float64
        self.kinds = backend.to_device(np.array([s.kernel_kind for s in specs], np.int32))
        self.thres = backend.to_device(np.array([s.kernel_thres for s in specs], np.float32))
        self._row_specs = specs
        self.events = 0
        self.selected_events = {sel: 0 for sel, _, _ in self._groups if sel is not None}
        self._every_event: dict = {}  # events -> device (events,) bool of ones: no upload per batch

    def __iter__(self):
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def update(self, data, keep=None, context=None) -> None:
        """Add a batch: ``data`` (events, panels, rows, cols) float32 on the device, ``keep`` (events,)
        host bool (None: every event; False: a damaged event, left out), ``context`` the batch's event context
        (name -> (events,) host), which sums over a selection need."""
        if not self.specs:
            return
        n = data.shape[0]
        self.events += n if keep is None else int(np.count_nonzero(keep))
        flat = data.reshape(n, -1)
        for sel, r0, r1 in self._groups:
            k = keep
            if sel is not None:
                m = self.selections.mask(sel, context)
                k = m if keep is None else keep & m
                self.selected_events[sel] += int(np.count_nonzero(k))
            self._update_rows(flat, k, r0, r1)

    def _update_rows(self, flat, keep, r0: int, r1: int) -> None:
        """The sums of accumulator rows ``r0`` .. ``r1`` (one selection's) over the events ``keep``."""
        n = flat.shape[0]
        if not self.backend.is_gpu:
            run_sums_numpy(flat, keep, self._row_specs[r0:r1], self.acc[r0:r1], self.backend.threads)
            return
        if keep is not None and not np.any(keep):
            return
        xp = self.backend.xp
        npix = flat.shape[1]
        if keep is None:
            if n not in self._every_event:
                self._every_event[n] = xp.ones(n, xp.bool_)
            keep_dev = self._every_event[n]
        else:  # a batch with damaged events (rare): its few bytes go up
            keep_dev = self.backend.to_device(np.asarray(keep, bool))
        flat = xp.ascontiguousarray(flat, dtype=xp.float32)
        for k0 in range(r0, r1, KERNEL_MAX_SUMS):
            k1 = min(r1, k0 + KERNEL_MAX_SUMS)
            RUN_SUMS.launch(
                self.backend,
                data=flat,
                keep=keep_dev,
                events=n,
                npix=npix,
                n_sums=k1 - k0,
                kinds=self.kinds[k0:k1],
                thres=self.thres[k0:k1],
                acc=self.acc[k0:k1],
            )

    def results(self) -> dict[str, np.ndarray]:
        """written name (:class:`SumSpec` ``name``) -> (panels, rows, cols) host array, (rows, cols) for a
        camera (see :meth:`SumSpec.host_result`); with ``mask_value`` ``"nan"`` and a mask, NaN at the masked
        pixels of the float sums (calib, square, max)."""
        acc = self.backend.to_host(self.acc)
        out = {}
        for k, s in enumerate(self.specs):
            v = s.host_result(acc[self._row[k]].reshape(self.shape))
            if self.mask_value == "nan" and self.mask is not None and s.kind != "nhits":
                v = np.where(self.mask, v, v.dtype.type(np.nan))
            out[s.name] = v.reshape(self.result_shape)
        return out
