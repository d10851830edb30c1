"""One batch through the detectors' pipelines: stage (upload), reduce, results to host, damage filled.

The same code runs on both backends. On CuPy a batch goes through three streams::

    copy stream:     H2D batch k+1 (pinned host -> device ring slot)                ─┐
    compute stream:  wait for batch k's copy; calibrate + reduce batch k; pack the   │ overlap
                     results into one device buffer                                  │
    results stream:  wait for batch k-1's reduction; D2H its packed results          ─┘
                     (into pinned host memory, one copy)

:meth:`BatchProcessor.stage` starts the upload and returns at once; :meth:`BatchProcessor.process_async`
reduces a staged batch and returns :class:`PendingColumns` at once (the results copy runs on its own
stream); :meth:`PendingColumns.result` waits for them (the run loop's writer thread does). The run loop
stages batch k+1 before it reduces batch k, so the copy engines move the next batch in and the last
results out while the SMs work on this one. A slot is reused for an upload only after the reduction that
read it (stream-ordered by a CUDA event). Each detector has two device slots of
``(batch_size, panels, rows, cols)`` raw, allocated once and reused, so no allocation happens per batch.
CUDA events around each copy and each reduction give :class:`DeviceTimes` (transfer and device time
separately, summed over the run). On NumPy staging only zeroes damaged rows (no copy).

Variable-size outputs (ragged droplets and photons: flat over the batch's items, with a per-event count)
pack like the others: their sizes are known on the host once the reduction has made them (the droplets'
padding layout reads how many fit; ragged photons read their number back, one extra device->host wait per
batch), so the batch still comes back in one copy. The columns say which outputs are per item
(:class:`~gpusmall.io.writer.Columns`; ``sparse_columns`` of the function trees).

Damaged events (``RawBatch.damaged[det]``): their raw rows are zeroed before upload, they are left out
of the run sums, and their result rows are overwritten with NaN (floats), -1 (signed integers) or
0 (unsigned integers, booleans); ``/<det>/damaged`` is 1 there. Their items are dropped from per-item
outputs and their counts are 0 (:func:`fill_damaged`).

GPU out of memory: a reduction that raises ``OutOfMemoryError`` (CuPy's, found by class name) is
retried in halves; the smaller size is kept for the rest of the run (logged). If the device slots
themselves cannot be allocated, batches are uploaded chunk by chunk on the compute stream instead.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass, field

import numpy as np

from ..backend import Backend
from ..funcs.base import EventInfo, Frames
from ..funcs.droplet import sparse_columns
from ..io.writer import Columns
from ..sources.context import is_missing
from .pipeline import DetectorPipeline

log = logging.getLogger(__name__)


def is_out_of_memory(exc: BaseException) -> bool:
    """CuPy's ``OutOfMemoryError`` (or a CUDA allocation failure), recognised without importing cupy."""
    return type(exc).__name__ == "OutOfMemoryError" or "cudaErrorMemoryAllocation" in str(exc)


def event_time(timestamp_ns: np.ndarray) -> np.ndarray:
    """``/event_time`` of ``/timestamp`` (uint64 ns since the Unix epoch): uint64 ``(seconds << 32) |
    nanoseconds``, seconds since the Unix epoch, as LCLS-I small data files hold it (smalldata_tools'
    SmallDataAna reads ``event_time >> 32`` as POSIX seconds and the low 32 bits as nanoseconds)."""
    ts = np.asarray(timestamp_ns, dtype=np.uint64)
    sec, ns = np.divmod(ts, np.uint64(10**9))
    return (sec << np.uint64(32)) | ns


def event_columns(timestamp: np.ndarray, event_index: np.ndarray) -> dict[str, np.ndarray]:
    """The per-event datasets at the root of every result file (SPEC section 8):

    - ``timestamp`` (events,) uint64: ns since the Unix epoch, for every source (psana's packed time is
      converted by the psana source);
    - ``event_index`` (events,) int64: the event's index in the run;
    - ``event_time`` (events,) uint64: the same time as ``(unix seconds << 32) | ns`` (:func:`event_time`);
    - ``fiducials`` (events,) int64: the event index. LCLS-II has no 360 Hz fiducials, and psana's events
      give no pulse id to Python; SmallDataAna needs ``/fiducials`` for its filters and cubes (one entry
      per event), not its values.
    """
    ts = np.asarray(timestamp, dtype=np.uint64)
    idx = np.asarray(event_index, dtype=np.int64)
    return {"timestamp": ts, "event_index": idx, "event_time": event_time(ts), "fiducials": idx.copy()}


