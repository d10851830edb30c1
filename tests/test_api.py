"""The Python API (gpusmall/api.py, docs/API.md): every number it hands out equals the file's or the analysis code's.

One small simulated run (two cameras, 20 events, a step scan of 5 events per step, the laser off on even
events, a cube by scan step split laser on / off) is reduced once through ``Run.run`` on NumPy; the DataFrame,
the xarray Dataset, the sums, the cube and the average image are compared with what h5py reads from the
file and with ``make_cube`` / ``average_image`` called directly.
"""

from __future__ import annotations

import builtins
import io
import subprocess
import sys

import h5py
import numpy as np
import pytest
import yaml

import gpusmall
from gpusmall.errors import ConfigError, InputError

pd = pytest.importorskip("pandas")
xr = pytest.importorskip("xarray")

EVENTS = 20
SCALARS = [
    "cam/damaged",
    "cam/roi0_max",
    "cam/roi0_mean",
    "cam/roi0_nsat",
    "cam/roi0_sum",
    "cam2/damaged",
    "cam2/r_max",
    "cam2/r_mean",
    "cam2/r_nsat",
    "cam2/r_sum",
    "damage/cam",
    "damage/cam2",
    "ipm/sum",
    "lightStatus/laser",
    "lightStatus/xray",
    "scan/delay",
    "scan/varStep",
]


