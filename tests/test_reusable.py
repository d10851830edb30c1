"""Reused output arrays (gpusmall/calib/reusable.py): an array is handed out again only when nobody holds
it or a view of it, so reusing buffers never changes a result a caller still has."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from gpusmall.calib.reusable import ReusableArrays


def test_a_dropped_array_is_reused():
    pool = ReusableArrays((4, 5), np.float32)
    a = pool.empty(3)
    address = a.ctypes.data
    del a
    b = pool.empty(3)
    assert pool.reused == 1 and b.ctypes.data == address
    assert b.shape == (3, 4, 5) and b.dtype == np.float32


def test_a_smaller_batch_takes_a_leading_slice():
    pool = ReusableArrays((2,), np.int8)
    pool.empty(5)  # dropped at once
    b = pool.empty(2)
    assert pool.reused == 1 and b.shape == (2, 2) and b.flags.c_contiguous


@pytest.mark.parametrize("held", ["array", "view", "in a list"])
def test_a_held_array_or_view_is_never_handed_out_again(held):
    pool = ReusableArrays((3,), np.float64)
    a = pool.empty(4)
    a[:] = 7.0
    keep = {"array": a, "view": a[1:3], "in a list": [a]}[held]
    del a
    gc.collect()
    b = pool.empty(4)
    b[:] = -1.0
    assert pool.reused == 0
    kept = keep[0] if held == "in a list" else keep
    assert (kept == 7.0).all()


def test_at_most_keep_arrays_are_kept():
    pool = ReusableArrays((1,), np.float32, keep=2)
    held = [pool.empty(1) for _ in range(5)]
    assert len(pool._arrays) == 2 and len(held) == 5


@pytest.mark.parametrize("common_mode", [None, "median rows+cols"])
def test_calibrated_frames_kept_by_a_caller_are_not_overwritten(rng, common_mode):
    """The NumPy backend's fused kernels write into reused arrays, with a median common mode too: frames
    from an earlier batch that a caller (a user's function, a queue) still holds keep their values."""
    pytest.importorskip("numba")
    from test_calibration import make_case

    from gpusmall.backend import Backend
    from gpusmall.calib import Calibrator
    from gpusmall.calib.common_mode import MedianCommonMode
    from gpusmall.detectors import get_model
    from gpusmall.detectors.constants import Constants

    model = get_model("jungfrau")
    ped, gain, raw, mask, cfg = make_case(rng, model, (3, 1, 256, 64), False)
    cm = MedianCommonMode(model, (256, 64), ("rows", "cols"), gain_ranges="all") if common_mode else None
    cal = Calibrator(model, Constants(pedestal=ped, gain=gain, config_bits=cfg), mask, Backend("numpy"), common_mode=cm)
    assert cal.cpu is not None
    first = cal(raw)
    want = first.data.copy(), first.good.copy()
    for _ in range(3):
        cal(raw[::-1].copy())  # other values, dropped at once: these arrays are reused
    np.testing.assert_array_equal(first.data, want[0])
    np.testing.assert_array_equal(first.good, want[1])
    del first
    gc.collect()
    again = cal(raw)
    assert cal.cpu._reuse["out"].reused >= 3
    np.testing.assert_array_equal(again.data, want[0])
