"""Common mode (SPEC section 4) against slow, direct transcriptions of the SPEC, on both backends."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from gpusmall.calib.common_mode import MedianCommonMode, ZeroPeakCommonMode, group_median, make_common_mode
from gpusmall.detectors import get_model
from gpusmall.detectors.base import DetectorModel
from gpusmall.errors import InputError

EPIX = get_model("epix10ka")
JF = get_model("jungfrau")
# a small gain-switching detector: panels of 8 x 12, banks of 4 x 6, ePix10ka gain ranges
SMALL = DetectorModel(
    type="small",
    panel_shape=(8, 12),
    default_panels=2,
    data_mask=0x3FFF,
    gain_names=EPIX.gain_names,
    pixel_um=100.0,
    saturation=None,
    bank_shape=(4, 6),
    high_gain_ranges=EPIX.high_gain_ranges,
)


def slow_median(s, good, g, bank, axes, max_correction=100.0, min_pixels=10, ranges=None):
    """SPEC section 4 `median`, one group at a time with np.median (the test oracle)."""
    s = s.astype(np.float32).copy()
    e_, p_, r_, c_ = s.shape
    br, bc = bank
    use = good.copy()
    if ranges is not None:
        use &= np.isin(g, ranges)

    def fix(e, p, rs, cs):
        vals = s[e, p, rs, cs][use[e, p, rs, cs]]
        if vals.size > min_pixels:
            m = np.float32(np.median(vals))
            if abs(m) < max_correction:
                blk = s[e, p, rs, cs]
                blk[use[e, p, rs, cs]] -= m
                s[e, p, rs, cs] = blk

    for axis in [a for a in ("banks", "rows", "cols") if a in axes]:
        for e in range(e_):
            for p in range(p_):
                for b0 in range(0, r_, br):
                    if axis == "cols":
                        for c in range(c_):
                            fix(e, p, slice(b0, b0 + br), slice(c, c + 1))
                        continue
                    for c0 in range(0, c_, bc):
                        if axis == "banks":
                            fix(e, p, slice(b0, b0 + br), slice(c0, c0 + bc))
                        else:
                            for r in range(b0, b0 + br):
                                fix(e, p, slice(r, r + 1), slice(c0, c0 + bc))
    return s


def random_case(rng, shape=(3, 2, 8, 12), bad_fraction=0.2, offsets=True):
    s = rng.normal(0, 5, shape).astype(np.float32)
    if offsets:
        s += rng.normal(0, 40, shape[:2] + (1, 1)).astype(np.float32)  # event/panel offsets
        s += rng.normal(0, 20, shape[:3] + (1,)).astype(np.float32)  # row offsets
    s = np.round(s * 4) / 4  # ties, so medians meet equal values
    good = rng.random(shape) > bad_fraction
    g = rng.choice([0, 1, 2, 3, 4, 5, 6], size=shape, p=[0.3, 0.1, 0.05, 0.3, 0.1, 0.1, 0.05]).astype(np.int8)
    return s, good, g


def run(backend, cm, s, good, g):
    xp = backend.xp
    out = cm(xp.asarray(s), xp.asarray(good), xp.asarray(g))
    return backend.to_host(out)


@pytest.mark.parametrize(
    "axes", [["rows"], ["cols"], ["banks"], ["rows", "cols"], ["cols", "rows"], ["banks", "rows", "cols"]]
)
@pytest.mark.parametrize("gain_ranges", ["all", "high"])
def test_median_matches_slow_transcription(backend, rng, axes, gain_ranges):
    s, good, g = random_case(rng)
    cm = MedianCommonMode(
        SMALL, (8, 12), axes, max_correction=100, min_pixels=2, gain_ranges=gain_ranges, backend=backend
    )
    ranges = None if gain_ranges == "all" else SMALL.high_gain_ranges
    want = slow_median(s, good, g, (4, 6), axes, 100, 2, ranges)
    got = run(backend, cm, s, good, g)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_median_leaves_excluded_pixels_alone(rng):
    s, good, g = random_case(rng)
    cm = MedianCommonMode(SMALL, (8, 12), ["rows", "cols"], min_pixels=0, gain_ranges="high")
    out = cm(s, good, g)
    untouched = ~good | ~np.isin(g, SMALL.high_gain_ranges)
    assert untouched.any()
    np.testing.assert_array_equal(out[untouched], s[untouched])


def test_min_pixels_is_strict(backend):
    """A group with exactly min_pixels good pixels is not corrected, one more is."""
    s = np.full((1, 1, 8, 12), 7.0, np.float32)
    good = np.zeros(s.shape, bool)
    good[0, 0, 0, :3] = True  # bank (0, 0), row 0: 3 good pixels
    good[0, 0, 1, :4] = True  # row 1: 4 good pixels
    g = np.zeros(s.shape, np.int8)
    cm = MedianCommonMode(SMALL, (8, 12), ["rows"], min_pixels=3, gain_ranges="all", backend=backend)
    out = run(backend, cm, s, good, g)
    assert (out[0, 0, 0] == 7).all()
    assert (out[0, 0, 1, :4] == 0).all() and (out[0, 0, 1, 4:] == 7).all()


def test_max_correction(backend):
    s = np.zeros((1, 1, 8, 12), np.float32)
    s[0, 0, 0, :6] = 99.5
    s[0, 0, 1, :6] = 100.0  # |median| == max_correction: not corrected
    s[0, 0, 2, :6] = -150.0
    good = np.ones(s.shape, bool)
    g = np.zeros(s.shape, np.int8)
    cm = MedianCommonMode(
        SMALL, (8, 12), ["rows"], max_correction=100, min_pixels=2, gain_ranges="all", backend=backend
    )
    out = run(backend, cm, s, good, g)
    assert (out[0, 0, 0, :6] == 0).all()
    assert (out[0, 0, 1, :6] == 100).all()
    assert (out[0, 0, 2, :6] == -150).all()


def test_even_count_median_is_mean_of_middle_values(backend):
    s = np.zeros((1, 1, 8, 12), np.float32)
    s[0, 0, 0, :6] = [1, 2, 10, 20, 30, 40]  # 6 values: median 15
    s[0, 0, 1, :6] = [1, 2, 10, 20, 30, 40]
    good = np.ones(s.shape, bool)
    good[0, 0, 1, 5] = False  # 5 values: median 10
    g = np.zeros(s.shape, np.int8)
    cm = MedianCommonMode(SMALL, (8, 12), ["rows"], min_pixels=2, gain_ranges="all", backend=backend)
    out = run(backend, cm, s, good, g)
    np.testing.assert_array_equal(out[0, 0, 0, :6], np.array([1, 2, 10, 20, 30, 40], np.float32) - 15)
    np.testing.assert_array_equal(out[0, 0, 1, :5], np.array([1, 2, 10, 20, 30], np.float32) - 10)


def test_group_median_equals_numpy_median(rng):
    v = rng.normal(0, 3, (50, 17)).astype(np.float32)
    use = rng.random(v.shape) > 0.3
    med, ok = group_median(np, v, use, 0, np.inf)
    for i in range(v.shape[0]):
        if use[i].any():
            assert med[i] == np.median(v[i][use[i]])
    assert (ok == (use.sum(1) > 0)).all()


@pytest.mark.parametrize("size", [1, 2, 17, 48, 176])
def test_group_median_edge_cases(backend, rng, size):
    """All masked, too few pixels (n == min_pixels), one more, even and odd counts, ties, all used."""
    xp = backend.xp
    min_pixels = min(3, size - 1)
    counts = sorted({0, 1, 2, min_pixels, min_pixels + 1, size // 2, size - 1, size} & set(range(size + 1)))
    v = np.round(rng.normal(0, 4, (len(counts), 3, size)) * 2).astype(np.float32) / 2  # ties
    use = np.zeros(v.shape, bool)
    for i, n in enumerate(counts):
        for j in range(3):
            use[i, j, rng.permutation(size)[:n]] = True
    med, ok = group_median(xp, xp.asarray(v), xp.asarray(use), min_pixels, np.inf)
    med, ok = backend.to_host(med), backend.to_host(ok)
    for i, n in enumerate(counts):
        for j in range(3):
            assert ok[i, j] == (n > min_pixels), (n, min_pixels)
            if n:
                assert med[i, j] == np.float32(np.median(v[i, j][use[i, j]])), (n, size)


def test_use_mask_selects_good_pixels_in_high_ranges(rng):
    _, good, g = random_case(rng)
    g[0, 0, 0, :3] = -1
    cm = MedianCommonMode(SMALL, (8, 12), ["rows"], gain_ranges="high")
    np.testing.assert_array_equal(cm.use_mask(np, good, g), good & np.isin(g, SMALL.high_gain_ranges))
    assert MedianCommonMode(SMALL, (8, 12), ["rows"], gain_ranges="all").use_mask(np, good, g) is good


def test_real_detector_layouts(backend, rng):
    """Full ePix10ka panels (banks of 176 x 48) and a JUNGFRAU panel (256 x 64), default parameters."""
    for model, ranges in ((EPIX, EPIX.high_gain_ranges), (JF, JF.high_gain_ranges)):
        shape = (1, 1) + model.panel_shape
        s, good, g = random_case(rng, shape)
        if model is JF:
            g = rng.choice([0, 1, 2, -1], size=shape, p=[0.9, 0.04, 0.03, 0.03]).astype(np.int8)
            good &= g >= 0
        cm = make_common_mode(
            "d",
            SimpleNamespace(model_dump=lambda: {"type": "median", "axes": ["rows", "cols"]}),
            model,
            None,
            backend,
            panel_shape=model.panel_shape,
        )
        assert cm.gain_ranges == "high" and cm.max_correction == 100 and cm.min_pixels == 10
        want = slow_median(s, good, g, model.bank_shape, ["rows", "cols"], 100, 10, ranges)
        np.testing.assert_allclose(run(backend, cm, s, good, g), want, rtol=1e-5, atol=1e-4)


def test_numpy_equals_cupy_full_batch(backend, rng):
    """The kernel path (CuPy) equals the reference on an ePix10ka-sized batch."""
    shape = (2, 2, 352, 384)
    s, good, g = random_case(rng, shape)
    cm_np = MedianCommonMode(EPIX, (352, 384), ["banks", "rows", "cols"])
    cm = MedianCommonMode(EPIX, (352, 384), ["banks", "rows", "cols"], backend=backend)
    np.testing.assert_allclose(run(backend, cm, s, good, g), cm_np(s, good, g), rtol=1e-5, atol=1e-4)


def test_make_common_mode_types(numpy_backend):
    ns = lambda **kw: SimpleNamespace(model_dump=lambda: kw)  # noqa: E731
    assert make_common_mode("d", ns(type="none"), EPIX, None, numpy_backend) is None
    assert make_common_mode("d", ns(type="raw"), EPIX, None, numpy_backend) == "raw"
    assert isinstance(make_common_mode("d", None, EPIX, None, numpy_backend), MedianCommonMode)
    assert make_common_mode("d", None, JF, None, numpy_backend) is None
    with pytest.raises(InputError, match="banks"):
        MedianCommonMode(EPIX, (350, 384))


def slow_zero_peak(s, use, bank, maxc):
    """SPEC 4: histogram of s with 1-ADU bins over [-maxc, maxc] (edges -maxc + k, the last one maxc)."""
    s = s.copy()
    edges = np.append(-maxc + np.arange(int(np.ceil(2 * maxc))), maxc)
    br, bc = bank
    for e in range(s.shape[0]):
        for p in range(s.shape[1]):
            for r0 in range(0, s.shape[2], br):
                for c0 in range(0, s.shape[3], bc):
                    blk, u = s[e, p, r0 : r0 + br, c0 : c0 + bc], use[e, p, r0 : r0 + br, c0 : c0 + bc]
                    h, _ = np.histogram(blk[u], bins=edges)
                    if h.sum():
                        k = np.argmax(h)
                        blk[u] -= np.float32((edges[k] + edges[k + 1]) / 2)
    return s


def test_zero_peak(backend, rng):
    s, good, g = random_case(rng, bad_fraction=0.1)
    s += 0.3  # keep values off the bin edges
    cm = ZeroPeakCommonMode(SMALL, (8, 12), max_correction=50, gain_ranges="all", backend=backend)
    want = slow_zero_peak(s, good, (4, 6), 50)
    np.testing.assert_allclose(run(backend, cm, s, good, g), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("maxc", [10.5, 7.3, 12.0])
def test_zero_peak_histogram_range_is_max_correction(backend, rng, maxc):
    """Only values within [-max_correction, max_correction] enter the histogram, also when it is not
    an integer (SPEC 4); the transcription uses numpy.histogram with 1-ADU edges from -max_correction."""
    shape = (4, 2, 8, 12)
    s = (np.round(rng.normal(0, 3, shape)) + 0.25).astype(np.float32)  # values off every bin edge
    # a crowd just outside the range in some banks: it must not be the peak
    s[0, 0, :4, :6] = np.float32(maxc + 0.2)
    s[1, 1, 4:, 6:] = np.float32(-maxc - 0.2)
    s[2, 0, :4, :6].flat[:30] = np.float32(maxc - 0.1)  # inside, in the last (partial) bin
    s[3, 1, :4, :6] = np.float32(maxc + 0.2)  # nothing in range: the bank stays as it is
    good = rng.random(shape) > 0.1
    g = np.zeros(shape, np.int8)
    cm = ZeroPeakCommonMode(SMALL, (8, 12), max_correction=maxc, gain_ranges="all", backend=backend)
    got = run(backend, cm, s, good, g)
    np.testing.assert_allclose(got, slow_zero_peak(s, good, (4, 6), maxc), rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(got[3, 1, :4, :6], s[3, 1, :4, :6])
    edges = np.append(-maxc + np.arange(int(np.ceil(2 * maxc))), maxc)
    u = good[2, 0, :4, :6]
    np.testing.assert_allclose(
        got[2, 0, :4, :6][u], s[2, 0, :4, :6][u] - np.float32((edges[-2] + edges[-1]) / 2), rtol=1e-6
    )


def test_zero_peak_values_outside_range_only(numpy_backend):
    s = np.full((1, 1, 6, 8), 10.7, np.float32)
    cam = get_model("camera")
    out = ZeroPeakCommonMode(cam, (6, 8), max_correction=10.5, gain_ranges="all")(
        s, np.ones(s.shape, bool), np.zeros(s.shape, np.int8)
    )
    np.testing.assert_array_equal(out, s)


@pytest.mark.parametrize("panel", [(704, 770), (703, 768), (10, 95)])
def test_epix100_common_mode_checks_the_panel_at_setup(numpy_backend, panel):
    cfg = SimpleNamespace(model_dump=lambda: {"type": "epix100"})
    with pytest.raises(InputError, match=r"detector e100: panel .* epix100 common mode"):
        make_common_mode("e100", cfg, get_model("epix100"), None, numpy_backend, panel_shape=panel)
    assert make_common_mode("e100", cfg, get_model("epix100"), None, numpy_backend, panel_shape=(10, 192)) is not None


def slow_epix100(s, good, noise, maxc=30.0, histo=30.0, frac=0.25, norm_all=False):
    s = s.copy()
    for e in range(s.shape[0]):
        f = s[e, 0]
        hot = f >= 10 * noise[0]
        near = hot.copy()
        near[1:] |= hot[:-1]
        near[:-1] |= hot[1:]
        near[:, 1:] |= hot[:, :-1]
        near[:, :-1] |= hot[:, 1:]
        inc = good[e, 0] & ~near & (np.abs(f) <= histo)
        if norm_all and inc.any():
            f -= np.float32(np.mean(f[inc], dtype=np.float64))
        half = f.shape[0] // 2
        for h in (0, half):
            for c in range(f.shape[1]):
                col, i = f[h : h + half, c], inc[h : h + half, c]
                if i.sum() >= frac * half and i.any():
                    m = np.float32(np.median(col[i]))
                    if abs(m) <= maxc:
                        f[h : h + half, c] = col - m
        for r in range(f.shape[0]):
            for c0 in range(0, f.shape[1], 96):
                seg, i = f[r, c0 : c0 + 96], inc[r, c0 : c0 + 96]
                if i.sum() >= frac * 96 and i.any():
                    m = np.float32(np.median(seg[i]))
                    if abs(m) <= maxc:
                        f[r, c0 : c0 + 96] = seg - m
    return s


@pytest.mark.parametrize("norm_all", [False, True])
def test_epix100(backend, rng, norm_all):
    model = get_model("epix100")
    shape = (2, 1, 704, 768)
    s = (rng.normal(0, 3, shape) + rng.normal(0, 10, (2, 1, 704, 1))).astype(np.float32)
    s[:, :, 100:110, 50:60] += 500  # photons
    s[0, 0, :, 5] += 40  # a column beyond max_correction
    good = rng.random(shape) > 0.05
    noise = np.full((1, 704, 768), 3.0, np.float32)
    consts = SimpleNamespace(noise=noise, pedestal=None)
    cfg = SimpleNamespace(model_dump=lambda: {"type": "epix100", "norm_all": norm_all})
    cm = make_common_mode("e", cfg, model, consts, backend, panel_shape=(704, 768))
    want = slow_epix100(s, good, noise, norm_all=norm_all)
    np.testing.assert_allclose(run(backend, cm, s, good, np.zeros(shape, np.int8)), want, rtol=1e-5, atol=2e-3)


# JUNGFRAU's banks (256 x 64: columns of 256 and rows of 64, both warp kernels at their largest group) on a
# panel of 2 x 2 of them instead of 2 x 16: the same index arithmetic (bank rows and columns, tiles of 32
# columns, event and panel strides) on 1/8 of the pixels; whole JUNGFRAU panels go through the same
# kernels in test_fake_gpu_pipeline (jungfrau-median)
JF_2X2_BANKS = dataclasses.replace(JF, panel_shape=(2 * JF.bank_shape[0], 2 * JF.bank_shape[1]))


@pytest.mark.parametrize("model", [SMALL, EPIX, JF_2X2_BANKS], ids=["small", "epix10ka", "jungfrau-2x2-banks"])
def test_kernel_index_arithmetic(rng, model):
    """The CUDA kernels' launch geometry, loads, bitonic network and stores give the reference result
    (launched through MedianCommonMode.gpu, the kernels compiled for the CPU; launch checks live in
    test_kernel_launches)."""
    from test_kernel_launches import FakeGpu

    shape = (2, 2) + model.panel_shape
    s, good, g = random_case(rng, shape)
    cm = MedianCommonMode(model, model.panel_shape, ["rows", "cols"], min_pixels=2, gain_ranges="high")
    gpu = FakeGpu()
    on_gpu = MedianCommonMode(model, model.panel_shape, ["rows", "cols"], min_pixels=2, gain_ranges="high", backend=gpu)
    x = on_gpu.gpu(s, good, g)
    assert [name for name, *_ in gpu.launches] == ["cm_median_rows_warp", "cm_median_cols_warp"]
    np.testing.assert_array_equal(x.reshape(shape), cm(s, good, g))