def config(out="run.h5", cube=True) -> dict:
    data = {
        "source": {
            "type": "sim",
            "events": EVENTS,
            "seed": 3,
            "simulate": {"scan": {"events_per_step": 5}, "laser_off_every": 2},
        },
        "batch_size": 8,
        "backend": "numpy",
        "output": out,
        "detectors": {
            "cam": {
                "type": "camera",
                "shape": [32, 48],
                "pixel_um": 50.0,
                "functions": [
                    {
                        "type": "roi",
                        "name": "roi0",
                        "bounds": [[4, 20], [8, 30]],
                        "write_area": True,
                        "children": [{"type": "projection", "axis": 0}],
                    },
                    {"type": "azav", "center_um": [0, 0], "distance_mm": 100, "energy_kev": 9.5, "bins": 8},
                ],
                "sums": ["calib", "calib_max", "calib:laser_on"],
            },
            "cam2": {"type": "camera", "shape": [16, 24], "functions": [{"type": "roi", "name": "r"}]},
        },
    }
    if cube:
        data["cube"] = {
            "by": "scan/varStep",
            "split": ["laser_on", "laser_off"],
            "norm": "ipm/sum",
            "detectors": {"cam": {"outputs": ["roi0_sum"]}},
        }
    return data


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(Run from the config file, result path, the tmp folder)."""
    d = tmp_path_factory.mktemp("api")
    cfg_file = d / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(config()))
    run = gpusmall.open_run(cfg_file)
    path = run.run(out=d / "out.h5", backend="numpy")
    return run, path, d


def read(path, key):
    with h5py.File(path, "r") as f:
        return f[key][()]


# ---- import, config --------------------------------------------------------------------------------------


def test_import_is_light_and_names_the_api():
    code = (
        "import sys, gpusmall; heavy = [m for m in ('h5py', 'matplotlib', 'pandas', 'xarray', 'pydantic', "
        "'numpy') if m in sys.modules]; print(heavy, sorted(set(gpusmall.__all__)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    heavy, names = out.strip().split(" ", 1)
    assert heavy == "[]"
    assert set(eval(names)) == {
        "Result",
        "Run",
        "__version__",
        "open_cube",
        "open_result",
        "open_run",
        *gpusmall._TOOLS,
    }
    assert gpusmall.__version__ and callable(gpusmall.open_run)


def test_config_from_file_or_dict_and_printed(made, tmp_path, capsys):
    run, _, d = made
    from_dict = gpusmall.open_run(config(), base_dir=d)
    assert from_dict.config.model_dump() == run.config.model_dump()
    assert run.detectors == ["cam", "cam2"] and run.config.source.events == EVENTS
    assert run.config.output == str(d / "run.h5")  # relative to the config file's folder
    run.show_config()
    text = capsys.readouterr().out
    again = yaml.safe_load(text)
    assert again["detectors"]["cam"]["shape"] == [32, 48] and "mask" not in again["detectors"]["cam"]
    assert gpusmall.Run(again, base_dir=d).config.model_dump() == run.config.model_dump()  # the text is a config
    full = yaml.safe_load(run.config_text(defaults=True))
    assert full["detectors"]["cam"]["mask"]["status"] is True and full["batch_size"] == 8
    assert "cam (camera 32x48)" in repr(run)
    bad = config()
    bad["detectors"]["cam"]["functions"][1]["bins"] = 0
    with pytest.raises(ConfigError, match=r"detectors\.cam\.functions\[1\]\.bins"):
        gpusmall.open_run(bad)


# ---- run ---------------------------------------------------------------------------------------------------


def test_run_writes_the_file_it_returns(made):
    run, path, d = made
    assert path == d / "out.h5" and path.is_file()
    s = run.last_summary
    assert s.output == path and s.events == EVENTS and not s.interrupted
    with h5py.File(path, "r") as f:
        assert f["timestamp"].shape == (EVENTS,) and bool(f.attrs["complete"])
        assert f.attrs["gpusmall_version"] == gpusmall.__version__ and int(f.attrs["events"]) == EVENTS
    assert s.cube == d / "out.cube.h5" and s.cube.is_file()


def test_run_events_of_a_sim_source_leaves_the_config_alone(tmp_path):
    small = gpusmall.open_run(config(cube=False), base_dir=tmp_path)
    p = small.run(events=6, out=tmp_path / "six.h5", backend="numpy")
    assert p == tmp_path / "six.h5" and read(p, "timestamp").shape == (6,)
    assert small.config.source.events == EVENTS


# ---- result: DataFrame, xarray, sums, UserDataCfg ---------------------------------------------------------


def test_dataframe_equals_the_datasets(made):
    _, path, _ = made
    res = gpusmall.open_result(path)
    assert len(res) == EVENTS and res.detectors == ["cam", "cam2"]
    df = res.to_dataframe()
    assert list(df.columns) == ["time", *SCALARS]
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(df.index.to_numpy(), f["event_index"][()])
        assert df.index.name == "event"
        ts = f["timestamp"][()]
        assert ts.dtype == np.uint64
        assert df["time"].dtype == np.dtype("datetime64[ns]")
        expected = pd.to_datetime(ts.astype(np.int64), unit="ns")
        assert (df["time"].to_numpy() == expected.to_numpy()).all()
        np.testing.assert_array_equal(df["time"].to_numpy().astype(np.int64), ts.astype(np.int64))
        for k in SCALARS:
            v = f[k][()]
            assert df[k].dtype == v.dtype, k
            np.testing.assert_array_equal(df[k].to_numpy(), v, err_msg=k)
    np.testing.assert_array_equal(df["scan/varStep"], np.arange(EVENTS) // 5)
    np.testing.assert_array_equal(df["lightStatus/laser"], (np.arange(EVENTS) % 2 != 0).astype(np.uint8))
    # chosen keys, in the order asked
    two = res.to_dataframe(["ipm/sum", "/cam/roi0_sum"])
    assert list(two.columns) == ["time", "ipm/sum", "cam/roi0_sum"]
    np.testing.assert_array_equal(two["cam/roi0_sum"], read(path, "cam/roi0_sum"))
    with pytest.raises(InputError, match=r"'cam/roi0_com' has \(2,\) values per event.*to_xarray"):
        res.to_dataframe(["cam/roi0_com"])
    with pytest.raises(InputError, match="cam/roi0_sum"):
        res.to_dataframe(["cam/roi0_summ"])
    with pytest.raises(InputError, match="not a per-event"):
        res.to_dataframe(["Sums/cam_calib"])


def test_xarray_equals_the_datasets(made):
    _, path, _ = made
    res = gpusmall.open_result(path)
    ds = res.to_xarray()
    keys = [k for k in res.keys() if k not in ("timestamp", "event_index", "event_time", "fiducials")]  # noqa: SIM118  (a Result, not a dict)
    assert sorted(ds.data_vars) == sorted(keys)
    assert "cam/roi0_area" in keys and "cam/azav_azav" in keys
    with h5py.File(path, "r") as f:
        for k in keys:
            v = f[k][()]
            assert ds[k].dtype == v.dtype and ds[k].shape == v.shape, k
            assert ds[k].dims == ("event",) + tuple(f"{k}_dim{i}" for i in range(1, v.ndim)), k
            np.testing.assert_array_equal(ds[k].values, v, err_msg=k)
        np.testing.assert_array_equal(ds["event"].values, f["event_index"][()])
        np.testing.assert_array_equal(ds["time"].values.astype(np.int64), f["timestamp"][()].astype(np.int64))
        np.testing.assert_array_equal(ds["cam/azav_q"].values, f["UserDataCfg/cam/azav__q"][()])
        assert ds["cam/azav_q"].dims == ("cam/azav_azav_dim2",)
    assert ds["cam/roi0_area"].shape == (EVENTS, 16, 22)
    assert ds.attrs["events"] == EVENTS
    one = res.to_xarray("cam/roi0_com")
    assert list(one.data_vars) == ["cam/roi0_com"] and one["cam/roi0_com"].shape == (EVENTS, 2)
    # selecting by context works as xarray does
    on = ds.where(ds["lightStatus/laser"] == 1, drop=True)
    assert on.sizes["event"] == EVENTS // 2


def test_sums_user_data_cfg_and_items(made):
    _, path, _ = made
    res = gpusmall.open_result(path)
    sums = res.sums()
    assert sorted(sums) == ["cam_calib", "cam_calib_laser_on", "cam_calib_max"]
    for k, v in sums.items():
        np.testing.assert_array_equal(v, read(path, f"Sums/{k}"))
    u = res.user_data_cfg("cam")
    np.testing.assert_array_equal(u["mask"], read(path, "UserDataCfg/cam/mask"))
    np.testing.assert_array_equal(u["roi0__bounds"], [[4, 20], [8, 30]])
    assert u["units"] == "adu" and u["azav__bins"] == 8
    with pytest.raises(InputError, match=r"2 detectors \(cam, cam2\)"):
        res.user_data_cfg()
    with pytest.raises(InputError, match="no detector 'nope'.*cam, cam2"):
        res.user_data_cfg("nope")
    np.testing.assert_array_equal(res["cam/roi0_sum"], read(path, "cam/roi0_sum"))
    assert res.config["detectors"]["cam"]["shape"] == [32, 48]
    with pytest.raises(InputError, match="does not exist"):
        gpusmall.open_result(path.with_name("missing.h5"))


def test_a_master_file_of_two_ranks_reads_the_same(made, tmp_path):
    """An MPI master (virtual datasets over the ranks' parts) gives the same DataFrame and Dataset."""
    from gpusmall.backend import Backend
    from gpusmall.producer.config import validate_config
    from gpusmall.producer.mpi import Comm
    from gpusmall.producer.run import reduce_run

    class Rank(Comm):
        def __init__(self, rank, size):
            super().__init__()
            self.rank, self.size = rank, size

    _, path, _ = made
    cfg = validate_config(config(out="mpi.h5", cube=False), base_dir=tmp_path)
    for r in (1, 0):  # rank 0 last: it builds the master
        reduce_run(cfg, Backend("numpy"), quiet=True, comm=Rank(r, 2))
    with h5py.File(tmp_path / "mpi.h5", "r") as f:
        assert f["cam/roi0_sum"].is_virtual
    one, master = gpusmall.open_result(path), gpusmall.open_result(tmp_path / "mpi.h5")
    pd.testing.assert_frame_equal(master.to_dataframe(), one.to_dataframe())
    a, b = master.to_xarray(), one.to_xarray()
    for k in b.data_vars:
        np.testing.assert_array_equal(a[k].values, b[k].values, err_msg=k)
    (tmp_path / "mpi.part1.h5").unlink()
    with pytest.raises(InputError, match="part files are missing"):
        master.to_dataframe()


# ---- cubes ------------------------------------------------------------------------------------------------


def assert_cube_equal(ds, cube, split):
    lead = ("split", "bin") if split else ("bin",)
    np.testing.assert_array_equal(ds["bin"].values, cube.centers)
    np.testing.assert_array_equal(ds["count"].values, cube.count)
    assert ds["count"].dims == lead and ds["count"].dtype == np.int64
    if cube.edges is not None:
        np.testing.assert_array_equal(ds["bin_lo"].values, cube.edges[:-1])
        np.testing.assert_array_equal(ds["bin_hi"].values, cube.edges[1:])
    if split:
        assert list(ds["split"].values) == list(cube.split)
    assert sorted(ds.data_vars) == sorted(
        ["count", *(f"{k}_sum" for k in cube.sums), *(f"{k}_mean" for k in cube.means)]
    )
    for k in cube.sums:
        for name, ref in ((f"{k}_sum", cube.sums[k]), (f"{k}_mean", cube.means[k])):
            assert ds[name].dims[: len(lead)] == lead, name
            assert ds[name].dims[len(lead) :] == tuple(f"{k}_dim{i}" for i in range(1, ref.ndim - len(lead) + 1))
            np.testing.assert_array_equal(ds[name].values, ref, err_msg=name)


def test_cube_equals_make_cube(made, tmp_path):
    from gpusmall.analysis.cube import make_cube

    _, path, _ = made
    res = gpusmall.open_result(path)
    split = ["laser_on", "laser_off"]
    ds = res.cube("scan/varStep", steps=True, split=split, out=tmp_path / "c.h5")
    ref = make_cube(path, "scan/varStep", steps=True, split=split)
    assert_cube_equal(ds, ref, split)
    assert ds.sizes["split"] == 2 and ds.sizes["bin"] == 4
    np.testing.assert_array_equal(ds["count"].values, [[2, 3, 2, 3], [3, 2, 3, 2]])  # laser on: odd events
    assert ds.attrs["by"] == "scan/varStep" and ds.attrs["events_used"] == EVENTS
    # the file written equals it
    back = gpusmall.open_cube(tmp_path / "c.h5")
    assert_cube_equal(back, ref, split)
    # bins over a range, chosen keys, no split
    ds2 = res.cube("cam/roi0_sum", bins=3, keys=["cam/roi0_pj_ax_0_data", "ipm/sum"], range=(-1e3, 1e5))
    ref2 = make_cube(path, "cam/roi0_sum", 3, keys=["cam/roi0_pj_ax_0_data", "ipm/sum"], value_range=(-1e3, 1e5))
    assert_cube_equal(ds2, ref2, [])
    assert ds2["cam/roi0_pj_ax_0_data_sum"].shape == (3, 22)
    with pytest.raises(InputError, match="--selection 'nope'"):
        res.cube("scan/varStep", steps=True, selection="nope")


def test_open_cube_of_the_run(made):
    _, path, d = made
    ds = gpusmall.open_cube(d / "out.cube.h5")
    with h5py.File(d / "out.cube.h5", "r") as f:
        np.testing.assert_array_equal(ds["bin"].values, f["bins/centers"][()])
        np.testing.assert_array_equal(ds["count"].values, f["bins/count"][()])
        assert list(ds["split"].values) == [s.decode() for s in f["bins/split"][()]]
        names = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) and not n.startswith("bins") else None)
        assert sorted(ds.data_vars) == sorted(["count", *names])
        for n in names:
            np.testing.assert_array_equal(ds[n].values, f[n][()], err_msg=n)
    assert ds["cam/frame_sum"].dims == ("split", "bin", "cam/frame_dim1", "cam/frame_dim2")
    assert ds["cam/frame_sum"].shape == (2, 4, 32, 48)
    # the per-bin sum of the run's ROI sums equals a grouping of the result file's values
    step, laser = read(path, "scan/varStep"), read(path, "lightStatus/laser")
    roi = read(path, "cam/roi0_sum")
    for s, on in enumerate((1, 0)):
        want = [roi[(step == b) & (laser == on)].sum() for b in range(4)]
        np.testing.assert_allclose(ds["cam/roi0_sum_sum"].values[s], want, rtol=1e-12)
    assert ds.attrs["gpusmall_kind"] == "cube"
    with pytest.raises(InputError, match="not a cube file"):
        gpusmall.open_cube(path)


