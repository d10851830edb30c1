"""Raw events from an HDF5 file: one dataset (events, [panels,] rows, cols) per detector.

The config names the file (``source.path``) and each detector's ``dataset``; ``/timestamp``
(events,) integer, taken as ns since the Unix epoch (1970-01-01 UTC, the meaning of gpusmall's own
``/timestamp``; not psana's packed ``(seconds << 32) | nanoseconds``), is used when present (else the
event index, as ns: ``source.timestamp: null`` ignores it), as is ``/<det>/config_bits``. Timestamps
must not decrease (SPEC 8: the output is in time order, for any number of ranks): a file whose events
are not in time order is an error naming the first event out of order. Datasets of different lengths
are cut to the shortest, with a warning naming them.

Following a file that is still being written (``gpusmall run --follow``, ``source.follow: true``):
the number of events is then open (``n_events`` None) and :meth:`Hdf5Source.read` waits until the
events asked for are in the file, polling every ``poll_s``. The run ends when the file has not grown
for ``follow_timeout_s`` seconds (or on SIGTERM / SIGINT); the last batch may be short. An event
counts as written once every detector's dataset (and ``/timestamp``, when there is one) holds it.
The writer should use HDF5 SWMR mode (h5py: ``libver=("v110", "v110")`` or later, ``f.swmr_mode =
True``, ``flush()`` after each append), which lets a reader see appended data safely; without SWMR
the file is reopened at each poll, which works for a writer that closes the file between appends.

Truncated and corrupt files (HDF5 reads bytes beyond the end of a file as zeros, without an error):
at each batch the events whose storage (from the chunk index, or the contiguous dataset's offset)
lies partly beyond the file's current end are marked damaged for that detector, their raw rows
zeroed. Events whose read fails (a corrupt compressed chunk: OSError) are found by re-reading the
batch in halves down to single events, and are marked damaged and zeroed the same way. Each of these
is one warning per file and detector, naming the first event (with the number of events beyond the
end; the number of further unreadable events is a warning at :meth:`Hdf5Source.close`); the run goes
on. A damaged timestamp damages the event for every detector and takes the timestamp before it.
Without ``follow`` the timestamps are read once, at open, so a later truncation does not reach them;
with it, the chunk index is looked at again only when the file has become shorter than it was (a
writer only appends, so events that appear in a growing file are taken to be whole). Compact,
virtual and external datasets are not checked against the end of the file. A batch none of whose
events can be read, of a file that is no longer an HDF5 file, is an :class:`InputError`.
"""

from __future__ import annotations

import logging
import os
import time

import h5py
import numpy as np

from ..errors import InputError
from ..io.writer import open_for_reading
from .base import DetectorSource, RawBatch, Source
from .context import as_context, context_dtype

log = logging.getLogger(__name__)


