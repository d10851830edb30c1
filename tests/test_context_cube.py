"""Event context, selections, selection sums and the cube during the run (SPEC 10), on the sim and hdf5 sources.

The cube's per-bin sums are checked against a NumPy grouping of the per-event calibrated frames the same run wrote
(a full-frame ROI with ``write_area``), so the reference is the result file, not the cube code.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from test_mpi import FakeComm, cam_config, env, needs_mpi, run_inproc, write_cfg

from gpusmall.errors import ConfigError, InputError
from gpusmall.producer.config import CubeBinsConfig, validate_config
from gpusmall.producer.cube import Binning, cube_add_numpy
from gpusmall.selections import SelectionError, Selections

SHAPE = (48, 64)
SIMULATE = {
    "scan": {"variable": "delay", "events_per_step": 9, "start": -1.0, "step": 0.5},
    "laser_off_every": 2,
    "xray_off_every": 5,
}


def scan_config(tmp_path, out="scan.h5", batch=7, events=45, cube=None, sums=None, **extra):
    data = {
        "source": {"type": "sim", "events": events, "seed": 4, "simulate": SIMULATE},
        "batch_size": batch,
        "backend": "numpy",
        "output": str(tmp_path / out),
        "selections": {"good_i0": {"ipm/sum": [0.6, 5.0]}, "on_good": {"laser_on": True, "good_i0": True}},
        "detectors": {
            "cam": {
                "type": "camera",
                "shape": list(SHAPE),
                "pixel_um": 50.0,
                "functions": [
                    {"type": "roi", "name": "full", "bounds": [[0, SHAPE[0]], [0, SHAPE[1]]], "write_area": True},
                    {"type": "azav", "center_um": [0, 0], "distance_mm": 100, "energy_kev": 9.5, "bins": 8},
                ],
                "sums": sums if sums is not None else ["calib", "calib_dropped", "calib_square:laser_on"],
            }
        },
    }
    if cube is not None:
        data["cube"] = cube
    data.update(extra)
    return data


def read(path):
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
        out["attrs"] = dict(f.attrs)
    return out


# ---- the event context -------------------------------------------------------------------------------------


def test_sim_context_per_event(tmp_path):
    """scan/varStep, scan/delay, the laser and X-ray patterns and I0 as the config describes them; a dropped shot
    has no photons and I0 0."""
    run_inproc(scan_config(tmp_path), tmp_path)
    r = read(tmp_path / "scan.h5")
    i = np.arange(45)
    np.testing.assert_array_equal(r["scan/varStep"], i // 9)
    assert r["scan/varStep"].dtype == np.int64 and r["scan/delay"].dtype == np.float64
    np.testing.assert_array_equal(r["scan/delay"], -1.0 + 0.5 * (i // 9))
    np.testing.assert_array_equal(r["lightStatus/laser"], (i % 2 != 0).astype(np.uint8))
    np.testing.assert_array_equal(r["lightStatus/xray"], (i % 5 != 4).astype(np.uint8))
    assert r["lightStatus/xray"].dtype == np.uint8
    dropped = r["lightStatus/xray"] == 0
    assert (r["ipm/sum"][dropped] == 0).all() and (r["ipm/sum"][~dropped] > 0).all()
    photons = r["cam/full_sum"]
    assert abs(photons[dropped].mean()) < 0.1 * photons[~dropped].mean()  # dark frames: noise only
    assert json.loads(r["attrs"]["context"]) == sorted(
        ["scan/delay", "scan/varStep", "lightStatus/laser", "lightStatus/xray", "ipm/sum"]
    )
    assert json.loads(r["attrs"]["context_missing"]) == {k: 0 for k in json.loads(r["attrs"]["context"])}


def test_i0_scales_the_signal(tmp_path):
    """The shot intensity I0 scales the photons: the ROI sum follows ipm/sum (laser off, so no pump)."""
    run_inproc(scan_config(tmp_path, events=80), tmp_path)
    r = read(tmp_path / "scan.h5")
    off = (r["lightStatus/laser"] == 0) & (r["lightStatus/xray"] == 1)
    corr = np.corrcoef(r["ipm/sum"][off], r["cam/full_sum"][off])[0, 1]
    assert corr > 0.7  # (Poisson noise on a small frame; without the scaling it is about 0)


def test_context_and_cube_without_simulate_are_errors(tmp_path):
    data = scan_config(tmp_path, cube={"by": "scan/varStep"})
    data["source"].pop("simulate")
    with pytest.raises(
        InputError,
        match=r"selections\.on_good\.laser_on: no selection 'laser_on'.*lightStatus.*"
        r"source\.simulate",
    ):
        run_inproc(data, tmp_path)
    data["selections"].pop("on_good")
    with pytest.raises(InputError, match=r"selections\.good_i0\.ipm/sum: no such per-event value.*source\.simulate"):
        run_inproc(data, tmp_path)
    data.pop("selections")
    data["detectors"]["cam"]["sums"] = ["calib_dropped"]
    with pytest.raises(InputError, match=r"detectors\.cam\.sums\[0\].*no selection 'dropped'.*lightStatus"):
        run_inproc(data, tmp_path)
    data["detectors"]["cam"]["sums"] = []
    with pytest.raises(InputError, match=r"cube\.by: 'scan/varStep' is not a per-event value"):
        run_inproc(data, tmp_path)
    assert not (tmp_path / "scan.h5").exists()


@pytest.mark.parametrize(
    "change, match",
    [
        ({"context": {"values": {"ipm/sum": "/x"}}}, r"context\.values\.ipm/sum: a sim source makes its own context"),
        ({"context": {"epics": ["a"]}}, r"context\.epics: read from psana runs only"),
        ({"context": {"values": {"cam/x": "/x"}}, "source": {"type": "hdf5", "path": "r.h5"}}, "the detector"),
        (
            {"context": {"values": {"lightStatus/foo": "/x"}}, "source": {"type": "hdf5", "path": "r.h5"}},
            "only lightStatus/xray and lightStatus/laser",
        ),
        ({"context": {"values": {"a b": "/x"}}, "source": {"type": "hdf5", "path": "r.h5"}}, "identifiers"),
        ({"context": {"values": {"ipm/sum": "x"}}, "source": {"type": "hdf5", "path": "r.h5"}}, "a dataset of the raw"),
        ({"selections": {"a": {"b": True}}}, r"selections\.a\.b: no selection 'b'"),
        ({"selections": {"a": {"a": True}}}, "refers to itself"),
        ({"selections": {"a": {"x": [2, 1]}}}, r"lo <= hi"),
        ({"selections": {"a": {"any": ["nope"]}}}, "no selection 'nope'"),
        ({"cube": {"by": "scan/varStep", "split": ["nope"]}}, r"cube\.split\[0\]: no selection 'nope'"),
        ({"cube": {"by": "x", "bins": {"n": 5}}}, r"cube\.bins: .*range"),
        ({"cube": {"by": "x", "bins": {"edges": [0, 2, 1]}}}, "must increase"),
        ({"cube": {"by": "x", "bins": {"n": 5, "edges": [0, 1]}}}, "give one of"),
        ({"cube": {"by": "x", "detectors": {"other": {}}}}, r"cube\.detectors\.other: no detector"),
    ],
)
def test_config_errors_name_the_key(tmp_path, change, match):
    data = scan_config(tmp_path)
    for k, v in change.items():
        data[k] = {**data.get(k, {}), **v} if k == "source" else v
    if data["source"]["type"] == "hdf5":
        data["source"] = {"type": "hdf5", "path": "r.h5"}
        data["detectors"]["cam"]["dataset"] = "/raw"
        data.pop("selections")
    with pytest.raises(ConfigError, match=match):
        validate_config(data, base_dir=tmp_path)


def test_hdf5_context_mapping(tmp_path):
    """An hdf5 source maps datasets of the raw file to context names; a NaN value is missing and counted; a
    dataset that is not there is an error naming the key before any event."""
    rng = np.random.default_rng(1)
    n = 12
    raw = tmp_path / "raw.h5"
    i0 = rng.uniform(0.5, 2, n)
    i0[3] = np.nan
    with h5py.File(raw, "w") as f:
        f["raw"] = rng.integers(0, 100, (n, *SHAPE)).astype(np.uint16)
        f["evr/laser"] = (np.arange(n) % 3 == 0).astype(np.int32)
        f["mon/i0"] = i0
        f["motor"] = np.repeat(np.arange(3), 4).astype(np.float32)
    data = {
        "source": {"type": "hdf5", "path": str(raw), "timestamp": None},
        "backend": "numpy",
        "batch_size": 5,
        "output": str(tmp_path / "o.h5"),
        "context": {"values": {"lightStatus/laser": "/evr/laser", "ipm/sum": "/mon/i0", "scan/motor": "/motor"}},
        "selections": {"on": {"lightStatus/laser": 1}},
        "detectors": {
            "cam": {"type": "camera", "shape": list(SHAPE), "dataset": "/raw", "sums": ["calib", "calib:on"]}
        },
        "cube": {"by": "scan/motor", "norm": "ipm/sum"},
    }
    run_inproc(data, tmp_path)
    r = read(tmp_path / "o.h5")
    np.testing.assert_array_equal(r["lightStatus/laser"], (np.arange(n) % 3 == 0).astype(np.uint8))
    np.testing.assert_array_equal(r["ipm/sum"], i0)
    assert json.loads(r["attrs"]["context_missing"])["ipm/sum"] == 1
    with h5py.File(raw) as f:  # (no constants: pedestal 0, gain 1)
        frames = f["raw"][()].astype(np.float64)
    np.testing.assert_allclose(r["Sums/cam_calib_on"], frames[np.arange(n) % 3 == 0].sum(0))
    c = read(tmp_path / "o.cube.h5")
    np.testing.assert_array_equal(c["bins/centers"], [0, 1, 2])
    np.testing.assert_array_equal(c["bins/count"], [3, 4, 4])  # event 3 (no I0) left out
    keep = np.isfinite(i0)
    step = np.repeat(np.arange(3), 4)
    for s in range(3):
        m = keep & (step == s)
        np.testing.assert_allclose(c["cam/frame_sum"][s], frames[m].sum(0))
        np.testing.assert_allclose(c["ipm/sum_sum"][s], i0[m].sum())
    assert c["attrs"]["events_missing"] == 1
    data["context"]["values"]["ipm/sum"] = "/mon/nope"
    (tmp_path / "o.h5").unlink()
    with pytest.raises(InputError, match=r"context\.values\.ipm/sum: '/mon/nope' is not in"):
        run_inproc(data, tmp_path)
    assert not (tmp_path / "o.h5").exists()


# ---- selections ----------------------------------------------------------------------------------------------


def test_selections_evaluate():
    values = {"x": np.array([0.0, 1, 2, 3, np.nan]), "s": np.array([1, 0, 1, 0, 1], np.uint8)}
    sel = Selections(
        {
            "lo": {"x": [0, 1.5]},
            "on": {"s": 1},
            "both": {"lo": True, "on": True},
            "neither": {"lo": False, "on": False},
            "either": {"any": ["lo", "on"]},
        }
    )
    np.testing.assert_array_equal(sel.mask("lo", values), [1, 1, 0, 0, 0])
    np.testing.assert_array_equal(sel.mask("on", values), [1, 0, 1, 0, 1])
    np.testing.assert_array_equal(sel.mask("both", values), [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(sel.mask("neither", values), [0, 0, 0, 1, 0])
    np.testing.assert_array_equal(sel.mask("either", values), [1, 1, 1, 0, 1])
    assert sel.keys_of("both") == {"x", "s"}
    with pytest.raises(SelectionError, match=r"selections\.lo\.x: no such per-event value"):
        sel.check_keys({"s"})
    only_xray = Selections({}, builtin={"lightStatus/xray"})
    assert "dropped" in only_xray and "laser_on" not in only_xray


def test_selection_sums_equal_the_grouped_frames(tmp_path):
    """calib_dropped sums the frames with lightStatus/xray == 0, calib_square:laser_on the squares of laser-on
    X-ray shots: both against the per-event frames of the same run."""
    run_inproc(scan_config(tmp_path), tmp_path)
    r = read(tmp_path / "scan.h5")
    frames = r["cam/full_area"].astype(np.float64)
    xray, laser = r["lightStatus/xray"], r["lightStatus/laser"]
    np.testing.assert_allclose(r["Sums/cam_calib"], frames.sum(0), rtol=1e-9)
    np.testing.assert_allclose(r["Sums/cam_calib_dropped"], frames[xray == 0].sum(0), rtol=1e-9)
    on = (xray == 1) & (laser == 1)
    np.testing.assert_allclose(r["Sums/cam_calib_square_laser_on"], (frames[on] ** 2).sum(0), rtol=1e-9)
    with h5py.File(tmp_path / "scan.h5") as f:
        assert json.loads(f["cam"].attrs["sums_selected_events"]) == {
            "dropped": int((xray == 0).sum()),
            "laser_on": int(on.sum()),
        }


# ---- the cube during the run ------------------------------------------------------------------------------


def grouped(r, ids, n_bins):
    """(bins, ...) sums of the per-event frames, azav and I0 of run ``r`` grouped by ``ids`` (-1: left out)."""
    frames = r["cam/full_area"].astype(np.float64)
    out = {
        "count": np.zeros(n_bins, np.int64),
        "frame": np.zeros((n_bins, *SHAPE)),
        "square": np.zeros((n_bins, *SHAPE)),
        "azav": np.zeros((n_bins, *r["cam/azav_azav"].shape[1:])),
        "i0": np.zeros(n_bins),
    }
    for b in range(n_bins):
        m = ids == b
        out["count"][b] = m.sum()
        out["frame"][b] = frames[m].sum(0)
        out["square"][b] = (frames[m] ** 2).sum(0)
        out["azav"][b] = r["cam/azav_azav"][m].astype(np.float64).sum(0)
        out["i0"][b] = r["ipm/sum"][m].sum()
    return out


STEP_CUBE = {
    "by": "scan/varStep",
    "split": ["laser_on", "laser_off"],
    "norm": "ipm/sum",
    "detectors": {"cam": {"square": True, "outputs": ["azav_azav"]}},
}


def test_cube_by_step_split_by_laser(tmp_path):
    """Per step and laser state: counts, frame sums, squares, azav sums and I0 sums equal the NumPy grouping of
    the run's own per-event frames by scan/varStep and lightStatus/laser; normalised means are sum(frame)/sum(I0)."""
    run_inproc(scan_config(tmp_path, cube=STEP_CUBE), tmp_path)
    r, c = read(tmp_path / "scan.h5"), read(tmp_path / "scan.cube.h5")
    assert c["attrs"]["gpusmall_kind"] == "cube" and bool(c["attrs"]["complete"])
    assert "sum" in c["attrs"]["means"]
    assert [s.decode() for s in c["bins/split"]] == ["laser_on", "laser_off"]
    np.testing.assert_array_equal(c["bins/centers"], np.arange(5))
    xray, laser = r["lightStatus/xray"] == 1, r["lightStatus/laser"]
    for s, state in enumerate((1, 0)):
        ids = np.where(xray & (laser == state), r["scan/varStep"], -1)
        want = grouped(r, ids, 5)
        np.testing.assert_array_equal(c["bins/count"][s], want["count"])
        np.testing.assert_allclose(c["cam/frame_sum"][s], want["frame"], rtol=1e-10)
        np.testing.assert_allclose(c["cam/frame_square_sum"][s], want["square"], rtol=1e-10)
        np.testing.assert_allclose(c["cam/azav_azav_sum"][s], want["azav"], rtol=1e-6)
        np.testing.assert_allclose(c["ipm/sum_sum"][s], want["i0"], rtol=1e-12)
        norm = c["cam/frame_sum"][s] / c["ipm/sum_sum"][s][:, None, None]
        np.testing.assert_allclose(norm, want["frame"] / want["i0"][:, None, None], rtol=1e-10)
    assert c["attrs"]["events_used"] == int(xray.sum())  # dropped shots are in neither split but in the cube
    # the pump: laser-on frames at positive delays are brighter per I0 than laser-off ones
    late = c["bins/centers"] * 0.5 - 1.0 > 0
    on, off = (c["cam/frame_sum"][s][late].sum() / c["ipm/sum_sum"][s][late].sum() for s in (0, 1))
    assert on > 1.15 * off


