"""Beamtime set-up helpers: beam centre / distance fit, mask maker, ROI picker (gpusmall.analysis)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import yaml

from gpusmall.analysis import centre, maskmaker, roi_picker
from gpusmall.analysis.avimage import assemble, pixel_grid
from gpusmall.detectors.masks import read_user_mask
from gpusmall.funcs.azav import HC_KEV_A, geometry_center, geometry_poni, load_poni
from gpusmall.funcs.roi import RoiParams

PIX = 100.0  # um
ROWS, COLS = 96, 112


def epix_like_geometry(rows=ROWS, cols=COLS, pix=PIX):
    """4 panels, 2 x 2, rotated by 0, 90, 180, 270 degrees, with gaps of ~1.8 mm between them."""
    r, c = np.mgrid[0:rows, 0:cols].astype(float)
    u, v = (c + 0.5) * pix - cols * pix / 2, (r + 0.5) * pix - rows * pix / 2
    xs, ys = [], []
    for X, Y, ang in [(-6500, -6500, 0), (6500, -6500, 90), (-6500, 6500, 180), (6500, 6500, 270)]:
        a = np.radians(ang)
        xs.append(X + np.cos(a) * u - np.sin(a) * v)
        ys.append(Y + np.sin(a) * u + np.cos(a) * v)
    return np.array(xs), np.array(ys)


CENTER = (310.3, -420.7)  # um: in the gap between the panels, off the pixel grid
DIST, E_KEV = 40.0, 9.5
RING_Q = [0.8, 1.3, 1.8]  # Angstrom^-1: radii ~6.7, 11.1, 15.8 mm (the last one in the corners only)


def ring_image(x, y, center=CENTER, dist=DIST, seed=0):
    """Rings of width 0.015 A^-1 (~1.5 pixel) at RING_Q on a falling background, with polarization and
    solid angle, Poisson noise."""
    tth, phi, cosi, _ = geometry_center(x, y, np.zeros_like(x), center, dist)
    q = 4 * np.pi / (HC_KEV_A / E_KEV) * np.sin(tth / 2)
    i = 20 * np.exp(-q) + 5
    for qk, a in zip(RING_Q, [100, 60, 40]):
        i = i + a * np.exp(-0.5 * ((q - qk) / 0.015) ** 2)
    i = i * 0.5 * (1 + np.cos(tth) ** 2 - 0.99 * np.cos(2 * phi) * np.sin(tth) ** 2) * cosi**3
    return np.random.default_rng(seed).poisson(i).astype(np.float64)


@pytest.fixture(scope="module")
def rings():
    x, y = epix_like_geometry()
    img = ring_image(x, y)
    mask = np.ones(img.shape, bool)
    img[0, 40:44, 50:60] = np.nan  # bad pixels, and a hot one the fit must shrug off
    mask[0, 40:44, 50:60] = False
    img[2, 5, 7] = 5000.0
    return img, x, y, mask


# ---- beam centre --------------------------------------------------------------------------------------
def test_kasa_circle_exact_on_points():
    t = np.linspace(0.3, 2.0, 25)  # an arc, not a whole circle
    cx, cy, r = centre.kasa_circle(12.5 + 7 * np.cos(t), -3.25 + 7 * np.sin(t))
    assert (cx, cy, r) == pytest.approx((12.5, -3.25, 7.0), abs=1e-9)


def test_fit_concentric_common_centre():
    rng = np.random.default_rng(1)
    t1, t2 = rng.uniform(0, np.pi, 200), rng.uniform(np.pi, 2 * np.pi, 200)  # rings on opposite halves
    x = np.r_[5 + 10 * np.cos(t1), 5 + 20 * np.cos(t2)]
    y = np.r_[-2 + 10 * np.sin(t1), -2 + 20 * np.sin(t2)]
    lab = np.r_[np.zeros(200, int), np.ones(200, int)]
    c, radii, rms = centre.fit_concentric(x, y, lab, guess=(3.0, 0.0))
    assert c == pytest.approx((5, -2), abs=1e-6)
    assert radii == pytest.approx((10, 20), abs=1e-6)
    assert rms < 1e-6


def test_fit_center_recovers_centre(rings):
    img, x, y, mask = rings
    fit = centre.fit_center(img, x, y, mask)
    err_px = np.hypot(fit.center_um[0] - CENTER[0], fit.center_um[1] - CENTER[1]) / PIX
    assert err_px < 0.2
    assert len(fit.radii_um) == 3  # the threshold finds the bright ring, the profile the two fainter ones


@pytest.mark.parametrize("refine", [False, True])
def test_find_geometry_centre_and_distance(rings, refine):
    img, x, y, mask = rings
    geo = centre.find_geometry(img, x, y, mask, energy_kev=E_KEV, ring_q=RING_Q, refine=refine)
    err_px = np.hypot(geo.center_um[0] - CENTER[0], geo.center_um[1] - CENTER[1]) / PIX
    assert err_px < 0.2
    assert geo.distance_mm == pytest.approx(DIST, rel=0.005)
    p = geo.azav_params()
    assert set(p) == {"center_um", "distance_mm", "energy_kev"}


def test_distance_from_calibrant_lines(rings):
    """d-spacings with lines the detector does not see (and an unreachable one): matched automatically."""
    img, x, y, mask = rings
    d = [2 * np.pi / q for q in [0.5, *RING_Q, 2.4, 100.0]]
    geo = centre.find_geometry(img, x, y, mask, energy_kev=E_KEV, d_spacing=d)
    assert geo.ring_q == pytest.approx(RING_Q)
    assert geo.distance_mm == pytest.approx(DIST, rel=0.005)


def test_refine_sharpness_from_a_wrong_start(rings):
    img, x, y, mask = rings
    start = (CENTER[0] + 3 * PIX, CENTER[1] - 2.5 * PIX)
    c = centre.refine_center_sharpness(img, x, y, start, mask, r_range_um=(5000, 12500))
    assert np.hypot(c[0] - CENTER[0], c[1] - CENTER[1]) / PIX < 0.2
    # the objective is sharper at the true centre than 1 pixel off
    v, xs, ys = img[mask].ravel(), x[mask].ravel(), y[mask].ravel()
    ok = np.isfinite(v)
    s_true = centre.profile_sharpness(v[ok], xs[ok], ys[ok], CENTER, 5000, 12500, PIX / 2)
    s_off = centre.profile_sharpness(v[ok], xs[ok], ys[ok], (CENTER[0] + PIX, CENTER[1]), 5000, 12500, PIX / 2)
    assert s_true > s_off


def test_fit_distance_errors():
    with pytest.raises(ValueError, match="exactly one"):
        centre.fit_distance([1000.0], 9.5)
    with pytest.raises(ValueError, match="no assignment"):
        centre.fit_distance([1000.0, 1100.0], 9.5, d_spacing=[3.0, 1.0])  # ratios that fit no pair of lines


def test_poni_gives_the_same_geometry(tmp_path):
    """The PONI file, read by azav's own loader, gives the 2theta of the centre/distance geometry."""
    x, y = epix_like_geometry()
    geo = centre.BeamGeometry(CENTER, DIST, E_KEV)
    path = geo.write_poni(tmp_path / "fit.poni")
    ai = load_poni(str(path))
    assert ai.wavelength == pytest.approx(HC_KEV_A / E_KEV * 1e-10)
    tth_poni, _, _ = geometry_poni(x, y, ai)
    tth_c, _, _, _ = geometry_center(x, y, np.zeros_like(x), CENTER, DIST)
    np.testing.assert_allclose(tth_poni, tth_c, rtol=0, atol=1e-9)


