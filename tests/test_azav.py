"""azav against a float64 transcription of the SPEC formula and against pyFAI integrate1d."""

from __future__ import annotations

import numpy as np
import pytest
from helpers_funcs import make_ctx, make_frames, setup

from gpusmall.funcs.azav import HC_KEV_A, Azav

SHAPE = (1, 120, 150)
PIX = 100.0  # um


def spec_reference(data, good, x, y, z, center, dist_mm, e_kev, bins, rng_q, f=0.99, solid=True, nphi=1):
    """Literal float64 transcription of SPEC section 6 azav."""
    vx, vy, vz = x - center[0], y - center[1], z - z.mean() + dist_mm * 1000
    tth = np.arctan2(np.hypot(vx, vy), vz)
    phi = np.arctan2(vy, vx)
    q = 4 * np.pi / (HC_KEV_A / e_kev) * np.sin(tth / 2)
    c = np.ones_like(q)
    if f is not None:
        c *= 0.5 * (1 + np.cos(tth) ** 2 - f * np.cos(2 * phi) * np.sin(tth) ** 2)
    if solid:
        c *= np.cos(tth) ** 3
    edges = np.linspace(rng_q[0], rng_q[1], bins + 1)
    pedges = np.linspace(-np.pi, np.pi, nphi + 1)
    out = np.full((data.shape[0], nphi, bins), np.nan)
    for e in range(data.shape[0]):
        for ip in range(nphi):
            for b in range(bins):
                hi_ok = q <= edges[b + 1] if b == bins - 1 else q < edges[b + 1]
                sel = (
                    good[e]
                    & (q >= edges[b])
                    & hi_ok
                    & (phi >= pedges[ip])
                    & (phi < pedges[ip + 1] if ip < nphi - 1 else True)
                )
                if sel.any():
                    out[e, ip, b] = data[e][sel].sum() / c[sel].sum()
    return out


@pytest.mark.parametrize("engine", ["csr", "histogram"])
@pytest.mark.parametrize("nphi", [1, 4])
def test_azav_matches_spec_formula(backend, rng, engine, nphi):
    ctx = make_ctx(backend, SHAPE, PIX)
    x, y, z = (backend.to_host(a).astype(np.float64) for a in (ctx.x, ctx.y, ctx.z))
    data = rng.normal(100, 20, (5,) + SHAPE).astype(np.float32)
    good = rng.random(data.shape) > 0.1
    center, rng_q = (3000.0, 4000.0), (0.05, 2.5)
    f = setup(
        Azav,
        backend,
        ctx,
        center_um=list(center),
        distance_mm=50,
        energy_kev=9.5,
        bins=40,
        range=list(rng_q),
        phi_bins=nphi,
        engine=engine,
    )
    out = f.compute(make_frames(backend, data, good))[0]
    got = backend.to_host(out["azav"])
    ref = spec_reference(
        np.where(good, data, 0).astype(np.float64), good, x, y, z, center, 50, 9.5, 40, rng_q, nphi=nphi
    )
    assert got.shape == (5, nphi, 40)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_allclose(got, ref, rtol=2e-5, equal_nan=True)
    cnt = backend.to_host(out["count"])
    assert cnt.sum() > 0 and (cnt[np.isnan(ref)] == 0).all()
    st = f.static_outputs()
    np.testing.assert_allclose(st["q"], np.linspace(*rng_q, 41)[:-1] + (rng_q[1] - rng_q[0]) / 80)
    assert st["phi"].shape == (nphi,)


@pytest.mark.parametrize("engine", ["csr", "histogram"])
def test_azav_static_mask_and_bad_pixels_per_event(backend, rng, engine):
    """A static mask (pixels in no total) and pixels bad in single events (taken out of that event's
    denominators and counts only): the SPEC formula over the pixels good in each event."""
    mask = rng.random(SHAPE) > 0.2
    ctx = make_ctx(backend, SHAPE, PIX, mask=mask)
    x, y, z = (backend.to_host(a).astype(np.float64) for a in (ctx.x, ctx.y, ctx.z))
    data = rng.normal(100, 20, (4,) + SHAPE).astype(np.float32)
    good = mask[None] & (rng.random(data.shape) > 0.05)
    good[2] = mask  # an event with only the static mask
    center, rng_q = (3000.0, 4000.0), (0.05, 2.5)
    f = setup(
        Azav,
        backend,
        ctx,
        center_um=list(center),
        distance_mm=50,
        energy_kev=9.5,
        bins=30,
        range=list(rng_q),
        engine=engine,
    )
    out = f.compute(make_frames(backend, data, good))[0]
    ref = spec_reference(np.where(good, data, 0).astype(np.float64), good, x, y, z, center, 50, 9.5, 30, rng_q)
    got = backend.to_host(out["azav"])
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_allclose(got, ref, rtol=2e-5, equal_nan=True)
    assert (backend.to_host(out["count"])[2] >= backend.to_host(out["count"])[[0, 1, 3]]).all()


