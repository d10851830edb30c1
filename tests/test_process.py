"""BatchProcessor's two-stream staging, checked on the CPU with a stand-in for CuPy's stream API.

The stand-in copies at once (so it cannot show overlap), but it runs the same orchestration as a GPU:
device ring slots, copies on the copy stream, the compute stream waiting for them, CUDA-event timing,
the fall-back when the slots do not fit. A batch reduced from the wrong slot (the next batch's data)
or a slot reused too early shows up as wrong sums.
"""

from __future__ import annotations

import numpy as np
import pytest
from fake_cupy import fake_cuda

from gpusmall.backend import Backend
from gpusmall.producer.process import BatchProcessor, StagedBatch
from gpusmall.sources.base import RawBatch


def fake_gpu_backend(log, oom_slots=False) -> Backend:
    b = Backend("numpy")
    xp, stream = fake_cuda(log, oom_slots)
    b.name, b.xp, b.description = "cupy", xp, "fake cupy (CPU)"
    b.stream = stream
    b.synchronize = lambda: None
    b.pinned_empty = lambda shape, dtype: np.empty(shape, dtype)
    return b


class SumPipeline:
    """Per-event sum of the raw frames, and where the frames lived (device slot or host)."""

    def __init__(self):
        self.sums = []
        self.seen = []

    def process(self, raw, keep=None, events=None, frames_out=None, cube_ids=None):
        self.seen.append(type(raw).__name__)
        return {"sum": np.asarray(raw, np.float64).sum(axis=(1, 2, 3))}


def batches(n_batches, size, shape=(1, 4, 5)):
    rng = np.random.default_rng(0)
    for k in range(n_batches):
        n = size if k < n_batches - 1 else size - 1  # a short last batch
        raw = rng.integers(0, 1000, (n, *shape)).astype(np.uint16)
        yield RawBatch(
            np.arange(n, dtype=np.uint64) + 100 * k,
            np.arange(n, dtype=np.int64) + size * k,
            {"det": raw},
            {"det": np.zeros(n, bool)},
        )


def run_like_reduce_run(proc, source):
    """The run loop's order: stage batch k+1, then reduce batch k."""
    out, pending = [], None
    for batch in source:
        staged = proc.stage(batch)
        if pending is not None:
            out.append((pending.batch, proc.process(pending)))
        pending = staged
    out.append((pending.batch, proc.process(pending)))
    return out


def test_overlapped_staging_reduces_each_batch_from_its_own_slot():
    log = []
    pl = SumPipeline()
    proc = BatchProcessor({"det": pl}, fake_gpu_backend(log), batch_size=6)
    done = run_like_reduce_run(proc, batches(5, 6))
    for batch, cols in done:
        np.testing.assert_array_equal(cols["det/sum"], batch.raw["det"].astype(np.float64).sum(axis=(1, 2, 3)))
        np.testing.assert_array_equal(cols["timestamp"], batch.timestamp)
    assert set(pl.seen) == {"FakeDeviceArray"}  # reduced from the device slots, not from host memory
    assert ("wait", "compute", "copy") in log  # the compute stream waits for the copy stream
    assert ("wait", "results", "compute") in log and ("d2h", "results") in log  # results copied on their stream
    # an upload into a slot waits (on the GPU) for the reduction that read the slot before
    assert ("wait", "copy", "compute") in log
    t = proc.times
    assert t.batches == 5 and t.h2d_bytes == sum(b.raw["det"].nbytes for b, _ in done)
    assert t.h2d_s == pytest.approx(5 * 2e-3) and t.compute_s == pytest.approx(5 * 2e-3)
    assert t.d2h_s == pytest.approx(5 * 2e-3) and t.d2h_bytes == sum(8 * len(b) for b, _ in done)


