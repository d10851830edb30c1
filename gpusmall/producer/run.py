"""The event loop of one run: source -> batches -> device -> calibrate -> reduce -> HDF5.

:func:`reduce_run` validates everything it can (constants, masks, function set-up) before it
creates the output file, so a bad config or input leaves no file behind.

Pipeline (the same code on NumPy and CuPy)::

    reader thread:  read batch k+1 into a free host buffer (pinned on CuPy)  ─┐ queue of 1
    main thread:    upload batch k on a stream, calibrate, reduce, results -> host, append to HDF5

Three host buffers per detector circulate between the two threads, so reading overlaps compute
(and, on CuPy, the asynchronous upload from pinned memory). Results do not depend on the batch size.

MPI (:mod:`gpusmall.producer.mpi`): each rank reduces its contiguous block of batches into
``<stem>.part<rank>.h5``; after a barrier rank 0 writes the master ``<stem>.h5``
(:func:`gpusmall.io.master.build_master`). With one rank the output file is written directly.

Crash safety: SIGTERM / SIGINT set a flag; the loop finishes the batch in hand, writes the sums,
flushes and closes the file (and under MPI the master is built); :attr:`RunSummary.interrupted`
tells the caller (``gpusmall run`` exits 1). An exception while reducing a batch does the same and
is re-raised afterwards. Every batch that was appended is in the file.

Damaged events (``RawBatch.damaged[det]``): their raw rows are zeroed before the detector's
pipeline sees them, they are left out of the run sums, and their result rows are overwritten with
NaN (floats), -1 (signed integers) or 0 (unsigned integers, booleans); ``/<det>/damaged`` is 1 there.
The damaged count per detector is the ``damaged_events`` attribute of ``/<det>`` and the JSON root
attribute ``damaged``.

GPU out of memory: a batch whose processing raises ``OutOfMemoryError`` (CuPy's, found by class
name) is retried in halves; the smaller size is kept for the rest of the run (logged).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..backend import Backend
from ..io.master import build_master, part_path
from ..io.writer import ResultWriter
from ..sources import open_source
from .mpi import Comm, block_range, get_comm
from .pipeline import DetectorPipeline

log = logging.getLogger(__name__)

BARRIER_TIMEOUT_S = float(os.environ.get("GPUSMALL_BARRIER_TIMEOUT", "120"))
N_BUFFERS = 3


@dataclass
class RunSummary:
    output: Path
    events: int
    seconds: float
    backend: str
    interrupted: bool = False
    rank: int = 0
    ranks: int = 1
    local_events: int = 0
    damaged: dict = field(default_factory=dict)
    reason: str = ""

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("inf")


def progress_bar(total: int | None, quiet: bool):
    """A tqdm bar on stderr with events/s; off with ``quiet`` or when stderr is not a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, unit="ev", desc="gpusmall", file=sys.stderr, dynamic_ncols=True,
                disable=quiet or not sys.stderr.isatty())


class StopFlag:
    """Set by SIGTERM / SIGINT while installed (main thread only); the loop stops between batches."""

    def __init__(self):
        self.reason = ""
        self._old = {}

    def __bool__(self):
        return bool(self.reason)

    def set(self, reason: str):
        if not self.reason:
            self.reason = reason

    def _handler(self, signum, frame):
        self.set(signal.Signals(signum).name)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


def is_out_of_memory(exc: BaseException) -> bool:
    """CuPy's ``OutOfMemoryError`` (or a CUDA allocation failure), recognised without importing cupy."""
    return type(exc).__name__ == "OutOfMemoryError" or "cudaErrorMemoryAllocation" in str(exc)


class _GoodEventsSum:
    """Wraps a RunSum so that it only sees the events in ``keep`` (damaged events are left out)."""

    def __init__(self, inner, backend: Backend):
        self.inner, self.backend = inner, backend
        self.keep = None  # host bool (events,) or None for all

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def update(self, frames):
        if self.keep is not None:
            if not self.keep.any():
                return
            k = self.backend.to_device(self.keep)
            frames = dataclasses.replace(frames, **{f.name: getattr(frames, f.name)[k]
                                                    for f in dataclasses.fields(frames)
                                                    if getattr(getattr(frames, f.name), "ndim", 0) >= 1})
        self.inner.update(frames)


def fill_value(dtype) -> object:
    """What a damaged event's result holds: NaN for floats, -1 for signed ints, 0 otherwise."""
    dtype = np.dtype(dtype)
    if dtype.kind in "fc":
        return np.nan
    if dtype.kind == "i":
        return -1
    return 0


