"""The cube during the run (SPEC 10): its cost per ePix10k2M batch beside the calibration (pytest-benchmark).

Run:  GPUSMALL_BACKEND=numpy|cupy python -m pytest benchmarks/bench_cube.py --benchmark-only
Optional: GPUSMALL_BENCH_EVENTS (default 64) events per batch, GPUSMALL_BENCH_PANELS (16), GPUSMALL_BENCH_BINS (50).

Cases (events/s and GB/s of the float32 frames read in ``extra_info``):
* ``calib_cm``: raw -> calibrated with the median common mode (rows, cols), the demo's calibration;
* ``cube_frames``: the calibrated batch into a cube of BINS bins by a scalar (each event's bin drawn at random:
  the worst case, every event in another bin), frame sums only;
* ``cube_frames_square``: the same with the squares;
* ``cube_steps``: a step scan (the whole batch in one or two steps).
The cube's cost per event over the calibration's is ``cube_frames`` time / ``calib_cm`` time.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from gpusmall.backend import get_backend
from gpusmall.calib import Calibrator
from gpusmall.calib.common_mode import MedianCommonMode
from gpusmall.detectors import get_model
from gpusmall.detectors.constants import Constants
from gpusmall.producer.cube import DetectorCube

MODEL = get_model("epix10ka")
EVENTS = int(os.environ.get("GPUSMALL_BENCH_EVENTS", 64))
PANELS = int(os.environ.get("GPUSMALL_BENCH_PANELS", 16))
BINS = int(os.environ.get("GPUSMALL_BENCH_BINS", 50))
SHAPE = (EVENTS, PANELS, 352, 384)


@pytest.fixture(scope="module")
def backend():
    return get_backend(None)


@pytest.fixture(scope="module")
def case(backend):
    """(raw on device, calibrator, calibrated frames on device)."""
    rng = np.random.default_rng(0)
    n = MODEL.n_gains
    ped = rng.normal(2800, 100, (n, *SHAPE[1:])).round().astype(np.float32)
    gain = rng.normal(16.4, 0.3, (n, *SHAPE[1:])).astype(np.float32)
    raw = np.clip(np.rint(ped[3][None] + rng.normal(0, 3, SHAPE).astype(np.float32)), 0, 0x3FFF).astype(np.uint16)
    mask = rng.random(SHAPE[1:]) > 0.001
    cm = MedianCommonMode(MODEL, (352, 384), ["rows", "cols"], backend=backend)
    cal = Calibrator(MODEL, Constants(pedestal=ped, gain=gain), mask, backend, common_mode=cm)
    raw_dev = backend.to_device(raw)
    return raw_dev, cal, cal(raw_dev).data


def _run(benchmark, backend, fn):
    def once():
        out = fn()
        backend.synchronize()
        return out

    once()  # kernels compiled, accumulators touched outside the timing
    if backend.is_gpu:
        return benchmark(once)
    return benchmark.pedantic(once, rounds=3, iterations=1, warmup_rounds=0)


def _report(benchmark):
    mean = benchmark.stats.stats.mean
    nbytes = EVENTS * int(np.prod(SHAPE[1:])) * 4
    benchmark.extra_info["events_per_s"] = EVENTS / mean
    benchmark.extra_info["GB_per_s"] = nbytes / mean / 1e9
    benchmark.extra_info["ms_per_event"] = 1e3 * mean / EVENTS
    print(f"\n{benchmark.name}: {EVENTS / mean:.1f} events/s, {1e3 * mean / EVENTS:.2f} ms/event")


def test_calib_cm(benchmark, backend, case):
    raw, cal, _ = case
    _run(benchmark, backend, lambda: cal(raw))
    _report(benchmark)


@pytest.mark.parametrize("square", [False, True], ids=["cube_frames", "cube_frames_square"])
def test_cube(benchmark, backend, case, square):
    _, _, frames = case
    cube = DetectorCube(SHAPE[1:], backend, splits=1, rows=BINS, square=square)
    ids = np.random.default_rng(1).integers(0, BINS, (1, EVENTS))
    _run(benchmark, backend, lambda: cube.add(frames, ids))
    _report(benchmark)


def test_cube_steps(benchmark, backend, case):
    _, _, frames = case
    cube = DetectorCube(SHAPE[1:], backend, splits=1, rows=4, square=False)
    ids = (np.arange(EVENTS) >= EVENTS // 2).astype(np.int64)[None]
    _run(benchmark, backend, lambda: cube.add(frames, ids))
    _report(benchmark)
