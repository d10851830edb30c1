"""The event loop of one run: source -> batches -> device -> calibrate -> reduce -> HDF5.

:func:`reduce_run` validates everything it can (constants, masks, function set-up) before it
creates the output file, so a bad config or input leaves no file behind.

Pipeline (the same code on NumPy and CuPy)::

    reader thread:  read batch k+2 into a free host buffer (pinned on CuPy)   ─┐ queue of 1
    main thread:    stage batch k+1 (CuPy: upload on the copy stream)          │
                    reduce batch k (compute stream; its results start back on a third stream)
    writer thread:  wait for batch k-1's results (one copy), append them to HDF5, flush (queue of 2)

Four host buffers per detector circulate between the two threads, so reading, uploading and
reducing overlap (:mod:`gpusmall.producer.process`). Results do not depend on the batch size.

MPI (:mod:`gpusmall.producer.mpi`): each rank reduces its contiguous block of batches into
``<stem>.part<rank>.h5``; after a barrier rank 0 writes the master ``<stem>.h5``
(:func:`gpusmall.io.master.build_master`). With one rank the output file is written directly.

Crash safety: SIGTERM / SIGINT / SIGHUP set a flag; the loop finishes the batch in hand, writes the sums,
flushes and closes the file (and under MPI the master is built); :attr:`RunSummary.interrupted`
tells the caller (``gpusmall run`` exits 1). An exception while reducing a batch does the same and
is re-raised afterwards. Every batch that was reduced is in the file: the writer thread's queue is
drained before the end-of-run writes.

Damaged events and GPU out-of-memory handling: see :mod:`gpusmall.producer.process`. The damaged
count per detector is the ``damaged_events`` attribute of ``/<det>`` and the JSON root attribute
``damaged``.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..backend import Backend
from ..errors import InputError
from ..io.master import build_master, part_path, remove_stale_parts
from ..io.writer import BackgroundAppender, OutputWriteError, ResultWriter
from ..sources import open_source
from .cube import (
    RunCube,
    check_cube_fits,
    cube_part_path,
    default_cube_path,
    merge_cube_parts,
)
from .event_functions import EventFunction
from .lock import OutputLock
from .memory import N_HOST_BUFFERS, check_frames_fit, check_run_fits
from .mpi import Comm, block_range, get_comm
from .paths import check_output, input_files
from .pipeline import make_pipelines
from .process import BatchProcessor, DeviceTimes

log = logging.getLogger(__name__)

BARRIER_TIMEOUT_S = float(os.environ.get("GPUSMALL_BARRIER_TIMEOUT", "120"))
N_BUFFERS = N_HOST_BUFFERS  # batch being reduced, batch uploading, batch being read, one spare


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
    device_times: DeviceTimes = field(default_factory=DeviceTimes)
    truncated_events: int = 0  # events a padded or bounded output truncated (a ``*_truncated`` output > 0)
    truncated: dict = field(default_factory=dict)  # such events per output
    cube: Path | None = None  # the cube file (config ``cube:``), or None
    cube_info: dict = field(default_factory=dict)  # this rank's cube event counts (RunCube.info)

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("inf")


def progress_bar(total: int | None, quiet: bool, desc: str = "gpusmall"):
    """A tqdm bar on stderr with events/s; off with ``quiet`` or when stderr is not a terminal."""
    from tqdm import tqdm

    return tqdm(
        total=total, unit="ev", desc=desc, file=sys.stderr, dynamic_ncols=True, disable=quiet or not sys.stderr.isatty()
    )


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""Signals that end a run cleanly: the batch in hand is finished and the file closed (SIGHUP: the ssh
session or terminal that started the run went away)."""


class StopFlag:
    """Set by a signal of :data:`STOP_SIGNALS` while installed (main thread only); the loop stops between
    batches."""

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
            for s in STOP_SIGNALS:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