def test_results_collected_a_batch_later_as_the_writer_thread_does():
    """process_async returns before the results are on the host; collected after the next batch was
    reduced (and its host buffers reused by the reader), every batch still has its own numbers."""
    log = []
    pl = SumPipeline()
    proc = BatchProcessor({"det": pl}, fake_gpu_backend(log), batch_size=6)
    buffers = [np.zeros((6, 1, 4, 5), np.uint16) for _ in range(2)]  # the reader's two host buffers
    want, pending, got = [], [], []
    for k, batch in enumerate(batches(5, 6)):
        buf = buffers[k % 2][: len(batch)]
        buf[...] = batch.raw["det"]
        b = RawBatch(batch.timestamp.copy(), batch.event_index.copy(), {"det": buf}, batch.damaged)
        want.append((batch.timestamp.copy(), batch.raw["det"].astype(np.float64).sum(axis=(1, 2, 3))))
        pending.append(proc.process_async(proc.stage(b)))
        if len(pending) == 2:
            got.append(pending.pop(0).result())
        b.timestamp[:] = 0  # the reader refills the buffer of the batch just reduced
    got += [p.result() for p in pending]
    for (ts, sums), cols in zip(want, got):
        np.testing.assert_array_equal(cols["timestamp"], ts)
        np.testing.assert_array_equal(cols["det/sum"], sums)


def test_slots_that_do_not_fit_fall_back_to_uploads_per_chunk():
    log = []
    pl = SumPipeline()
    proc = BatchProcessor({"det": pl}, fake_gpu_backend(log, oom_slots=True), batch_size=6)
    done = run_like_reduce_run(proc, batches(3, 6))
    for batch, cols in done:
        np.testing.assert_array_equal(cols["det/sum"], batch.raw["det"].astype(np.float64).sum(axis=(1, 2, 3)))
    assert proc._no_slots and proc.times.h2d_bytes == sum(b.raw["det"].nbytes for b, _ in done)


def test_damaged_rows_zeroed_before_upload_and_filled_after():
    log = []
    proc = BatchProcessor({"det": SumPipeline()}, fake_gpu_backend(log), batch_size=4)
    raw = np.full((4, 1, 2, 2), 7, np.uint16)
    bad = np.array([False, True, False, False])
    staged = proc.stage(RawBatch(np.arange(4, dtype=np.uint64), np.arange(4), {"det": raw}, {"det": bad}))
    assert isinstance(staged, StagedBatch) and not staged.raw["det"][1].any()
    cols = proc.process(staged)
    assert np.isnan(cols["det/sum"][1]) and cols["det/sum"][0] == 28
    np.testing.assert_array_equal(cols["det/damaged"], bad.astype(np.uint8))
    assert proc.damaged["det"] == 1


def test_numpy_backend_stages_without_copies():
    pl = SumPipeline()
    proc = BatchProcessor({"det": pl}, Backend("numpy"), batch_size=6)
    done = run_like_reduce_run(proc, batches(3, 6))
    for batch, cols in done:
        np.testing.assert_array_equal(cols["det/sum"], batch.raw["det"].astype(np.float64).sum(axis=(1, 2, 3)))
    assert set(pl.seen) == {"ndarray"} and proc.times.h2d_bytes == 0


def test_stage_refuses_a_batch_larger_than_the_slots():
    proc = BatchProcessor({"det": SumPipeline()}, fake_gpu_backend([]), batch_size=2)
    with pytest.raises(ValueError, match="detector det"):
        proc.stage(next(batches(1, 4)))


def test_results_packed_come_back_in_one_copy_aligned():
    """Results of mixed dtypes and shapes come back in one copy, equal, aligned, in their key order."""
    from fake_cupy import strict_cupy

    from gpusmall.producer.process import pack_on_device, unpack

    def gather_to_host(xp, arrays):
        packed, layout = pack_on_device(xp, arrays)
        return {} if packed is None else unpack(xp.asnumpy(packed), layout, arrays)

    rng = np.random.default_rng(0)
    host = {
        "flag": rng.random(5) > 0.5,
        "n": np.int32(7),
        "small": np.arange(3, dtype=np.int8),
        "img": rng.normal(size=(4, 6)).astype(np.float32)[:, ::2],
        "sum": rng.normal(size=(2, 3)),
        "none": np.zeros((0, 4), np.int64),
        "c": np.array([1 + 2j], np.complex128),
    }
    transfers = []
    xp = strict_cupy(transfers)
    dev = {k: xp.asarray(v) for k, v in host.items()}
    transfers.clear()
    out = gather_to_host(xp, dev)
    assert [k for k, _ in transfers] == ["d2h"]
    assert list(out) == list(host)
    for k, v in host.items():
        assert isinstance(out[k], np.ndarray) and out[k].flags.aligned, k
        assert out[k].dtype == np.asarray(v).dtype and out[k].shape == np.shape(v), k
        np.testing.assert_array_equal(out[k], v, err_msg=k)
    assert gather_to_host(xp, {}) == {}
