"""Calibration and common-mode throughput per ePix10k2M batch (pytest-benchmark; not part of tests/).

Run:  GPUSMALL_BACKEND=numpy|cupy python -m pytest benchmarks/bench_calib.py --benchmark-only
Optional: GPUSMALL_BENCH_EVENTS (default 64) events per batch, GPUSMALL_BENCH_PANELS (default 16).

Each case reports events/s and GB/s (raw uint16 in + float32 out) in ``extra_info``:
* ``calib``: raw -> calibrated, no common mode (one fused kernel on CuPy);
* ``calib_cm``: raw -> pedestal -> median common mode (rows, cols; high ranges) -> scaled output;
* ``per_event_masked``: the straightforward per-event NumPy version (psana-like masked-array medians;
  ``benchmarks/reference_pipeline.py``);
* ``d2d_copy`` (CuPy only): a device-to-device copy of the same bytes, the memory-bandwidth ceiling.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from gpusmall.backend import get_backend
from gpusmall.calib import Calibrator
from gpusmall.calib.common_mode import MedianCommonMode
from gpusmall.detectors import get_model
from gpusmall.detectors.constants import Constants

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_pipeline import per_event_masked  # noqa: E402  (benchmarks/reference_pipeline.py)

MODEL = get_model("epix10ka")
EVENTS = int(os.environ.get("GPUSMALL_BENCH_EVENTS", 64))
PANELS = int(os.environ.get("GPUSMALL_BENCH_PANELS", 16))
SHAPE = (EVENTS, PANELS, 352, 384)


@pytest.fixture(scope="module")
def backend():
    return get_backend(None)


@pytest.fixture(scope="module")
def case(backend):
    """(raw on device, host raw, constants, mask): pedestal + noise + bank/row offsets, 1% switched."""
    rng = np.random.default_rng(0)
    n = MODEL.n_gains
    ped = rng.normal(2800, 100, (n, *SHAPE[1:])).round().astype(np.float32)
    gain = rng.normal(16.4, 0.3, (n, *SHAPE[1:])).astype(np.float32)
    raw = (ped[3][None] + rng.normal(0, 3, SHAPE).astype(np.float32)
           + rng.normal(0, 8, (*SHAPE[:3], 1)).astype(np.float32))
    raw = np.clip(np.rint(raw), 0, 0x3FFF).astype(np.uint16)
    switched = rng.random(SHAPE) < 0.01
    raw[switched] |= np.uint16(1 << 14)
    mask = rng.random(SHAPE[1:]) > 0.001
    return backend.to_device(raw), raw, Constants(pedestal=ped, gain=gain), mask


def _report(benchmark, nbytes):
    mean = benchmark.stats.stats.mean
    benchmark.extra_info["events_per_s"] = EVENTS / mean
    benchmark.extra_info["GB_per_s"] = nbytes / mean / 1e9
    print(f"\n{benchmark.name}: {EVENTS / mean:.1f} events/s, {nbytes / mean / 1e9:.2f} GB/s")


def _run(benchmark, backend, fn):
    def once():
        out = fn()
        backend.synchronize()
        return out

    if backend.is_gpu:
        once()  # compile kernels outside the timing
        return benchmark(once)
    return benchmark.pedantic(once, rounds=2, iterations=1, warmup_rounds=0)


def test_calib(benchmark, backend, case):
    raw, host, c, mask = case
    cal = Calibrator(MODEL, c, mask, backend)
    _run(benchmark, backend, lambda: cal(raw))
    _report(benchmark, host.nbytes + host.size * 4)


def test_calib_cm(benchmark, backend, case):
    raw, host, c, mask = case
    cm = MedianCommonMode(MODEL, (352, 384), ["rows", "cols"], backend=backend)
    cal = Calibrator(MODEL, c, mask, backend, common_mode=cm)
    _run(benchmark, backend, lambda: cal(raw))
    _report(benchmark, host.nbytes + host.size * 4)


def test_per_event_masked(benchmark, backend, case):
    _, host, c, mask = case
    benchmark.pedantic(lambda: per_event_masked(host, c, mask), rounds=1, iterations=1)
    _report(benchmark, host.nbytes + host.size * 4)


def test_d2d_copy(benchmark, backend, case):
    if not backend.is_gpu:
        pytest.skip("device-to-device copy: CuPy only")
    xp = backend.xp
    raw = case[0]
    n = (raw.nbytes + raw.size * 4) // 2  # bytes read + written = raw in + float32 out
    src = xp.zeros(n, xp.uint8)
    dst = xp.empty_like(src)
    _run(benchmark, backend, lambda: dst.__setitem__(Ellipsis, src))
    _report(benchmark, raw.nbytes + raw.size * 4)
