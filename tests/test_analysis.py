"""Beamtime helpers: avimage (average + assembly), plot, cube, and mask_value: nan (SPEC sections 3, 9).

Numbers are checked against direct NumPy computations on the same simulated events.
"""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
from helpers_funcs import make_ctx, make_frames, setup
from matplotlib.image import imread
from test_end_to_end import calibrate_by_the_spec

from gpusmall.analysis.avimage import assemble, average_image, pixel_grid, tile_panels
from gpusmall.analysis.cube import make_cube
from gpusmall.backend import Backend
from gpusmall.cli import main
from gpusmall.funcs.roi import Roi
from gpusmall.producer.config import validate_config
from gpusmall.producer.run import reduce_run
from gpusmall.sources.sim import SimSource, panel_layout

# ---- assemble ----------------------------------------------------------------------------------------


def test_assemble_places_known_pixels_at_known_positions():
    pix = 100.0
    # panel 0: 2 x 3 pixels at the origin, rows along x, columns along y (psana's geometry)
    r, c = np.mgrid[0:2, 0:3]
    x0, y0 = (r + 0.5) * pix, (c + 0.5) * pix
    # panel 1: 2 x 3 pixels rotated by 90 degrees (its rows run along y, its columns along -x),
    # placed 5 pixels to the right (along y), its first pixel at grid (row 4, col 5)
    y1 = (5 + r + 0.5) * pix
    x1 = (4 - c + 0.5) * pix
    x = np.stack([x0, x1]).astype(np.float32)
    y = np.stack([y0, y1]).astype(np.float32)
    img = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    img[0, 1, 2] = np.nan  # a bad pixel
    out = assemble(img, x, y, pix, fill=-1.0)
    assert out.shape == (5, 7) and out.dtype == np.float32
    for p, i, j in np.ndindex(img.shape):
        row = int(round(x[p, i, j] / pix - 0.5))  # rows from x, columns from y: psana's det.raw.image()
        col = int(round(y[p, i, j] / pix - 0.5))
        if np.isnan(img[p, i, j]):
            assert np.isnan(out[row, col])
        else:
            assert out[row, col] == img[p, i, j], (p, i, j)
    # by hand: panel 1 pixel (row 0, col 0) -> grid (4, 5); (row 1, col 2) -> grid (2, 6)
    assert out[4, 5] == 6 and out[2, 6] == 11 and out[0, 0] == 0 and out[1, 1] == 4
    covered = np.zeros((5, 7), bool)
    rows, cols, shape, origin = pixel_grid(x, y, pix)
    covered[rows, cols] = True
    assert shape == (5, 7) and origin == (50.0, 50.0)
    assert covered.sum() == 12 and (out[~covered] == -1).all()


def test_assemble_rounds_like_psana_and_keeps_the_largest_of_overlaps():
    # centres 40 % of a pixel off the grid still land in the nearest cell; of two pixels in one cell the
    # larger value is kept (psana's det.raw.image() default, mapmode=2)
    y = np.array([[[50.0, 190.0, 260.0]]])  # -> (y - 50)/100 + 0.5 = 0.5, 1.9, 2.6 -> cols 0, 1, 2
    x = np.array([[[50.0, 50.0, 140.0]]])  # rows 0, 0, 1 (0.9 + 0.5 -> 1)
    out = assemble(np.array([[[1.0, 2.0, 3.0]]]), x, y, 100.0, fill=0.0)
    np.testing.assert_array_equal(out, [[1, 2, 0], [0, 0, 3]])
    y2 = np.array([[[50.0, 60.0, 250.0, 350.0, 360.0]]])  # the first two share cell (0, 0), the last two (0, 3)
    out2 = assemble(np.array([[[1.0, 4.0, np.nan, np.nan, -2.0]]]), np.full_like(y2, 50.0), y2, 100.0, fill=0.0)
    np.testing.assert_array_equal(out2[0, [0, 1, 3]], [4.0, 0.0, -2.0])  # a NaN does not win a shared cell
    assert np.isnan(out2[0, 2])