# ---- masks ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dark():
    """mean / std / max of a dark of 4 panels of 48 x 64 with planted hot, dead and noisy pixels."""
    rng = np.random.default_rng(3)
    shape = (4, 48, 64)
    mean = rng.normal(0.0, 0.3, shape)
    std = rng.normal(3.0, 0.15, shape)
    planted = {"hot": [(0, 3, 4), (2, 40, 60)], "dead": [(1, 10, 10), (3, 0, 63)], "noisy": [(0, 20, 30), (3, 47, 0)]}
    for p in planted["hot"]:
        mean[p] = 30.0
    for p in planted["dead"]:
        mean[p], std[p] = 0.0, 0.0
    for p in planted["noisy"]:
        std[p] = 25.0
    mx = mean + 5 * std
    return mean, std, mx, planted


def _where(bad):
    return sorted(map(tuple, np.argwhere(bad).tolist()))


def test_thresholds_flag_exactly_the_planted_pixels(dark):
    mean, std, mx, planted = dark
    assert _where(maskmaker.hot_pixels(mean, k=6)) == sorted(planted["hot"])
    assert _where(maskmaker.dead_pixels(std=std)) == sorted(planted["dead"])
    assert _where(maskmaker.noisy_pixels(std, k=4)) == sorted(planted["noisy"])
    assert _where(maskmaker.hot_pixels(mean, k=None, adu=10)) == sorted(planted["hot"])
    maps = maskmaker.make_mask(mean, std, mx, hot_k=6, noisy_k=4)
    assert _where(maskmaker.combine(maps)) == sorted(p for v in planted.values() for p in v)


