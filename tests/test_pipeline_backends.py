"""A whole run on CuPy writes the NumPy run's numbers (skipped without a GPU: the GPU session's main check).

``reduce_run`` with its reader thread, pinned host buffers, uploads on a non-blocking stream, batches split
(7 events in batches of 3) and damaged events, for an ePix10ka (median common mode: ``pedestal_u16`` +
``cm_median_step`` + ``scale_apply``) and a JUNGFRAU panel (fused ``calibrate_u16``), with every function
type and every sum. Every dataset of the CuPy file is compared with the NumPy file.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from gpusmall.backend import Backend
from gpusmall.producer.config import validate_config
from gpusmall.producer.run import reduce_run


def config(out):
    epix_functions = [
        {
            "type": "roi",
            "name": "roi0",
            "bounds": [[1, 2], [40, 140], [30, 230]],
            "thres_adu": 20,
            "write_area": True,
            "children": [{"type": "projection", "axis": -1}, {"type": "acf", "window": 11, "resolution": 2}],
        },
        {"type": "rebin", "shape": [22, 24]},
        {"type": "azav", "center_um": [0, 0], "distance_mm": 100, "energy_kev": 9.5, "bins": 100, "phi_bins": 2},
        {
            "type": "azav",
            "name": "azh",
            "center_um": [0, 0],
            "distance_mm": 100,
            "energy_kev": 9.5,
            "bins": 100,
            "engine": "histogram",
        },
        {
            "type": "droplet",
            "threshold": 10,
            "threshold_low": 3,
            "use_rms": True,
            "thres_adu": 40,
            "max_droplets": 3000,
            "children": [{"type": "photons", "adu_per_photon": 156, "max_photons": 6000}],
        },
        {"type": "photon_count", "adu_per_photon": 156, "hist_max": 3},
    ]
    return {
        "source": {"type": "sim", "events": 7, "seed": 5, "damage_every": 4},
        "batch_size": 3,
        "output": str(out),
        "detectors": {
            "epix": {
                "type": "epix10ka",
                "shape": [2, 352, 384],
                "mask": {"edges": 1, "central": 1},
                "common_mode": {"type": "median", "axes": ["rows", "cols"]},
                "functions": epix_functions,
                "sums": ["calib", "square", "max", "nhits_thresADU80"],
            },
            "jf": {
                "type": "jungfrau",
                "shape": [1, 512, 1024],
                "common_mode": {"type": "none"},
                "functions": [
                    {"type": "roi", "bounds": [[0, 1], [0, 256], [0, 512]]},
                    {"type": "azav", "center_um": [0, 0], "distance_mm": 100, "energy_kev": 9.5, "bins": 50},
                ],
                "sums": ["calib", "max"],
            },
        },
    }


def datasets(f):
    out = {}
    f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


@pytest.fixture(scope="module")
def numpy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("np") / "run.h5"
    reduce_run(validate_config(config(out)), Backend("numpy"), quiet=True)
    with h5py.File(out, "r") as f:
        return datasets(f)


def test_cupy_run_equals_numpy_run(backend, tmp_path, request):
    if not backend.is_gpu:
        pytest.skip("the NumPy run is the reference of this comparison")
    want = request.getfixturevalue("numpy_run")
    out = tmp_path / "run.h5"
    summary = reduce_run(validate_config(config(out)), backend, quiet=True)
    assert summary.events == 7 and not summary.interrupted
    with h5py.File(out, "r") as f:
        got = datasets(f)
    assert sorted(got) == sorted(want)
    bad = []
    for key, ref in want.items():
        g = got[key]
        if not isinstance(ref, np.ndarray) or ref.dtype.kind not in "fc":
            if not np.array_equal(np.asarray(g), np.asarray(ref)):
                bad.append(key)
            continue
        scale = float(np.nanmax(np.abs(ref))) if ref.size and np.isfinite(ref).any() else 1.0
        loose = "acf" in key  # cuFFT vs pocketfft, float32
        try:
            np.testing.assert_allclose(
                g, ref, rtol=1e-4 if loose else 1e-5, atol=(1e-4 if loose else 1e-6) * scale, equal_nan=True
            )
        except AssertionError as exc:
            bad.append(f"{key}: {str(exc).splitlines()[3:5]}")
    assert not bad, "CuPy run differs from the NumPy run in:\n" + "\n".join(map(str, bad))