def test_assemble_default_geometry_is_the_identity_and_errors():
    from gpusmall.detectors.constants import default_geometry

    img = np.random.default_rng(0).normal(size=(1, 7, 9)).astype(np.float32)
    x, y, _ = default_geometry(img.shape, 13.5)
    # the default geometry has x along the columns; the image's rows follow x: the panel transposed
    np.testing.assert_array_equal(assemble(img, x, y, 13.5), img[0].T)
    np.testing.assert_array_equal(assemble(img, y, x, 13.5), img[0])
    with pytest.raises(ValueError, match="shape"):
        assemble(img[:, :3], x, y, 13.5)
    with pytest.raises(ValueError, match="micrometres"):
        assemble(img, x * 1e6, y, 13.5)
    t = tile_panels(np.ones((3, 2, 2)), gap=1, fill=0)
    assert t.shape == (5, 5) and t.sum() == 12 and t[2].sum() == 0


# ---- avimage -----------------------------------------------------------------------------------------


def camera_config(tmp_path, events=10, mask_value="nan", damage_every=4):
    return {
        "source": {"type": "sim", "events": events, "seed": 5, "damage_every": damage_every},
        "batch_size": 3,
        "backend": "numpy",
        "output": str(tmp_path / "cam.h5"),
        "detectors": {
            "cam": {
                "type": "camera",
                "shape": [48, 64],
                "pixel_um": 13.5,
                "mask": {"edges": 2},
                "mask_value": mask_value,
                "functions": [{"type": "roi", "name": "r", "bounds": [[0, 1], [0, 48], [0, 64]], "write_area": True}],
            }
        },
    }


def test_avimage_camera_equals_the_direct_mean(tmp_path, backend):
    cfg = validate_config(camera_config(tmp_path))
    av = average_image(cfg, "cam", backend, events=10)
    src = SimSource(10, {"cam": {"type": "camera", "shape": (1, 48, 64), "pixel_um": 13.5}}, seed=5, damage_every=4)
    batch = src.read(0, 10)
    c = src.detectors["cam"].constants
    keep = ~batch.damaged["cam"]
    assert keep.sum() == 8 and av.events == 8 and av.damaged == 2
    mask = c.status == 0
    mask[:, :2] = mask[:, -2:] = False
    mask[:, :, :2] = mask[:, :, -2:] = False
    cal = batch.raw["cam"][keep].astype(np.float64) - c.pedestal[0]
    direct = np.where(mask, cal.mean(axis=0), np.nan)
    np.testing.assert_allclose(av.mean, direct, rtol=1e-6, atol=1e-4)
    assert (np.isnan(av.mean) == ~mask).all() and (av.count == np.where(mask, 8, 0)).all()
    # default geometry (x = (col + 0.5) * 13.5 um) and rows from x (psana's layout): the frame transposed
    np.testing.assert_array_equal(av.image(), av.mean[0].T)


def test_avimage_cli_png_and_h5(tmp_path, capsys):
    import yaml

    cfg_path = tmp_path / "cam.yaml"
    cfg_path.write_text(yaml.safe_dump(camera_config(tmp_path, mask_value="zero")))
    png, out = tmp_path / "av.png", tmp_path / "av.h5"
    assert main(["avimage", str(cfg_path), "--events", "6", "--png", str(png), "--out", str(out)]) == 0
    assert png.stat().st_size > 0
    rgba = imread(png)
    assert rgba.ndim == 3 and rgba.shape[0] > 100 and rgba.shape[1] > 100
    cfg = validate_config(camera_config(tmp_path, mask_value="zero"))
    av = average_image(cfg, "cam", Backend("numpy"), events=6)
    with h5py.File(out, "r") as f:
        mean, image = f["cam/mean"][()], f["cam/image"][()]
        assert f["cam"].attrs["events"] == 5 and f["cam"].attrs["damaged"] == 1
    bad = av.count == 0
    assert bad.any() and (mean[bad] == 0).all()  # mask_value: zero -> 0 in the stored image
    np.testing.assert_array_equal(mean[~bad], av.mean[~bad])
    np.testing.assert_array_equal(image, mean[0].T)  # default geometry (x along columns), rows from x
    assert "mean of 5 events" in capsys.readouterr().err


def epix_config(tmp_path, events=5, common_mode=None, shape=(2, 352, 384), sums=("calib",)):
    return {
        "source": {"type": "sim", "events": events, "seed": 2},
        "batch_size": 2,
        "backend": "numpy",
        "output": str(tmp_path / "epix.h5"),
        "detectors": {
            "epix": {
                "type": "epix10ka",
                "shape": list(shape),
                "mask": {"edges": 1, "central": 1},
                "common_mode": common_mode or {"type": "none"},
                "sums": list(sums),
            }
        },
    }


