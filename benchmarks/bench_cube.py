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
import sys
from pathlib import Path

import numpy as np
import pytest

from gpusmall.calib import Calibrator
from gpusmall.calib.common_mode import MedianCommonMode
from gpusmall.producer.cube import DetectorCube

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the same synthetic ePix10k2M batch as the calibration benchmark (its fixtures ``backend`` and ``case``)
from bench_calib import EVENTS, MODEL, SHAPE, backend, case  # noqa: E402, F401

BINS = int(os.environ.get("GPUSMALL_BENCH_BINS", "50"))


@pytest.fixture(scope="module")
def calibrated(backend, case):  # noqa: F811
    """(raw on device, calibrator with the median rows+cols common mode, calibrated frames on device)."""
    raw, _, constants, mask = case
    cm = MedianCommonMode(MODEL, (352, 384), ["rows", "cols"], backend=backend)
    cal = Calibrator(MODEL, constants, mask, backend, common_mode=cm)
    return raw, cal, cal(raw).data


def _run(benchmark, backend, fn):  # noqa: F811  (the fixture is passed in)
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


def test_calib_cm(benchmark, backend, calibrated):  # noqa: F811
    raw, cal, _ = calibrated
    _run(benchmark, backend, lambda: cal(raw))
    _report(benchmark)


@pytest.mark.parametrize("square", [False, True], ids=["cube_frames", "cube_frames_square"])
def test_cube(benchmark, backend, calibrated, square):  # noqa: F811
    _, _, frames = calibrated
    cube = DetectorCube(SHAPE[1:], backend, splits=1, rows=BINS, square=square)
    ids = np.random.default_rng(1).integers(0, BINS, (1, EVENTS))
    _run(benchmark, backend, lambda: cube.add(frames, ids))
    _report(benchmark)


def test_cube_steps(benchmark, backend, calibrated):  # noqa: F811
    _, _, frames = calibrated
    cube = DetectorCube(SHAPE[1:], backend, splits=1, rows=4, square=False)
    ids = (np.arange(EVENTS) >= EVENTS // 2).astype(np.int64)[None]
    _run(benchmark, backend, lambda: cube.add(frames, ids))
    _report(benchmark)