class Prefetcher:
    """Reads batches in a background thread into circulating host buffers (pinned on CuPy).

    Iterate to get RawBatch objects; call :meth:`release` with each one when done with its buffers.
    """

    _END = object()

    def __init__(self, source, backend: Backend, batch_size: int, start: int, stop: int, stop_flag):
        self.source, self.stop_flag = source, stop_flag
        self.free: queue.Queue = queue.Queue()
        for _ in range(N_BUFFERS):
            self.free.put(
                {name: backend.pinned_empty((batch_size, *d.shape), d.dtype) for name, d in source.detectors.items()}
            )
        self.ready: queue.Queue = queue.Queue(maxsize=1)
        if stop is None:  # a sequential source of unknown length: read until it runs dry
            self.ranges = ((b, b + batch_size) for b in itertools.count(start, batch_size))
        else:
            self.ranges = [(b, min(b + batch_size, stop)) for b in range(start, stop, batch_size)]  # type: ignore[has-type]
        self.error: BaseException | None = None
        self._cancel = threading.Event()
        source.should_stop = lambda: self._cancel.is_set() or bool(stop_flag)  # ends waits for data
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


def reduce_run(
    cfg,
    backend: Backend,
    *,
    events: int | None = None,
    output: str | Path | None = None,
    quiet: bool = False,
    comm: Comm | None = None,
) -> RunSummary:
    """Reduce the run a validated config describes (this rank's share under MPI); returns what was done."""
    comm = comm or get_comm()
    out_path = Path(output or cfg.output)
    my_path = part_path(out_path, comm.rank) if comm.size > 1 else out_path
    with ExitStack() as held:
        locks = claim_outputs(cfg, comm, out_path, "--out" if output else "output")
        for lock in locks:
            held.callback(lock.release)
        return _reduce(cfg, backend, comm, out_path, my_path, events, quiet)


def claim_outputs(cfg, comm: Comm, out_path: Path, what: str) -> list[OutputLock]:
    """Check every file this run writes and lock this rank's, before any event is read, on every rank alike.

    Each rank checks the master and every rank's part (:func:`~gpusmall.producer.paths.check_output`: not an
    input, not someone else's file, writable) and locks the files it writes itself (rank 0 also the
    master). The ranks then compare: when any rank found a problem, every rank raises the first one, so no
    rank waits for one that gave up (an input named like a part, a part locked by another run)."""
    inputs = input_files(cfg)
    paths = [out_path] + ([part_path(out_path, r) for r in range(comm.size)] if comm.size > 1 else [])
    mine = ([out_path] if comm.rank == 0 else []) + ([part_path(out_path, comm.rank)] if comm.size > 1 else [])
    cubes, cube_mine = [], []
    if cfg.cube is not None:  # the cube file (and under MPI each rank's part of it)
        cube = cube_path(cfg, out_path)
        cubes = [(cube, "cube")] + (
            [(cube_part_path(cube, r), "cube_part") for r in range(comm.size)] if comm.size > 1 else []
        )
        cube_mine = ([cube] if comm.rank == 0 else []) + ([cube_part_path(cube, comm.rank)] if comm.size > 1 else [])
    problem, locks = None, []
    try:
        for path in paths:
            check_output(path, what, inputs, results_only=True)
        for path, kind in cubes:
            if any(_same_path(path, p) for p in paths):
                raise InputError(f"cube.output: {str(path)!r} is also the run's result file")
            check_output(path, "cube.output", inputs, results_only=True, kind=kind)
        for path in mine:
            locks.append(OutputLock(path, what).acquire())
        for path in cube_mine:
            locks.append(OutputLock(path, "cube.output").acquire())
    except InputError as exc:
        problem = str(exc)
    problems = [p for p in comm.allgather(problem) if p]
    if problems:
        for lock in locks:
            lock.release()
        raise InputError(problems[0])
    if comm.rank == 0:  # gpusmall parts of this output left by an earlier run with more ranks (or under MPI)
        remove_stale_parts(out_path, comm.size if comm.size > 1 else 0)
    return locks


def cube_path(cfg, out_path: Path) -> Path:
    """Where the run's cube goes: ``cube.output``, or ``<output stem>.cube.h5`` beside the result."""
    return Path(cfg.cube.output) if cfg.cube.output else default_cube_path(out_path)


def _same_path(a: Path, b: Path) -> bool:
    return Path(a).absolute() == Path(b).absolute()


def setup_cube(cfg, pipelines: dict, backend: Backend):
    """The run's :class:`~gpusmall.producer.cube.RunCube` (None without ``cube:``), checked to fit, its detectors'
    pipelines pointed at it."""
    if cfg.cube is None:
        return None
    from ..funcs.droplet import sparse_columns

    outputs = {}
    for name, pl in pipelines.items():
        _, by_function = pl.setup_event()
        per_item = set(sparse_columns(pl.functions).items) | set(sparse_columns(pl.functions).links)
        outputs[name] = {
            k: (tuple(v.shape[1:]), v.dtype)
            for out in by_function.values()
            for k, v in out.items()
            if k not in per_item
        }
    check_cube_fits(cfg.cube, pipelines, backend)
    selections = next(iter(pipelines.values())).sums.selections
    cube = RunCube(cfg.cube, selections, pipelines, backend, outputs)
    for name in cube.frame:
        pipelines[name].cube = cube
    return cube


