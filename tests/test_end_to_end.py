"""A whole run, simulated source -> HDF5 file, checked against the SPEC formulas in NumPy."""

import h5py
import numpy as np
import pytest

from gpusmall.cli import main
from gpusmall.producer.config import validate_config
from gpusmall.producer.run import reduce_run
from gpusmall.sources.sim import SimSource

SHAPE = [2, 352, 384]


def config(tmp_path, events=12, batch=5):
    return {
        "source": {"type": "sim", "events": events, "seed": 3},
        "batch_size": batch,
        "output": str(tmp_path / "run.h5"),
        "detectors": {
            "epix": {
                "type": "epix10ka",
                "shape": SHAPE,
                "mask": {"edges": 1, "central": 1},
                "common_mode": {"type": "none"},
                "functions": [
                    {
                        "type": "roi",
                        "name": "roi0",
                        "bounds": [[1, 2], [40, 140], [30, 230]],
                        "thres_adu": 20,
                        "write_area": True,
                        "children": [{"type": "projection", "axis": 1}],
                    },
                    {
                        "type": "roi",
                        "name": "all",
                        "bounds": [[0, 2], [0, 352], [0, 384]],
                        "children": [{"type": "projection"}],
                    },  # smalldata_tools' default axis -1: the total
                ],
                "sums": ["calib", "max", "nhits_thresADU80"],  # max: written calib_max
            }
        },
    }


def calibrate_by_the_spec(raw, ped, gain, mask):
    """SPEC section 3 for an ePix10ka without config bits, written out longhand."""
    d = (raw >> 14) & 1
    g = np.where(d == 0, 3, 5)
    v = (raw & 0x3FFF).astype(np.float64)
    p = np.take_along_axis(ped[None].astype(np.float64), g[:, None], 1)[:, 0]
    gg = np.take_along_axis(gain[None].astype(np.float64), g[:, None], 1)[:, 0]
    out = (v - p) / gg * gain[0]
    return np.where(mask[None] != 0, out, 0.0)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    cfg = validate_config(config(tmp))
    from gpusmall.backend import Backend

    summary = reduce_run(cfg, Backend("numpy"), quiet=True)
    raw = SimSource(12, {"epix": {"type": "epix10ka", "shape": SHAPE}}, seed=3).read(0, 12).raw["epix"]
    return summary, raw


def test_layout(result):
    summary, _ = result
    with h5py.File(summary.output, "r") as f:
        assert f["timestamp"].shape == (12,) and f["timestamp"].dtype == np.uint64
        assert np.all(np.diff(f["timestamp"][()].astype(np.int64)) > 0)
        np.testing.assert_array_equal(f["event_index"][()], np.arange(12))
        for key in ("roi0_sum", "roi0_mean", "roi0_max", "roi0_nsat", "damaged"):
            assert f[f"epix/{key}"].shape == (12,)
        assert f["epix/roi0_com"].shape == (12, 2)
        assert f["epix/roi0_area"].shape == (12, 100, 200)
        assert f["epix/roi0_pj_ax_1_data"].shape == (12, 100)
        assert f["epix/all_pj_ax_1_data"].shape == (12,)
        for key in (
            "ped",
            "gain",
            "noise",
            "x",
            "y",
            "z",
            "mask",
            "cmask",
            "roi0__bounds",
            "roi0_pj_ax_1__axis",
            # smalldata_tools' names
            "rms",
            "ix",
            "iy",
            "roi0__roi0_bound",
            "roi0__roi0_thresADU",
            "roi0__pj_ax_1_axis",
            "all__all_bound",
            "all__pj_ax_1_axis",
        ):
            assert key in f["UserDataCfg/epix"], key
        assert sorted(f["Sums"]) == ["epix_calib", "epix_calib_max", "epix_nhits_thresADU80"]
        assert f["Sums/epix_calib"].shape == tuple(SHAPE)


def test_user_data_cfg_under_smalldata_tools_names(result):
    """rms is the noise; ix, iy the column and row of each pixel in the image assembled from x, y (pixel
    centres on the 100 um grid); function parameters also as <top>__<owner>_<param>, same values."""
    summary, _ = result
    with h5py.File(summary.output, "r") as f:
        g = f["UserDataCfg/epix"]
        np.testing.assert_array_equal(g["rms"][()], g["noise"][()])
        x, y = g["x"][()].astype(np.float64), g["y"][()].astype(np.float64)
        assert g["ix"].shape == g["iy"].shape == tuple(SHAPE)
        np.testing.assert_array_equal(g["ix"][()], np.floor((x - x.min()) / 100 + 0.5))
        np.testing.assert_array_equal(g["iy"][()], np.floor((y - y.min()) / 100 + 0.5))
        np.testing.assert_array_equal(g["roi0__roi0_bound"][()], g["roi0__bounds"][()])
        np.testing.assert_array_equal(g["roi0__roi0_bound"][()], [[1, 2], [40, 140], [30, 230]])
        assert g["roi0__roi0_thresADU"][()] == 20 and g["roi0__pj_ax_1_axis"][()] == 1
        assert g["all__pj_ax_1_axis"][()] == -1 and g["all_pj_ax_1__axis"][()] == -1