class BatchProcessor:
    """Runs the detectors' pipelines on host batches; uploads on a stream; halves on GPU OOM."""

    def __init__(self, pipelines: dict[str, DetectorPipeline], backend: Backend, batch_size: int):
        self.pipelines, self.backend = pipelines, backend
        self.chunk = batch_size
        self.stream = backend.stream() if backend.is_gpu else None
        # Constants, bin maps and zeroed run sums were made on the legacy default stream, asynchronously
        # (cupy.asarray copies, fill kernels); a non-blocking stream does not wait for that stream.
        backend.synchronize()
        for pl in pipelines.values():
            pl.sums = [s if isinstance(s, _GoodEventsSum) else _GoodEventsSum(s, backend) for s in pl.sums]
        self.damaged = {name: 0 for name in pipelines}

    def _upload(self, host):
        if not self.backend.is_gpu:
            return host
        d = self.backend.xp.empty(host.shape, host.dtype)
        d.set(np.ascontiguousarray(host), stream=self.stream)
        return d

    def _run_one(self, name, raw, damaged) -> dict[str, np.ndarray]:
        pl = self.pipelines[name]
        keep = ~damaged if damaged.any() else None
        for s in pl.sums:
            s.keep = keep
        if self.stream is not None:
            with self.stream:
                res = pl.process(self._upload(raw))
                out = {k: self.backend.to_host(v) for k, v in res.items()}
            self.stream.synchronize()  # the host buffer may be refilled once this returns
        else:
            res = pl.process(raw)
            out = {k: np.array(self.backend.to_host(v), copy=True) for k, v in res.items()}
        return out

    def process(self, batch) -> dict[str, np.ndarray]:
        """One RawBatch -> columns to append (host arrays), damaged rows filled."""
        columns = {"timestamp": batch.timestamp, "event_index": batch.event_index}
        n = len(batch)
        for name in self.pipelines:
            raw = batch.raw[name]
            damaged = np.asarray(batch.damaged.get(name, np.zeros(n, bool)), bool)
            if damaged.any():
                raw[damaged] = 0
            pieces = []
            start = 0
            while start < n:
                stop = min(n, start + self.chunk)
                try:
                    pieces.append(self._run_one(name, raw[start:stop], damaged[start:stop]))
                    start = stop
                except Exception as exc:
                    if not is_out_of_memory(exc) or self.chunk <= 1:
                        raise
                    self.chunk = max(1, (stop - start) // 2)
                    log.warning("GPU out of memory with %d events of %s: retrying in batches of %d",
                                stop - start, name, self.chunk)
                    print(f"gpusmall: GPU out of memory; batch size now {self.chunk}", file=sys.stderr)
                    try:
                        self.backend.xp.get_default_memory_pool().free_all_blocks()
                    except AttributeError:
                        pass
            res = pieces[0] if len(pieces) == 1 else {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
            if damaged.any():
                for v in res.values():
                    v[damaged] = fill_value(v.dtype)
                self.damaged[name] += int(damaged.sum())
            for k, v in res.items():
                columns[f"{name}/{k}"] = v
            columns[f"{name}/damaged"] = damaged.astype(np.uint8)
        return columns


class Prefetcher:
    """Reads batches in a background thread into circulating host buffers (pinned on CuPy).

    Iterate to get RawBatch objects; call :meth:`release` with each one when done with its buffers.
    """

    _END = object()

    def __init__(self, source, backend: Backend, batch_size: int, start: int, stop: int, stop_flag):
        self.source, self.stop_flag = source, stop_flag
        self.free: queue.Queue = queue.Queue()
        for _ in range(N_BUFFERS):
            self.free.put({name: backend.pinned_empty((batch_size, *d.shape), d.dtype)
                           for name, d in source.detectors.items()})
        self.ready: queue.Queue = queue.Queue(maxsize=1)
        if stop is None:  # a sequential source of unknown length: read until it runs dry
            self.ranges = ((b, b + batch_size) for b in itertools.count(start, batch_size))
        else:
            self.ranges = [(b, min(b + batch_size, stop)) for b in range(start, stop, batch_size)]
        self.error: BaseException | None = None
        self._cancel = threading.Event()
        self.thread = threading.Thread(target=self._run, name="gpusmall-reader", daemon=True)
        self.thread.start()

    def _put(self, item) -> bool:
        while not self._cancel.is_set():
            try:
                self.ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _run(self):
        try:
            for a, b in self.ranges:
                if self._cancel.is_set() or self.stop_flag:
                    break
                while True:
                    try:
                        bufs = self.free.get(timeout=0.1)
                        break
                    except queue.Empty:
                        if self._cancel.is_set():
                            return
                batch = self.source.read(a, b, out=bufs)
                if len(batch) == 0:
                    self.free.put(bufs)
                    break
                batch._buffers = bufs
                if not self._put(batch):
                    return
                if len(batch) < b - a:
                    break
        except BaseException as exc:  # handed to the main thread
            self.error = exc
        self._put(self._END)

    def __iter__(self):
        while True:
            try:
                item = self.ready.get(timeout=0.1)
            except queue.Empty:
                if not self.thread.is_alive() and self.ready.empty():
                    break
                continue
            if item is self._END:
                break
            yield item
        if self.error is not None:
            raise self.error

    def release(self, batch):
        bufs = getattr(batch, "_buffers", None)
        if bufs is not None:
            self.free.put(bufs)

    def close(self):
        self._cancel.set()
        self.thread.join(timeout=10)


def reduce_run(cfg, backend: Backend, *, events: int | None = None, output: str | Path | None = None,
               quiet: bool = False, comm: Comm | None = None) -> RunSummary:
    """Reduce the run a validated config describes (this rank's share under MPI); returns what was done."""
    comm = comm or get_comm()
    out_path = Path(output or cfg.output)
    my_path = part_path(out_path, comm.rank) if comm.size > 1 else out_path
    t0 = time.perf_counter()
    done = 0
    error: BaseException | None = None
    with StopFlag() as stop, open_source(cfg) as source:
        n = source.n_events
        if events is not None:
            n = events if n is None else min(n, events)
        start, end = block_range(n, cfg.batch_size, comm.rank, comm.size)
        pipelines = {name: DetectorPipeline(name, dcfg, source.detectors[name], cfg.function_specs(name), backend)
                     for name, dcfg in cfg.detectors.items()}
        proc = BatchProcessor(pipelines, backend, cfg.batch_size)
        if comm.rank == 0 and comm.size > 1:
            for p in out_path.parent.glob(f"{out_path.stem}.part*.h5"):
                if p.name not in {part_path(out_path, r).name for r in range(comm.size)}:
                    p.unlink()  # left by an earlier run with more ranks
        with ResultWriter(my_path, chunk_events=cfg.batch_size) as writer, \
                progress_bar(n, quiet or comm.rank > 0) as bar:
            writer.set_attrs("/", {"gpusmall_version": __version__, "backend": backend.description,
                                   "config": cfg.model_dump_json(), "rank": comm.rank, "ranks": comm.size,
                                   "first_event": start, "last_event": -1 if end is None else end,
                                   "complete": False})
            for name, pl in pipelines.items():
                writer.write_static(f"UserDataCfg/{name}", pl.user_data_cfg())
            reader = Prefetcher(source, backend, cfg.batch_size, start, end, stop)
            try:
                for batch in reader:
                    try:
                        columns = proc.process(batch)
                    finally:
                        reader.release(batch)
                    writer.append(columns)
                    done += len(batch)
                    bar.update(len(batch) * comm.size)
                    if stop:
                        break
            except Exception as exc:  # finish what exists, then re-raise
                error = exc
                stop.set(f"{type(exc).__name__}: {exc}")
            finally:
                reader.close()
            for name, pl in pipelines.items():
                writer.write_static("Sums", pl.sum_results())
                writer.set_attrs(name, {"damaged_events": proc.damaged[name]})
            complete = (end is None or done == end - start) and error is None and not stop
            writer.set_attrs("/", {"events": done, "complete": complete,
                                   "damaged": json.dumps(proc.damaged)})
    total, damaged = done, dict(proc.damaged)
    if comm.size > 1:
        all_there = comm.barrier(timeout=BARRIER_TIMEOUT_S)
        if comm.rank == 0:
            parts = [part_path(out_path, r) for r in range(comm.size)]
            if not all_there:
                log.warning("not every rank finished within %.0f s; master over the parts on disk", BARRIER_TIMEOUT_S)
            info = build_master(out_path, [p for p in parts if p.exists()])
            total, damaged = info["events"], info["damaged"]
            complete = complete and info["complete"]
    if error is not None:
        raise error
    dt = time.perf_counter() - t0
    return RunSummary(out_path, total, dt, backend.name, interrupted=not complete, rank=comm.rank,
                      ranks=comm.size, local_events=done, damaged=damaged, reason=stop.reason)


def config_json(cfg) -> str:
    return json.dumps(json.loads(cfg.model_dump_json()), indent=1)