def test_avimage_epix_assembles_the_direct_mean_with_the_sim_geometry(tmp_path):
    cfg = validate_config(epix_config(tmp_path))
    av = average_image(cfg, "epix", Backend("numpy"), events=5)
    src = SimSource(5, {"epix": {"type": "epix10ka", "shape": (2, 352, 384)}}, seed=2)
    raw = src.read(0, 5).raw["epix"]
    c = src.detectors["epix"].constants
    from gpusmall.detectors import get_model
    from gpusmall.detectors.masks import static_mask

    mask, _ = static_mask("epix", get_model("epix10ka"), (2, 352, 384), c, edges=1, central=1)
    direct = calibrate_by_the_spec(raw, c.pedestal, c.gain, mask).mean(axis=0)
    good = mask.astype(bool)
    np.testing.assert_allclose(av.mean[good], direct[good], rtol=1e-5, atol=1e-3)
    assert np.isnan(av.mean[~good]).all()
    # the geometry is the simulator's: panels side by side along x with a 2 mm gap; pixel (p, r, c) sits
    # at grid row (x - x.min()) / 100, column (y - y.min()) / 100 (psana's det.raw.image() layout)
    x, y, _ = panel_layout((2, 352, 384), 100.0)
    img = av.image(fill=-7.0)
    assert img.shape == (2 * 384 + 20, 352)
    for p, r, cc in [(0, 10, 20), (1, 100, 5), (1, 351, 383), (0, 200, 300)]:
        row = int(round((x[p, r, cc] - x.min()) / 100))
        col = int(round((y[p, r, cc] - y.min()) / 100))
        assert img[row, col] == pytest.approx(av.mean[p, r, cc], nan_ok=True)
    assert (img[384:404] == -7.0).all()  # the gap between the panels


def test_avimage_calibrates_as_the_run_does_with_common_mode(tmp_path):
    """With a median common mode the average equals the run's /Sums/<det>_calib divided by the events."""
    cm = {"type": "median", "axes": ["rows", "cols"]}
    cfg = validate_config(epix_config(tmp_path, events=4, common_mode=cm, shape=(1, 352, 384)))
    summary = reduce_run(cfg, Backend("numpy"), quiet=True)
    av = average_image(cfg, "epix", Backend("numpy"), events=4)
    with h5py.File(summary.output, "r") as f:
        run_mean = f["Sums/epix_calib"][()] / 4
        mask = f["UserDataCfg/epix/mask"][()].astype(bool)
    np.testing.assert_allclose(av.mean[mask], run_mean[mask], rtol=1e-5, atol=1e-3)
    # and the common mode did something: without it the average differs
    plain = average_image(
        validate_config(epix_config(tmp_path, events=4, shape=(1, 352, 384))), "epix", Backend("numpy"), events=4
    )
    assert np.abs(plain.mean[mask] - av.mean[mask]).max() > 1.0


# ---- mask_value --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_value", ["zero", "nan"])
def test_roi_area_mask_value(backend, rng, mask_value):
    shape = (2, 6, 8)
    mask = rng.random(shape) > 0.2
    data = rng.normal(50, 20, (3, *shape)).astype(np.float32)
    good = np.broadcast_to(mask, data.shape).copy()
    good[1, 0, 2, 3] = False  # bad in one event only (an invalid gain bit)
    ctx = make_ctx(backend, shape, mask=mask)
    ctx.mask_value = mask_value
    f = setup(Roi, backend, ctx, bounds=[[0, 2], [1, 5], [2, 8]], thres_adu=40, write_area=True)
    out = {k: backend.to_host(v) for k, v in f(make_frames(backend, data, good)).items()}
    area = out["roi_area"]
    g = good[:, :, 1:5, 2:8]
    d = np.where(g, data[:, :, 1:5, 2:8], 0)
    d = np.where(d >= 40, d, 0)
    if mask_value == "nan":
        np.testing.assert_array_equal(np.isnan(area), ~g)
    else:
        assert not np.isnan(area).any() and (area[~g] == 0).all()
    np.testing.assert_allclose(area[g], d[g], rtol=1e-6)
    assert area.dtype == np.float32
    np.testing.assert_allclose(out["roi_sum"], d.sum(axis=(1, 2, 3)), rtol=1e-5)  # sums never see NaN