def test_numbers_match_the_formulas(result):
    summary, raw = result
    with h5py.File(summary.output, "r") as f:
        ped, gain, mask = f["UserDataCfg/epix/ped"][()], f["UserDataCfg/epix/gain"][()], f["UserDataCfg/epix/mask"][()]
        cal = calibrate_by_the_spec(raw, ped, gain, mask)
        area = cal[:, 1, 40:140, 30:230]
        thr = np.where(area >= 20, area, 0)
        np.testing.assert_allclose(f["epix/roi0_area"][()], thr, rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(f["epix/roi0_sum"][()], thr.sum(axis=(1, 2)), rtol=1e-5)
        np.testing.assert_allclose(f["epix/roi0_mean"][()], thr.mean(axis=(1, 2)), rtol=1e-5)
        np.testing.assert_allclose(f["epix/roi0_max"][()], thr.max(axis=(1, 2)), rtol=1e-5)
        r, c = np.mgrid[0:100, 0:200]
        com = np.stack([(thr * r).sum((1, 2)), (thr * c).sum((1, 2))], 1) / thr.sum((1, 2))[:, None]
        np.testing.assert_allclose(f["epix/roi0_com"][()], com, rtol=1e-5)
        np.testing.assert_allclose(f["epix/roi0_pj_ax_1_data"][()], thr.sum(axis=2), rtol=1e-4, atol=1e-2)
        sat = ((raw[:, 1, 40:140, 30:230] & 0x3FFF) >= 0x3FFF) & (mask[1, 40:140, 30:230] != 0)  # good pixels only
        np.testing.assert_array_equal(f["epix/roi0_nsat"][()], sat.sum((1, 2)))
        np.testing.assert_allclose(f["epix/all_sum"][()], cal.sum(axis=(1, 2, 3)), rtol=1e-5)
        np.testing.assert_allclose(f["epix/all_pj_ax_1_data"][()], cal.sum(axis=(1, 2, 3)), rtol=1e-5)
        np.testing.assert_allclose(f["Sums/epix_calib"][()], cal.sum(axis=0), rtol=1e-4, atol=1e-2)
        np.testing.assert_allclose(f["Sums/epix_calib_max"][()], cal.max(axis=0), rtol=1e-5, atol=1e-3)
        # smalldata_tools' nhits_thresADU80 counts the values >= 80 (within float32 rounding of the threshold)
        n = f["Sums/epix_nhits_thresADU80"][()]
        assert ((cal > 80.01).sum(axis=0) <= n).all() and (n <= (cal >= 79.99).sum(axis=0)).all()


def test_the_simulation_has_photons_and_gain_switching(result):
    _, raw = result
    assert ((raw >> 14) & 1).any(), "no pixel switched to low gain"
    summary, _ = result
    with h5py.File(summary.output, "r") as f:
        # photons of 9.5 keV give ~156 ADU in the first gain range
        assert (f["epix/all_max"][()] > 120).all()


def test_batch_size_does_not_change_results(tmp_path):
    from gpusmall.backend import Backend

    a = reduce_run(validate_config(config(tmp_path / "a", events=7, batch=7)), Backend("numpy"), quiet=True)
    b = reduce_run(validate_config(config(tmp_path / "b", events=7, batch=3)), Backend("numpy"), quiet=True)
    with h5py.File(a.output, "r") as fa, h5py.File(b.output, "r") as fb:
        for key in ("epix/roi0_sum", "epix/roi0_area", "timestamp", "Sums/epix_calib"):
            np.testing.assert_allclose(fa[key][()], fb[key][()], rtol=1e-6)


def test_gpusmall_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--events", "6", "--out", "demo.h5", "--backend", "numpy", "--quiet"]) == 0
    with h5py.File(tmp_path / "demo.h5", "r") as f:
        assert f["timestamp"].shape == (6,)
        det = f["epix10k2m"]
        per_item = [k for k in det if isinstance(det[k], h5py.Dataset) and "items_count" in det[k].attrs]
        assert per_item and all(
            det[k].shape[0] == 6 for k in det if isinstance(det[k], h5py.Dataset) and k not in per_item
        )
        for k in per_item:  # ragged droplets and photons: the items of every event, one after the other
            n = det[det[k].attrs["items_count"]][()]
            assert det[k].shape == (n.sum(),), k
        assert "epix10k2m" in f["UserDataCfg"] and len(f["Sums"]) > 0
    assert "6 events" in capsys.readouterr().err
