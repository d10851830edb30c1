"""Raw events from an HDF5 file: one dataset (events, [panels,] rows, cols) per detector.

The config names the file (``source.path``) and each detector's ``dataset``; ``/timestamp``
(events,) uint64 is used when present (else the event index), as is ``/<det>/config_bits``.
"""
from __future__ import annotations

import h5py
import numpy as np

from ..errors import InputError
from .base import DetectorSource, RawBatch, Source


class Hdf5Source(Source):
    def __init__(self, path: str, detectors: dict[str, dict], events: int | None = None,
                 timestamp: str = "/timestamp"):
        try:
            self.file = h5py.File(path, "r")
        except OSError as exc:
            raise InputError(f"source.path: cannot open {path!r}: {exc}") from None
        self.datasets = {}
        self.detectors = {}
        n = None
        for name, d in detectors.items():
            dset = d["dataset"]
            if dset not in self.file:
                raise InputError(f"detectors.{name}.dataset: {dset!r} is not in {path}")
            ds = self.file[dset]
            shape = tuple(d["shape"])
            if ds.shape[1:] not in (shape, shape[1:] if shape[0] == 1 else None):
                raise InputError(f"detectors.{name}.dataset: {dset!r} has events of shape {ds.shape[1:]}, "
                                 f"expected {shape}")
            self.datasets[name] = ds
            n = ds.shape[0] if n is None else min(n, ds.shape[0])
            self.detectors[name] = DetectorSource(name, d["type"], shape, ds.dtype)
        self.timestamps = self.file[timestamp][()].astype(np.uint64) if timestamp in self.file else None
        self.n_events = n if events is None else min(n, int(events))

    def read(self, start: int, stop: int, out=None) -> RawBatch:
        raw = {}
        for name, ds in self.datasets.items():
            shape = self.detectors[name].shape
            buf = out[name][: stop - start] if out is not None and name in out else np.empty((stop - start, *shape), ds.dtype)
            ds.read_direct(buf.reshape((stop - start, *ds.shape[1:])), np.s_[start:stop])
            raw[name] = buf
        idx = np.arange(start, stop, dtype=np.int64)
        ts = self.timestamps[start:stop] if self.timestamps is not None else idx.astype(np.uint64)
        return RawBatch(ts, idx, raw, {name: np.zeros(stop - start, bool) for name in raw})

    def close(self) -> None:
        self.file.close()
