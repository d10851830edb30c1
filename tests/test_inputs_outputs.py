"""Bad inputs and outputs stop a run before any event is read, with exit 2 and a line naming them;
no input file is ever overwritten (the audit of 2026-12-01)."""

import logging

import h5py
import numpy as np
import pytest
import yaml

from gpusmall.cli import main
from gpusmall.errors import ConfigError, InputError
from gpusmall.producer.config import validate_config
from gpusmall.sources.hdf5 import Hdf5Source

CAM = {"type": "camera", "shape": [16, 16], "functions": [{"type": "roi", "bounds": [[0, 8], [0, 8]]}]}


def write_raw(path, n=6, ts=None, raw_dtype=np.uint16):
    with h5py.File(path, "w") as f:
        f["cam/raw"] = np.random.default_rng(0).integers(0, 100, (n, 16, 16)).astype(raw_dtype)
        if ts is not None:
            f["timestamp"] = ts
    return path


def write_config(tmp_path, **top):
    cfg = {
        "source": {"type": "sim", "events": 4},
        "batch_size": 2,
        "output": str(tmp_path / "out.h5"),
        "detectors": {"cam": dict(CAM)},
    }
    cfg.update(top)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(capsys, *argv):
    rc = main(list(argv))
    return rc, capsys.readouterr().err


# ---- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source, key",
    [
        ({"type": "sim", "path": "run.h5"}, "path"),
        ({"type": "sim", "files": ["a.xtc2"]}, "files"),
        ({"type": "hdf5", "path": "run.h5", "seed": 3}, "seed"),
        ({"type": "hdf5", "path": "run.h5", "damage_every": 2}, "damage_every"),
        ({"type": "psana", "files": ["a.xtc2"], "path": "run.h5"}, "path"),
    ],
)
def test_source_keys_of_another_type_are_errors(source, key):
    det = dict(CAM, dataset="/cam/raw")
    with pytest.raises(ConfigError, match=rf"source.*{key}: not used by a {source['type']} source"):
        validate_config({"source": source, "detectors": {"cam": det}})


def test_duplicate_function_names_are_errors():
    two = [{"type": "roi", "bounds": [[0, 8], [0, 8]]}, {"type": "roi", "bounds": [[8, 16], [0, 8]]}]
    with pytest.raises(ConfigError, match=r"detectors\.cam\.functions\[1\]\.name: duplicate name 'roi'"):
        validate_config({"source": {"type": "sim"}, "detectors": {"cam": dict(CAM, functions=two)}})
    kids = [
        {
            "type": "roi",
            "name": "r",
            "bounds": [[0, 8], [0, 8]],
            "children": [{"type": "projection", "axis": 0}, {"type": "projection", "axis": 0, "mean": True}],
        }
    ]
    with pytest.raises(ConfigError, match=r"functions\[0\]\.children\[1\]\.name: duplicate name 'pj_ax_0'"):
        validate_config({"source": {"type": "sim"}, "detectors": {"cam": dict(CAM, functions=kids)}})
    named = [dict(two[0], name="a"), dict(two[1], name="b")]
    validate_config({"source": {"type": "sim"}, "detectors": {"cam": dict(CAM, functions=named)}})
    with pytest.raises(ConfigError, match=r"functions\[0\]\.name: function name 'a/b' is not an identifier"):
        validate_config(
            {"source": {"type": "sim"}, "detectors": {"cam": dict(CAM, functions=[dict(two[0], name="a/b")])}}
        )


# ---- outputs ----------------------------------------------------------------------------------


def test_output_that_is_the_constants_file_is_refused(tmp_path, capsys):
    consts = tmp_path / "k.h5"
    with h5py.File(consts, "w") as f:
        f["pedestal"] = np.full((1, 1, 16, 16), 5, np.float32)
    path = write_config(tmp_path, output=str(consts), detectors={"cam": dict(CAM, constants=str(consts))})
    rc, err = run_cli(capsys, "run", str(path), "--backend", "numpy", "--quiet")
    assert rc == 2 and "output" in err and "detectors.cam.constants" in err
    with h5py.File(consts) as f:  # untouched
        assert list(f) == ["pedestal"]


