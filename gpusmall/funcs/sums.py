"""Run sums (SPEC section 6, ``sums``): images accumulated over all events of a run.

Names: ``calib`` (sum of out), ``square`` (sum of out^2), ``max`` (pixel maximum), ``nhits``
(count of pixels above the threshold, 0 without one), each optionally ``_thresADU<t>``: pixels below
``t`` count 0 (for nhits: pixels > t count 1). Written as ``/Sums/<det>_<name>``, (panels, rows, cols).
"""
from __future__ import annotations

import re

import numpy as np

from ..backend import Backend
from .base import Frames

_NAME = re.compile(r"^(calib|square|max|nhits)(?:_thresADU(-?\d+(?:\.\d+)?))?$")


class RunSum:
    """One running sum on the device: ``update(frames)`` per batch, ``result()`` on the host."""

    def __init__(self, name: str, shape, backend: Backend):
        m = _NAME.match(name)
        if not m:
            raise ValueError(f"unknown sum {name!r}")
        self.name, self.kind = name, m.group(1)
        self.thres = float(m.group(2)) if m.group(2) is not None else None
        self.backend = backend
        xp = backend.xp
        if self.kind == "max":
            self.acc = xp.full(shape, -np.inf, xp.float32)
        elif self.kind == "nhits":
            self.acc = xp.zeros(shape, xp.int64)
        else:
            self.acc = xp.zeros(shape, xp.float64)
        self.events = 0

    def update(self, frames: Frames) -> None:
        xp = self.backend.xp
        data = frames.data
        self.events += data.shape[0]
        if self.kind == "nhits":
            self.acc += (data > (self.thres if self.thres is not None else 0)).sum(axis=0)
            return
        if self.thres is not None:
            data = xp.where(data >= self.thres, data, xp.float32(0))
        if self.kind == "calib":
            self.acc += data.sum(axis=0, dtype=xp.float64)
        elif self.kind == "square":
            d = data.astype(xp.float64)
            self.acc += (d * d).sum(axis=0)
        else:
            xp.maximum(self.acc, data.max(axis=0), out=self.acc)

    def result(self) -> np.ndarray:
        return self.backend.to_host(self.acc)

    def merge(self, other: np.ndarray, into: np.ndarray) -> np.ndarray:
        """Combine two host results of this sum (for MPI reduction)."""
        return np.maximum(into, other) if self.kind == "max" else into + other