def test_drawn_regions():
    shape = (2, 6, 8)
    rect = maskmaker.rectangle_mask(shape, [[1, 2], [2, 4], [3, 6]])
    assert rect.sum() == 6 and rect[1, 2:4, 3:6].all()
    tri = maskmaker.polygon_mask(shape, 0, [(0.5, 0.5), (0.5, 4.5), (4.5, 0.5)])  # pixel centres r + c < 5
    r, c = np.mgrid[0:6, 0:8]
    np.testing.assert_array_equal(tri[0], (r >= 1) & (c >= 1) & (r + c < 5))
    assert not tri[1].any()
    x = np.broadcast_to((np.arange(8) + 0.5) * PIX, shape)
    y = np.broadcast_to(((np.arange(6) + 0.5) * PIX)[:, None], shape)
    disc = maskmaker.circle_mask(x, y, (100.0, 100.0), 120.0)  # centre at the corner of pixels (0..1, 0..1)
    assert _where(disc[:1]) == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]
    ring = maskmaker.circle_mask(x, y, (50.0, 50.0), 250.0, r_min_um=150.0)
    assert (0, 0, 2) in _where(ring) and (0, 1, 2) in _where(ring)  # 200 and 224 um from pixel (0, 0)
    assert (0, 0, 0) not in _where(ring) and (0, 1, 1) not in _where(ring) and (0, 0, 3) not in _where(ring)
    with pytest.raises(ValueError):
        maskmaker.rectangle_mask(shape, [[0, 1], [0, 7], [0, 2]])


@pytest.mark.parametrize("name", ["user.npy", "user.h5", "user.h5:/masks/epix"])
def test_saved_mask_reads_back_through_gpusmall(tmp_path, dark, name):
    mean, std, mx, _ = dark
    bad = maskmaker.combine(
        maskmaker.make_mask(mean, std, mx, hot_k=6, noisy_k=4),
        maskmaker.rectangle_mask(mean.shape, [[2, 3], [0, 5], [10, 20]]),
    )
    source = maskmaker.save_user_mask(tmp_path / name if ":" not in name else f"{tmp_path}/{name}", bad)
    good = read_user_mask(source, "epix", mean.shape)  # the loader mask.user goes through: 1 = keep
    np.testing.assert_array_equal(good, ~bad)
    np.testing.assert_array_equal(maskmaker.load_user_mask(source, mean.shape), bad)


