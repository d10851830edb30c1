"""Raw events from an HDF5 file: one dataset (events, [panels,] rows, cols) per detector.

The config names the file (``source.path``) and each detector's ``dataset``; ``/timestamp``
(events,) integer (ns, as psana's) is used when present (else the event index; ``source.timestamp:
null`` ignores it), as is ``/<det>/config_bits``. Timestamps must not decrease (SPEC 8: the output is
in time order, for any number of ranks): a file whose events are not in time order is an error
naming the first event out of order. Datasets of different lengths are cut to the shortest, with a
warning naming them.

Following a file that is still being written (``gpusmall run --follow``, ``source.follow: true``):
the number of events is then open (``n_events`` None) and :meth:`Hdf5Source.read` waits until the
events asked for are in the file, polling every ``poll_s``. The run ends when the file has not grown
for ``follow_timeout_s`` seconds (or on SIGTERM / SIGINT); the last batch may be short. An event
counts as written once every detector's dataset (and ``/timestamp``, when there is one) holds it.
The writer should use HDF5 SWMR mode (h5py: ``libver="latest"``, ``f.swmr_mode = True``, ``flush()``
after each append), which lets a reader see appended data safely; without SWMR the file is reopened
at each poll, which works for a writer that closes the file between appends.
"""
from __future__ import annotations

import logging
import time

import h5py
import numpy as np

from ..errors import InputError
from ..io.writer import open_for_reading
from .base import DetectorSource, RawBatch, Source

log = logging.getLogger(__name__)


