"""benchmarks/reference_pipeline.py (the per-event NumPy timing reference) does the same work as gpusmall.

Only the unambiguous outputs are compared to float32 tolerance (ROI sums, projections, rebin); the
azimuthal average loosely and the droplets not at all (the reference grows and counts them its own way).
"""

import sys
from pathlib import Path

import numpy as np
import pytest

from gpusmall.backend import Backend
from gpusmall.producer.config import validate_config
from gpusmall.producer.pipeline import DetectorPipeline
from gpusmall.sources import open_source

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reference_pipeline import PerEventReference  # noqa: E402

EVENTS = 3


def config(common_mode):
    """The demo's function set on 2 panels."""
    return {
        "source": {"type": "sim", "events": EVENTS, "seed": 5},
        "batch_size": EVENTS,
        "output": "unused.h5",
        "detectors": {
            "epix": {
                "type": "epix10ka",
                "shape": [2, 352, 384],
                "mask": {"status": True, "edges": 1, "central": 1},
                "common_mode": common_mode,
                "functions": [
                    {
                        "type": "roi",
                        "name": "roi0",
                        "bounds": [[1, 2], [100, 200], [100, 300]],
                        "thres_adu": 20,
                        "children": [
                            {"type": "projection", "axis": 1},
                            {"type": "projection", "name": "tot", "axis": -1},
                        ],
                    },
                    {
                        "type": "roi",
                        "name": "roi1",
                        "bounds": [[0, 1], [0, 352], [0, 384]],
                        "thres_adu": 20,
                        "children": [{"type": "projection", "axis": 0, "thres_adu": 20}],
                    },
                    {"type": "rebin", "shape": [22, 24]},
                    {"type": "azav", "center_um": [0, 0], "distance_mm": 100, "energy_kev": 9.5, "bins": 100},
                    {
                        "type": "droplet",
                        "threshold": 10,
                        "threshold_low": 3,
                        "use_rms": True,
                        "thres_adu": 40,
                        "children": [{"type": "photons", "adu_per_photon": 156}],
                    },
                ],
                "sums": ["calib", "square", "max", "nhits_thresADU80"],
            }
        },
    }


@pytest.fixture(scope="module", params=["median", "none"])
def both(request):
    cm = (
        {"type": "median", "axes": ["rows", "cols"], "max_correction": 100, "min_pixels": 10, "gain_ranges": "high"}
        if request.param == "median"
        else {"type": "none"}
    )
    cfg = validate_config(config(cm))
    with open_source(cfg) as src:
        pl = DetectorPipeline(
            "epix", cfg.detectors["epix"], src.detectors["epix"], cfg.function_specs("epix"), Backend("numpy")
        )
        raw = src.read(0, EVENTS).raw["epix"]
    batched = pl.process(raw)
    ref = PerEventReference(pl)
    per_event = ref.process(raw)
    return batched, per_event, ref, pl


def stack(per_event, key):
    return np.stack([np.asarray(r[key]) for r in per_event])


@pytest.mark.parametrize(
    "key",
    [
        "roi0_sum",
        "roi0_max",
        "roi0_com",
        "roi0_nsat",
        "roi0_pj_ax_1_data",
        "roi0_tot_data",
        "roi1_sum",
        "roi1_pj_ax_0_data",
        "rebin_data",
    ],
)
def test_roi_and_rebin_agree(both, key):
    batched, per_event, _, _ = both
    np.testing.assert_allclose(stack(per_event, key), batched[key], rtol=1e-5, atol=1e-2)


def test_azav_and_sums_agree(both):
    batched, per_event, ref, pl = both
    np.testing.assert_allclose(stack(per_event, "azav_azav"), batched["azav_azav"][:, 0], rtol=1e-4, equal_nan=True)
    sums = pl.sum_results()
    for name, acc in ref.sum_results().items():
        np.testing.assert_allclose(acc, sums[f"epix_{name}"], rtol=1e-4, atol=1e-2, err_msg=name)


def test_droplets_are_found(both):
    batched, per_event, _, _ = both
    n = stack(per_event, "droplet_nDroplets")
    assert (n > 0).all()
    # the same seeds and the same growth rule: counts close to gpusmall's
    np.testing.assert_allclose(n, batched["droplet_nDroplets"], rtol=0.05)
