"""HDF5 result file (SPEC section 8): per-event datasets extended and flushed per batch.

Layout::

    /timestamp (events,) uint64     /event_index (events,) int64
    /<det>/<name>_<key>             per event, events first
    /<det>/damaged                  (events,) uint8
    /UserDataCfg/<det>/...          written once: constants, masks, parameters
    /Sums/<det>_<sum>               run totals

The file is valid HDF5 after every :meth:`ResultWriter.append` (each batch is flushed). After the
first batch the file is in HDF5 SWMR mode, so it can be read while the run goes on
(:func:`open_result`, h5py ``File(path, "r", swmr=True)``; a reader calls ``dataset.refresh()`` to see
new events). SWMR forbids new objects, so the end-of-run writes (run sums, attributes) reopen the
file in normal mode.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import InputError


def _storable(value: Any):
    """A value h5py can store: arrays as they are, lists of numbers as arrays, the rest as JSON text."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (bool, int, float, np.number, np.bool_)):
        return np.asarray(value)
    if isinstance(value, str):
        return value
    try:
        arr = np.asarray(value)
        if arr.dtype.kind in "biuf":
            return arr
    except (ValueError, TypeError):
        pass
    return json.dumps(value)


def open_for_reading(path) -> tuple[h5py.File, bool]:
    """(file, closed): an HDF5 file for reading, also while a writer holds it in SWMR mode (a run still
    going, or one killed before it could close the file); ``closed`` is False in that case, when plain
    opens (e.g. as a virtual dataset's source) fail."""
    try:
        return h5py.File(path, "r"), True
    except OSError as exc:
        if "already open for write" not in str(exc):
            raise
        return h5py.File(path, "r", swmr=True), False


def open_result(path) -> h5py.File:
    """A result file for reading, also while ``gpusmall run`` is still writing it (SWMR).

    :class:`UnreadableResult` (exit 2, also an OSError) when the file does not exist or is not HDF5."""
    if not Path(path).is_file():
        raise UnreadableResult(f"file {str(path)!r} does not exist")
    try:
        return open_for_reading(path)[0]
    except OSError as exc:
        raise UnreadableResult(f"{str(path)!r} is not a readable HDF5 file ({exc})") from None


class UnreadableResult(InputError, OSError):
    """A result file that does not exist or cannot be opened: bad input (exit 2) to the command line, and
    an OSError to a caller that polls a file still being created (as h5py's own error is)."""


class _Layout:
    """What :class:`ResultWriter` needs per per-event dataset, read from HDF5 once: chunk length (events),
    dtype, whether whole chunks may be written directly (uncompressed, at least 2-D), and a low-level
    write of whole rows."""

    def __init__(self, ds: h5py.Dataset):
        self.id = ds.id
        self.tail = tuple(ds.shape[1:])
        self.chunk = ds.chunks[0]
        self.dtype = ds.dtype
        self.direct = ds.ndim >= 2 and ds.compression is None
        self.zeros = (0,) * len(self.tail)

    def grow(self, n_events: int) -> None:
        """Extend the events axis to ``n_events``."""
        self.id.set_extent((n_events, *self.tail))

    def write_rows(self, start: int, arr: np.ndarray) -> None:
        """Rows ``start .. start + len(arr)`` of the file dataset from ``arr`` (converted to its dtype)."""
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        fspace = self.id.get_space()
        fspace.select_hyperslab((start, *self.zeros), arr.shape)
        self.id.write(h5py.h5s.create_simple(arr.shape), fspace, arr)


