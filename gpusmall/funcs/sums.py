"""Run sums (SPEC section 6, ``sums``): images accumulated over all events of a run.

Names: ``calib`` (sum of out), ``square`` (sum of out^2), ``max`` (pixel maximum), ``nhits``
(count of pixels above the threshold, 0 without one), each optionally ``_thresADU<t>``: pixels below
``t`` count 0 (for nhits: pixels > t count 1). Written as ``/Sums/<det>_<name>``, (panels, rows, cols).
Statically masked pixels are 0 in the float sums (calib, square, max), NaN with the detector's
``mask_value: nan`` (SPEC section 3); nhits is a count and keeps 0 there.

All sums of a detector are one :class:`RunSums`: on CuPy one ``run_sums`` kernel (``kernels/sums.cu``)
reads the calibrated batch once and updates every sum; :func:`run_sums_numpy` is its NumPy twin.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..backend import Backend

_NAME = re.compile(r"^(calib|square|max|nhits)(?:_thresADU(-?\d+(?:\.\d+)?))?$")
KINDS = ("calib", "square", "max", "nhits")  # the kernel's kind codes 0..3
KERNEL_MAX_SUMS = 8  # sums per kernel launch (MAX_SUMS in kernels/sums.cu)
KERNEL_THREADS = 256


@dataclass(frozen=True)
class SumSpec:
    """One run sum: its name, kind and optional threshold (ADU)."""

    name: str
    kind: str
    thres: float | None

    @classmethod
    def parse(cls, name: str) -> SumSpec:
        m = _NAME.match(name)
        if not m:
            raise ValueError(f"unknown sum {name!r}")
        return cls(name, m.group(1), float(m.group(2)) if m.group(2) is not None else None)

    @property
    def kernel_thres(self) -> float:
        """The threshold as the kernel takes it: values ``>=`` it count (``-inf``: all) for calib/square/max,
        values ``>`` it for nhits (0 without a threshold)."""
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


def run_sums_numpy(data: np.ndarray, keep, specs: list[SumSpec], acc: np.ndarray) -> None:
    """NumPy twin of the ``run_sums`` kernel: update ``acc`` (sums, pixels) float64 in place with the
    events of ``data`` (events, pixels) float32 ADU where ``keep`` (events,) bool (None: all)."""
    if keep is not None:
        data = data[keep]
    if data.shape[0] == 0:
        return
    for k, s in enumerate(specs):
        t = np.float32(s.kernel_thres)
        if s.kind == "nhits":
            acc[k] += (data > t).sum(axis=0)
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
    :meth:`results` writes at masked pixels.
    """

    def __init__(self, names, shape, backend: Backend, mask=None, mask_value: str = "zero"):
        self.specs = [SumSpec.parse(n) for n in names]
        self.shape, self.backend = tuple(shape), backend
        if mask_value not in ("zero", "nan"):
            raise ValueError(f"mask_value must be 'zero' or 'nan', not {mask_value!r}")
        self.mask = None if mask is None else np.asarray(mask, bool).reshape(self.shape)
        self.mask_value = mask_value
        npix = int(np.prod(self.shape))
        start = np.array([s.start() for s in self.specs], np.float64)
        self.acc = backend.to_device(np.repeat(start[:, None], npix, axis=1))  # (sums, pixels) float64
        self.kinds = backend.to_device(np.array([KINDS.index(s.kind) for s in self.specs], np.int32))
        self.thres = backend.to_device(np.array([s.kernel_thres for s in self.specs], np.float32))
        self.events = 0
        self._every_event = {}  # events -> device (events,) bool of ones: no upload per batch

    def __iter__(self):
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def update(self, data, keep=None) -> None:
        """Add a batch: ``data`` (events, panels, rows, cols) float32 on the device, ``keep`` (events,)
        host bool (None: every event; False: a damaged event, left out)."""
        if not self.specs:
            return
        n = data.shape[0]
        self.events += n if keep is None else int(np.count_nonzero(keep))
        flat = data.reshape(n, -1)
        if not self.backend.is_gpu:
            run_sums_numpy(flat, keep, self.specs, self.acc)
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
        kernel = self.backend.kernel("sums.cu", "run_sums")
        blocks = max(1, min((npix + KERNEL_THREADS - 1) // KERNEL_THREADS, 65535))
        flat = xp.ascontiguousarray(flat, dtype=xp.float32)
        for k0 in range(0, len(self.specs), KERNEL_MAX_SUMS):
            k1 = min(len(self.specs), k0 + KERNEL_MAX_SUMS)
            kernel((blocks,), (KERNEL_THREADS,),
                   (flat, keep_dev, np.int64(n), np.int64(npix), np.int32(k1 - k0), self.kinds[k0:k1],
                    self.thres[k0:k1], self.acc[k0:k1]))

    def results(self) -> dict[str, np.ndarray]:
        """name -> (panels, rows, cols) host array (see :meth:`SumSpec.host_result`); with ``mask_value``
        ``"nan"`` and a mask, NaN at the masked pixels of the float sums (calib, square, max)."""
        acc = self.backend.to_host(self.acc)
        out = {}
        for k, s in enumerate(self.specs):
            v = s.host_result(acc[k].reshape(self.shape))
            if self.mask_value == "nan" and self.mask is not None and s.kind != "nhits":
                v = np.where(self.mask, v, v.dtype.type(np.nan))
            out[s.name] = v
        return out