def test_mask_value_nan_in_a_run(tmp_path):
    cfgs = {}
    for mv in ("zero", "nan"):
        c = camera_config(tmp_path / mv, events=6, mask_value=mv, damage_every=0)
        cfgs[mv] = reduce_run(validate_config(c), Backend("numpy"), quiet=True).output
    with h5py.File(cfgs["zero"], "r") as fz, h5py.File(cfgs["nan"], "r") as fn:
        mask = fz["UserDataCfg/cam/mask"][()][0].astype(bool)
        az, an = fz["cam/r_area"][()], fn["cam/r_area"][()]
        assert (~mask).sum() > 2 * 48 + 2 * 60  # edges and a few bad status pixels
        np.testing.assert_array_equal(np.isnan(an), np.broadcast_to(~mask, an.shape))
        assert (az[:, ~mask] == 0).all()
        np.testing.assert_array_equal(az[:, mask], an[:, mask])
        np.testing.assert_array_equal(fz["cam/r_sum"][()], fn["cam/r_sum"][()])
        assert fn["UserDataCfg/cam/mask_value"][()] in (b"nan", "nan")


# ---- a small result file for plot and cube ---------------------------------------------------------


@pytest.fixture(scope="module")
def result_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("helpers")
    cfg = {
        "source": {"type": "sim", "events": 14, "seed": 4, "damage_every": 5},
        "batch_size": 4,
        "backend": "numpy",
        "output": str(tmp / "run.h5"),
        "detectors": {
            "epix": {
                "type": "epix10ka",
                "shape": [2, 352, 384],
                "mask": {"edges": 1, "central": 1},
                "mask_value": "nan",
                "common_mode": {"type": "none"},
                "functions": [
                    {
                        "type": "roi",
                        "name": "roi0",
                        "bounds": [[1, 2], [40, 80], [30, 90]],
                        "thres_adu": 20,
                        "write_area": True,
                        "children": [{"type": "projection", "axis": 1}],
                    },
                    {"type": "azav", "center_um": [0, 0], "distance_mm": 100, "energy_kev": 9.5, "bins": 30},
                ],
                "sums": ["calib"],
            }
        },
    }
    return reduce_run(validate_config(cfg), Backend("numpy"), quiet=True).output


def direct_cube(path, by, keys, edges, extra_bad=None):
    """The cube by a plain loop over events (the oracle)."""
    with h5py.File(path, "r") as f:
        v = f[by][()]
        dam = f["epix/damaged"][()] == 1
        data = {k: f[k][()] for k in keys}
    nb = len(edges) - 1
    count = np.zeros(nb, int)
    sums = {k: np.zeros((nb, *data[k].shape[1:])) for k in keys}
    for i in range(len(v)):
        if dam[i] or not np.isfinite(v[i]) or (extra_bad is not None and extra_bad[i]):
            continue
        if v[i] < edges[0] or v[i] > edges[-1]:
            continue
        b = nb - 1 if v[i] == edges[-1] else int(np.searchsorted(edges, v[i], side="right") - 1)
        count[b] += 1
        for k in keys:
            sums[k][b] += data[k][i]
    return count, sums


def test_cube_equals_a_direct_loop(result_file, tmp_path, capsys):
    out = tmp_path / "cube.h5"
    assert main(["cube", str(result_file), "--by", "epix/roi0_sum", "--bins", "3", "--out", str(out)]) == 0
    with h5py.File(result_file, "r") as f:
        v = f["epix/roi0_sum"][()]
        dam = f["epix/damaged"][()] == 1
        keys = [f"epix/{k}" for k in f["epix"] if k != "damaged"]
    assert dam.sum() == 2  # events 4 and 9
    good = v[~dam]
    edges = np.linspace(good.min(), good.max(), 4)
    count, sums = direct_cube(result_file, "epix/roi0_sum", keys, edges)
    with h5py.File(out, "r") as c:
        np.testing.assert_allclose(c["bins/edges"][()], edges)
        np.testing.assert_allclose(c["bins/centers"][()], 0.5 * (edges[1:] + edges[:-1]))
        np.testing.assert_array_equal(c["bins/count"][()], count)
        assert count.sum() == 12
        assert sorted(k[:-4] for k in _datasets(c) if k.endswith("_sum") and not k.startswith("bins")) == sorted(keys)
        for k in keys:
            np.testing.assert_allclose(c[f"{k}_sum"][()], sums[k], rtol=1e-12, equal_nan=True)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = sums[k] / count.reshape(-1, *([1] * (sums[k].ndim - 1)))
            np.testing.assert_allclose(c[f"{k}_mean"][()], mean, rtol=1e-12, equal_nan=True)
        # mask_value nan: the ROI area's bad pixels stay NaN in the cube, good ones are finite
        area = c["epix/roi0_area_mean"][()]
        assert np.isnan(area).any() and np.isfinite(area[count > 0][:, 0, 0]).all()
    assert "12 of 14 events in 3 bins" in capsys.readouterr().err


