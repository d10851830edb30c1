"""The whole demo function set through the CuPy code paths, on the CPU.

A stand-in backend takes every GPU branch: ``is_gpu`` is True, ``xp`` is not NumPy (so the CuPy-only
branches run too), kernels are the checked NumPy emulations of ``test_kernel_launches`` or the CUDA
sources themselves compiled for the CPU (``tests/cuda_cpu``), ``cupyx`` is
replaced by SciPy with CuPy's restrictions where we know them (``scatter_min`` dtypes, labels numbered
in another order), and streams/events are the stand-ins of ``test_process``. The batch goes through
``BatchProcessor`` (two-stream staging) and must give the NumPy backend's numbers. What this cannot see:
the GPU itself (compilation is checked by ``test_kernels_compile``, numbers on a GPU by
``test_pipeline_backends`` with ``GPUSMALL_BACKEND=cupy``).
"""
from __future__ import annotations

import numpy as np
import pytest
from fake_cupy import fake_cuda, install_fake_cupyx, numpy_as_cupy
from test_kernel_launches import FakeGpu

from gpusmall.backend import Backend
from gpusmall.cli import demo_config_dict
from gpusmall.producer.config import validate_config
from gpusmall.producer.pipeline import DetectorPipeline
from gpusmall.producer.process import BatchProcessor
from gpusmall.sources.sim import SimSource


class FakeGpuXp(FakeGpu):
    """FakeGpu whose ``xp`` is not NumPy and has CuPy's streams and events."""

    def __init__(self, kernels="emulated"):
        super().__init__(kernels)
        cuda_parts, self.stream = fake_cuda([])
        self.xp = numpy_as_cupy(cuda_parts)


def demo_on(backend, shape=(2, 352, 384), events=6, batch=4):
    data = demo_config_dict()
    det = data["detectors"]["epix10k2m"]
    det["shape"] = list(shape)
    det["functions"][0]["bounds"] = [[1, 2], [100, 200], [100, 300]]
    det["functions"][1]["bounds"] = [[0, 1], [0, 352], [0, 384]]
    det["functions"].append({"type": "acf", "name": "acf", "window": 9})
    det["functions"].append({"type": "photon_count", "adu_per_photon": 156})
    data["source"]["events"] = events
    cfg = validate_config(data)
    src = SimSource(events, {"epix10k2m": {"type": "epix10ka", "shape": tuple(shape)}}, seed=2)
    pl = DetectorPipeline("epix10k2m", cfg.detectors["epix10k2m"], src.detectors["epix10k2m"],
                          cfg.function_specs("epix10k2m"), backend)
    proc = BatchProcessor({"epix10k2m": pl}, backend, batch)
    out, pending = [], None
    for b in range(0, events, batch):
        staged = proc.stage(src.read(b, min(events, b + batch)))
        if pending is not None:
            out.append(proc.process(pending))
        pending = staged
    out.append(proc.process(pending))
    cols = {k: np.concatenate([o[k] for o in out]) for k in out[0]}
    sums = {k: np.asarray(v) for k, v in pl.sum_results().items()}
    return cols, sums, proc


@pytest.mark.parametrize("kernels", ["emulated", "compiled"])
def test_demo_functions_on_the_gpu_code_paths_equal_numpy(monkeypatch, kernels):
    install_fake_cupyx(monkeypatch)
    gpu = FakeGpuXp(kernels)
    got, got_sums, proc = demo_on(gpu)
    want, want_sums, _ = demo_on(Backend("numpy"))
    assert {name for name, *_ in gpu.launches} >= {"pedestal_u16", "cm_median_step", "scale_apply"}
    assert proc.times.batches == 2 and proc.times.h2d_bytes == 6 * 2 * 352 * 384 * 2
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


@pytest.fixture(autouse=True)
def _quiet_numpy():
    with np.errstate(all="ignore"):
        yield