@pytest.mark.parametrize(
    "bins", [{"n": 6, "range": [0.2, 2.0]}, {"edges": [0.0, 0.7, 1.0, 1.6, 9.0]}, {"width": 0.5, "range": [0.0, 2.0]}]
)
def test_cube_by_a_scalar_with_a_selection(tmp_path, bins):
    """Binned by I0 with edges as ``gpusmall cube`` makes them, only the events of a selection."""
    cube = {"by": "ipm/sum", "bins": bins, "selection": "on_good", "detectors": {"cam": {}}}
    run_inproc(scan_config(tmp_path, cube=cube), tmp_path)
    r, c = read(tmp_path / "scan.h5"), read(tmp_path / "scan.cube.h5")
    edges = c["bins/edges"]
    v = r["ipm/sum"]
    sel = (r["lightStatus/xray"] == 1) & (r["lightStatus/laser"] == 1) & (v >= 0.6) & (v <= 5.0)
    inside = sel & (v >= edges[0]) & (v <= edges[-1])
    ids = np.where(inside, np.clip(np.searchsorted(edges, v, side="right") - 1, 0, len(edges) - 2), -1)
    want = grouped(r, ids, len(edges) - 1)
    np.testing.assert_array_equal(c["bins/count"], want["count"])
    np.testing.assert_allclose(c["cam/frame_sum"], want["frame"], rtol=1e-10)
    assert "cam/frame_square_sum" not in c
    assert c["attrs"]["events_unselected"] == int((~sel).sum())
    assert c["attrs"]["events_used"] == int(inside.sum())


