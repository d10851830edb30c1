"""roi, projection, rebin and run sums against direct NumPy on random frames, on every backend."""
import numpy as np
import pytest

from gpusmall.detectors import get_model
from gpusmall.errors import InputError
from gpusmall.funcs import FrameContext, Frames
from gpusmall.funcs.projection import Projection, ProjectionParams
from gpusmall.funcs.rebin import Rebin, RebinParams
from gpusmall.funcs.roi import Roi, RoiParams
from gpusmall.funcs.sums import RunSums

SHAPE = (2, 24, 32)


def make(backend, rng, events=5, bad_fraction=0.1):
    data = rng.normal(10, 20, (events, *SHAPE)).astype(np.float32)
    good = rng.random((events, *SHAPE)) > bad_fraction
    data = np.where(good, data, 0).astype(np.float32)
    raw = rng.integers(0, 0x4000, (events, *SHAPE)).astype(np.uint16)
    raw[0, 1, 5, 7] = 0x3FFF
    ctx = FrameContext(det="d", model=get_model("epix10ka"), backend=backend, shape=SHAPE,
                       mask=backend.to_device(np.ones(SHAPE, bool)), noise=backend.to_device(np.full(SHAPE, 2.0, np.float32)),
                       saturation=0x3FFF)
    frames = Frames(backend.to_device(data), backend.to_device(good), backend.to_device(raw))
    return ctx, frames, data, good, raw


def run(fn, ctx, frames, backend):
    fn.setup(ctx)
    return {k: backend.to_host(v) for k, v in fn(frames).items()}


def test_roi(backend, rng):
    ctx, frames, data, good, raw = make(backend, rng)
    fn = Roi(RoiParams(name="r", bounds=[[1, 2], [3, 15], [4, 20]], thres_adu=5.0, write_area=True),
             [Projection(ProjectionParams(axis=0)), Projection(ProjectionParams(axis=-1, mean=True))])
    out = run(fn, ctx, frames, backend)
    a = data[:, 1:2, 3:15, 4:20]
    t = np.where(a >= 5, a, 0)
    np.testing.assert_allclose(out["r_sum"], t.sum((1, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(out["r_mean"], t.mean((1, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(out["r_max"], t.max((1, 2, 3)), rtol=1e-6)
    np.testing.assert_array_equal(out["r_nsat"], ((raw[:, 1:2, 3:15, 4:20] & 0x3FFF) >= 0x3FFF).sum((1, 2, 3)))
    np.testing.assert_allclose(out["r_area"], t[:, 0], rtol=1e-6)
    r, c = np.mgrid[0:12, 0:16]
    w = t[:, 0]
    np.testing.assert_allclose(out["r_com"][:, 0], (w * r).sum((1, 2)) / w.sum((1, 2)), rtol=1e-5)
    np.testing.assert_allclose(out["r_com"][:, 1], (w * c).sum((1, 2)) / w.sum((1, 2)), rtol=1e-5)
    np.testing.assert_allclose(out["r_pj_ax_0_data"], t[:, 0].sum(1), rtol=1e-5, atol=1e-4)
    n = good[:, 1, 3:15, 4:20].sum(2)
    np.testing.assert_allclose(out["r_pj_ax_1_data"], t[:, 0].sum(2) / n, rtol=1e-5, atol=1e-4)


def test_roi_two_dimensional_bounds_mean_panel_zero(backend, rng):
    ctx, frames, data, _, _ = make(backend, rng)
    out = run(Roi(RoiParams(bounds=[[0, 4], [0, 4]])), ctx, frames, backend)
    np.testing.assert_allclose(out["roi_sum"], data[:, 0, :4, :4].sum((1, 2)), rtol=1e-5)


def test_roi_out_of_bounds_names_function(backend, rng):
    ctx, _, _, _, _ = make(backend, rng)
    with pytest.raises(InputError, match="detector d: function big"):
        Roi(RoiParams(name="big", bounds=[[0, 1], [0, 25], [0, 4]])).setup(ctx)


def test_projection_thresholds(backend, rng):
    ctx, frames, data, _, _ = make(backend, rng)
    out = run(Projection(ProjectionParams(axis=0, thres_rms=3.0, single_photon=True)), ctx, frames, backend)
    np.testing.assert_allclose(out["pj_ax_0_data"], (data >= 6.0).sum(2), rtol=0)


def test_rebin(backend, rng):
    ctx, frames, data, _, _ = make(backend, rng)
    out = run(Rebin(RebinParams(shape=[6, 8])), ctx, frames, backend)
    np.testing.assert_allclose(out["rebin_data"], data.reshape(5, 2, 6, 4, 8, 4).sum((3, 5)), rtol=1e-5, atol=1e-4)
    with pytest.raises(InputError, match="must divide"):
        Rebin(RebinParams(shape=[5, 8])).setup(ctx)


@pytest.mark.parametrize("name", ["calib", "square", "max", "nhits", "calib_thresADU10", "nhits_thresADU15.5"])
def test_run_sums(backend, rng, name):
    ctx, frames, data, good, raw = make(backend, rng)
    s = RunSums([name], SHAPE, backend)
    s.update(frames.data)
    s.update(frames.data)
    d = np.concatenate([data, data]).astype(np.float64)
    thr = 10.0 if "thresADU10" in name else None
    if thr is not None:
        d = np.where(d >= thr, d, 0)
    expected = {"calib": d.sum(0), "square": (d * d).sum(0), "max": d.max(0), "nhits": (d > 0).sum(0)}
    if name.startswith("nhits_thres"):
        expected["nhits"] = (d > 15.5).sum(0)
    np.testing.assert_allclose(s.results()[name], expected[name.split("_")[0]], rtol=1e-5)


@pytest.mark.parametrize("mask_value", ["zero", "nan"])
def test_run_sums_mask_value(backend, rng, mask_value):
    """SPEC 3: statically masked pixels are 0 in the float sums, NaN with mask_value: nan; nhits stays 0."""
    ctx, frames, data, good, raw = make(backend, rng)
    mask = rng.random(SHAPE) > 0.2
    d = np.where(mask[None], data, 0).astype(np.float32)  # the calibrated data is 0 at masked pixels
    names = ["calib", "square", "max", "nhits", "max_thresADU10"]
    s = RunSums(names, SHAPE, backend, mask=mask, mask_value=mask_value)
    s.update(backend.to_device(d))
    d64 = d.astype(np.float64)
    t = np.where(d64 >= 10, d64, 0)
    expected = {"calib": d64.sum(0), "square": (d64 * d64).sum(0), "max": d64.max(0), "nhits": (d64 > 0).sum(0),
                "max_thresADU10": t.max(0)}
    res = s.results()
    for name in names:
        v, e = res[name], expected[name]
        if mask_value == "nan" and name != "nhits":
            assert np.isnan(v[~mask]).all(), name
        else:
            np.testing.assert_array_equal(v[~mask], 0, err_msg=name)
        np.testing.assert_allclose(v[mask], e[mask], rtol=1e-5, err_msg=name)
    assert res["nhits"].dtype == np.int64
