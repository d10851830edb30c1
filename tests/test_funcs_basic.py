"""roi, projection, rebin and run sums against direct NumPy on random frames, on every backend.

The conventions are smalldata_tools' (issue 14); each is checked against a small, independent transcription of
the rule (the ``ref_*`` functions below, loops over pixels or blocks where that is clearest).
"""

import warnings

import numpy as np
import pytest

from gpusmall.detectors import get_model
from gpusmall.errors import InputError
from gpusmall.funcs import FrameContext, Frames
from gpusmall.funcs.projection import Projection, ProjectionParams
from gpusmall.funcs.rebin import Rebin, RebinParams
from gpusmall.funcs.roi import Roi, RoiParams
from gpusmall.funcs.sums import RunSums, SumSpec, parse_sums

SHAPE = (2, 24, 32)


def make(backend, rng, events=5, bad_fraction=0.1):
    data = rng.normal(10, 20, (events, *SHAPE)).astype(np.float32)
    good = rng.random((events, *SHAPE)) > bad_fraction
    data = np.where(good, data, 0).astype(np.float32)
    raw = rng.integers(0, 0x4000, (events, *SHAPE)).astype(np.uint16)
    raw[0, 1, 5, 7] = 0x3FFF
    ctx = FrameContext(
        det="d",
        model=get_model("epix10ka"),
        backend=backend,
        shape=SHAPE,
        mask=backend.to_device(np.ones(SHAPE, bool)),
        noise=backend.to_device(np.full(SHAPE, 2.0, np.float32)),
        saturation=0x3FFF,
    )
    frames = Frames(backend.to_device(data), backend.to_device(good), backend.to_device(raw))
    return ctx, frames, data, good, raw


def run(fn, ctx, frames, backend):
    fn.setup(ctx)
    return {k: backend.to_host(v) for k, v in fn(frames).items()}


