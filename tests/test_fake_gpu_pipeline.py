"""The whole demo function set through the CuPy code paths, on the CPU.

A stand-in backend takes every GPU branch: ``is_gpu`` is True, ``xp`` is not NumPy (so the CuPy-only
branches run too), kernels are the CUDA sources themselves compiled for the CPU (``tests/cuda_cpu``),
launched through the checks of ``test_kernel_launches``, ``cupyx`` is
replaced by SciPy with CuPy's restrictions where we know them (``scatter_min`` dtypes, labels numbered
in another order), and streams/events are the stand-ins of ``test_process``. The batch goes through
``BatchProcessor`` (two-stream staging) and must give the NumPy backend's numbers. What this cannot see:
the GPU itself (compilation is checked by ``test_kernels_compile``, numbers on a GPU by
``test_pipeline_backends`` with ``GPUSMALL_BACKEND=cupy``).
"""

from __future__ import annotations

import types
from collections import Counter

import numpy as np
import pytest
from fake_cupy import fake_cuda, install_fake_cupyx, numpy_as_cupy, strict_cupy
from test_kernel_launches import FakeGpu

from gpusmall.backend import Backend
from gpusmall.cli import demo_config_dict
from gpusmall.producer.config import validate_config
from gpusmall.producer.pipeline import DetectorPipeline, make_pipelines
from gpusmall.producer.process import BatchProcessor
from gpusmall.sources.sim import SimSource


class FakeGpuXp(FakeGpu):
    """FakeGpu whose ``xp`` is not NumPy and has CuPy's streams and events."""

    def __init__(self, kernels="compiled"):
        super().__init__(kernels)
        cuda_parts, self.stream = fake_cuda([])
        self.xp = numpy_as_cupy(cuda_parts)


class FakeGpuStrict(FakeGpu):
    """FakeGpu whose ``xp`` follows CuPy's rules (``fake_cupy.strict_cupy``): device arrays do not turn into
    NumPy arrays by themselves, host arrays do not mix into device arithmetic, and every way back to the
    host is logged in ``transfers``."""

    def __init__(self, kernels="compiled", transfers=None):
        super().__init__(kernels)
        self.transfers = [] if transfers is None else transfers
        cuda_parts, self.stream = fake_cuda([])
        self.xp = strict_cupy(
            self.transfers,
            extra=types.SimpleNamespace(
                cuda=cuda_parts.cuda, get_default_memory_pool=cuda_parts.get_default_memory_pool
            ),
        )

    to_host = Backend.to_host


def demo_on(backend, shape=(2, 352, 384), events=6, batch=4, per_batch=None):
    """(results, sums, processor) of the demo set over ``events`` simulated events in batches of ``batch``;
    with ``per_batch`` (a list) and a backend that logs ``transfers``, each batch's transfers are appended."""
    data = demo_config_dict()
    det = data["detectors"]["epix10k2m"]
    det["shape"] = list(shape)
    det["functions"][0]["bounds"] = [[1, 2], [100, 200], [100, 300]]
    det["functions"][1]["bounds"] = [[0, 1], [0, 352], [0, 384]]
    det["functions"].append({"type": "acf", "name": "acf", "window": 9})
    det["functions"].append({"type": "photon_count", "adu_per_photon": 156})
    data["source"]["events"] = events
    cfg = validate_config(data)
    src = SimSource(
        events, {"epix10k2m": {"type": "epix10ka", "shape": tuple(shape)}}, seed=2, simulate=cfg.source.simulate
    )
    pl = make_pipelines(cfg, src, backend)["epix10k2m"]
    proc = BatchProcessor({"epix10k2m": pl}, backend, batch)
    if hasattr(backend, "transfers"):
        backend.transfers.clear()  # count from the first batch on (set-up moves constants once)
    out, pending = [], None
    for b in range(0, events, batch):
        staged = proc.stage(src.read(b, min(events, b + batch)))
        if pending is not None:
            out.append(_process(proc, pending, backend, per_batch))
        pending = staged
    out.append(_process(proc, pending, backend, per_batch))
    cols = {k: np.concatenate([o[k] for o in out]) for k in out[0]}
    sums = {k: np.asarray(v) for k, v in pl.sum_results().items()}
    return cols, sums, proc