def fill_value(dtype) -> object:
    """What a damaged event's result holds: NaN for floats, -1 for signed ints, 0 otherwise."""
    dtype = np.dtype(dtype)
    if dtype.kind in "fc":
        return np.nan
    if dtype.kind == "i":
        return -1
    return 0


def fill_damaged(res: dict, damaged: np.ndarray, items: dict[str, tuple[str, str]]) -> None:
    """Damaged events' results, in place: per-event rows filled (:func:`fill_value`); per-item outputs
    (``items``: output -> (its per-event count, offset)) lose the damaged events' items, whose counts become 0
    (the offsets stay consistent: a damaged event has no items)."""
    counts = {c for c, _ in items.values()}
    for count in counts:
        c = np.asarray(res[count])
        keep = np.repeat(~damaged, c.astype(np.int64))
        for k, (cc, _) in items.items():
            if cc == count:
                res[k] = res[k][keep]
        c[damaged] = 0
    for k, v in res.items():
        if k not in items and k not in counts:
            v[damaged] = fill_value(v.dtype)


@dataclass
class DeviceTimes:
    """Where a run's time went on the GPU (seconds, summed over batches; zero on NumPy).

    ``h2d_s``: host->device copies of raw batches (copy stream); ``compute_s``: calibration,
    reduction and packing of the results (compute stream); ``d2h_s``: the results' copies back
    (results stream); ``h2d_bytes`` / ``d2h_bytes``: bytes copied each way. When the copies
    overlap the reductions, the run's wall time approaches ``max(h2d_s, compute_s)``, not their sum.
    """

    h2d_s: float = 0.0
    compute_s: float = 0.0
    d2h_s: float = 0.0
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    batches: int = 0

    @property
    def h2d_gb_per_s(self) -> float:
        return self.h2d_bytes / self.h2d_s / 1e9 if self.h2d_s > 0 else float("nan")

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "h2d_GB_per_s": self.h2d_gb_per_s}


@dataclass
class StagedBatch:
    """A batch on its way: host batch, per detector the raw to reduce (device or host) and damage."""

    batch: object
    raw: dict = field(default_factory=dict)  # name -> device view (events, ...) or host array, or None
    damaged: dict = field(default_factory=dict)  # name -> host bool (events,)
    copied: dict = field(default_factory=dict)  # name -> (start, end) CUDA events of its upload
    slot: dict = field(default_factory=dict)  # name -> device slot (turn) its raw is in

    def __len__(self) -> int:
        return len(self.batch)  # type: ignore[arg-type]


def pack_on_device(xp, arrays: dict):
    """(one uint8 device buffer holding every array's bytes, layout): largest item size first, so every
    array stays aligned when :func:`unpack` views it back. None for no arrays."""
    items = sorted(arrays.items(), key=lambda kv: -kv[1].dtype.itemsize)
    if not items:
        return None, []
    parts, layout = [], []
    for k, v in items:
        flat = xp.ascontiguousarray(v).reshape(-1)  # (ascontiguousarray makes a 0-d array 1-d: keep v.shape)
        parts.append(flat.view(xp.uint8))
        layout.append((k, v.shape, v.dtype, flat.nbytes))
    return xp.concatenate(parts), layout


def unpack(host: np.ndarray, layout, order) -> dict[str, np.ndarray]:
    """Host arrays viewed in the bytes of :func:`pack_on_device`'s buffer, in the key ``order``."""
    out, offset = {}, 0
    for k, shape, dtype, nbytes in layout:
        out[k] = host[offset : offset + nbytes].view(dtype).reshape(shape)
        offset += nbytes
    return {k: out[k] for k in order}


