"""Raw events from an HDF5 file: one dataset (events, [panels,] rows, cols) per detector.

The config names the file (``source.path``) and each detector's ``dataset``; ``/timestamp``
(events,) uint64 is used when present (else the event index), as is ``/<det>/config_bits``.

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
        timestamp: dataset of (events,) uint64 timestamps (optional in the file).
        follow: wait for events still being written; ``follow_timeout_s``: end after this long
            without new events; ``poll_s``: seconds between looks at the file.
    """

    def __init__(self, path: str, detectors: dict[str, dict], events: int | None = None,
                 timestamp: str = "/timestamp", follow: bool = False, follow_timeout_s: float = 60.0,
                 poll_s: float = 0.5):
        self.path, self.names, self.timestamp = path, {n: d["dataset"] for n, d in detectors.items()}, timestamp
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
            self.datasets[name] = self.file[dset]
        self.ts_dataset = self.file[self.timestamp] if self.timestamp in self.file else None

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
        ts = (self.ts_dataset[start:stop].astype(np.uint64) if self.ts_dataset is not None
              else idx.astype(np.uint64))
        return RawBatch(ts, idx, raw, {name: np.zeros(n, bool) for name in raw})

    def close(self) -> None:
        self.file.close()