def test_azav_thresholds_and_options(numpy_backend, rng):
    ctx = make_ctx(numpy_backend, SHAPE, PIX)
    data = rng.normal(100, 50, (3,) + SHAPE).astype(np.float32)
    f = setup(
        Azav,
        numpy_backend,
        ctx,
        center_um=[0, 0],
        distance_mm=80,
        energy_kev=9.5,
        bins=10,
        thres_adu=80,
        thres_adu_high=150,
        polarization=None,
        solid_angle=False,
    )
    got = f.compute(make_frames(numpy_backend, data))[0]["azav"]
    clipped = np.where((data >= 80) & (data <= 150), data, 0)
    g = setup(
        Azav,
        numpy_backend,
        ctx,
        center_um=[0, 0],
        distance_mm=80,
        energy_kev=9.5,
        bins=10,
        polarization=None,
        solid_angle=False,
    )
    ref = g.compute(make_frames(numpy_backend, clipped))[0]["azav"]
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    # no corrections: plain mean per bin
    assert np.nanmax(ref) <= 150
    for unit in ("q_nm^-1", "2th_deg", "r_mm"):
        h = setup(Azav, numpy_backend, ctx, center_um=[0, 0], distance_mm=80, energy_kev=9.5, bin_width=0.5, unit=unit)
        assert h.compute(make_frames(numpy_backend, data))[0]["azav"].shape[2] == h.nrad


def _pyfai_compare(ai, f, img, bins, rng_q):
    res = ai.integrate1d(
        img,
        bins,
        unit="q_A^-1",
        method=("no", "histogram", "cython"),
        correctSolidAngle=True,
        polarization_factor=0.99,
        radial_range=rng_q,
        dummy=None,
    )
    return np.asarray(res.intensity), np.asarray(res.count) if res.count is not None else None


def _check_agreement(ours, theirs):
    ok = np.isfinite(ours) & (theirs != 0)
    assert ok.sum() > 0.8 * ours.size
    rel = np.abs(ours[ok] - theirs[ok]) / np.abs(theirs[ok])
    assert np.mean(rel < 1e-4) >= 0.9, np.sort(rel)[-10:]
    assert rel.max() < 1e-2


@pytest.mark.parametrize("rotations", [(0, 0, 0), (0.05, -0.03, 0.2)])
def test_azav_vs_pyfai(numpy_backend, rng, tmp_path, rotations):
    from pyFAI.detectors import Detector
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    px = PIX * 1e-6
    det = Detector(pixel1=px, pixel2=px, max_shape=SHAPE[1:])
    ai = AzimuthalIntegrator(
        dist=0.05,
        poni1=0.004,
        poni2=0.003,
        rot1=rotations[0],
        rot2=rotations[1],
        rot3=rotations[2],
        detector=det,
        wavelength=HC_KEV_A / 9.5 * 1e-10,
    )
    poni = tmp_path / "geo.poni"
    ai.save(str(poni))
    img = rng.normal(100, 20, SHAPE[1:]).astype(np.float32) + 50 * np.sin(np.arange(SHAPE[2]) / 7.0)
    # the range covers every pixel: pyFAI's histogram engine folds pixels below radial_range[0] into
    # the first bin (a pyFAI quirk), while azav (and the SPEC) leave them out
    bins, rng_q = 60, (0.0, 1.45)
    ctx = make_ctx(numpy_backend, SHAPE, PIX)
    theirs, _ = _pyfai_compare(ai, None, img, bins, rng_q)
    f = setup(Azav, numpy_backend, ctx, poni=str(poni), bins=bins, range=list(rng_q))
    ours = f.compute(make_frames(numpy_backend, img[None, None]))[0]["azav"][0, 0]
    _check_agreement(ours, theirs)
    if rotations == (0, 0, 0):  # the centre/distance geometry is the same thing
        g = setup(
            Azav,
            numpy_backend,
            ctx,
            center_um=[3000, 4000],
            distance_mm=50,
            energy_kev=9.5,
            bins=bins,
            range=list(rng_q),
        )
        ours2 = g.compute(make_frames(numpy_backend, img[None, None]))[0]["azav"][0, 0]
        _check_agreement(ours2, theirs)


