"""Result files as smalldata_tools' SmallDataAna (PyTables) reads them (issue 14).

SmallDataAna takes its time axis from ``/event_time`` (``(seconds << 32) | nanoseconds``, else from
``/timestamp`` in that packing), needs ``/fiducials`` for its filters and cubes, lists its keys down to
``/a/b/c`` taking each one's ``shape`` (a group there: ``NoSuchNodeError``; a soft link there is looked
up by its *target's* name, which PyTables' ``leaf.name`` gives: ``NoSuchNodeError`` unless the link's
group holds that name too), takes ``shape[0]`` of every ``/a/b`` dataset (a 0-d one:
``IndexError``; those whose first axis is not the events' it leaves out, as the per-item datasets of
droplets), and PyTables cannot read variable-length string datasets (``UnImplemented`` nodes) nor
HDF5's boolean enums (attributes read as None). :func:`layout_problems`
checks these rules on a file; the files are a single-rank run and a two-rank master with its parts.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_mpi import FakeComm, run_inproc

from gpusmall.io.master import build_master
from gpusmall.io.writer import ResultWriter
from gpusmall.producer.process import event_time

STATIC = ("UserDataCfg", "Sums")
ROOT_INTS = {"timestamp": np.uint64, "event_time": np.uint64, "fiducials": np.int64, "event_index": np.int64}


def smalldata_config(out: Path, events: int = 12, batch: int = 4) -> dict:
    """A demo-like run: an ePix10ka panel with ROI (area written), projection, azav, droplets and photons,
    run sums; every 5th event damaged."""
    return {
        "source": {"type": "sim", "events": events, "seed": 3, "damage_every": 5},
        "batch_size": batch,
        "backend": "numpy",
        "output": str(out),
        "detectors": {
            "epix": {
                "type": "epix10ka",
                "shape": [1, 352, 384],
                "units": "adu",
                "mask": {"status": True, "edges": 1, "central": 1},
                "common_mode": {
                    "type": "median",
                    "axes": ["rows", "cols"],
                    "max_correction": 100,
                    "min_pixels": 10,
                    "gain_ranges": "high",
                },
                "functions": [
                    {
                        "type": "roi",
                        "name": "roi0",
                        "bounds": [[0, 1], [40, 140], [30, 230]],
                        "thres_adu": 20,
                        "write_area": True,
                        "children": [{"type": "projection", "axis": -1}],
                    },
                    {"type": "azav", "center_um": [0, 0], "distance_mm": 100, "energy_kev": 9.5, "bins": 50},
                    {
                        "type": "droplet",
                        "threshold": 10,
                        "threshold_low": 3,
                        "use_rms": True,
                        "thres_adu": 40,
                        "max_droplets": 600,
                        "children": [{"type": "photons", "adu_per_photon": 156, "max_photons": 1200}],
                    },
                ],
                "sums": ["calib", "square", "max", "nhits_thresADU80"],
            }
        },
    }


def make_results(folder: Path) -> dict[str, Path]:
    """``single``: one rank; ``master``, ``part0``, ``part1``: two ranks (in one process, rank 0 last)."""
    folder.mkdir(parents=True, exist_ok=True)
    single = folder / "single.h5"
    run_inproc(smalldata_config(single), folder)
    master = folder / "two.h5"
    for r in (1, 0):
        run_inproc(smalldata_config(master), folder, comm=FakeComm(r, 2))
    return {"single": single, "master": master, "part0": folder / "two.part0.h5", "part1": folder / "two.part1.h5"}


def layout_problems(path) -> list[str]:
    """What SmallDataAna (PyTables) would trip on in a result file; empty when it reads it."""
    bad: list[str] = []
    with h5py.File(path, "r") as f:
        for k, t in ROOT_INTS.items():
            if k not in f or not isinstance(f[k], h5py.Dataset):
                bad.append(f"/{k} missing")
            elif f[k].dtype != t or f[k].ndim != 1:
                bad.append(f"/{k} is {f[k].dtype} {f[k].shape}, not ({np.dtype(t)}) per event")
        n = f["timestamp"].shape[0] if "timestamp" in f else None

        def attrs(name, obj):
            for k in obj.attrs:
                if obj.attrs.get_id(k).dtype.kind == "b":
                    bad.append(f"/{name}@{k}: a boolean attribute (PyTables reads None)")

        def visit(name, obj):
            depth = name.count("/") + 1
            attrs(name, obj)
            if isinstance(obj, h5py.Group):
                if depth >= 3:
                    bad.append(f"/{name}: a group three levels deep (SmallDataAna.Keys: NoSuchNodeError)")
                return
            if depth <= 2 and obj.ndim == 0:
                bad.append(f"/{name}: a 0-d dataset directly under the root or a root group (IndexError)")
            info = h5py.check_string_dtype(obj.dtype)
            if obj.dtype.kind == "O" or (info is not None and info.length is None):
                bad.append(f"/{name}: variable-length {obj.dtype} (a PyTables UnImplemented node)")
            if obj.dtype.kind == "b":
                bad.append(f"/{name}: a boolean dataset (HDF5 enum)")
            if name.split("/")[0] in STATIC or n is None:
                return
            if "items_count" in obj.attrs:  # per item (ragged): as many as the events' counts say
                count = f.get(f"{name.rsplit('/', 1)[0]}/{obj.attrs['items_count']}")
                if count is None or count.shape != (n,) or obj.ndim == 0 or obj.shape[0] != int(count[()].sum()):
                    bad.append(f"/{name}: per-item {obj.shape}, not the sum of its per-event counts")
            elif obj.ndim == 0 or obj.shape[0] != n:
                bad.append(f"/{name}: {obj.shape}, not {n} events first as /timestamp")

        def link(name, lnk):
            if not isinstance(lnk, h5py.SoftLink):
                return
            target = f.get(name)
            if target is None:
                bad.append(f"/{name}: a soft link to {lnk.path}, which does not exist")
            elif isinstance(target, h5py.Group) and name.count("/") + 1 >= 3:
                bad.append(f"/{name}: a soft link three levels deep to a group ({lnk.path})")
            else:  # PyTables forwards .name to the target: SmallDataAna looks up <link's group>/<target's name>
                seen = f"{name.rsplit('/', 1)[0]}/{lnk.path.rsplit('/', 1)[-1]}" if "/" in name else lnk.path
                if seen.lstrip("/") not in f:
                    bad.append(
                        f"/{name}: a soft link to {lnk.path}; SmallDataAna.Keys (PyTables' leaf.name is the "
                        f"target's) looks up /{seen.lstrip('/')}: NoSuchNodeError"
                    )

        attrs("", f)
        f.visititems(visit)
        f.visititems_links(link)
    return bad


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, Path]:
    return make_results(tmp_path_factory.mktemp("smalldata"))


@pytest.mark.parametrize("which", ["single", "master", "part0", "part1"])
def test_smalldata_ana_reads_the_layout(results, which):
    assert layout_problems(results[which]) == []


@pytest.mark.parametrize("which", ["single", "master"])
def test_event_time_fiducials_and_timestamp(results, which):
    with h5py.File(results[which], "r") as f:
        ts, et = f["timestamp"][()], f["event_time"][()]
        assert ts.shape == (12,) and np.all(np.diff(ts.astype(np.int64)) > 0)  # in time order
        np.testing.assert_array_equal(f["fiducials"][()], np.arange(12))
        np.testing.assert_array_equal(f["event_index"][()], np.arange(12))
        # (POSIX seconds << 32) | ns of the same instant, as SmallDataAna decodes it
        sec, ns = et >> np.uint64(32), et & np.uint64(0xFFFFFFFF)
        assert (ns < 10**9).all()
        np.testing.assert_array_equal(sec * np.uint64(10**9) + ns, ts)
        # SmallDataAna's time axis (its float sum rounds to ~0.2 us)
        when = np.array([np.datetime64(int(s * 1e9 + n), "ns") for s, n in zip(sec, ns)])
        assert (np.abs(when - ts.astype("datetime64[ns]")) < np.timedelta64(1, "us")).all()
        # the simulator's clock: plausible ns since the Unix epoch, 120 Hz
        first = datetime.datetime.fromtimestamp(int(ts[0]) / 1e9, datetime.timezone.utc)
        assert 2020 <= first.year <= 2030
        assert set(np.diff(ts.astype(np.int64)).tolist()) <= {8_333_333}


def test_single_and_master_hold_the_same_events(results):
    with h5py.File(results["single"], "r") as a, h5py.File(results["master"], "r") as b:
        for k in ROOT_INTS:
            assert b[k].is_virtual
            np.testing.assert_array_equal(a[k][()], b[k][()], err_msg=k)


def test_event_time_packs_unix_seconds_and_nanoseconds():
    ts = np.array([0, 999_999_999, 10**9, 1_700_000_000_123_456_789], np.uint64)
    np.testing.assert_array_equal(event_time(ts), [0, 999_999_999, 1 << 32, (1_700_000_000 << 32) | 123_456_789])
    assert event_time(ts).dtype == np.uint64


def test_master_renumbers_local_fiducials_in_time_order(tmp_path):
    """psana's MPI distribution: parts count their own events (``event_index_local``); the master numbers
    /event_index and /fiducials 0, 1, ... in timestamp order, as one rank would."""
    out = tmp_path / "ps.h5"
    for rank, t in ((0, [10, 30, 50]), (1, [20, 40])):
        with ResultWriter(tmp_path / f"ps.part{rank}.h5", chunk_events=4) as w:
            w.set_attrs(
                "/",
                {"gpusmall_version": "test", "rank": rank, "ranks": 2, "event_index_local": True, "complete": False},
            )
            ts = np.array(t, np.uint64)
            local = np.arange(len(t), dtype=np.int64)
            w.append(
                {
                    "timestamp": ts,
                    "event_index": local,
                    "event_time": event_time(ts),
                    "fiducials": local,
                    "det/x": ts.astype(np.float32),
                }
            )
            w.set_attrs("/", {"complete": True})
    info = build_master(out, [tmp_path / "ps.part0.h5", tmp_path / "ps.part1.h5"])
    assert info["events"] == 5 and info["complete"]
    with h5py.File(out, "r") as f:
        np.testing.assert_array_equal(f["timestamp"][()], [10, 20, 30, 40, 50])
        np.testing.assert_array_equal(f["event_index"][()], np.arange(5))
        np.testing.assert_array_equal(f["fiducials"][()], np.arange(5))
        np.testing.assert_array_equal(f["event_time"][()], [10, 20, 30, 40, 50])  # < 1 s: the low 32 bits
        assert f.attrs["complete"] == 1 and f.attrs["complete"].dtype == np.uint8
    assert layout_problems(out) == []


def test_booleans_and_text_are_stored_as_pytables_reads_them(tmp_path):
    """Booleans (datasets, attributes, per-event columns) as uint8; text in datasets as fixed-length bytes,
    text attributes as strings."""
    with ResultWriter(tmp_path / "b.h5", chunk_events=2) as w:
        w.set_attrs("/", {"flag": True, "text": "adu", "list": ["a", "b"]})
        w.append({"timestamp": np.arange(2, dtype=np.uint64), "det/hit": np.array([True, False])})
        w.write_static(
            "UserDataCfg/det",
            {
                "on": np.bool_(True),
                "mask": np.ones((2, 3), bool),
                "units": "adu",
                "axes": ["rows", "cols"],
                "none": "null",
                "empty": "",
            },
        )
    with h5py.File(tmp_path / "b.h5", "r") as f:
        assert f.attrs["flag"] == 1 and f.attrs["flag"].dtype == np.uint8
        assert f.attrs["text"] == "adu" and f.attrs["list"] == '["a", "b"]'
        assert f["det/hit"].dtype == np.uint8 and f["det/hit"][()].tolist() == [1, 0]
        u = f["UserDataCfg/det"]
        assert u["on"].dtype == np.uint8 and u["mask"].dtype == np.uint8 and u["mask"][()].all()
        for k, v in (("units", b"adu"), ("axes", b'["rows", "cols"]'), ("none", b"null"), ("empty", b"")):
            assert u[k].dtype.kind == "S" and u[k][()] == v, k


def test_psana_time_becomes_unix_ns_in_the_same_order():
    """psana's (seconds since 1990-01-01 << 32) | ns -> ns since 1970-01-01; sorting (the master's event order)
    gives the same order either way."""
    from gpusmall.sources.psana import EPICS_EPOCH_UNIX_S, unix_ns

    epoch = datetime.datetime(1990, 1, 1, tzinfo=datetime.timezone.utc)
    assert int(epoch.timestamp()) == EPICS_EPOCH_UNIX_S
    packed = np.array([0, 5, (982960461 << 32) | 942241006], np.uint64)
    np.testing.assert_array_equal(
        unix_ns(packed), [631_152_000 * 10**9, 631_152_000 * 10**9 + 5, (982960461 + 631_152_000) * 10**9 + 942241006]
    )
    assert unix_ns(packed).dtype == np.uint64
    when = datetime.datetime.fromtimestamp(int(unix_ns(packed)[2]) // 10**9, datetime.timezone.utc)
    assert when == datetime.datetime(2021, 2, 23, 20, 34, 21, tzinfo=datetime.timezone.utc)  # psana's evt.datetime()
    rng = np.random.default_rng(0)
    t = (rng.integers(0, 2**31, 1000).astype(np.uint64) << np.uint64(32)) | rng.integers(0, 10**9, 1000).astype(
        np.uint64
    )
    np.testing.assert_array_equal(np.argsort(t, kind="stable"), np.argsort(unix_ns(t), kind="stable"))