def test_cube_independent_of_batch_size_and_ranks(tmp_path):
    """Batch sizes 1, 7, 64 and 2 ranks (parts added up by rank 0) give the same cube: counts exactly, sums to
    float64 rounding."""
    runs = {}
    for bs in (1, 7, 64):
        run_inproc(scan_config(tmp_path, out=f"b{bs}.h5", batch=bs, cube=STEP_CUBE), tmp_path)
        runs[bs] = read(tmp_path / f"b{bs}.cube.h5")
    data = scan_config(tmp_path, out="r2.h5", batch=4, cube=STEP_CUBE)
    for rank in (1, 0):
        run_inproc(data, tmp_path, comm=FakeComm(rank, 2))
    runs["ranks"] = read(tmp_path / "r2.cube.h5")
    assert not list(tmp_path.glob("r2.cube.part*"))
    ref = runs[7]
    for k, c in runs.items():
        assert sorted(c) == sorted(ref), k
        for name in ref:
            if name == "attrs":
                continue
            if ref[name].dtype.kind in "iuS":
                np.testing.assert_array_equal(c[name], ref[name], err_msg=f"{k} {name}")
            else:
                np.testing.assert_allclose(c[name], ref[name], rtol=1e-12, err_msg=f"{k} {name}")
        assert c["attrs"]["events_used"] == ref["attrs"]["events_used"]