def _datasets(f):
    out = []
    f.visititems(lambda n, o: out.append(n) if isinstance(o, h5py.Dataset) else None)
    return out


def test_cube_range_nan_keys_and_top_level_key(result_file, tmp_path):
    # a copy whose key is NaN in one undamaged event: that event is left out
    path = tmp_path / "copy.h5"
    shutil.copy(result_file, path)
    with h5py.File(path, "r+") as f:
        v = f["epix/roi0_max"][()]
        v[0] = np.nan
        f["epix/roi0_max"][...] = v
    dam_or_nan = np.zeros(14, bool)
    dam_or_nan[0] = True
    good = v[np.isfinite(v)]
    lo, hi = np.percentile(good, 20), np.percentile(good, 80)
    edges = np.linspace(lo, hi, 5)
    keys = ["epix/roi0_pj_ax_1_data", "epix/roi0_sum"]
    cube = make_cube(path, "epix/roi0_max", 4, keys=keys, value_range=(lo, hi))
    count, sums = direct_cube(path, "epix/roi0_max", keys, edges, extra_bad=dam_or_nan)
    np.testing.assert_array_equal(cube.count, count)
    assert cube.info["nonfinite"] == 1 and cube.info["damaged"] == 2
    assert cube.info["outside"] == 11 - count.sum() and cube.info["used"] == count.sum()
    for k in keys:
        np.testing.assert_allclose(cube.sums[k], sums[k], rtol=1e-12)
    # binned by the timestamp (outside the detector groups): every non-scalar per-event dataset and every
    # per-event scalar but the bookkeeping ones (timestamp, event_index, event_time, fiducials, damaged)
    cube = make_cube(result_file, "timestamp", 2)
    assert set(cube.sums) == {
        "epix/roi0_com",
        "epix/roi0_area",
        "epix/roi0_pj_ax_1_data",
        "epix/azav_azav",
        "epix/azav_count",
        "epix/roi0_sum",
        "epix/roi0_max",
        "epix/roi0_mean",
        "epix/roi0_nsat",
    }
    assert cube.count.sum() == 12


def test_cube_bad_inputs_exit_2(result_file, tmp_path, capsys):
    assert main(["cube", str(result_file), "--by", "epix/roi0_sun", "--bins", "3"]) == 2
    err = capsys.readouterr().err
    assert "'epix/roi0_sun'" in err and "epix/roi0_sum" in err and len(err.strip().splitlines()) == 1
    assert main(["cube", str(result_file), "--by", "epix/roi0_area", "--bins", "3"]) == 2
    assert "per-event scalar" in capsys.readouterr().err
    assert main(["cube", str(result_file), "--by", "epix/roi0_sum", "--bins", "3", "--range", "5", "1"]) == 2
    assert "LO < HI" in capsys.readouterr().err


# ---- plot --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "epix/roi0_sum",
        "/epix/roi0_com",
        "epix/roi0_pj_ax_1_data",
        "epix/azav_azav",
        "epix/roi0_area",
        "Sums/epix_calib",
        "UserDataCfg/epix/ped",
        "UserDataCfg/epix/azav__q",
        "timestamp",
    ],
)
def test_plot_writes_a_png(result_file, tmp_path, key, capsys):
    png = tmp_path / "p.png"
    assert main(["plot", str(result_file), key, "--png", str(png)]) == 0
    assert png.stat().st_size > 0
    img = imread(png)
    assert img.ndim == 3 and img.shape[0] >= 200 and img.shape[1] >= 300 and img.shape[2] in (3, 4)
    assert img[..., :3].std() > 0.01  # not a blank canvas
    assert key.strip("/") in capsys.readouterr().err


def test_plot_bad_key_exits_2_naming_it(result_file, tmp_path, capsys):
    png = tmp_path / "p.png"
    assert main(["plot", str(result_file), "epix/roi0_summ", "--png", str(png)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "'epix/roi0_summ'" in err and "close matches: epix/roi0_sum" in err
    assert not png.exists()
    assert main(["plot", str(result_file), "epix", "--png", str(png)]) == 2
    assert "is a group" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "nope.h5"), "x", "--png", str(png)]) == 2