def test_show_mask_draws_the_bad_pixels_red(dark, tmp_path):
    mean, std, _, planted = dark
    bad = maskmaker.noisy_pixels(std, k=4)
    fig = maskmaker.show_mask(mean, bad, png=tmp_path / "mask.png")
    overlay = fig.axes[0].get_images()[1].get_array()
    assert int(np.isfinite(np.ma.filled(overlay, np.nan)).sum()) == len(planted["noisy"])
    assert (tmp_path / "mask.png").stat().st_size > 0
    x, y = epix_like_geometry(48, 64)
    fig = maskmaker.show_mask(mean, bad, x, y)
    overlay = np.ma.filled(fig.axes[0].get_images()[1].get_array(), np.nan)
    assert int(np.isfinite(overlay).sum()) == len(planted["noisy"])


# ---- ROI picker -------------------------------------------------------------------------------------------
def test_bounds_from_rectangle_numbers():
    assert roi_picker.bounds_from_rectangle(2, 9.6, 19.4, 30.2, 5.0) == [[2, 3], [5, 20], [10, 31]]
    assert roi_picker.bounds_from_rectangle(2, 30.2, 5.0, 9.6, 19.4) == [[2, 3], [5, 20], [10, 31]]
    assert roi_picker.bounds_from_rectangle(0, 3.1, 7.2, 3.3, 7.4) == [[0, 1], [7, 8], [3, 4]]  # within a pixel
    assert roi_picker.bounds_from_rectangle(0, 4.0, 2.0, 6.0, 2.0) == [[0, 1], [2, 3], [4, 7]]  # edges count
    assert roi_picker.bounds_from_rectangle(1, -3.0, -2.0, 5.2, 200.0, shape=(3, 96, 112)) == [[1, 2], [0, 96], [0, 6]]
    with pytest.raises(ValueError):
        roi_picker.bounds_from_rectangle(0, 120.0, 0.0, 130.0, 5.0, shape=(96, 112))
    RoiParams(bounds=roi_picker.bounds_from_rectangle(2, 9.6, 19.4, 30.2, 5.0))  # valid config bounds


def test_tiled_view_coordinates():
    img = np.arange(4 * 6 * 8, dtype=np.float32).reshape(4, 6, 8)
    view = roi_picker.PanelView(img)
    assert view.kind == "tiled" and view.origin == "upper"
    # tiles 2 x 2, 4 cells apart: panel 3 starts at row 10, col 12
    assert view.pixel_at(12 + 5, 10 + 2) == (3, 2, 5)
    assert view.pixel_at(9.0, 1.0) is None  # the gap
    assert view.format_coord(12 + 5, 10 + 2) == f"panel 3, row 2, col 5: {img[3, 2, 5]:.4g}"
    # a rectangle inside panel 3's tile: bounds_from_rectangle in its own coordinates
    assert view.rectangle_to_bounds(13.6, 10.4, 16.2, 13.0) == [roi_picker.bounds_from_rectangle(3, 1.6, 0.4, 4.2, 3.0)]
    # one across panels 0 and 1
    assert view.rectangle_to_bounds(6.0, 1.0, 13.0, 2.0) == [[[0, 1], [1, 3], [6, 8]], [[1, 2], [1, 3], [0, 2]]]
    np.testing.assert_array_equal(view.shown[10:16, 12:20], img[3])