def test_darks_out_that_is_the_raw_file_is_refused(tmp_path, capsys):
    raw = write_raw(tmp_path / "raw.h5")
    path = write_config(
        tmp_path, source={"type": "hdf5", "path": str(raw)}, detectors={"cam": dict(CAM, dataset="/cam/raw")}
    )
    rc, err = run_cli(capsys, "darks", str(path), "--out", str(raw), "--backend", "numpy")
    assert rc == 2 and "--out" in err and "source.path" in err
    with h5py.File(raw) as f:
        assert f["cam/raw"].shape == (6, 16, 16)


@pytest.mark.parametrize("where", ["folder", "under_a_file"])
def test_output_that_cannot_be_a_file_is_refused_before_reading(tmp_path, capsys, where):
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("x")
    out = tmp_path / "d" if where == "folder" else tmp_path / "f" / "out.h5"
    rc, err = run_cli(capsys, "run", str(write_config(tmp_path)), "--out", str(out), "--backend", "numpy", "--quiet")
    assert rc == 2 and "--out" in err and ("folder" in err), err


def test_missing_output_folders_are_created(tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "out.h5"
    rc, _ = run_cli(capsys, "run", str(write_config(tmp_path)), "--out", str(out), "--backend", "numpy", "--quiet")
    assert rc == 0 and out.is_file()


def test_a_source_without_events_is_an_error_and_leaves_no_file(tmp_path, capsys):
    raw = write_raw(tmp_path / "raw.h5", n=0)
    path = write_config(
        tmp_path, source={"type": "hdf5", "path": str(raw)}, detectors={"cam": dict(CAM, dataset="/cam/raw")}
    )
    rc, err = run_cli(capsys, "run", str(path), "--backend", "numpy", "--quiet")
    assert rc == 2 and "no events" in err
    assert not (tmp_path / "out.h5").exists()


@pytest.mark.parametrize("what", ["missing", "not_hdf5"])
def test_inspect_of_a_file_that_is_not_a_result(tmp_path, capsys, what):
    path = tmp_path / "x.h5"
    if what == "not_hdf5":
        path.write_text("not HDF5")
    rc, err = run_cli(capsys, "inspect", str(path))
    assert rc == 2 and str(path) in err


# ---- the HDF5 source --------------------------------------------------------------------------

DETS = {"cam": {"type": "camera", "shape": (1, 16, 16), "dataset": "/cam/raw"}}


def test_hdf5_timestamps_out_of_order_name_the_event(tmp_path):
    raw = write_raw(tmp_path / "raw.h5", ts=np.array([5, 6, 9, 1, 10, 11], np.uint64))
    with pytest.raises(InputError, match=r"not in time order at event 3 \(1 after 9\)"):
        Hdf5Source(str(raw), DETS)
    with Hdf5Source(str(raw), DETS, timestamp=None) as src:  # timestamp: null takes the event index
        np.testing.assert_array_equal(src.read(0, 6).timestamp, np.arange(6))


def test_hdf5_timestamps_must_be_integers(tmp_path):
    raw = write_raw(tmp_path / "raw.h5", ts=1.6e9 + np.arange(6) * 0.008)
    with pytest.raises(InputError, match=r"source.timestamp: '/timestamp'.*float64.*integers"):
        Hdf5Source(str(raw), DETS)


def test_hdf5_timestamp_named_in_the_config_must_exist(tmp_path):
    raw = write_raw(tmp_path / "raw.h5")
    with Hdf5Source(str(raw), DETS) as src:  # the default /timestamp is optional
        np.testing.assert_array_equal(src.read(0, 3).timestamp, np.arange(3))
    with pytest.raises(InputError, match=r"source.timestamp: '/ts' is not in"):
        Hdf5Source(str(raw), DETS, timestamp="/ts", timestamp_required=True)


def test_hdf5_dataset_that_is_a_group_is_an_error(tmp_path):
    raw = write_raw(tmp_path / "raw.h5")
    with pytest.raises(InputError, match=r"detectors.cam.dataset: '/cam' .* is a group"):
        Hdf5Source(str(raw), {"cam": dict(DETS["cam"], dataset="/cam")})


def test_hdf5_datasets_of_different_lengths_warn(tmp_path, caplog):
    raw = write_raw(tmp_path / "raw.h5", n=6, ts=np.arange(4, dtype=np.uint64))
    with caplog.at_level(logging.WARNING), Hdf5Source(str(raw), DETS) as src:
        assert src.n_events == 4
    assert "different lengths" in caplog.text and "source.timestamp '/timestamp': 4" in caplog.text


@pytest.mark.parametrize(
    "where, value",
    [
        (("batch_size",), True),
        (("batch_size",), "4"),
        (("detectors", "cam", "mask", "edges"), True),
        (("detectors", "cam", "mask", "status"), "no"),
        (("detectors", "cam", "mask", "central"), 1.0),
    ],
)
def test_wrong_types_are_errors_not_coerced(where, value):
    cfg = {"source": {"type": "sim"}, "detectors": {"cam": dict(CAM, mask={})}}
    node = cfg
    for k in where[:-1]:
        node = node[k]
    node[where[-1]] = value
    with pytest.raises(ConfigError, match=r"config: " + r"\.".join(where)):
        validate_config(cfg)
    # function parameters too
    for bad in (
        {"type": "roi", "bounds": [[0, 8], [0, 8]], "write_area": "yes"},
        {"type": "azav", "center_um": [0, 0], "distance_mm": 100, "energy_kev": 9.5, "bins": "10"},
    ):
        key = "write_area" if bad["type"] == "roi" else "bins"
        with pytest.raises(ConfigError, match=rf"functions\[0\]\.{key}"):
            validate_config({"source": {"type": "sim"}, "detectors": {"cam": dict(CAM, functions=[bad])}})
    # an integer where a float is asked is no error
    validate_config(
        {
            "source": {"type": "sim"},
            "detectors": {"cam": dict(CAM, common_mode={"type": "median", "max_correction": 50})},
        }
    )


def test_events_option_sets_the_length_of_a_simulated_run(tmp_path, capsys):
    out = tmp_path / "o.h5"
    rc, _ = run_cli(
        capsys, "run", str(write_config(tmp_path)), "--events", "7", "--out", str(out), "--backend", "numpy", "--quiet"
    )
    assert rc == 0
    with h5py.File(out) as f:  # the config says 4 events; --events 7 makes 7
        assert f["timestamp"].shape == (7,)


@pytest.mark.parametrize(
    "det, where",
    [
        (dict(type="jungfrau", shape=[1, 500, 1024]), "a jungfrau panel is 512 x 1024 pixels, not 500 x 1024"),
        (dict(type="epix10ka", shape=[4, 384, 352]), "a epix10ka panel is 352 x 384"),
        (dict(CAM, common_mode={"type": "median", "axes": []}), "common_mode.axes"),
        (
            dict(
                CAM,
                functions=[
                    {
                        "type": "azav",
                        "center_um": [0, 0],
                        "distance_mm": 100,
                        "energy_kev": 9.5,
                        "bins": 10,
                        "polarization": 2,
                    }
                ],
            ),
            r"functions\[0\].polarization",
        ),
    ],
)
def test_values_out_of_their_domain_are_config_errors(det, where):
    with pytest.raises(ConfigError, match=where):
        validate_config({"source": {"type": "sim"}, "detectors": {"d": det}})


@pytest.mark.parametrize("what", ["text", "other_hdf5"])
def test_run_does_not_overwrite_a_file_that_is_not_a_result(tmp_path, capsys, what):
    out = tmp_path / "o.h5"
    if what == "text":
        out.write_text("notes of the shift")
    else:
        with h5py.File(out, "w") as f:
            f["data"] = np.arange(3)
    before = out.read_bytes()
    rc, err = run_cli(capsys, "run", str(write_config(tmp_path)), "--out", str(out), "--backend", "numpy", "--quiet")
    assert rc == 2 and ("did not write" in err), err
    assert out.read_bytes() == before
    # an earlier result is overwritten by a rerun
    out.unlink()
    for _ in range(2):
        rc, _ = run_cli(capsys, "run", str(write_config(tmp_path)), "--out", str(out), "--backend", "numpy", "--quiet")
        assert rc == 0