class Hdf5Source(Source):
    """Events of one HDF5 file (see module docstring).

    Args:
        path: the file.
        detectors: name -> {"type", "shape" (panels, rows, cols), "dataset"} from the config.
        events: read at most this many events.
        timestamp: dataset of (events,) integer timestamps, optional in the file unless
            ``timestamp_required``; None: use the event index.
        follow: wait for events still being written; ``follow_timeout_s``: end after this long
            without new events; ``poll_s``: seconds between looks at the file.
    """

    def __init__(self, path: str, detectors: dict[str, dict], events: int | None = None,
                 timestamp: str | None = "/timestamp", follow: bool = False, follow_timeout_s: float = 60.0,
                 poll_s: float = 0.5, timestamp_required: bool = False):
        self.path, self.names, self.timestamp = path, {n: d["dataset"] for n, d in detectors.items()}, timestamp
        self.timestamp_required = bool(timestamp_required and timestamp)
        self.last_ts: int | None = None  # follow mode: the last timestamp read, to check the order
        self.follow, self.follow_timeout_s, self.poll_s = follow, float(follow_timeout_s), float(poll_s)
        self.limit = None if events is None else int(events)
        self.swmr = False
        self._open()
        self.detectors = {}
        for name, d in detectors.items():
            dset = d["dataset"]
            ds = self.datasets[name]
            shape = tuple(d["shape"])
            if ds.shape[1:] not in (shape, shape[1:] if shape[0] == 1 else None):
                raise InputError(f"detectors.{name}.dataset: {dset!r} has events of shape {ds.shape[1:]}, "
                                 f"expected {shape}")
            self.detectors[name] = DetectorSource(name, d["type"], shape, ds.dtype)
        n = self.available()
        if follow:
            self.n_events = None  # open: the run is still being written
        else:
            self.n_events = n if self.limit is None else min(n, self.limit)
            self._check_lengths(n)
            if self.ts_dataset is not None:
                self._check_order(self.ts_dataset[: self.n_events], 0)

    def _check_lengths(self, n: int) -> None:
        """Warn when the datasets hold different numbers of events (the run is cut to the shortest)."""
        lengths = {f"detectors.{name}.dataset {self.names[name]!r}": ds.shape[0] for name, ds in self.datasets.items()}
        if self.ts_dataset is not None:
            lengths[f"source.timestamp {self.timestamp!r}"] = self.ts_dataset.shape[0]
        if len(set(lengths.values())) > 1:
            log.warning("%s: datasets of different lengths (%s): only the first %d events are read", self.path,
                        ", ".join(f"{k}: {v}" for k, v in lengths.items()), n)

    def _check_order(self, ts: np.ndarray, first: int) -> None:
        """InputError unless timestamps (events ``first``...) never decrease, also across batches."""
        ts = ts.astype(np.uint64)
        if ts.size == 0:
            return
        prev = self.last_ts
        back = np.flatnonzero(ts[1:] < ts[:-1])
        if prev is not None and int(ts[0]) < prev:
            bad, before, after = first, prev, int(ts[0])
        elif back.size:
            bad = first + int(back[0]) + 1
            before, after = int(ts[back[0]]), int(ts[back[0] + 1])
        else:
            self.last_ts = int(ts[-1]) if self.follow else None
            return
        raise InputError(f"source.timestamp: {self.timestamp!r} in {self.path} is not in time order at event "
                         f"{bad} ({after} after {before}); gpusmall writes events in time order (use "
                         f"'timestamp: null' to take the event index instead)")

    # -- the file -------------------------------------------------------------------------------
    def _open(self) -> None:
        try:
            if not self.follow:  # a file being written in SWMR mode is read as it is now
                self.file = open_for_reading(self.path)[0]
            else:
                try:
                    self.file, self.swmr = h5py.File(self.path, "r", swmr=True), True
                except OSError:
                    self.file = h5py.File(self.path, "r")  # not written in SWMR mode: reopen to see more
        except OSError as exc:
            raise InputError(f"source.path: cannot open {self.path!r}: {exc}") from None
        self.datasets = {}
        for name, dset in self.names.items():
            if dset not in self.file:
                raise InputError(f"detectors.{name}.dataset: {dset!r} is not in {self.path}")
            ds = self.file[dset]
            if not isinstance(ds, h5py.Dataset):
                raise InputError(f"detectors.{name}.dataset: {dset!r} in {self.path} is a group, not a dataset")
            if ds.ndim < 3:
                raise InputError(f"detectors.{name}.dataset: {dset!r} in {self.path} has shape {ds.shape}; "
                                 f"expected (events, [panels,] rows, cols)")
            self.datasets[name] = ds
        self.ts_dataset = None
        if self.timestamp and self.timestamp in self.file:
            ts = self.file[self.timestamp]
            if not isinstance(ts, h5py.Dataset) or ts.ndim != 1 or ts.dtype.kind not in "iu":
                what = "a group" if not isinstance(ts, h5py.Dataset) else f"{ts.dtype} of shape {ts.shape}"
                raise InputError(f"source.timestamp: {self.timestamp!r} in {self.path} is {what}; expected "
                                 f"(events,) integers (ns)")
            self.ts_dataset = ts
        elif self.timestamp_required:
            raise InputError(f"source.timestamp: {self.timestamp!r} is not in {self.path}")

    def _refresh(self) -> None:
        """Let the file show what the writer appended since the last look."""
        if self.swmr:
            for ds in (*self.datasets.values(), self.ts_dataset):
                if ds is not None:
                    ds.refresh()
            return
        try:
            self.file.close()
            self._open()
        except InputError as exc:  # e.g. locked by the writer right now: look again later
            log.debug("follow: %s", exc)

    def available(self) -> int:
        """Events every detector (and the timestamps) hold now."""
        lengths = [ds.shape[0] for ds in self.datasets.values()]
        if self.ts_dataset is not None:
            lengths.append(self.ts_dataset.shape[0])
        return min(lengths)

    def _wait_for(self, stop: int) -> int:
        """Follow mode: wait until ``stop`` events are written, the file stalls, or a stop is asked for."""
        have = self.available()
        last_growth = time.monotonic()
        while have < stop:
            if self.should_stop():
                break
            if time.monotonic() - last_growth > self.follow_timeout_s:
                log.info("follow: no new events in %s for %.0f s: the run has ended at %d events",
                         self.path, self.follow_timeout_s, have)
                break
            time.sleep(self.poll_s)
            self._refresh()
            now = self.available()
            if now > have:
                have, last_growth = now, time.monotonic()
        return have

    # -- events ---------------------------------------------------------------------------------
    def read(self, start: int, stop: int, out=None) -> RawBatch:
        if self.limit is not None:
            stop = min(stop, self.limit)
        if self.follow:
            stop = min(stop, self._wait_for(stop))
        stop = max(start, stop)
        n = stop - start
        raw = {}
        for name, ds in self.datasets.items():
            shape = self.detectors[name].shape
            buf = out[name][:n] if out is not None and name in out else np.empty((n, *shape), ds.dtype)
            if n:
                ds.read_direct(buf.reshape((n, *ds.shape[1:])), np.s_[start:stop])
            raw[name] = buf
        idx = np.arange(start, stop, dtype=np.int64)
        if self.ts_dataset is not None:
            ts = self.ts_dataset[start:stop].astype(np.uint64)
            if self.follow:  # checked at open otherwise
                self._check_order(ts, start)
        else:
            ts = idx.astype(np.uint64)
        return RawBatch(ts, idx, raw, {name: np.zeros(n, bool) for name in raw})

    def close(self) -> None:
        self.file.close()