class ResultWriter:
    """Writes one result file; use as a context manager (closing flushes).

    Args:
        path: output file (overwritten).
        chunk_events: events per HDF5 chunk of per-event datasets (the batch size is a good choice).
    """

    def __init__(self, path, chunk_events: int = 64):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = h5py.File(self.path, "w", libver="latest")
        self.chunk_events = max(1, int(chunk_events))
        self.n_events = 0
        self._datasets: dict[str, h5py.Dataset] = {}
        self._layout: dict[str, _Layout] = {}  # HDF5 path -> cached layout of a per-event dataset
        self.swmr = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        if self.file is not None and self.file.id.valid:
            self.file.flush()
            self.file.close()

    def _create(self, name: str, arr: np.ndarray) -> h5py.Dataset:
        """Chunks of whole events, at most ~1 MiB, and (for per-event arrays) a divisor of the batch size,
        so that full batches fill whole chunks (written directly, see :meth:`_write`)."""
        tail = arr.shape[1:]
        per_event = max(1, int(np.prod(tail)) * arr.dtype.itemsize)
        limit = max(1, (1 << 20) // per_event)
        if tail:
            most = min(self.chunk_events, limit)
            chunk0 = max(d for d in range(1, most + 1) if self.chunk_events % d == 0)
            if 4 * chunk0 < most:  # e.g. a prime batch size: no tiny chunks (those batches go through h5py)
                chunk0 = most
            chunks = (chunk0, *tail)
        else:
            chunks = (max(min(self.chunk_events, limit), 1024),)
        return self.file.create_dataset(name, shape=(0, *tail), maxshape=(None, *tail), dtype=arr.dtype,
                                        chunks=chunks)

    def _write(self, ds: h5py.Dataset, start: int, arr: np.ndarray) -> None:
        """``ds[start:start + len(arr)] = arr`` for a dataset this writer created (its layout cached in
        :class:`_Layout`). Whole chunks go to the file directly (no chunk cache, no type conversion:
        ~1.6x faster for the padded per-event arrays), the rest through HDF5's low-level write of a
        hyperslab (h5py's slicing machinery costs ~0.1 ms of Python per call, GIL held)."""
        lay = self._layout[ds.name]
        c, n = lay.chunk, arr.shape[0]
        first = -start % c  # events before the first chunk boundary
        if not lay.direct or arr.dtype != lay.dtype or first + c > n:
            lay.write_rows(start, arr)
            return
        arr = np.ascontiguousarray(arr)
        if first:
            lay.write_rows(start, arr[:first])
        k = first
        while k + c <= n:
            ds.id.write_direct_chunk((start + k, *lay.zeros), memoryview(arr[k:k + c]).cast("B"))
            k += c
        if k < n:
            lay.write_rows(start + k, arr[k:])

    def append(self, columns: dict[str, np.ndarray]) -> None:
        """Append one batch: every array has the same leading events axis. Flushes the file.

        The first batch creates the datasets; later batches must bring the same names.
        """
        n = None
        for name, arr in columns.items():
            arr = np.asarray(arr)
            if n is None:
                n = arr.shape[0]
            elif arr.shape[0] != n:
                raise ValueError(f"output {name}: {arr.shape[0]} events in a batch of {n}")
            ds = self._datasets.get(name)
            if ds is None:
                if self.n_events:
                    raise ValueError(f"output {name} appears after the first batch")
                ds = self._datasets[name] = self._create(name, arr)
                self._layout[ds.name] = _Layout(ds)
            self._layout[ds.name].grow(self.n_events + n)
            self._write(ds, self.n_events, arr)
        if n is not None:
            self.n_events += n
        self.file.flush()
        if not self.swmr and self._datasets:
            self.file.swmr_mode = True  # readers may now follow the file as it grows
            self.swmr = True

    def _leave_swmr(self) -> None:
        """Reopen the file in normal mode so that new objects and attributes can be written."""
        if not self.swmr:
            return
        self.file.flush()
        self.file.close()
        self.file = h5py.File(self.path, "a", libver="latest")
        self._datasets = {name: self.file[name] for name in self._datasets}
        self._layout = {ds.name: _Layout(ds) for ds in self._datasets.values()}
        self.swmr = False

    def write_static(self, group: str, values: dict[str, Any]) -> None:
        """Write values once under ``group`` (e.g. ``UserDataCfg/<det>``); replaces existing ones."""
        self._leave_swmr()
        g = self.file.require_group(group)
        for key, value in values.items():
            if value is None:
                continue
            if key in g:
                del g[key]
            v = _storable(value)
            if isinstance(v, np.ndarray) and v.size > 4096:
                g.create_dataset(key, data=v, compression="gzip", compression_opts=1, shuffle=True)
            else:
                g.create_dataset(key, data=v)
        self.file.flush()

    def set_attrs(self, path: str, attrs: dict[str, Any]) -> None:
        self._leave_swmr()
        obj = self.file.require_group(path) if path not in ("", "/") else self.file
        for k, v in attrs.items():
            obj.attrs[k] = _storable(v)


class BackgroundAppender:
    """Appends batches to a :class:`ResultWriter` from a thread of its own, so that writing batch k
    overlaps the reduction of batch k+1 (h5py lets other threads run during HDF5 I/O).

    At most ``depth`` batches wait; :meth:`append` blocks beyond that. A batch is a dict of host
    arrays or an object whose ``result()`` gives one (:class:`gpusmall.producer.process.PendingColumns`,
    waited for here). ``on_written`` runs in the writer thread once its batch is in the file (flushed).
    An error in the thread stops every later write (the file keeps the batches before it) and is
    raised by the next :meth:`append` or by :meth:`drain`. After :meth:`drain` every
    batch handed over is in the file and the caller may use the writer again; :meth:`close` (or the
    context manager) drains and ends the thread.

    While it runs, the interpreter's thread switch interval is at most ``switch_interval_s`` (restored by
    :meth:`close`; None leaves it alone). h5py lets the GIL go around each HDF5 call, and taking it back
    waits until the other thread yields it: up to the switch interval, 5 ms by default. Beside a main
    thread busy with Python (launching GPU work) that stalls the writer: a demo batch took 18-19 ms with
    9 ms of main-thread Python per batch, 14-15 ms with 0.1 ms (8.7 ms alone; ``benchmarks/bench_writer.py``).
    """

    def __init__(self, writer: ResultWriter, depth: int = 2, switch_interval_s: float | None = 1e-4):
        import queue
        import sys
        import threading

        self._switch_before = None
        if switch_interval_s is not None:
            self._switch_before = sys.getswitchinterval()
            sys.setswitchinterval(min(self._switch_before, switch_interval_s))
        self.writer = writer
        self.error: BaseException | None = None
        self._broken = False  # set by the thread at its first error: nothing after it is written
        self._failed = False  # set once the error was raised in the caller's thread
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._thread = threading.Thread(target=self._run, name="gpusmall-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if not self._broken:
                    columns, on_written = item
                    if hasattr(columns, "result"):  # PendingColumns: results still on their way
                        columns = columns.result()
                    self.writer.append(columns)
                    if on_written is not None:
                        on_written()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                self.error, self._broken = exc, True
            finally:
                self._queue.task_done()

    def _raise(self) -> None:
        if self.error is not None:
            exc, self.error = self.error, None
            self._failed = True
            raise exc

    def append(self, columns, on_written=None) -> None:
        """Queue one batch: host arrays the caller no longer changes, or an object whose ``result()``
        gives them (waited for in the writer thread)."""
        self._raise()
        if self._failed:
            raise RuntimeError("the writer thread failed earlier; no more batches are written")
        self._queue.put((columns, on_written))

    def drain(self) -> None:
        """Wait until every queued batch is written; raise the writer thread's error if it had one."""
        self._queue.join()
        self._raise()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.join()
            self._queue.put(None)
            self._thread.join()
        if self._switch_before is not None:
            import sys

            sys.setswitchinterval(self._switch_before)
            self._switch_before = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