# ---- average image ---------------------------------------------------------------------------------------


def test_avimage_equals_the_analysis_average(made):
    from gpusmall.analysis.avimage import average_image
    from gpusmall.backend import Backend

    run, _, _ = made
    av = run.avimage(events=12, det="cam", backend="numpy")
    ref = average_image(run.config, "cam", Backend("numpy"), events=12)
    assert av.events == ref.events == 12 and av.det == "cam"
    np.testing.assert_array_equal(av.mean, ref.mean)
    np.testing.assert_array_equal(av.count, ref.count)
    np.testing.assert_array_equal(av.image(), ref.image())
    # default geometry: x along the columns, and the image's rows follow x (psana's layout): transposed
    assert av.mean.shape == (1, 32, 48) and av.image().shape == (48, 32)
    np.testing.assert_array_equal(av.image(), av.mean[0].T)


def test_avimage_without_det_in_a_script_names_the_detectors(made, monkeypatch):
    run, _, _ = made
    monkeypatch.delattr(builtins, "__IPYTHON__", raising=False)
    monkeypatch.delattr(sys, "ps1", raising=False)
    assert not gpusmall.api.interactive()
    with pytest.raises(InputError, match=r"2 detectors \(cam, cam2\).*det="):
        run.avimage()
    with pytest.raises(InputError, match=r"no detector 'cam3'.*cam, cam2"):
        run.avimage(det="cam3")
    one = gpusmall.open_run({**config(cube=False), "detectors": {"cam2": config()["detectors"]["cam2"]}})
    assert one.choose_detector() == "cam2"