def _reduce(
    cfg, backend: Backend, comm: Comm, out_path: Path, my_path: Path, events: int | None, quiet: bool
) -> RunSummary:
    t0 = time.perf_counter()
    done = 0
    error: BaseException | None = None
    batch_size = cfg.batch_size
    if cfg.source.type == "sim":
        batch_size = min(batch_size, events or cfg.source.events)
    check_frames_fit(cfg, batch_size)  # before the source allocates anything frame-sized
    with StopFlag() as stop, open_source(cfg) as source:
        n = source.n_events
        if events is not None:
            n = events if n is None else min(n, events)
        if n == 0:
            raise InputError(
                f"source: the {cfg.source.type} source has no events"
                + (f" ({cfg.source.path})" if cfg.source.path else "")
            )
        if n is not None:
            batch_size = min(batch_size, n)  # no buffers for events that do not exist
        if getattr(source, "distributed", False):  # psana's MPI distribution hands this rank its events
            start, end = 0, None
            # ranks 0 and 1 read small data and build events: the first reducing rank shows its own events
            bar_rank, bar_scale, desc = min(2, comm.size - 1), 1, f"gpusmall rank {min(2, comm.size - 1)}"
        else:
            start, end = block_range(n, batch_size, comm.rank, comm.size)
            bar_rank, bar_scale, desc = 0, comm.size, "gpusmall"
        pipelines = make_pipelines(cfg, source, backend)  # before any event: every context key the config reads
        check_run_fits(pipelines, batch_size, backend)
        cube = setup_cube(cfg, pipelines, backend)
        event_functions = [EventFunction(ef, i) for i, ef in enumerate(cfg.event_functions)]
        for ef in event_functions:
            ef.setup(pipelines)  # keys, shapes and dtypes fixed before the output is created
        proc = BatchProcessor(pipelines, backend, batch_size, event_functions, cube=cube)
        with (
            ResultWriter(my_path, chunk_events=batch_size) as writer,
            progress_bar(n, quiet or comm.rank != bar_rank, desc) as bar,
        ):
            writer.set_attrs(
                "/",
                {
                    "gpusmall_version": __version__,
                    "backend": backend.description,
                    "config": cfg.model_dump_json(),
                    "rank": comm.rank,
                    "ranks": comm.size,
                    "first_event": start,
                    "last_event": -1 if end is None else end,
                    "event_index_local": bool(getattr(source, "distributed", False)),
                    "event_functions": json.dumps([ef.params_record() for ef in event_functions]),
                    "context": json.dumps(sorted(source.context)),
                    "complete": False,
                },
            )
            for name, pl in pipelines.items():
                writer.write_static(f"UserDataCfg/{name}", pl.user_data_cfg())
            reader = Prefetcher(source, backend, batch_size, start, end, stop)  # type: ignore[arg-type]
            appender = BackgroundAppender(writer)

            def written(n):  # in the writer thread, once the batch is in the file
                nonlocal done
                done += n
                bar.update(n * bar_scale)

            def finish(staged):
                try:
                    columns = proc.process_async(staged)  # results may still be on their way (GPU)
                finally:
                    reader.release(staged.batch)
                appender.append(columns, on_written=functools.partial(written, len(staged)))

            def failed(exc, also):  # the first error stops the run and is re-raised; later ones are logged
                nonlocal error
                if error is None:
                    error = exc
                    stop.set(f"{type(exc).__name__}: {exc}")
                else:
                    log.warning("%s: %s", also, exc)

            pending = None  # staged (uploading) batch, reduced once the next one is staged
            try:
                for batch in reader:
                    staged = proc.stage(batch)  # upload of this batch overlaps the reduction of the last
                    if pending is not None:
                        last, pending = pending, None
                        finish(last)
                    pending = staged
                    if stop:
                        break
            except Exception as exc:  # finish what exists, then re-raise
                failed(exc, "")
            try:
                if pending is not None:  # read and staged: reduce it, also after a failure of the reader
                    last, pending = pending, None
                    finish(last)
            except Exception as exc:
                failed(exc, "the batch read before the failure could not be reduced")
            finally:
                reader.close()
                try:  # every reduced batch into the file before the end-of-run writes
                    appender.drain()
                except Exception as exc:
                    failed(exc, "writing a batch failed as well")
                finally:
                    appender.close()

            def end_failed(exc, what):  # after a full disk (its one line said so) only -v tells the rest
                if isinstance(error, OutputWriteError):
                    log.info("%s: %s", what, exc)
                else:
                    failed(exc, what)

            # the end-of-run writes: none into a sealed file (a write failed: it keeps the batches before)
            try:
                for name, pl in pipelines.items():
                    writer.write_static("Sums", pl.sum_results())
                    writer.set_attrs(name, {"damaged_events": proc.damaged[name]})
                    if pl.sums.selected_events:
                        writer.set_attrs(name, {"sums_selected_events": json.dumps(pl.sums.selected_events)})
                once = source.context_once()
                if once:
                    writer.write_static("/", once)
            except OutputWriteError as exc:
                end_failed(exc, "the run sums were not written")
            for k, v in sorted(proc.context_missing.items()):
                if v:
                    log.warning("context %s: %d of %d events had no value (NaN or missing)", k, v, done)
            complete = (end is None or done == end - start) and error is None and not stop
            try:  # "complete" last, on its own: a file whose other writes failed never claims it
                writer.set_attrs(
                    "/",
                    {
                        "events": done,
                        "damaged": json.dumps(proc.damaged),
                        "context_missing": json.dumps(proc.context_missing),
                        "truncated_events": writer.truncated_events,
                        "truncated": json.dumps(writer.truncated),
                    },
                )
                writer.set_attrs("/", {"complete": complete})
                writer.close()
            except OutputWriteError as exc:
                end_failed(exc, "the end-of-run attributes were not written")
                complete = False
    total, damaged = done, dict(proc.damaged)
    truncated_events, truncated = writer.truncated_events, dict(writer.truncated)
    if cube is not None:  # this rank's cube: the cube itself, or its part that rank 0 adds up
        where = cube_path(cfg, out_path)
        cube.write(
            where if comm.size == 1 else cube_part_path(where, comm.rank),
            source=str(out_path),
            part=comm.size > 1,
            complete=complete,
        )
    if comm.size > 1:
        all_there = comm.barrier(timeout=BARRIER_TIMEOUT_S)
        if comm.rank == 0 and cube is not None:
            where = cube_path(cfg, out_path)
            parts = [cube_part_path(where, r) for r in range(comm.size)]
            merge_cube_parts(
                where,
                [p for p in parts if p.exists()],
                cfg.cube,
                source=str(out_path),
                complete=complete and all_there and all(p.exists() for p in parts),
            )
            for p in parts:  # written by this run's ranks just now (checked and locked as ours at the start)
                p.unlink(missing_ok=True)
        if comm.rank == 0:
            parts = [part_path(out_path, r) for r in range(comm.size)]
            if not all_there:
                log.warning("not every rank finished within %.0f s; master over the parts on disk", BARRIER_TIMEOUT_S)
            try:
                info = build_master(out_path, [p for p in parts if p.exists()])
            except (OSError, OutputWriteError) as exc:  # e.g. the disk that filled: the parts hold the events
                if error is None:
                    raise
                log.warning("the master %s was not written: %s", out_path, exc)
                info = {"events": total, "damaged": damaged, "complete": False}
            total, damaged = info["events"], info["damaged"]
            truncated_events = info.get("truncated_events", truncated_events)
            truncated = info.get("truncated", truncated)
            complete = complete and info["complete"]
    if error is not None:
        raise error
    dt = time.perf_counter() - t0
    return RunSummary(
        out_path,
        total,
        dt,
        backend.name,
        interrupted=not complete,
        rank=comm.rank,
        ranks=comm.size,
        local_events=done,
        damaged=damaged,
        reason=stop.reason,
        device_times=proc.times,
        truncated_events=truncated_events,
        truncated=truncated,
        cube=None if cube is None else cube_path(cfg, out_path),
        cube_info={} if cube is None else dict(cube.info),
    )


def config_json(cfg) -> str:
    return json.dumps(json.loads(cfg.model_dump_json()), indent=1)