def test_roi(backend, rng):
    ctx, frames, data, good, raw = make(backend, rng)
    fn = Roi(
        RoiParams(name="r", bounds=[[1, 2], [3, 15], [4, 20]], thres_adu=5.0, write_area=True),
        [Projection(ProjectionParams(axis=0)), Projection(ProjectionParams(axis=1, mean=True))],
    )
    out = run(fn, ctx, frames, backend)
    a = data[:, 1:2, 3:15, 4:20]
    t = np.where(a >= 5, a, 0)
    np.testing.assert_allclose(out["r_sum"], t.sum((1, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(out["r_mean"], t.mean((1, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(out["r_max"], t.max((1, 2, 3)), rtol=1e-6)
    sat = ((raw[:, 1:2, 3:15, 4:20] & 0x3FFF) >= 0x3FFF) & good[:, 1:2, 3:15, 4:20]  # good pixels only
    np.testing.assert_array_equal(out["r_nsat"], sat.sum((1, 2, 3)))
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


# ---- projection: smalldata_tools' axis convention ------------------------------------------------------
def ref_projection(data, good, axis, mean):
    """smalldata_tools' projection of each event's image (bad pixels NaN): a negative axis -> nansum / nanmean
    of the whole image (every panel); 0 / 1 -> numpy axis of each panel's 2-D image summed away."""
    out = []
    for d, g in zip(data, good):
        img = np.where(g, d, np.nan).astype(np.float64)
        if axis < 0:
            out.append(np.nanmean(img) if mean else np.nansum(img))
            continue
        panels = [np.nanmean(p, axis=axis) if mean else np.nansum(p, axis=axis) for p in img]
        out.append(panels[0] if len(panels) == 1 else np.stack(panels))
    return np.array(out)


@pytest.mark.parametrize("axis", [-1, -2, 0, 1])
@pytest.mark.parametrize("mean", [False, True])
@pytest.mark.parametrize("panels", [slice(0, 1), slice(0, 2)])
def test_projection_axis_convention(backend, rng, axis, mean, panels):
    """axis -1 (and any negative axis) is one number per event, the total (nansum, or nanmean over the good
    pixels) of the whole image, every panel; 0 / 1 sums NumPy axis 0 / 1 of each panel away; name pj_ax_|axis|."""
    ctx, frames, data, good, _ = make(backend, rng, bad_fraction=0.3)
    good[2, panels] = False  # an event with no good pixel: nanmean gives NaN
    data = np.where(good, data, 0).astype(np.float32)
    frames = Frames(backend.to_device(data), backend.to_device(good))
    fn = Roi(
        RoiParams(name="r", bounds=[[panels.start, panels.stop], [0, 24], [0, 32]]),
        [Projection(ProjectionParams(axis=axis, mean=mean))],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of no good pixel
        want = ref_projection(data[:, panels], good[:, panels], axis, mean)
    got = run(fn, ctx, frames, backend)[f"r_pj_ax_{abs(axis)}_data"]
    assert got.shape == want.shape
    n_pix = 24 * 32 * (panels.stop - panels.start)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * (n_pix if axis < 0 and not mean else 1))


def test_projection_thresholds(backend, rng):
    ctx, frames, data, _, _ = make(backend, rng)
    out = run(Projection(ProjectionParams(axis=0, thres_rms=3.0, single_photon=True)), ctx, frames, backend)
    np.testing.assert_allclose(out["pj_ax_0_data"], (data >= 6.0).sum(2), rtol=0)


def ref_roi(data, good, raw, index, thres, sat=0x3FFF):
    """smalldata_tools' ROI numbers of each event, pixel by pixel: ``thres`` a number (pixels below count 0) or
    [lo, hi] (pixels below lo or above hi count 0); mean over every ROI pixel, bad ones as 0; nsat over good ones."""
    out = {"sum": [], "mean": [], "max": [], "nsat": []}
    for d, g, w in zip(data, good, raw):
        a, ga, wa = d[index].astype(np.float64), g[index], w[index]
        total, top, nsat = 0.0, -np.inf, 0
        for v, ok, word in zip(a.ravel(), ga.ravel(), wa.ravel()):
            v = v if ok else 0.0
            if thres is not None and (v < thres[0] or v > thres[1] if isinstance(thres, list) else v < thres):
                v = 0.0
            total += v
            top = max(top, v)
            nsat += int(ok and (word & 0x3FFF) >= sat)
        out["sum"].append(total)
        out["mean"].append(total / a.size)
        out["max"].append(top)
        out["nsat"].append(nsat)
    return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("thres", [None, 7.5, [-3.0, 12.0]])
def test_roi_thresholds_and_saturated_good_pixels(backend, rng, thres):
    """thres_adu as a number or [lo, hi]; nsat counts only good pixels (a saturated bad pixel never counts)."""
    ctx, frames, data, good, raw = make(backend, rng, bad_fraction=0.3)
    raw[:, 0, 2:6, 3:9] = 0x3FFF  # saturated pixels, some of them bad
    frames = Frames(frames.data, frames.good, backend.to_device(raw))
    index = (slice(0, 1), slice(1, 10), slice(2, 12))
    out = run(
        Roi(RoiParams(name="r", bounds=[[0, 1], [1, 10], [2, 12]], thres_adu=thres, write_area=True)),
        ctx,
        frames,
        backend,
    )
    want = ref_roi(data, good, raw, index, thres)
    assert want["nsat"].min() > 0 and ((raw[:, 0, 2:6, 3:9] == 0x3FFF) & ~good[:, 0, 2:6, 3:9]).any()
    for k in ("sum", "mean", "max"):
        np.testing.assert_allclose(out[f"r_{k}"], want[k], rtol=1e-5, atol=1e-4, err_msg=k)
    np.testing.assert_array_equal(out["r_nsat"], want["nsat"])


def test_roi_nsat_leaves_out_user_masked_pixels(backend, rng, tmp_path):
    """A pixel masked by the ROI's user mask is bad too: saturated, it is not counted."""
    ctx, frames, data, good, raw = make(backend, rng, bad_fraction=0.0)
    raw[:] = 0x3FFF
    user = np.ones((1, 4, 4), bool)
    user[0, 1:3, :] = False
    np.save(tmp_path / "m.npy", user)
    fn = Roi(RoiParams(bounds=[[1, 2], [0, 4], [0, 4]], user_mask=str(tmp_path / "m.npy")))
    out = run(fn, ctx, Frames(frames.data, frames.good, backend.to_device(raw)), backend)
    np.testing.assert_array_equal(out["roi_nsat"], user.sum())


def test_roi_without_bounds_is_the_whole_detector(backend, rng):
    ctx, frames, data, good, raw = make(backend, rng)
    out = run(Roi(RoiParams(thres_adu=5.0, write_area=True)), ctx, frames, backend)
    want = ref_roi(data, good, raw, (slice(None),) * 3, 5.0)
    for k in ("sum", "mean", "max"):
        np.testing.assert_allclose(out[f"roi_{k}"], want[k], rtol=1e-5, atol=1e-4, err_msg=k)
    np.testing.assert_array_equal(out["roi_nsat"], want["nsat"])
    assert out["roi_area"].shape == (5, *SHAPE)


@pytest.mark.parametrize("thres", [[5.0], [5.0, 1.0], [1.0, 2.0, 3.0]])
def test_roi_rejects_a_bad_threshold_range(thres):
    with pytest.raises(ValueError, match="thres_adu"):
        RoiParams(bounds=[[0, 4], [0, 4]], thres_adu=thres)


def ref_rebin(data, shape):
    """smalldata_tools' rebin: each output pixel the mean of its block (bad pixels as 0), block by block."""
    e, p, r, c = data.shape
    fr, fc = r // shape[0], c // shape[1]
    out = np.zeros((e, p, *shape))
    for i in range(shape[0]):
        for j in range(shape[1]):
            out[:, :, i, j] = (
                data[:, :, i * fr : (i + 1) * fr, j * fc : (j + 1) * fc].astype(np.float64).mean(axis=(2, 3))
            )
    return out


def test_rebin(backend, rng):
    """Block means (as smalldata_tools), not sums; a single-panel input loses the panel axis."""
    ctx, frames, data, _, _ = make(backend, rng)
    out = run(Rebin(RebinParams(shape=[6, 8])), ctx, frames, backend)
    assert out["rebin_data"].dtype == np.float32
    np.testing.assert_allclose(out["rebin_data"], ref_rebin(data, (6, 8)), rtol=1e-5, atol=1e-5)
    one = run(
        Roi(RoiParams(name="r", bounds=[[0, 24], [0, 32]]), [Rebin(RebinParams(shape=[8, 4]))]), ctx, frames, backend
    )
    np.testing.assert_allclose(one["r_rebin_data"], ref_rebin(data[:, :1], (8, 4))[:, 0], rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="must divide"):
        Rebin(RebinParams(shape=[5, 8])).setup(ctx)


# ---- run sums: smalldata_tools' names and rules ------------------------------------------------------
def ref_sum(name, frames):
    """The run sum smalldata_tools writes as /Sums/<det>_<name>, event by event: calib (sum), calib_square,
    a name with max (running maximum), nhits (pixels > 0 counted); _thresADU<t> sets values below t to 0 (and
    nhits_thresADU<t> counts values >= t)."""
    base, _, t = name.partition("_thresADU")
    t = float(t) if t else None
    acc = None
    for f in frames.astype(np.float64):
        if base == "nhits":
            x = (f >= t) if t is not None else (f > 0)
        else:
            x = f if t is None else np.where(f < t, 0.0, f)
        if base == "calib_square":
            x = x * x
        if acc is None:
            acc = x.astype(np.float64)
        elif "max" in base:
            acc = np.maximum(acc, x)
        else:
            acc = acc + x
    return acc


# config name -> the name written (smalldata_tools')
SUM_WRITTEN = {
    "calib": "calib",
    "calib_square": "calib_square",
    "square": "calib_square",
    "calib_max": "calib_max",
    "max": "calib_max",
    "nhits": "nhits",
    "calib_thresADU10": "calib_thresADU10",
    "calib_max_thresADU10": "calib_max_thresADU10",
    "max_thresADU10": "calib_max_thresADU10",
    "square_thresADU10": "calib_square_thresADU10",
    "nhits_thresADU10": "nhits_thresADU10",
    "nhits_thresADU15.5": "nhits_thresADU15.5",
    "calib_thresADU-3.5": "calib_thresADU-3.5",
}


@pytest.mark.parametrize("name", list(SUM_WRITTEN))
def test_run_sums(backend, rng, name):
    ctx, frames, data, good, raw = make(backend, rng)
    data[0, 0, 0, :4] = [0.0, 10.0, 15.5, -3.5]  # values on the thresholds: >= t is kept / counted
    frames = Frames(backend.to_device(data), frames.good)
    s = RunSums([name], SHAPE, backend)
    s.update(frames.data)
    s.update(frames.data)
    written = SUM_WRITTEN[name]
    res = s.results()
    assert list(res) == [written] and [x.name for x in s] == [written]
    np.testing.assert_allclose(res[written], ref_sum(written, np.concatenate([data, data])), rtol=1e-5)
    assert res[written].dtype == {"calib_max": np.float32, "nhits": np.int64}.get(
        written.split("_thres")[0], np.float64
    )


def test_camera_sums_have_the_camera_shape(backend, rng):
    """A camera's sums are (rows, cols), as smalldata_tools writes them; other detectors keep the panels."""
    data = rng.normal(10, 20, (3, 1, 6, 7)).astype(np.float32)
    for camera, shape in ((True, (6, 7)), (False, (1, 6, 7))):
        s = RunSums(["calib", "max", "nhits"], (1, 6, 7), backend, mask=np.ones((1, 6, 7), bool), camera=camera)
        s.update(backend.to_device(data))
        for k, v in s.results().items():
            assert v.shape == shape, k
            np.testing.assert_allclose(v, ref_sum(k, data).reshape(shape), rtol=1e-5)


@pytest.mark.parametrize(
    "names",
    [
        ["square", "calib_square"],
        ["max", "calib_max"],
        ["calib", "calib"],
        ["calib_thresADU5", "calib_thresADU5.0"],
        ["max_thresADU2", "calib_max_thresADU2"],
    ],
)
def test_two_names_of_one_sum_are_an_error(names):
    with pytest.raises(ValueError, match="the same sum"):
        parse_sums(names)


def test_sum_names():
    assert [s.name for s in parse_sums(["square", "max_thresADU5", "calib_thresADU5", "nhits_thresADU5"])] == [
        "calib_square",
        "calib_max_thresADU5",
        "calib_thresADU5",
        "nhits_thresADU5",
    ]
    assert SumSpec.parse("calib_dropped") == SumSpec("calib_dropped", "calib", None, "dropped")
    assert SumSpec.parse("calib_dropped_square") == SumSpec("calib_dropped_square", "square", None, "dropped")
    assert SumSpec.parse("max_thresADU5:laser_on") == SumSpec("calib_max_thresADU5_laser_on", "max", 5.0, "laser_on")
    for bad in ("mean", "calib_mean", "nhits_max", "calib_square_max", "calib_thresADU"):
        with pytest.raises(ValueError, match="unknown sum"):
            SumSpec.parse(bad)


def test_sum_names_in_the_config():
    """The config takes smalldata_tools' names and the older ones, and stops at a sum it cannot make."""
    from gpusmall.errors import ConfigError
    from gpusmall.producer.config import validate_config

    def cfg(sums):
        return {
            "source": {"type": "sim", "events": 2},
            "output": "o.h5",
            "detectors": {"cam": {"type": "camera", "shape": [8, 8], "sums": sums}},
        }

    ok = [
        "calib",
        "calib_square",
        "calib_max",
        "calib_thresADU5",
        "calib_max_thresADU5",
        "nhits",
        "nhits_thresADU5",
        "square_thresADU3",
        "max_thresADU3",
    ]
    assert validate_config(cfg(ok)).detectors["cam"].sums == ok
    for sums, match in (
        (["calib:nosuch"], "no selection 'nosuch'"),
        (["square", "calib_square"], "the same sum"),
        (["calib_mean"], "unknown sum"),
        (["calib:1x"], "must name a selection"),
    ):
        with pytest.raises(ConfigError, match=f"detectors.cam.*{match}"):
            validate_config(cfg(sums))


@pytest.mark.parametrize("mask_value", ["zero", "nan"])
def test_run_sums_mask_value(backend, rng, mask_value):
    """SPEC 3: statically masked pixels are 0 in the float sums, NaN with mask_value: nan; nhits stays 0."""
    ctx, frames, data, good, raw = make(backend, rng)
    mask = rng.random(SHAPE) > 0.2
    d = np.where(mask[None], data, 0).astype(np.float32)  # the calibrated data is 0 at masked pixels
    s = RunSums(["calib", "square", "max", "nhits", "max_thresADU10"], SHAPE, backend, mask=mask, mask_value=mask_value)
    s.update(backend.to_device(d))
    names = ["calib", "calib_square", "calib_max", "nhits", "calib_max_thresADU10"]  # as written
    expected = {name: ref_sum(name, d) for name in names}
    res = s.results()
    assert list(res) == names
    for name in names:
        v, e = res[name], expected[name]
        if mask_value == "nan" and name != "nhits":
            assert np.isnan(v[~mask]).all(), name
        else:
            np.testing.assert_array_equal(v[~mask], 0, err_msg=name)
        np.testing.assert_allclose(v[mask], e[mask], rtol=1e-5, err_msg=name)
    assert res["nhits"].dtype == np.int64