def test_avimage_asks_in_an_interactive_session(made, monkeypatch, capsys):
    from gpusmall.analysis.avimage import average_image
    from gpusmall.backend import Backend

    run, _, _ = made
    monkeypatch.setattr(builtins, "__IPYTHON__", True, raising=False)
    answers = iter(["cam9", "1"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(answers))
    av = run.avimage(events=4, backend="numpy")
    assert av.det == "cam2"
    assert "no detector 'cam9'" in capsys.readouterr().out
    np.testing.assert_array_equal(av.mean, average_image(run.config, "cam2", Backend("numpy"), events=4).mean)


def test_plot_avimage_is_a_figure_of_the_assembled_average(made):
    from matplotlib.figure import Figure

    run, _, _ = made
    av = run.avimage(events=8, det="cam", backend="numpy")
    fig = run.plot_avimage(av=av)
    assert isinstance(fig, Figure)
    (im,) = fig.axes[0].get_images()
    np.testing.assert_array_equal(np.ma.filled(im.get_array(), np.nan), av.image(np.nan))
    assert "cam (camera): mean of 8 events" in fig.axes[0].get_title()
    assert fig.axes[0].get_xlabel() == "y (mm)" and fig.axes[0].get_ylabel() == "x (mm)"
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:4] == b"\x89PNG"