@needs_mpi
def test_cube_under_mpiexec(tmp_path):
    import subprocess
    import sys

    one = write_cfg(tmp_path, scan_config(tmp_path, out="one.h5", cube=STEP_CUBE), "one.yaml")
    two = write_cfg(tmp_path, scan_config(tmp_path, out="two.h5", batch=5, cube=STEP_CUBE), "two.yaml")
    for argv in (
        [sys.executable, "-m", "gpusmall", "run", str(one), "--quiet"],
        ["mpiexec", "-n", "2", sys.executable, "-m", "gpusmall", "run", str(two), "--quiet"],
    ):
        p = subprocess.run(argv, env=env(), capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
    a, b = read(tmp_path / "one.cube.h5"), read(tmp_path / "two.cube.h5")
    np.testing.assert_array_equal(a["bins/count"], b["bins/count"])
    np.testing.assert_allclose(a["cam/frame_sum"], b["cam/frame_sum"], rtol=1e-12)
    assert not list(tmp_path.glob("two.cube.part*"))
    with h5py.File(tmp_path / "two.h5") as f:  # the master has the context too
        np.testing.assert_array_equal(f["scan/varStep"][()], np.arange(45) // 9)


def test_cube_steps_beyond_the_device_rows(tmp_path):
    """Many steps, few device rows: sums move to the host as the scan moves on, and a batch over more steps than
    rows still adds up."""
    sim = {**SIMULATE, "scan": {**SIMULATE["scan"], "events_per_step": 2}}
    data = scan_config(tmp_path, batch=13, cube={"by": "scan/varStep", "detectors": {"cam": {}}})
    data["source"]["simulate"] = sim
    run_inproc(data, tmp_path)
    r, c = read(tmp_path / "scan.h5"), read(tmp_path / "scan.cube.h5")
    want = grouped(r, r["scan/varStep"], 23)
    np.testing.assert_array_equal(c["bins/count"], want["count"])
    np.testing.assert_allclose(c["cam/frame_sum"], want["frame"], rtol=1e-10)


def test_cube_errors_before_any_event(tmp_path):
    cube = {"by": "ipm/sum", "bins": {"n": 10**7, "range": [0, 1]}, "detectors": {"cam": {}}}
    data = scan_config(tmp_path, cube=cube)
    data["detectors"]["cam"]["shape"] = [512, 512]
    with pytest.raises(InputError, match=r"cube\.bins: the cube's sums .* need .* GiB"):
        run_inproc(data, tmp_path)
    data = scan_config(tmp_path, cube={"by": "scan/varStep", "detectors": {"cam": {"outputs": ["nope"]}}})
    with pytest.raises(InputError, match=r"cube\.detectors\.cam\.outputs\[0\]: detector cam has no per-event output"):
        run_inproc(data, tmp_path)
    data = scan_config(tmp_path, cube={"by": "scan/nope"})
    with pytest.raises(InputError, match=r"cube\.by: 'scan/nope' is not a per-event value.*scan/varStep"):
        run_inproc(data, tmp_path)
    assert not (tmp_path / "scan.h5").exists() and not (tmp_path / "scan.cube.h5").exists()


def test_cube_never_overwrites_a_foreign_file(tmp_path):
    (tmp_path / "scan.cube.h5").write_text("my notes")
    with pytest.raises(InputError, match="gpusmall overwrites only files it wrote"):
        run_inproc(scan_config(tmp_path, cube=STEP_CUBE), tmp_path)
    assert (tmp_path / "scan.cube.h5").read_text() == "my notes"


def test_binning_and_numpy_twin():
    b = Binning(CubeBinsConfig(width=0.5, range=[0.0, 1.2]))
    np.testing.assert_allclose(b.edges, [0, 0.5, 1.0, 1.5])
    np.testing.assert_array_equal(b.index(np.array([-0.1, 0.0, 0.49, 0.5, 1.5, 1.6, np.nan])), [-1, 0, 0, 1, 2, -1, -1])
    s = Binning(CubeBinsConfig(steps=True, max_bins=2))
    np.testing.assert_array_equal(s.index(np.array([3.0, 3.0, 1.0, 7.0, np.nan])), [1, 1, 0, -1, -1])
    rng = np.random.default_rng(0)
    data = rng.normal(size=(6, 10)).astype(np.float32)
    rows = np.array([[0, 0, -1, 1, 1, 0], [2, -1, 2, 2, -1, -1]])
    acc, sq = np.zeros((3, 10)), np.zeros((3, 10))
    cube_add_numpy(data, rows, acc, sq)
    d = data.astype(np.float64)
    for r in range(3):
        m = (rows == r).any(0)
        np.testing.assert_allclose(acc[r], d[m].sum(0), rtol=1e-12)
        np.testing.assert_allclose(sq[r], (d[m] ** 2).sum(0), rtol=1e-12)


def test_cam_config_still_writes_no_context(tmp_path):
    """A run without context writes none of it (the files of earlier versions stay as they were)."""
    run_inproc(cam_config(tmp_path), tmp_path)
    r = read(tmp_path / "cam.h5")
    assert not any(k.startswith(("lightStatus", "scan", "ipm")) for k in r)
    assert json.loads(r["attrs"]["context"]) == []


def test_cube_and_selection_sums_on_the_cupy_code_paths(tmp_path, monkeypatch):
    """The whole run through the CuPy branches under CuPy's rules (the strict stand-in, the kernels compiled
    for the CPU): the cube and the selection sums equal the NumPy backend's."""
    from fake_cupy import install_fake_cupyx
    from test_fake_gpu_pipeline import FakeGpuStrict

    from gpusmall.backend import Backend
    from gpusmall.producer.run import reduce_run

    gpu = FakeGpuStrict()
    install_fake_cupyx(monkeypatch, transfers=gpu.transfers)
    runs = {}
    for name, backend in (("gpu", gpu), ("numpy", Backend("numpy"))):
        cfg = validate_config(scan_config(tmp_path, out=f"{name}.h5", cube=STEP_CUBE), base_dir=tmp_path)
        reduce_run(cfg, backend, quiet=True)
        runs[name] = read(tmp_path / f"{name}.cube.h5"), read(tmp_path / f"{name}.h5")
    assert "cube_add" in {n for n, *_ in gpu.launches}
    (cg, rg), (cn, rn) = runs["gpu"], runs["numpy"]
    np.testing.assert_array_equal(cg["bins/count"], cn["bins/count"])
    for k in ("cam/frame_sum", "cam/frame_square_sum", "cam/azav_azav_sum", "ipm/sum_sum"):
        np.testing.assert_allclose(cg[k], cn[k], rtol=1e-5, atol=1e-3, err_msg=k)
    for k in ("Sums/cam_calib_dropped", "Sums/cam_calib_square_laser_on"):
        np.testing.assert_allclose(rg[k], rn[k], rtol=1e-5, atol=1e-2, err_msg=k)


def smalldata_scan_names(f) -> list[str]:
    """SmallDataAna's rule for a file's scan variables (its getScanName, transcribed): every ``scan/<name>``
    whose name does not contain ``var`` (its step counter is ``scan/varStep``)."""
    return sorted(k for k in f.get("scan", {}) if "var" not in k)


def test_scan_names_as_smalldata_ana_finds_them_and_the_old_step_name(tmp_path):
    """The step counter is smalldata_tools' scan/varStep, so SmallDataAna finds exactly the scan variable (a
    scan/step made it see two scans, and its scan plot failed); configs of the earlier release that name
    scan/step (cube.by, selection keys) get scan/varStep."""
    old = {**STEP_CUBE, "by": "scan/step"}
    run_inproc(
        scan_config(tmp_path, cube=old, selections={"early": {"scan/step": [0, 1]}}, sums=["calib:early"]), tmp_path
    )
    r = read(tmp_path / "scan.h5")
    with h5py.File(tmp_path / "scan.h5", "r") as f:
        assert smalldata_scan_names(f) == ["delay"] and "scan/step" not in f
    c = read(tmp_path / "scan.cube.h5")
    assert c["attrs"]["by"] == "scan/varStep"
    np.testing.assert_array_equal(c["bins/centers"], np.unique(r["scan/varStep"]))
    early = r["scan/varStep"] <= 1  # the selection the config wrote with the old name
    assert 0 < early.sum() < early.size
    np.testing.assert_allclose(r["Sums/cam_calib_early"], r["cam/full_area"][early].sum(0), rtol=1e-9)