class _Extents:
    """Where the file storage of each event of one dataset ends (bytes), to find events that a
    truncation cut off. Contiguous: from the dataset's offset; chunked: from the chunk index, scanned
    once (``follow``: again when the file has become shorter than it was)."""

    def __init__(self, ds: h5py.Dataset, size: int, follow: bool):
        self.chunked, self.follow = ds.chunks is not None, follow
        self.event_bytes = int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize
        self.ends = np.zeros(0, np.int64)  # chunked: (known,) end byte of the chunks each event needs
        self.size_seen = size
        if self.chunked:
            self._scan(ds, size)

    @staticmethod
    def of(ds: h5py.Dataset, size: int, follow: bool) -> _Extents | None:
        """The extents of ``ds``, None for storage not in this file's byte range (compact, virtual, external)."""
        plist = ds.id.get_create_plist()
        if plist.get_layout() not in (h5py.h5d.CONTIGUOUS, h5py.h5d.CHUNKED) or plist.get_external_count():
            return None
        return _Extents(ds, size, follow)

    def _scan(self, ds: h5py.Dataset, size: int) -> None:
        """Read the chunk index into ``ends``. (A chunk a writer rewrites elsewhere later moves towards
        the end of the file: its old end is still within the file, until a truncation scans again.)"""
        n, c0 = ds.shape[0], ds.chunks[0]
        first, end = [], []

        def one(info):
            first.append(info.chunk_offset[0])
            end.append(info.byte_offset + info.size)

        if hasattr(ds.id, "chunk_iter"):
            ds.id.chunk_iter(one)
        else:  # h5py < 3.8: by index (quadratic in HDF5, but only for old installations)
            for i in range(ds.id.get_num_chunks()):
                one(ds.id.get_chunk_info(i))
        ends = np.zeros(n, np.int64)
        if first:
            events = (np.asarray(first, np.int64)[:, None] + np.arange(c0)).ravel()
            keep = events < n
            np.maximum.at(ends, events[keep], np.repeat(np.asarray(end, np.int64), c0)[keep])
        self.ends, self.size_seen = ends, size

    def _ends(self, ds: h5py.Dataset, start: int, stop: int) -> np.ndarray:
        """(events,) int64 end bytes of events ``start`` .. (``stop`` or fewer, as far as known)."""
        if not self.chunked:
            offset = ds.id.get_offset()
            if offset is None:  # not allocated: no storage to miss
                return np.zeros(0, np.int64)
            return offset + (np.arange(start, stop, dtype=np.int64) + 1) * self.event_bytes
        return self.ends[start:stop]

    def beyond(self, ds: h5py.Dataset, start: int, stop: int, size: int) -> np.ndarray:
        """(stop - start,) bool: events whose storage ends beyond ``size`` bytes (the file's length)."""
        if self.chunked and self.follow and size < self.size_seen:
            self._scan(ds, size)  # shorter than it was: truncated, look at the chunks again
        self.size_seen = max(self.size_seen, size)
        bad = np.zeros(stop - start, bool)
        ends = self._ends(ds, start, stop)
        bad[: ends.size] = ends > size
        return bad

    def first_beyond(self, ds: h5py.Dataset, n: int, size: int) -> tuple[int, int]:
        """(first event, number of events) of events 0 .. ``n`` (as far as known) beyond ``size`` bytes."""
        if not self.chunked:
            offset = ds.id.get_offset() or 0
            first = min(n, max(0, (size - offset) // self.event_bytes))
            return first, n - first
        bad = self.ends[:n] > size
        return int(np.argmax(bad)), int(bad.sum())


def _read_rows(ds: h5py.Dataset, buf: np.ndarray, start: int) -> list[tuple[int, str]]:
    """Events ``start`` .. ``start + len(buf)`` of ``ds`` into ``buf`` (events, ...). A failing read
    (a corrupt chunk: OSError) is tried again in halves down to single events; an event that still
    fails is zeroed. Returns [(event, error message)] of those."""
    try:
        ds.read_direct(buf, np.s_[start : start + len(buf)])
        return []
    except OSError as exc:
        if len(buf) == 1:
            buf[...] = 0
            return [(start, str(exc))]
    h = len(buf) // 2
    return _read_rows(ds, buf[:h], start) + _read_rows(ds, buf[h:], start + h)


def _fill(ts: np.ndarray, bad: np.ndarray, before: int | None) -> np.ndarray:
    """(events,) uint64 ``ts`` with each damaged (``bad``) event's timestamp replaced by the one before
    it (``before`` ahead of the first event, else the first good one), so the events stay in order."""
    good = np.flatnonzero(~bad)
    head = before if before is not None else (int(ts[good[0]]) if good.size else 0)
    last_good = np.maximum.accumulate(np.where(bad, -1, np.arange(ts.size)))
    return np.where(last_good >= 0, ts[np.maximum(last_good, 0)], np.uint64(head)).astype(np.uint64)


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

    def __init__(
        self,
        path: str,
        detectors: dict[str, dict],
        events: int | None = None,
        timestamp: str | None = "/timestamp",
        follow: bool = False,
        follow_timeout_s: float = 60.0,
        poll_s: float = 0.5,
        timestamp_required: bool = False,
        context: dict[str, str] | None = None,
    ):
        self.path, self.names, self.timestamp = path, {n: d["dataset"] for n, d in detectors.items()}, timestamp
        self.context_paths = dict(context or {})  # context name -> per-event dataset of the file
        self.context = {k: context_dtype(k) for k in self.context_paths}
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
                raise InputError(
                    f"detectors.{name}.dataset: {dset!r} has events of shape {ds.shape[1:]}, expected {shape}"
                )
            self.detectors[name] = DetectorSource(name, d["type"], shape, ds.dtype)
        self._watch_extents()
        self._unreadable: dict = {}  # detector name (None: the timestamps) -> events unreadable after the first
        self._truncated: set = set()  # those warned about events beyond the end of the file
        n = self.available()
        if follow:
            self.n_events = None  # open: the run is still being written
        else:
            self.n_events = n if self.limit is None else min(n, self.limit)
            self._check_lengths(n)
            for name, ds in self.context_datasets.items():
                if ds.shape[0] < self.n_events:
                    log.warning(
                        "%s: context %s (%r) holds %d values for %d events: the rest are missing (NaN)",
                        self.path,
                        name,
                        self.context_paths[name],
                        ds.shape[0],
                        self.n_events,
                    )
            if self.ts_dataset is not None:  # read once: a later truncation does not reach them
                self._ts, self._ts_bad = self._read_ts(0, self.n_events)
                self._check_order(self._ts, 0)

    def _watch_extents(self) -> None:
        """Where each event's storage ends, per detector (and None: the timestamps), to compare with the
        file's length at each read (see module docstring)."""
        self._extents = {}
        for key, ds in {**self.datasets, None: self.ts_dataset}.items():  # type: ignore[misc]
            size = None if ds is None else self._file_size(ds.file)  # an external link's file, if so
            if size is not None:
                self._extents[key] = _Extents.of(ds, size, self.follow)

    def _check_lengths(self, n: int) -> None:
        """Warn when the datasets hold different numbers of events (the run is cut to the shortest)."""
        lengths = {f"detectors.{name}.dataset {self.names[name]!r}": ds.shape[0] for name, ds in self.datasets.items()}
        if self.ts_dataset is not None:
            lengths[f"source.timestamp {self.timestamp!r}"] = self.ts_dataset.shape[0]
        if len(set(lengths.values())) > 1:
            log.warning(
                "%s: datasets of different lengths (%s): only the first %d events are read",
                self.path,
                ", ".join(f"{k}: {v}" for k, v in lengths.items()),
                n,
            )

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
        raise InputError(
            f"source.timestamp: {self.timestamp!r} in {self.path} is not in time order at event "
            f"{bad} ({after} after {before}); gpusmall writes events in time order (use "
            f"'timestamp: null' to take the event index instead)"
        )

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
                raise InputError(
                    f"detectors.{name}.dataset: {dset!r} in {self.path} has shape {ds.shape}; "
                    f"expected (events, [panels,] rows, cols)"
                )
            self.datasets[name] = ds
        self.context_datasets = {}
        for name, dset in self.context_paths.items():
            ds = self.file.get(dset)
            where = f"context.values.{name}"
            if ds is None:
                raise InputError(f"{where}: {dset!r} is not in {self.path}")
            if not isinstance(ds, h5py.Dataset) or ds.ndim != 1 or ds.dtype.kind not in "biuf":
                what = "a group" if not isinstance(ds, h5py.Dataset) else f"{ds.dtype} of shape {ds.shape}"
                raise InputError(f"{where}: {dset!r} in {self.path} is {what}; expected (events,) numbers")
            self.context_datasets[name] = ds
        self.ts_dataset = None
        if self.timestamp and self.timestamp in self.file:
            ts = self.file[self.timestamp]
            if not isinstance(ts, h5py.Dataset) or ts.ndim != 1 or ts.dtype.kind not in "iu":
                what = "a group" if not isinstance(ts, h5py.Dataset) else f"{ts.dtype} of shape {ts.shape}"
                raise InputError(
                    f"source.timestamp: {self.timestamp!r} in {self.path} is {what}; expected "
                    f"(events,) integers (ns since the Unix epoch)"
                )
            self.ts_dataset = ts
        elif self.timestamp_required:
            raise InputError(f"source.timestamp: {self.timestamp!r} is not in {self.path}")

    def _refresh(self) -> None:
        """Let the file show what the writer appended since the last look."""
        if self.swmr:
            for ds in (*self.datasets.values(), *self.context_datasets.values(), self.ts_dataset):
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
                log.info(
                    "follow: no new events in %s for %.0f s: the run has ended at %d events",
                    self.path,
                    self.follow_timeout_s,
                    have,
                )
                break
            time.sleep(self.poll_s)
            self._refresh()
            now = self.available()
            if now > have:
                have, last_growth = now, time.monotonic()
        return have

    @staticmethod
    def _file_size(f: h5py.File) -> int | None:
        """The length now (bytes) of the file HDF5 has open as ``f``; None if it cannot be told."""
        try:
            return os.fstat(f.id.get_vfd_handle()).st_size
        except (OSError, TypeError, ValueError):
            try:
                return os.path.getsize(f.filename)
            except OSError:
                return None

    def _where(self, ds: h5py.Dataset) -> str:
        """The source file, and the file holding ``ds`` when that is another (an external link)."""
        held = ds.file.filename
        return self.path if os.path.abspath(held) == os.path.abspath(self.path) else f"{self.path} (data in {held})"

    # -- damaged events -------------------------------------------------------------------------
    def _label(self, key) -> str:
        return f"source.timestamp {self.timestamp!r}" if key is None else f"detector {key!r} ({self.names[key]!r})"

    def _read_checked(self, key, ds: h5py.Dataset, buf: np.ndarray, start: int) -> np.ndarray:
        """Events ``start`` .. ``start + len(buf)`` of ``ds`` (detector ``key``; None: the timestamps) into
        ``buf`` (events, ...). Returns (events,) bool: the damaged ones (unreadable, or stored beyond the
        end of the file), whose rows are zeroed."""
        n = len(buf)
        failed = _read_rows(ds, buf, start) if n else []
        bad = np.zeros(n, bool)
        bad[[event - start for event, _ in failed]] = True
        ext = self._extents.get(key)
        size = None if ext is None else self._file_size(ds.file)
        if size is not None:
            beyond = ext.beyond(ds, start, start + n, size)  # type: ignore[union-attr]
            if beyond.any():
                buf[beyond] = 0
                self._warn_truncated(key, ds, ext, size)  # type: ignore[arg-type]
                failed = [f for f in failed if not beyond[f[0] - start]]  # told about already
            bad |= beyond
        if failed:
            self._warn_unreadable(key, ds, failed)
            if len(failed) == n:
                self._check_still_hdf5(failed[0][1])
        return bad

    def _every(self, key) -> str:
        return " for every detector" if key is None else ""

    def _warn_truncated(self, key, ds: h5py.Dataset, ext: _Extents, size: int) -> None:
        """Once per detector: how many events (and the first) lie beyond the file's end (of the run)."""
        if key in self._truncated:
            return
        self._truncated.add(key)
        first, count = ext.first_beyond(ds, ds.shape[0] if self.n_events is None else self.n_events, size)
        log.warning(
            "%s: %s: %d events (the first: event %d) lie beyond the end of the file (%d bytes; "
            "truncated?): marked damaged%s",
            self._where(ds),
            self._label(key),
            count,
            first,
            size,
            self._every(key),
        )

    def _warn_unreadable(self, key, ds: h5py.Dataset, failed: list[tuple[int, str]]) -> None:
        """The first unreadable event of a detector is a warning; later ones are counted (see :meth:`close`)."""
        if key in self._unreadable:
            self._unreadable[key] += len(failed)
            return
        self._unreadable[key] = len(failed) - 1
        event, why = failed[0]
        log.warning(
            "%s: %s: event %d cannot be read (%s): marked damaged%s; further unreadable events are counted",
            self._where(ds),
            self._label(key),
            event,
            why,
            self._every(key),
        )

    def _check_still_hdf5(self, why: str) -> None:
        """InputError when the file is no longer an HDF5 file (no event of a batch could be read)."""
        try:
            ok = h5py.is_hdf5(self.path)
        except OSError:
            ok = False
        if not ok:
            raise InputError(f"source.path: {self.path} can no longer be read as an HDF5 file ({why})")

    # -- events ---------------------------------------------------------------------------------
    def _read_ts(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(events,) uint64 timestamps of events ``start`` .. ``stop`` and (events,) bool damaged ones
        (their timestamp is the one before, see :func:`_fill`)."""
        buf = np.empty(stop - start, self.ts_dataset.dtype)  # type: ignore[union-attr]
        bad = self._read_checked(None, self.ts_dataset, buf, start)
        ts = buf.astype(np.uint64)
        return (_fill(ts, bad, self.last_ts) if bad.any() else ts), bad

    def _timestamps(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(events,) uint64 timestamps and (events,) bool damaged of events ``start`` .. ``stop``."""
        if self.ts_dataset is None:
            return np.arange(start, stop, dtype=np.uint64), np.zeros(stop - start, bool)
        if not self.follow:  # read and checked at open
            return self._ts[start:stop], self._ts_bad[start:stop]
        ts, bad = self._read_ts(start, stop)
        self._check_order(ts, start)
        return ts, bad

    def read(self, start: int, stop: int, out=None) -> RawBatch:
        if self.n_events is not None:
            stop = min(stop, self.n_events)
        if self.limit is not None:
            stop = min(stop, self.limit)
        if self.follow:
            stop = min(stop, self._wait_for(stop))
        stop = max(start, stop)
        n = stop - start
        ts, ts_bad = self._timestamps(start, stop)
        raw, damaged = {}, {}
        for name, ds in self.datasets.items():
            shape = self.detectors[name].shape
            buf = out[name][:n] if out is not None and name in out else np.empty((n, *shape), ds.dtype)
            damaged[name] = self._read_checked(name, ds, buf.reshape((n, *ds.shape[1:])), start) | ts_bad
            buf[ts_bad] = 0
            raw[name] = buf
        return RawBatch(ts, np.arange(start, stop, dtype=np.int64), raw, damaged, self._context(start, stop))

    def _context(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """The mapped context of events ``start`` .. ``stop``; values past a dataset's end are missing."""
        out = {}
        for name, ds in self.context_datasets.items():
            v = np.full(stop - start, np.nan)
            have = max(0, min(stop, ds.shape[0]) - start)
            if have:
                v[:have] = ds[start : start + have]
            out[name] = as_context(name, v)
        return out

    def close(self) -> None:
        for key, more in self._unreadable.items():
            if more:
                log.warning(
                    "%s: %s: %d more events could not be read: marked damaged%s",
                    self.path,
                    self._label(key),
                    more,
                    self._every(key),
                )
        self._unreadable = {}
        self.file.close()
