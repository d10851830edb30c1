"""CPU threads of the NumPy backend (Backend.threads): the same numbers as one thread, bit for bit."""

import numpy as np
import pytest

from gpusmall.backend import Backend, cpu_threads
from gpusmall.sources.sim import SimSource


@pytest.mark.parametrize(
    "det_type, shape, cm",
    [
        ("epix10ka", (2, 352, 384), {"type": "median", "axes": ["banks", "rows", "cols"]}),
        ("epix10ka", (1, 352, 384), {"type": "zero_peak"}),
        ("epix100", (1, 704, 768), {"type": "epix100", "norm_all": True}),
        ("jungfrau", (1, 512, 1024), None),
    ],
)
def test_threaded_numpy_calibration_equals_one_thread(det_type, shape, cm):
    """Each common mode: the calibrated frames (a whole-detector ROI image, NaN where a pixel is bad) of
    blocks of events on three threads equal those of one thread."""
    from gpusmall.producer.config import validate_config
    from gpusmall.producer.pipeline import DetectorPipeline

    src = SimSource(5, {"d": {"type": det_type, "shape": shape}}, seed=9)
    raw = src.read(0, 5).raw["d"]
    whole = {"type": "roi", "name": "all", "write_area": True, "bounds": [[0, n] for n in shape]}
    cfg = validate_config(
        {
            "source": {"type": "sim"},
            "detectors": {
                "d": {
                    "type": det_type,
                    "shape": list(shape),
                    "common_mode": cm or {"type": "none"},
                    "mask_value": "nan",
                    "functions": [whole],
                }
            },
        }
    )
    out = []
    for threads in (1, 3):
        pl = DetectorPipeline(
            "d", cfg.detectors["d"], src.detectors["d"], cfg.function_specs("d"), Backend("numpy", threads=threads)
        )
        out.append(pl.process(raw)["all_area"])
        assert (pl.pool is None) == (threads == 1)
    assert np.isnan(out[0]).any() and np.isfinite(out[0]).mean() > 0.9
    np.testing.assert_array_equal(out[0], out[1])


def test_cpu_threads_share_the_cores_between_ranks():
    assert cpu_threads(1) >= 1 and cpu_threads(10_000) == 1
    assert cpu_threads(2) == max(1, cpu_threads(1) // 2)


def test_threaded_pipeline_equals_one_thread():
    """Calibration, every function of the demo set and more, and the run sums: blocks of events on three
    threads give what one thread gives, bit for bit but for the float64 rounding of the sum of squares
    (damaged events left out of the sums alike)."""
    from gpusmall.producer.config import validate_config
    from gpusmall.producer.pipeline import DetectorPipeline

    shape = [2, 352, 384]
    functions = [
        {
            "type": "roi",
            "name": "roi0",
            "bounds": [[1, 2], [100, 200], [100, 300]],
            "thres_adu": 20,
            "write_area": True,
            "children": [{"type": "projection", "axis": -1}],
        },
        {"type": "rebin", "shape": [22, 24]},
        {"type": "azav", "center_um": [0, 0], "distance_mm": 100, "energy_kev": 9.5, "bins": 100, "phi_bins": 2},
        {
            "type": "droplet",
            "threshold": 10,
            "threshold_low": 3,
            "thres_adu": 40,
            "max_droplets": 2000,
            "children": [{"type": "photons", "adu_per_photon": 156, "max_photons": 4000}],
        },
        {"type": "photon_count", "adu_per_photon": 156},
        {
            "type": "roi",
            "name": "small",
            "bounds": [[0, 1], [0, 64], [0, 64]],
            "children": [{"type": "acf", "window": 7}],
        },
    ]
    cfg = validate_config(
        {
            "source": {"type": "sim", "events": 7},
            "detectors": {
                "e": {
                    "type": "epix10ka",
                    "shape": shape,
                    "mask": {"edges": 1, "central": 1},
                    "common_mode": {"type": "median", "axes": ["rows", "cols"]},
                    "functions": functions,
                    "sums": ["calib", "square", "max", "nhits_thresADU80"],
                }
            },
        }
    )
    src = SimSource(7, {"e": {"type": "epix10ka", "shape": tuple(shape)}}, seed=2)
    raw = src.read(0, 7).raw["e"]
    keep = np.ones(7, bool)
    keep[4] = False  # a damaged event
    results = []
    for threads in (1, 3):
        pl = DetectorPipeline(
            "e", cfg.detectors["e"], src.detectors["e"], cfg.function_specs("e"), Backend("numpy", threads=threads)
        )
        assert (pl.pool is None) == (threads == 1)
        out = pl.process(raw[:5], keep[:5])
        out2 = pl.process(raw[5:], keep[5:])  # a short batch
        results.append(({k: np.concatenate([out[k], out2[k]]) for k in out}, pl.sum_results()))
    (one, sums1), (three, sums3) = results
    assert sorted(one) == sorted(three) and len(one) > 25
    for k in one:
        np.testing.assert_array_equal(one[k], three[k], err_msg=k)
    for k in sums1:  # the float64 sum of squares rounds by how events are grouped (as with the batch size)
        if k.endswith("square"):
            np.testing.assert_allclose(sums1[k], sums3[k], rtol=1e-14, err_msg=k)
        else:
            np.testing.assert_array_equal(sums1[k], sums3[k], err_msg=k)
