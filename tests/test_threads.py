"""CPU threads of the NumPy backend (Backend.threads): the same numbers as one thread, bit for bit."""
import numpy as np
import pytest

from gpusmall.backend import Backend, cpu_threads
from gpusmall.calib import Calibrator, make_common_mode
from gpusmall.detectors import get_model
from gpusmall.producer.config import CommonModeConfig
from gpusmall.sources.sim import SimSource


@pytest.mark.parametrize("det_type, shape, cm", [
    ("epix10ka", (2, 352, 384), {"type": "median", "axes": ["banks", "rows", "cols"]}),
    ("epix10ka", (1, 352, 384), {"type": "zero_peak"}),
    ("epix100", (1, 704, 768), {"type": "epix100", "norm_all": True}),
    ("jungfrau", (1, 512, 1024), None),
])
def test_threaded_numpy_calibration_equals_one_thread(det_type, shape, cm):
    src = SimSource(5, {"d": {"type": det_type, "shape": shape}}, seed=9)
    raw = src.read(0, 5).raw["d"]
    c = src.detectors["d"].constants
    model = get_model(det_type)
    out = []
    for threads in (1, 3):
        b = Backend("numpy", threads=threads)
        common = None if cm is None else make_common_mode("d", CommonModeConfig(**cm), model, c, b, shape[1:])
        cal = Calibrator(model, c, c.status == 0, b, common_mode=common)
        assert (cal.pool is None) == (threads == 1)
        out.append(cal(raw))
    np.testing.assert_array_equal(out[0].data, out[1].data)
    np.testing.assert_array_equal(out[0].good, out[1].good)


def test_cpu_threads_share_the_cores_between_ranks():
    assert cpu_threads(1) >= 1 and cpu_threads(10_000) == 1
    assert cpu_threads(2) == max(1, cpu_threads(1) // 2)