class PendingColumns:
    """The columns of a reduced batch, possibly still being copied from the GPU.

    :meth:`result` waits for them and returns the host arrays (damaged rows filled), once; any thread
    may call it (the run loop's writer thread does).
    """

    def __init__(self, finish):
        self._finish, self._columns = finish, None

    def result(self) -> dict[str, np.ndarray]:
        if self._finish is not None:
            self._columns, self._finish = self._finish(), None
        return self._columns


class BatchProcessor:
    """Runs the detectors' pipelines on host batches; overlaps uploads with compute; halves on GPU OOM."""

    def __init__(
        self,
        pipelines: dict[str, DetectorPipeline],
        backend: Backend,
        batch_size: int,
        event_functions: list = (),  # type: ignore[assignment]
        cube=None,
    ):
        self.pipelines, self.backend = pipelines, backend
        self.event_functions = list(event_functions)  # producer.event_functions.EventFunction
        self._grab = {d for ef in self.event_functions for d in ef.detectors}  # their detectors' frames are kept
        self.batch_size = batch_size
        # per detector: its ragged per-item outputs (count, offset) and smalldata_tools' names (hard links)
        self.sparse = {name: sparse_columns(getattr(pl, "functions", ())) for name, pl in pipelines.items()}
        self.chunk = batch_size
        gpu = backend.is_gpu
        self.copy_stream = backend.stream() if gpu else None
        self.compute_stream = backend.stream() if gpu else None
        self.results_stream = backend.stream() if gpu else None
        # Constants, bin maps and zeroed run sums were made on the legacy default stream, asynchronously
        # (cupy.asarray copies, fill kernels); the non-blocking streams above do not wait for it.
        backend.synchronize()
        self.damaged = {name: 0 for name in pipelines}
        self.context_missing: dict[str, int] = {}  # context name -> events without a value
        self.cube = cube  # producer.cube.RunCube or None
        self.times = DeviceTimes()
        self._slots: dict[str, list] = {}  # name -> two device raw buffers (batch_size, ...)
        self._slot_read: dict[tuple[str, int], object] = {}  # (name, turn) -> event: its last reduction ended
        self._turn = 0
        self._no_slots = False

    # -- staging ----------------------------------------------------------------------------------
    def _slot(self, name, raw):
        """This turn's device buffer for ``name`` (allocated on first use), or None when out of memory."""
        if self._no_slots:
            return None
        if name not in self._slots:
            try:
                with self.copy_stream:
                    self._slots[name] = [
                        self.backend.xp.empty((self.batch_size, *raw.shape[1:]), raw.dtype) for _ in range(2)
                    ]
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                log.warning("no room for two device batches of %s: uploading chunk by chunk", name)
                self._no_slots = True
                self._slots.clear()
                return None
        slots = self._slots[name]
        if slots[0].shape[1:] != raw.shape[1:] or slots[0].dtype != raw.dtype or len(raw) > self.batch_size:
            raise ValueError(
                f"detector {name}: batch of {raw.shape} {raw.dtype} does not fit the device slots "
                f"{slots[0].shape} {slots[0].dtype}"
            )
        return slots[self._turn]

    def stage(self, batch) -> StagedBatch:
        """Zero damaged rows and, on CuPy, start each detector's upload on the copy stream (returns at once).

        The host buffers of ``batch`` must stay untouched until :meth:`process` of this batch returned.
        """
        n = len(batch)
        staged = StagedBatch(batch)
        for name in self.pipelines:
            raw = batch.raw[name]
            damaged = np.asarray(batch.damaged.get(name, np.zeros(n, bool)), bool)
            if damaged.any():
                raw[damaged] = 0
            staged.damaged[name] = damaged
            if not self.backend.is_gpu:
                staged.raw[name] = raw
                continue
            slot = self._slot(name, raw)
            if slot is None:
                staged.raw[name] = None
                continue
            cp = self.backend.xp
            view = slot[:n]
            read = self._slot_read.pop((name, self._turn), None)
            if read is not None:  # the reduction that read this slot last must be done with it
                self.copy_stream.wait_event(read)  # type: ignore[union-attr]
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record(self.copy_stream)
            view.set(np.ascontiguousarray(raw), stream=self.copy_stream)
            end.record(self.copy_stream)
            staged.raw[name], staged.copied[name] = view, (start, end)
            staged.slot[name] = self._turn
            self.times.h2d_bytes += raw.nbytes
        self._turn ^= 1
        return staged

    # -- reduction --------------------------------------------------------------------------------
    def _run_one(self, name, raw, damaged, copied=None, upload=False, events=None, grab=None, cube_ids=None):
        """Reduce ``raw`` (events, ...) of detector ``name``: a staged array, or (``upload``) a host array
        to upload here on the compute stream. Returns (a function giving the host results, the CUDA event
        that ends the reduction or None); on CuPy the results are still being copied when it returns."""
        pl = self.pipelines[name]
        keep = ~damaged if damaged.any() else None  # damaged events stay out of the run sums
        if self.compute_stream is None:
            res = {
                k: np.array(self.backend.to_host(v), copy=True)
                for k, v in pl.process(raw, keep, events, grab, cube_ids).items()
            }
            return (lambda: res), None
        cp = self.backend.xp
        with self.compute_stream:
            if copied is not None:
                self.compute_stream.wait_event(copied[1])
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record(self.compute_stream)
            if upload:  # no device slot: upload here, on the compute stream
                d = cp.empty(raw.shape, raw.dtype)
                d.set(np.ascontiguousarray(raw), stream=self.compute_stream)
                self.times.h2d_bytes += raw.nbytes
                raw = d
            res = pl.process(raw, keep, events, grab, cube_ids)
            packed, layout = pack_on_device(cp, res)
            end.record(self.compute_stream)
        if packed is None:
            end.synchronize()
            return (lambda: {}), end
        # one device->host copy on the results stream, into pinned memory, while the next batch reduces
        host = self.backend.pinned_empty((packed.nbytes,), np.uint8)
        self.results_stream.wait_event(end)
        sent, fetched = cp.cuda.Event(), cp.cuda.Event()
        sent.record(self.results_stream)
        cp.asnumpy(packed, stream=self.results_stream, out=host, blocking=False)
        fetched.record(self.results_stream)
        order = list(res)

        def finish(packed=packed):  # holds the device buffer until its copy is done (not back to the pool)
            fetched.synchronize()
            self.times.compute_s += cp.cuda.get_elapsed_time(start, end) / 1e3
            self.times.d2h_s += cp.cuda.get_elapsed_time(sent, fetched) / 1e3
            self.times.d2h_bytes += host.nbytes
            return unpack(host, layout, order)

        return finish, end

    def process_async(self, staged) -> PendingColumns:
        """Reduce a staged batch (or a RawBatch, staged here); the results may still be on their way.

        When this returns the batch's host buffers may be reused (its uploads are complete) and its
        device slots are free for the upload after next once the reduction ended (stream-ordered).
        """
        if not isinstance(staged, StagedBatch):
            staged = self.stage(staged)
        batch = staged.batch
        n = len(batch)
        # the host batch goes back to the reader when this returns: keep copies of what the columns need
        timestamp, event_index = np.array(batch.timestamp, copy=True), np.array(batch.event_index, copy=True)
        context = {k: np.array(v, copy=True) for k, v in getattr(batch, "context", {}).items()}
        for k, v in context.items():
            self.context_missing[k] = self.context_missing.get(k, 0) + int(is_missing(k, v).sum())
        info = EventInfo(timestamp, event_index, context)  # what functions and user functions see of the events
        cube_rows = None if self.cube is None else self.cube.rows(context, staged.damaged)
        grabbed: dict[str, list] = {name: [] for name in self._grab}  # (frames, outputs) blocks for the event functions
        finishers = {}
        for name in self.pipelines:
            damaged = staged.damaged[name]
            dev = staged.raw[name]
            copied = staged.copied.get(name)
            source = batch.raw[name] if dev is None else dev
            pieces, end = [], None
            start = 0
            while start < n:
                stop = min(n, start + self.chunk)
                try:
                    piece, end = self._run_one(
                        name,
                        source[start:stop],
                        damaged[start:stop],
                        copied,
                        upload=dev is None,
                        events=info[start:stop],
                        grab=grabbed.get(name),
                        cube_ids=None if cube_rows is None else cube_rows[:, start:stop],
                    )
                    pieces.append(piece)
                    start = stop
                except Exception as exc:
                    if not is_out_of_memory(exc) or self.chunk <= 1:
                        raise
                    self.chunk = max(1, (stop - start) // 2)
                    log.warning(
                        "GPU out of memory with %d events of %s: retrying in batches of %d",
                        stop - start,
                        name,
                        self.chunk,
                    )
                    print(f"gpusmall: GPU out of memory; batch size now {self.chunk}", file=sys.stderr)
                    try:
                        self.backend.xp.get_default_memory_pool().free_all_blocks()
                    except AttributeError:
                        pass
            if copied is not None:
                copied[1].synchronize()  # normally long done: the host buffer may be refilled after this
                self.times.h2d_s += self.backend.xp.cuda.get_elapsed_time(*copied) / 1e3
            if name in staged.slot and end is not None:
                self._slot_read[(name, staged.slot[name])] = end
            self.damaged[name] += int(damaged.sum())
            finishers[name] = (pieces, np.array(damaged, copy=True))
        self.times.batches += 1
        event_outputs = self._event_functions(grabbed, info, staged.damaged)

        def finish():
            columns = Columns(event_columns(timestamp, event_index))
            columns.update(context)
            columns.update(event_outputs)
            for name, (pieces, damaged) in finishers.items():
                parts = [p() for p in pieces]
                # (pieces of a batch halved on OOM: per-item outputs are event after event, so they concatenate)
                res = parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
                sparse = self.sparse[name]
                if damaged.any():
                    fill_damaged(res, damaged, sparse.items)
                for k, v in res.items():
                    columns[f"{name}/{k}"] = v
                columns[f"{name}/damaged"] = damaged.astype(np.uint8)
                columns[f"damage/{name}"] = (~damaged).astype(np.uint8)  # smalldata_tools': 1 = detector there
                for k, (count, offset) in sparse.items.items():
                    columns.ragged[f"{name}/{k}"] = (f"{name}/{count}", f"{name}/{offset}")
                for k, target in sparse.links.items():
                    columns.links[f"{name}/{k}"] = f"{name}/{target}"
            if cube_rows is not None:
                self.cube.add_outputs(cube_rows, columns)
            return columns

        return PendingColumns(finish)

    def _event_functions(self, grabbed: dict, info: EventInfo, damaged: dict) -> dict[str, np.ndarray]:
        """Host columns ``<name>_<key>`` of the event functions for the batch whose detectors' (frames,
        outputs) blocks are in ``grabbed``; events damaged in any of a function's detectors are filled."""
        if not self.event_functions:
            return {}
        from ..funcs.python import UserBatch

        xp = self.backend.xp
        batches = {}
        for det, blocks in grabbed.items():
            frames, out = blocks[0]
            if len(blocks) > 1:  # threads or an out-of-memory split: one batch again
                frames = Frames(
                    xp.concatenate([b[0].data for b in blocks]), xp.concatenate([b[0].good for b in blocks])
                )
                out = {k: xp.concatenate([b[1][k] for b in blocks]) for k in out}
            frames.events = info
            batches[det] = UserBatch.of(self.pipelines[det].ctx, frames, out)
        columns = {}
        for ef in self.event_functions:
            if self.compute_stream is not None:
                with self.compute_stream:
                    res = ef({d: batches[d] for d in ef.detectors}, info, xp)
            else:
                res = ef({d: batches[d] for d in ef.detectors}, info, xp)
            bad = np.zeros(len(info.event_index), bool)
            for d in ef.detectors:
                bad |= np.asarray(damaged[d], bool)
            for k, v in res.items():
                host = np.array(self.backend.to_host(v), copy=True)
                if bad.any():
                    host[bad] = fill_value(host.dtype)
                columns[f"{ef.name}_{k}"] = host
        return columns

    def process(self, staged) -> dict[str, np.ndarray]:
        """A staged batch (or a RawBatch, staged here) -> columns to append (host arrays), damaged rows filled."""
        return self.process_async(staged).result()
