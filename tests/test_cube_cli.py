"""``gpusmall cube`` binning (--edges, --width, --steps), selections (--selection, --split, --select) and default
keys (SPEC sections 9, 10), checked against a grouping by plain NumPy masks over the file's datasets."""

from __future__ import annotations

import itertools
import json
import shutil

import h5py
import numpy as np
import pytest

from gpusmall.analysis import cube as cube_mod
from gpusmall.backend import Backend
from gpusmall.cli import main
from gpusmall.producer.config import validate_config
from gpusmall.producer.run import reduce_run

EVENTS = 40
RUN_SELECTIONS = {"good": {"ipm/sum": [0.5, 3.0]}}
# a run's selections read its event context; a cube's may read any per-event scalar of the file: "bright" is
# written into the file's config afterwards (as a config edited by hand)
SELECTIONS = {**RUN_SELECTIONS, "bright": {"cam/r_sum": [0.0, 1e30]}}
CONTEXT = ("lightStatus/xray", "lightStatus/laser", "ipm/sum", "scan/delay", "scan/varStep")


def _add_context(path):
    """What the sim source's ``simulate`` block makes, written by hand when the run does not write it."""
    with h5py.File(path, "r+") as f:
        idx = np.arange(f["timestamp"].shape[0])
        rng = np.random.default_rng(1)
        f.create_dataset("lightStatus/xray", data=(idx % 7 != 0).astype(np.uint8))
        f.create_dataset("lightStatus/laser", data=(idx % 2 != 0).astype(np.uint8))
        f.create_dataset("ipm/sum", data=rng.gamma(4.0, 0.3, idx.size))
        f.create_dataset("scan/varStep", data=(idx // 10).astype(np.int64))
        f.create_dataset("scan/delay", data=-1 + 0.5 * (idx // 10))


@pytest.fixture(scope="module")
def run_file(tmp_path_factory):
    """A 40-event camera run with a scan of 4 steps, laser off every 2nd event, X-rays off every 7th, damage."""
    tmp = tmp_path_factory.mktemp("cube_cli")
    cfg = {
        "source": {
            "type": "sim",
            "events": EVENTS,
            "seed": 3,
            "damage_every": 9,
            "simulate": {
                "scan": {"events_per_step": 10, "start": -1, "step": 0.5},
                "laser_off_every": 2,
                "xray_off_every": 7,
            },
        },
        "batch_size": 8,
        "backend": "numpy",
        "output": str(tmp / "run.h5"),
        "selections": RUN_SELECTIONS,
        "detectors": {
            "cam": {
                "type": "camera",
                "shape": [16, 20],
                "mask": {"edges": 1},
                "functions": [{"type": "roi", "name": "r", "bounds": [[0, 1], [2, 10], [3, 12]], "write_area": True}],
            }
        },
    }
    path = reduce_run(validate_config(cfg), Backend("numpy"), quiet=True).output
    with h5py.File(path, "r") as f:
        missing = [k for k in CONTEXT if k not in f]
        conf = json.loads(f.attrs["config"])
    if missing:
        _add_context(path)
    assert conf.get("selections") in (RUN_SELECTIONS, None)
    with h5py.File(path, "r+") as f:
        f.attrs["config"] = json.dumps({**conf, "selections": SELECTIONS})
    with h5py.File(path, "r") as f:  # the file is what the tests need
        assert (f["cam/damaged"][()] != 0).sum() > 0
        assert set(np.unique(f["scan/varStep"][()])) == {0, 1, 2, 3}
        assert 0 < f["lightStatus/xray"][()].sum() < EVENTS and 0 < f["lightStatus/laser"][()].sum() < EVENTS
    return path


def read(path, *keys):
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in keys}


def oracle(path, by, keys, masks, extra=None):
    """(count, sums) per bin from one boolean mask per bin over the events (not damaged, finite ``by``, and
    ``extra``), summing the rows of each dataset with ``ndarray.sum``."""
    d = read(path, by, "cam/damaged", *keys)
    ok = (d["cam/damaged"] == 0) & np.isfinite(d[by].astype(float))
    if extra is not None:
        ok &= extra
    count = np.array([(m & ok).sum() for m in masks])
    sums = {k: np.stack([d[k][m & ok].astype(np.float64).sum(axis=0) for m in masks]) for k in keys}
    return count, sums


def edge_masks(v, edges):
    v = np.asarray(v, float)
    out = [(v >= a) & (v < b) for a, b in itertools.pairwise(edges)]
    out[-1] |= v == edges[-1]
    return out


def check(out, count, sums, split=None):
    with h5py.File(out, "r") as c:
        np.testing.assert_array_equal(c["bins/count"][()], count)
        assert c["bins/count"].dtype == np.int64
        for k, s in sums.items():
            np.testing.assert_allclose(c[f"{k}_sum"][()], s, rtol=1e-12, atol=1e-9)
            cnt = count.reshape(*count.shape, *([1] * (s.ndim - count.ndim)))
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = np.where(cnt > 0, s / cnt, np.nan)
            np.testing.assert_allclose(c[f"{k}_mean"][()], mean, rtol=1e-12, atol=1e-9, equal_nan=True)
        assert c.attrs["gpusmall_kind"] == "cube" and c.attrs["means"] == "<key>_mean = <key>_sum / bins/count"
        assert set(json.loads(c.attrs["keys"])) >= set(sums)
        if split is not None:
            assert c["bins/split"].dtype.kind == "S"
            assert [s.decode() for s in c["bins/split"][()]] == split
        else:
            assert "split" not in c["bins"]


KEYS = ["cam/r_sum", "cam/r_area", "ipm/sum", "cam/r_com"]


def cube(run_file, out, *args):
    return main(["cube", str(run_file), "--out", str(out), *args])


def test_edges(run_file, tmp_path, capsys):
    out = tmp_path / "c.h5"
    edges = [-0.75, -0.25, 0.2, 0.5]  # delay -1 is below, 0.5 on the last edge (in the last bin)
    assert cube(run_file, out, "--by", "scan/delay", "--edges", *map(str, edges), "--keys", *KEYS) == 0
    v = read(run_file, "scan/delay")["scan/delay"]
    count, sums = oracle(run_file, "scan/delay", KEYS, edge_masks(v, edges))
    assert count.sum() > 0 and (count > 0).sum() == 3
    check(out, count, sums)
    with h5py.File(out, "r") as c:
        np.testing.assert_array_equal(c["bins/edges"][()], edges)
        np.testing.assert_allclose(c["bins/centers"][()], [-0.5, -0.025, 0.35])
        assert c.attrs["binning"] == "edges" and c.attrs["option"] == "--edges"
        dam = read(run_file, "cam/damaged")["cam/damaged"] != 0
        assert c.attrs["events_outside"] == ((v < -0.75) & ~dam).sum() > 0
    assert f"{count.sum()} of {EVENTS} events in 3 bins of scan/delay" in capsys.readouterr().err


def test_width_with_and_without_range(run_file, tmp_path):
    out = tmp_path / "c.h5"
    ipm = read(run_file, "ipm/sum")["ipm/sum"]
    # no range: bins [k W, (k + 1) W) holding min..max
    w = 0.25
    assert cube(run_file, out, "--by", "ipm/sum", "--width", str(w), "--keys", *KEYS) == 0
    dam = read(run_file, "cam/damaged")["cam/damaged"] != 0
    good = ipm[~dam]
    k0, k1 = int(np.floor(good.min() / w)), int(np.floor(good.max() / w)) + 1
    edges = w * np.arange(k0, k1 + 1)
    with h5py.File(out, "r") as c:
        np.testing.assert_allclose(c["bins/edges"][()], edges, rtol=0, atol=1e-12)
        assert c.attrs["binning"] == "edges" and c.attrs["option"] == "--width"
    count, sums = oracle(run_file, "ipm/sum", KEYS, edge_masks(ipm, edges))
    assert count.sum() == (~dam).sum()
    check(out, count, sums)
    # values on the grid (delay -1, -0.5, 0, 0.5): one bin each, the maximum not on the last edge
    assert cube(run_file, out, "--by", "scan/delay", "--width", "0.5", "--keys", *KEYS) == 0
    v = read(run_file, "scan/delay")["scan/delay"]
    edges = np.array([-1, -0.5, 0, 0.5, 1])
    with h5py.File(out, "r") as c:
        np.testing.assert_allclose(c["bins/edges"][()], edges, atol=1e-12)
    count, sums = oracle(run_file, "scan/delay", KEYS, [v == u for u in edges[:-1]])
    check(out, count, sums)
    # a range that is no whole number of widths: whole bins, the last reaching past HI (delay 0.5 is in it)
    assert cube(run_file, out, "--by", "scan/delay", "--width", "0.3", "--range", "-1", "0.4", "--keys", *KEYS) == 0
    edges = np.array([-1, -0.7, -0.4, -0.1, 0.2, 0.5])
    with h5py.File(out, "r") as c:
        np.testing.assert_allclose(c["bins/edges"][()], edges, atol=1e-12)
    v = read(run_file, "scan/delay")["scan/delay"]
    count, sums = oracle(run_file, "scan/delay", KEYS, edge_masks(v, edges))
    check(out, count, sums)


def test_steps_one_bin_per_value_and_nan_left_out(run_file, tmp_path):
    path = tmp_path / "nan.h5"
    shutil.copy(run_file, path)
    with h5py.File(path, "r+") as f:
        v = f["scan/delay"][()]
        dam = f["cam/damaged"][()] != 0
        first_good = int(np.flatnonzero(~dam)[0])
        v[first_good] = np.nan
        f["scan/delay"][...] = v
    out = tmp_path / "c.h5"
    assert cube(path, out, "--by", "scan/delay", "--steps", "--keys", *KEYS) == 0
    values = np.array(sorted(set(v[np.isfinite(v) & ~dam].tolist())))
    assert len(values) == 4
    count, sums = oracle(path, "scan/delay", KEYS, [v == u for u in values])
    check(out, count, sums)
    with h5py.File(out, "r") as c:
        np.testing.assert_array_equal(c["bins/centers"][()], values)
        assert "edges" not in c["bins"] and c.attrs["binning"] == "steps"
        assert c.attrs["events_nonfinite"] == 1 and c.attrs["events_used"] == count.sum() == (~dam).sum() - 1
    # an integer step key
    assert cube(run_file, out, "--by", "scan/varStep", "--steps", "--keys", *KEYS) == 0
    s = read(run_file, "scan/varStep")["scan/varStep"]
    count, sums = oracle(run_file, "scan/varStep", KEYS, [s == u for u in range(4)])
    check(out, count, sums)
    with h5py.File(out, "r") as c:
        np.testing.assert_array_equal(c["bins/centers"][()], [0, 1, 2, 3])


@pytest.mark.parametrize("name", ["laser_on", "good", "dropped"])
def test_selection(run_file, tmp_path, name, capsys):
    out = tmp_path / "c.h5"
    assert cube(run_file, out, "--by", "scan/varStep", "--steps", "--selection", name, "--keys", *KEYS) == 0
    d = read(run_file, "lightStatus/xray", "lightStatus/laser", "ipm/sum", "scan/varStep")
    sel = {
        "laser_on": (d["lightStatus/xray"] == 1) & (d["lightStatus/laser"] == 1),
        "good": (d["ipm/sum"] >= 0.5) & (d["ipm/sum"] <= 3.0),
        "dropped": d["lightStatus/xray"] == 0,
    }[name]
    values = np.unique(d["scan/varStep"][sel & (read(run_file, "cam/damaged")["cam/damaged"] == 0)])
    count, sums = oracle(run_file, "scan/varStep", KEYS, [d["scan/varStep"] == u for u in values], extra=sel)
    assert 0 < count.sum() < EVENTS
    check(out, count, sums)
    with h5py.File(out, "r") as c:
        np.testing.assert_array_equal(c["bins/centers"][()], values)
        assert c.attrs["selection"] == name and c.attrs["events_unselected"] > 0
    assert "unselected" in capsys.readouterr().err


def test_split_partition_adds_up_to_the_unsplit_cube(run_file, tmp_path, monkeypatch):
    out, whole = tmp_path / "split.h5", tmp_path / "whole.h5"
    names = ["laser_on", "laser_off", "dropped"]  # a partition of the events
    monkeypatch.setattr(cube_mod, "CHUNK_BYTES", 2000)  # several chunks of events, each read once for all splits
    assert cube(run_file, out, "--by", "scan/delay", "--bins", "3", "--split", *names, "--keys", *KEYS) == 0
    monkeypatch.undo()
    assert cube(run_file, whole, "--by", "scan/delay", "--bins", "3", "--keys", *KEYS) == 0
    d = read(run_file, "lightStatus/xray", "lightStatus/laser", "scan/delay", "cam/damaged")
    x, la = d["lightStatus/xray"], d["lightStatus/laser"]
    sel = [(x == 1) & (la == 1), (x == 1) & (la == 0), x == 0]
    good = d["scan/delay"][d["cam/damaged"] == 0]
    edges = np.linspace(good.min(), good.max(), 4)
    per = [oracle(run_file, "scan/delay", KEYS, edge_masks(d["scan/delay"], edges), extra=s) for s in sel]
    count = np.stack([p[0] for p in per])
    sums = {k: np.stack([p[1][k] for p in per]) for k in KEYS}
    assert count.shape == (3, 3) and (count.sum(axis=1) > 0).all()
    check(out, count, sums, split=names)
    with h5py.File(out, "r") as c, h5py.File(whole, "r") as w:
        np.testing.assert_array_equal(c["bins/count"][()].sum(axis=0), w["bins/count"][()])
        np.testing.assert_allclose(c["bins/edges"][()], w["bins/edges"][()])
        for k in KEYS:
            assert c[f"{k}_sum"].shape == (3, *w[f"{k}_sum"].shape)
            np.testing.assert_allclose(c[f"{k}_sum"][()].sum(axis=0), w[f"{k}_sum"][()], rtol=1e-12)
        assert json.loads(c.attrs["split"]) == names


def test_split_overlapping_with_a_selection(run_file, tmp_path):
    out = tmp_path / "c.h5"
    assert (
        cube(
            run_file,
            out,
            "--by",
            "scan/varStep",
            "--steps",
            "--selection",
            "good",
            "--split",
            "laser_on",
            "bright",
            "--keys",
            *KEYS,
        )
        == 0
    )
    d = read(run_file, "lightStatus/xray", "lightStatus/laser", "ipm/sum", "scan/varStep", "cam/r_sum", "cam/damaged")
    good = (d["ipm/sum"] >= 0.5) & (d["ipm/sum"] <= 3.0)
    sel = [(d["lightStatus/xray"] == 1) & (d["lightStatus/laser"] == 1), d["cam/r_sum"] >= 0]
    values = np.unique(d["scan/varStep"][good & (d["cam/damaged"] == 0)])
    per = [
        oracle(run_file, "scan/varStep", KEYS, [d["scan/varStep"] == u for u in values], extra=good & s) for s in sel
    ]
    check(
        out,
        np.stack([p[0] for p in per]),
        {k: np.stack([p[1][k] for p in per]) for k in KEYS},
        split=["laser_on", "bright"],
    )


def test_ad_hoc_select(run_file, tmp_path):
    out = tmp_path / "c.h5"
    assert (
        cube(
            run_file,
            out,
            "--by",
            "scan/varStep",
            "--bins",
            "2",
            "--select",
            "lightStatus/laser=1",
            "--select",
            "ipm/sum=0.8:",
            "--select",
            "scan/delay=-1:0.25",
            "--keys",
            *KEYS,
        )
        == 0
    )
    d = read(run_file, "lightStatus/laser", "ipm/sum", "scan/delay", "scan/varStep", "cam/damaged")
    sel = (d["lightStatus/laser"] == 1) & (d["ipm/sum"] >= 0.8) & (d["scan/delay"] >= -1) & (d["scan/delay"] <= 0.25)
    s = d["scan/varStep"][sel & (d["cam/damaged"] == 0)]
    edges = np.linspace(s.min(), s.max(), 3)
    count, sums = oracle(run_file, "scan/varStep", KEYS, edge_masks(d["scan/varStep"], edges), extra=sel)
    assert 0 < count.sum() < (d["cam/damaged"] == 0).sum()
    check(out, count, sums)
    with h5py.File(out, "r") as c:
        np.testing.assert_allclose(c["bins/edges"][()], edges)
        assert json.loads(c.attrs["select"]) == ["lightStatus/laser=1", "ipm/sum=0.8:", "scan/delay=-1:0.25"]


def test_default_keys_include_every_per_event_scalar(run_file, tmp_path):
    out = tmp_path / "c.h5"
    assert cube(run_file, out, "--by", "scan/varStep", "--steps") == 0
    with h5py.File(run_file, "r") as f:
        scalars = [
            k
            for k in (
                "ipm/sum",
                "lightStatus/laser",
                "lightStatus/xray",
                "scan/delay",
                "scan/varStep",
                "cam/r_sum",
                "cam/r_max",
                "cam/r_mean",
                "cam/r_nsat",
            )
        ]
        assert all(k in f for k in scalars)
    with h5py.File(out, "r") as c:
        keys = set(json.loads(c.attrs["keys"]))
    # by a key outside the detector groups: the >= 2-D datasets as before, and now every scalar
    assert keys == {*scalars, "cam/r_area", "cam/r_com"}
    s = read(run_file, "scan/varStep")["scan/varStep"]
    count, sums = oracle(run_file, "scan/varStep", sorted(keys), [s == u for u in range(4)])
    check(out, count, sums)
    # by a detector key: that detector's datasets and the context scalars
    assert cube(run_file, out, "--by", "cam/r_sum", "--bins", "2") == 0
    with h5py.File(out, "r") as c:
        assert set(json.loads(c.attrs["keys"])) == keys
        for gone in ("timestamp", "event_index", "event_time", "fiducials", "cam/damaged"):
            assert f"{gone}_sum" not in c


@pytest.mark.parametrize(
    "args, words",
    [
        (["--selection", "nope"], ["--selection", "'nope'", "laser_on", "good"]),
        (["--split", "laser_on", "nope"], ["--split", "'nope'", "laser_off", "dropped"]),
        (["--select", "ipm/summ=1"], ["--select", "'ipm/summ'", "ipm/sum", "scan/delay"]),
        (["--select", "cam/r_area=1"], ["--select", "'cam/r_area'", "ipm/sum"]),
        (["--select", "ipm/sum>1"], ["--select", "KEY=LO:HI"]),
        (["--select", "ipm/sum=3:1"], ["--select", "ipm/sum=3:1"]),
        (["--keys", "ipm/sun"], ["'ipm/sun'", "ipm/sum"]),
    ],
)
def test_unknown_selection_or_key_exits_2_naming_it(run_file, tmp_path, capsys, args, words):
    out = tmp_path / "c.h5"
    assert cube(run_file, out, "--by", "scan/varStep", "--steps", *args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and all(w in err for w in words), err
    assert not out.exists()


def test_selection_reading_a_missing_key_and_bad_binning_exit_2(run_file, tmp_path, capsys):
    path = tmp_path / "weird.h5"
    shutil.copy(run_file, path)
    with h5py.File(path, "r+") as f:
        conf = json.loads(f.attrs["config"])
        f.attrs["config"] = json.dumps({**conf, "selections": {**SELECTIONS, "weird": {"epics/foo": 1}}})
    assert main(["cube", str(path), "--by", "scan/varStep", "--steps", "--split", "good", "weird"]) == 2
    err = capsys.readouterr().err
    assert "--split 'weird'" in err and "'epics/foo'" in err and "ipm/sum" in err
    # unused, the broken selection is no error
    assert (
        main(
            ["cube", str(path), "--by", "scan/varStep", "--steps", "--split", "good", "--out", str(tmp_path / "ok.h5")]
        )
        == 0
    )
    capsys.readouterr()
    for args, word in [
        (["--edges", "0", "2", "1"], "--edges"),
        (["--edges", "1"], "--edges"),
        (["--steps", "--range", "0", "1"], "--range"),
        (["--edges", "0", "1", "--range", "0", "1"], "--range"),
        (["--width", "1e-9"], "--width"),
        (["--bins", "2", "--range", "2", "1"], "LO < HI"),
    ]:
        assert cube(run_file, tmp_path / "c.h5", "--by", "scan/varStep", *args) == 2, args
        assert word in capsys.readouterr().err
    # exactly one of --bins/--edges/--width/--steps (argparse: exit 2)
    for args in (["--bins", "3", "--steps"], ["--width", "1", "--edges", "0", "1"], []):
        with pytest.raises(SystemExit) as e:
            cube(run_file, tmp_path / "c.h5", "--by", "scan/varStep", *args)
        assert e.value.code == 2
        assert "--bins" in capsys.readouterr().err