def test_demo_functions_on_the_gpu_code_paths_equal_numpy(monkeypatch):
    install_fake_cupyx(monkeypatch)
    gpu = FakeGpuXp()
    got, got_sums, proc = demo_on(gpu)
    want, want_sums, _ = demo_on(Backend("numpy"))
    names = {name for name, *_ in gpu.launches}
    assert names >= {"pedestal_u16", "cm_median_rows_warp", "cm_median_cols_warp"}
    assert "scale_apply" not in names  # the column step (last) applies the gain scale
    assert proc.times.batches == 2 and proc.times.h2d_bytes == 6 * 2 * 352 * 384 * 2
    _compare(got, want, got_sums, want_sums)


def _process(proc, staged, backend, per_batch):
    n = len(getattr(backend, "transfers", ()))
    res = proc.process(staged)
    if per_batch is not None:
        per_batch.append(list(backend.transfers[n:]))
    return res


def _compare(got, want, got_sums, want_sums):
    assert sorted(got) == sorted(want)
    for k in want:
        a, b = np.asarray(got[k]), np.asarray(want[k])
        assert a.shape == b.shape and a.dtype == b.dtype, k
        if a.dtype.kind == "f":
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-3, equal_nan=True, err_msg=k)
        else:
            np.testing.assert_array_equal(a, b, err_msg=k)
    for k in want_sums:
        np.testing.assert_allclose(got_sums[k], want_sums[k], rtol=1e-5, atol=1e-2, err_msg=k)


@pytest.mark.slow
def test_demo_under_cupys_rules_and_host_traffic_per_batch_not_per_event(monkeypatch):
    """The demo set on a backend under CuPy's rules, batches of 2 and of 4 events: the same numbers as
    NumPy, results on the host as NumPy arrays, and the same transfers to the host per batch whatever
    the batch size (no per-event device->host traffic); uploads are the raw batches."""
    want, want_sums, _ = demo_on(Backend("numpy"), events=8, batch=4)
    kinds = {}
    for batch in (2, 4):
        gpu = FakeGpuStrict()
        install_fake_cupyx(monkeypatch, transfers=gpu.transfers)
        per_batch = []
        got, got_sums, proc = demo_on(gpu, events=8, batch=batch, per_batch=per_batch)
        _compare(got, want, got_sums, want_sums)
        assert all(isinstance(v, np.ndarray) for v in got.values())
        assert [k for k, _ in gpu.transfers].count("h2d") == 8 // batch  # the raw batches, one upload each
        counts = {(tuple(sorted(Counter(k for k, _ in b).items()))) for b in per_batch}
        assert len(counts) == 1, f"batches of {batch} differ in host traffic: {counts}"
        kinds[batch] = counts.pop()
    assert kinds[2] == kinds[4], f"host traffic per batch depends on its size (per event?): {kinds}"
    assert dict(kinds[4])["d2h"] == 1  # the results of a batch come back in one copy (pack_on_device)
    # waits on the GPU per batch, each for a size that depends on the data: azav 1 (bad pixels), droplet 5
    # (labelled pixels, number of labels, kept droplets, padding, their pixels), photons 2 (count, padding)
    assert dict(kinds[4]).get("sync", 0) <= 8, kinds[4]


@pytest.fixture(autouse=True)
def _quiet_numpy():
    with np.errstate(all="ignore"):
        yield