# ---- r_mm, azav under a roi, fully masked frames --------------------------------------------------------
def _bins_by_formula(r, lo, hi, nb):
    """Radial bin of each pixel as azav bins it: floor((r - lo) / width), the upper edge in the last bin."""
    width = (hi - lo) / nb
    rb = np.floor((r - lo) / width).astype(np.int64)
    rb[r == hi] = nb - 1
    return np.where((rb >= 0) & (rb < nb) & (r <= hi), rb, -1)


def test_r_mm_matches_pyfai_for_a_rotated_poni(numpy_backend, rng, tmp_path):
    pytest.importorskip("pyFAI")
    from pyFAI.detectors import Detector
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    det = Detector(pixel1=PIX * 1e-6, pixel2=PIX * 1e-6, max_shape=SHAPE[1:])
    ai = AzimuthalIntegrator(
        dist=0.05,
        poni1=0.004,
        poni2=0.003,
        rot1=0.3,
        rot2=-0.2,
        rot3=0.1,
        detector=det,
        wavelength=HC_KEV_A / 9.5 * 1e-10,
    )
    poni = tmp_path / "geo.poni"
    ai.save(str(poni))
    r_pyfai = np.asarray(ai.array_from_unit(shape=SHAPE[1:], typ="center", unit="r_mm"), np.float64)
    ctx = make_ctx(numpy_backend, SHAPE, PIX)
    bins = 25
    f = setup(Azav, numpy_backend, ctx, poni=str(poni), bins=bins, unit="r_mm", polarization=None, solid_angle=False)
    # no range: it spans pyFAI's r_mm of the pixels
    lo, hi = r_pyfai.min(), r_pyfai.max()
    width = (hi - lo) / bins
    np.testing.assert_allclose(f.static_outputs()["q"], lo + (np.arange(bins) + 0.5) * width, rtol=1e-10)
    np.testing.assert_array_equal(f.bin_index_host, _bins_by_formula(r_pyfai, lo, hi, bins).ravel())
    # with polarization and solid angle off, each bin is the plain mean of its pixels
    img = rng.normal(100, 20, SHAPE[1:]).astype(np.float32)
    got = f.compute(make_frames(numpy_backend, img[None, None]))[0]["azav"][0, 0]
    rb = _bins_by_formula(r_pyfai, lo, hi, bins)
    ref = np.array([img[rb == b].astype(np.float64).mean() for b in range(bins)])
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_r_mm_is_the_transverse_radius_with_a_panel_displaced_in_z(backend, rng):
    from gpusmall.detectors.constants import default_geometry

    shape = (2, 20, 20)
    x, y, z = (np.asarray(a, np.float64) for a in default_geometry(shape, PIX))
    x[1] += 2500.0
    z[1] = 5000.0  # panel 1 is 5 mm further from the sample: its r_mm is still hypot(x - cx, y - cy)
    ctx = make_ctx(backend, shape, PIX, geometry=(x, y, z))
    center, rng_r, bins = (600.0, 900.0), (0.0, 4.0), 16
    f = setup(
        Azav,
        backend,
        ctx,
        center_um=list(center),
        distance_mm=80,
        bins=bins,
        range=list(rng_r),
        unit="r_mm",
        polarization=None,
        solid_angle=False,
    )
    r = np.hypot(x - center[0], y - center[1]) / 1000.0
    rb = _bins_by_formula(r, *rng_r, bins)
    np.testing.assert_array_equal(f.bin_index_host, rb.ravel())
    data = rng.normal(50, 10, (3,) + shape).astype(np.float32)
    got = backend.to_host(f.compute(make_frames(backend, data))[0]["azav"])[:, 0]
    ref = np.array(
        [[d[rb == b].astype(np.float64).mean() if (rb == b).any() else np.nan for b in range(bins)] for d in data]
    )
    np.testing.assert_allclose(got, ref, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("unit", ["q_A^-1", "2th_deg", "r_mm"])
def test_azav_under_a_roi_bins_each_pixel_as_the_top_level_one(backend, rng, unit):
    from gpusmall.detectors.constants import default_geometry
    from gpusmall.funcs.roi import Roi

    shape = (2, 40, 40)
    x, y, z = (np.asarray(a, np.float64) for a in default_geometry(shape, PIX))
    x[1] += 4000.0
    z[1] = 5000.0  # mean z of the detector is 2500 um; of panel 1 alone 5000 um
    ctx = make_ctx(backend, shape, PIX, geometry=(x, y, z))
    rng_ = {"q_A^-1": [0.0, 0.4], "2th_deg": [0.0, 5.0], "r_mm": [0.0, 9.0]}[unit]
    params = dict(center_um=[0, 0], distance_mm=100, energy_kev=9.5, bins=10, range=rng_, unit=unit)
    top = setup(Azav, backend, ctx, **params)
    bounds = [[1, 2], [5, 30], [3, 40]]
    roi = Roi(Roi.Params(bounds=bounds), [Azav(Azav.Params(**params))])
    roi.setup(ctx)
    child = roi.children[0]
    idx = tuple(slice(a, b) for a, b in bounds)
    top_bins = top.bin_index_host.reshape(shape)[idx]
    assert (top_bins >= 0).sum() > 100
    np.testing.assert_array_equal(child.bin_index_host.reshape(top_bins.shape), top_bins)
    # and the numbers: the child's azav is the top-level formula over the ROI's pixels only
    data = rng.normal(80, 15, (2,) + shape).astype(np.float32)
    out = roi(make_frames(backend, data))
    got = backend.to_host(out["roi_azav_azav"])[:, 0]
    c = top.c_host.reshape(shape)[idx]
    sub = data[(slice(None),) + idx].astype(np.float64)
    ref = np.array(
        [
            [s[top_bins == b].sum() / c[top_bins == b].sum() if (top_bins == b).any() else np.nan for b in range(10)]
            for s in sub
        ]
    )
    np.testing.assert_allclose(got, ref, rtol=1e-5, equal_nan=True)


def test_azav_fully_masked_without_range_is_an_input_error(backend):
    from gpusmall.errors import InputError

    shape = (1, 10, 10)
    ctx = make_ctx(backend, shape, mask=np.zeros(shape, bool))
    with pytest.raises(
        InputError,
        match=r"detector det: function ring: .*no unmasked pixel to set the radial "
        r"range; give range",
    ):
        setup(Azav, backend, ctx, name="ring", center_um=[0, 0], distance_mm=100, energy_kev=9.5, bins=5)
    # with a range it sets up, and every bin is empty
    f = setup(Azav, backend, ctx, center_um=[0, 0], distance_mm=100, energy_kev=9.5, bins=5, range=[0, 1])
    out = f.compute(make_frames(backend, np.ones((2,) + shape, np.float32)))[0]
    assert np.isnan(backend.to_host(out["azav"])).all()
    np.testing.assert_array_equal(backend.to_host(out["count"]), 0)


def test_numba_numerators_equal_the_sparse_product(rng, monkeypatch):
    """gpusmall/funcs/cpu_azav.py (float64, one pass) against the csr engine's sparse product (float32) on the
    same batch: equal within float32 rounding, NaN in the same bins."""
    from gpusmall.backend import get_backend
    from gpusmall.calib import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip("numba not available")
    backend = get_backend("numpy")
    shape = (2, 30, 40)
    data = rng.exponential(20, (5,) + shape).astype(np.float32)
    good = rng.random(data.shape) > 0.05
    ctx = make_ctx(backend, shape)
    f = setup(Azav, backend, ctx, center_um=[1500, 2000], distance_mm=50, energy_kev=9.5, bins=37)
    frames = make_frames(backend, data, good)
    got = f.compute(frames)[0]
    monkeypatch.setenv(cpu_kernels.ENV_VAR, "0")
    ref = f.compute(frames)[0]
    np.testing.assert_array_equal(got["count"], ref["count"])
    np.testing.assert_array_equal(np.isnan(got["azav"]), np.isnan(ref["azav"]))
    np.testing.assert_allclose(got["azav"], ref["azav"], rtol=2e-6, equal_nan=True)
    assert not np.array_equal(got["azav"], ref["azav"])  # the float64 sums are not the float32 product's