def test_assembled_view_follows_avimage():
    x, y = epix_like_geometry()
    img = np.random.default_rng(0).random(x.shape).astype(np.float32)
    view = roi_picker.PanelView(img, x, y)
    assert view.kind == "assembled" and view.origin == "upper"  # row 0 at the top, as every image
    np.testing.assert_array_equal(view.shown, assemble(img, x, y, PIX))
    # psana's det.raw.image() layout: the horizontal data coordinate is y, the vertical one x (mm)
    assert (view.xlabel, view.ylabel) == ("y (mm)", "x (mm)")
    for where in [(0, 0, 0), (1, 10, 20), (2, 95, 111), (3, 50, 3)]:
        assert view.pixel_at(y[where] / 1000, x[where] / 1000) == where
        rows, cols, _, _ = pixel_grid(x, y, PIX)
        assert view.shown[rows[where], cols[where]] == img[where]
    assert view.format_coord(-1e3, -1e3) == "x=-1000 mm, y=-1000 mm"  # off the image: x is the vertical one
    # panel 1 is turned by 90 degrees: a rectangle in x, y covers rows along x and cols along y
    p, r0, r1, c0, c1 = 1, 10, 20, 30, 45
    xs, ys = x[p, r0:r1, c0:c1] / 1000, y[p, r0:r1, c0:c1] / 1000
    got = view.rectangle_to_bounds(ys.min() - 0.02, xs.min() - 0.02, ys.max() + 0.02, xs.max() + 0.02)
    assert got == [[[1, 2], [10, 20], [30, 45]]]
    outline = view.roi_outline(got[0])  # the outline is the pixels' outer edge, in (y, x) data coordinates
    assert outline[:, 0].min() == pytest.approx(ys.min() - 0.05) and outline[:, 1].max() == pytest.approx(
        xs.max() + 0.05
    )


class _Event:
    def __init__(self, x, y):
        self.xdata, self.ydata = x, y


def test_picker_collects_rectangles(capsys):
    from matplotlib.figure import Figure

    img = np.arange(4 * 6 * 8, dtype=np.float32).reshape(4, 6, 8)
    fig = Figure()
    ax = fig.add_subplot()
    picker = roi_picker.RoiPicker(roi_picker.PanelView(img), ax=ax)
    assert ax.format_coord(12 + 5, 10 + 2).startswith("panel 3, row 2, col 5")
    picker.onselect(_Event(13.6, 10.4), _Event(16.2, 13.0))
    picker.onselect(_Event(0.2, 0.1), _Event(2.0, 3.0))
    assert picker.rois == [[[3, 4], [1, 4], [2, 5]], [[0, 1], [1, 4], [1, 3]]]  # centres inside, edges included
    assert "roi1: bounds: [[0, 1], [1, 4], [1, 3]]" in capsys.readouterr().out
    funcs = yaml.safe_load(picker.config())
    assert [f["bounds"] for f in funcs] == picker.rois and funcs[0] == {
        "type": "roi",
        "name": "roi0",
        "bounds": [[3, 4], [1, 4], [2, 5]],
    }


def test_roi_png_labels_and_outlines(tmp_path):
    x, y = epix_like_geometry()
    img = np.random.default_rng(0).random(x.shape).astype(np.float32)
    rois = [[[1, 2], [10, 20], [30, 45]], [[3, 4], [0, 5], [0, 5]]]
    fig = roi_picker.roi_figure(img, x, y, rois=rois, grid=32)
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert {"p0", "p1", "p2", "p3", "r0", "r32", "r64", "c96", "roi0", "roi1"} <= texts
    outlines = [line for line in fig.axes[0].lines if line.get_label().startswith("roi")]
    view = roi_picker.PanelView(img, x, y)
    np.testing.assert_allclose(outlines[0].get_xydata(), view.roi_outline(rois[0]))
    png = roi_picker.roi_png(img, tmp_path / "rois.png", rois=rois)  # tiled
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_helpers_at_the_package_top_level():
    """``gpusmall.find_geometry`` etc. are the analysis modules' functions, imported on first use."""
    import gpusmall
    from gpusmall.analysis import centre, maskmaker, roi_picker

    for name, module in gpusmall._TOOLS.items():
        assert getattr(gpusmall, name) is getattr(
            {"centre": centre, "maskmaker": maskmaker, "roi_picker": roi_picker}[module], name
        )
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        gpusmall.nope  # noqa: B018