AZAV = {"type": "azav", "center_um": [0, 0], "distance_mm": 100, "energy_kev": 9.5, "bins": 100}
CASES = {
    "jungfrau-median": (
        "jungfrau",
        [1, 512, 1024],
        {"type": "median", "axes": ["rows", "cols"]},
        [
            {
                "type": "roi",
                "name": "r",
                "bounds": [[0, 1], [10, 200], [100, 400]],
                "children": [{"type": "projection", "axis": 0}],
            },
            dict(AZAV, phi_bins=4, engine="histogram"),
            {
                "type": "droplet",
                "threshold": 10,
                "use_rms": False,
                "max_droplets": 500,
                "children": [{"type": "photons", "adu_per_photon": 40, "max_photons": 800}],
            },
        ],
        "photons",
    ),
    "epix100": (
        "epix100",
        [1, 704, 768],
        {"type": "epix100", "norm_all": True},
        [dict(AZAV), {"type": "photon_count", "adu_per_photon": 4.4}, {"type": "rebin", "shape": [88, 96]}],
        "adu",
    ),
    "epix10ka-zero_peak-kev": (
        "epix10ka",
        [2, 352, 384],
        {"type": "zero_peak"},
        [
            {"type": "roi", "name": "r", "bounds": [[1, 2], [0, 352], [0, 384]], "thres_adu": 5},
            {"type": "acf", "window": 9},
        ],
        "kev",
    ),
    "epix10ka-zero_peak-psana": (
        "epix10ka",
        [1, 352, 384],
        {"type": "zero_peak", "method": "psana", "min_count": 20},
        [{"type": "roi", "name": "r", "bounds": [[0, 1], [0, 352], [0, 384]]}],
        "adu",
    ),
    "camera-none": (
        "camera",
        [1, 300, 400],
        {"type": "none"},
        [
            dict(AZAV, engine="histogram"),
            {"type": "droplet", "threshold": 30, "threshold_low": 10, "use_rms": False, "thres_adu": 50},
        ],
        "adu",
    ),
    "epix10ka-raw": (
        "epix10ka",
        [1, 352, 384],
        {"type": "raw"},
        [{"type": "roi", "name": "r", "bounds": [[0, 1], [0, 100], [0, 100]]}],
        "adu",
    ),
}


DAMAGED = {"jungfrau-median": [1], "camera-none": [3, 4]}


def case_on(backend, case, events=5, batch=3):
    det_type, shape, cm, functions, units = CASES[case]
    data = {
        "source": {"type": "sim", "events": events, "seed": 4},
        "batch_size": batch,
        "output": "x.h5",
        "detectors": {
            "det": {
                "type": det_type,
                "shape": shape,
                "units": units,
                "photon_energy_kev": 9.5 if units != "adu" else None,
                "mask": {"status": True, "edges": 1},
                "common_mode": cm,
                "functions": functions,
                "sums": ["calib", "max", "nhits_thresADU20"],
            }
        },
    }
    cfg = validate_config(data)
    src = SimSource(events, {"det": {"type": det_type, "shape": tuple(shape)}}, seed=4)
    pl = DetectorPipeline("det", cfg.detectors["det"], src.detectors["det"], cfg.function_specs("det"), backend)
    proc = BatchProcessor({"det": pl}, backend, batch)
    transfers = getattr(backend, "transfers", [])
    before = len(transfers)
    out = []
    for b in range(0, events, batch):
        raw = src.read(b, min(events, b + batch))
        for i in DAMAGED.get(case, ()):  # events with bad data: left out of the sums, results filled
            if b <= i < b + len(raw):
                raw.damaged["det"] = np.asarray(raw.damaged.get("det", np.zeros(len(raw), bool)), bool).copy()
                raw.damaged["det"][i - b] = True
        out.append(proc.process_async(proc.stage(raw)))
    cols = [p.result() for p in out]
    # host->device copies per batch: the raw batch, plus a byte per event of damage flags where it has damage
    uploads = sum(1 for k, n in transfers[before:] if k == "h2d" and n > batch)
    cols = {k: np.concatenate([c[k] for c in cols]) for k in cols[0]}
    return cols, {k: np.asarray(v) for k, v in pl.sum_results().items()}, uploads


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=[pytest.mark.slow] if c == "jungfrau-median" else []) for c in sorted(CASES)]
)  # JUNGFRAU's 0.5M median: 25 s, the slow run
def test_detectors_and_common_modes_under_cupys_rules(monkeypatch, case):
    """Other detectors, common modes, units and functions than the demo's (JUNGFRAU median, epix100,
    zero_peak in keV, zero_peak psana, none, raw; 2-D azav, histogram engine, photon_count, acf, rebin, droplet growth):
    the CuPy code paths under CuPy's rules with the compiled kernels give the NumPy backend's numbers."""
    gpu = FakeGpuStrict()
    install_fake_cupyx(monkeypatch, transfers=gpu.transfers)
    got, got_sums, uploads = case_on(gpu, case)
    want, want_sums, _ = case_on(Backend("numpy"), case)
    _compare(got, want, got_sums, want_sums)
    # constants, masks, bin maps and the like went up in the set-up: per batch only the raw batch goes up
    assert uploads == 2, f"{uploads} host->device copies for 2 batches"
    np.testing.assert_array_equal(np.flatnonzero(got["det/damaged"]), DAMAGED.get(case, []))
