"""Files gpusmall must leave alone or keep readable (issue 13): stale MPI parts (only real gpusmall parts
of an earlier run with more ranks are deleted), ``gpusmall merge`` over a foreign file, a full disk while
writing, a master file whose parts are missing.

A full disk is made with ``RLIMIT_FSIZE`` in a subprocess (SIGXFSZ ignored): writes past the limit fail
with EFBIG as they fail with ENOSPC on a full disk. The predictive free-space check is tested with a
fake ``os.statvfs``.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from test_mpi import KILLED_RANK, FakeComm, cam_config, env, needs_mpi, run_inproc, write_cfg

from gpusmall.cli import main
from gpusmall.io import writer as writer_mod
from gpusmall.io.master import (
    build_master,
    find_parts,
    missing_sources,
    part_path,
    remove_stale_parts,
    stale_parts,
)
from gpusmall.io.writer import LowDiskSpace, ResultWriter, lookup3, open_result

ROOT = Path(__file__).resolve().parents[1]


def make_part(path, rank: int, ranks: int, events: int = 8, t0: int = 0) -> Path:
    """A small gpusmall part file of rank ``rank`` of ``ranks``."""
    with ResultWriter(path, chunk_events=4) as w:
        w.set_attrs("/", {"gpusmall_version": "test", "rank": rank, "ranks": ranks, "complete": True})
        ev = t0 + np.arange(events)
        w.append(
            {
                "timestamp": (1000 + ev).astype(np.uint64),
                "event_index": ev,
                "cam/v": ev * 1.5,
                "cam/img": np.ones((events, 3, 3), np.float32) * ev[:, None, None],
                "cam/damaged": np.zeros(events, np.uint8),
            }
        )
    return Path(path)


def foreign_hdf5(path) -> Path:
    with h5py.File(path, "w") as f:
        f["data"] = np.arange(5)
    return Path(path)


# ---- 1. stale parts ---------------------------------------------------------------------------------


def test_stale_parts_are_only_gpusmall_parts_of_more_ranks(tmp_path):
    out = tmp_path / "out.h5"
    for r in (0, 1):
        make_part(part_path(out, r), r, 2)  # this run's own parts (2 ranks)
    stale = [make_part(part_path(out, r), r, 4) for r in (2, 3)]  # an earlier run on 4 ranks
    keep = [
        make_part(tmp_path / "out.partner.h5", 1, 4),  # not a part name
        make_part(tmp_path / "out.part07.h5", 7, 8),  # not how parts are named
        foreign_hdf5(tmp_path / "out.part4.h5"),  # someone's HDF5 data
        make_part(tmp_path / "out.part5.h5", 0, 1),  # a single-rank result named like a part
        make_part(tmp_path / "out.part6.h5", 2, 8),  # its rank is not its number
    ]
    (tmp_path / "out.part9.h5").write_text("shift notes")  # a text file
    keep.append(tmp_path / "out.part9.h5")
    (tmp_path / "out.part8.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)  # unreadable HDF5
    keep.append(tmp_path / "out.part8.h5")
    before = {p: p.read_bytes() for p in keep}
    assert stale_parts(out, 2) == stale
    assert stale_parts(out, 4) == []
    assert remove_stale_parts(out, 2) == stale
    assert not any(p.exists() for p in stale)
    for p in keep:
        assert p.read_bytes() == before[p], p
    assert part_path(out, 0).exists() and part_path(out, 1).exists()
    # found by exact name: part0, part1 and the numbered others, in rank order; not out.partner / out.part07
    assert [p.name for p in find_parts(out)] == [f"out.part{r}.h5" for r in (0, 1, 4, 5, 6, 8, 9)]


def test_glob_brackets_in_the_output_name_match_nothing_else(tmp_path):
    out = tmp_path / "run[1].h5"
    others = [make_part(tmp_path / f"run1.part{r}.h5", r, 4) for r in range(4)]  # another run's parts
    mine = make_part(tmp_path / "run[1].part3.h5", 3, 4)
    assert find_parts(out) == [mine]
    assert stale_parts(out, 2) == [mine]
    assert remove_stale_parts(out, 2) == [mine]
    assert all(p.exists() for p in others)


def test_a_two_rank_run_deletes_only_its_stale_parts(tmp_path):
    """Rank 0 of a 2-rank run on ``run[1].h5``: its own earlier 3-rank part goes, nothing else does."""
    data = cam_config(tmp_path, events=16, batch=8, out="run[1].h5")
    others = [make_part(tmp_path / f"run1.part{r}.h5", r, 2) for r in range(2)]
    foreign = foreign_hdf5(tmp_path / "run[1].part3.h5")
    (tmp_path / "run[1].part4.h5").write_text("not HDF5")
    (tmp_path / "run[1].partner.h5").write_text("not a part")
    stale = make_part(tmp_path / "run[1].part2.h5", 2, 3)
    for r in (1, 0):
        run_inproc(data, tmp_path, comm=FakeComm(r, 2))
    assert not stale.exists()
    assert all(p.exists() for p in others) and foreign.exists()
    assert (tmp_path / "run[1].part4.h5").read_text() == "not HDF5"
    assert (tmp_path / "run[1].partner.h5").exists()
    with h5py.File(tmp_path / "run[1].h5") as f:
        assert int(f.attrs["events"]) == 16 and int(f.attrs["ranks"]) == 2


# ---- 3. merge ---------------------------------------------------------------------------------------


def two_parts(out):
    make_part(part_path(out, 0), 0, 2, events=8, t0=0)
    make_part(part_path(out, 1), 1, 2, events=8, t0=8)


@pytest.mark.parametrize("what", ["text", "other_hdf5"])
def test_merge_refuses_to_overwrite_a_foreign_file(tmp_path, capsys, what):
    out = tmp_path / "x.h5"
    two_parts(out)
    if what == "text":
        out.write_text("the shift's notes")
    else:
        foreign_hdf5(out)
    before = out.read_bytes()
    assert main(["merge", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and ("did not write" in err), err
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.h5", "x.part0.h5", "x.part1.h5"]


def test_merge_leaves_a_file_named_like_a_temporary_alone_and_rewrites_its_master(tmp_path, capsys):
    out = tmp_path / "x.h5"
    two_parts(out)
    tmp = tmp_path / "x.h5.tmp"
    tmp.write_text("someone's file")
    old = os.umask(0o022)
    try:
        for _ in range(2):  # the second merge overwrites the first master (a gpusmall result)
            assert main(["merge", str(out)]) == 0
    finally:
        os.umask(old)
    assert "16 events from 2 parts" in capsys.readouterr().err
    assert tmp.read_text() == "someone's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.h5", "x.h5.tmp", "x.part0.h5", "x.part1.h5"]
    assert out.stat().st_mode & 0o777 == 0o644  # as any file created here, not mkstemp's 0600
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["timestamp"][()], 1000 + np.arange(16))


def test_a_failed_master_leaves_no_temporary_and_the_old_master(tmp_path, monkeypatch):
    out = tmp_path / "x.h5"
    two_parts(out)
    build_master(out)
    before = out.read_bytes()

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(h5py.Group, "create_virtual_dataset", broken)
    with pytest.raises(Exception, match="No space left"):
        build_master(out)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.h5", "x.part0.h5", "x.part1.h5"]


# ---- 4. full disk -----------------------------------------------------------------------------------


def _limited(limit):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return pre


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A run without a limit: its file's size and every per-event dataset."""
    d = tmp_path_factory.mktemp("ref")
    data = cam_config(d, events=400, batch=16, shape=(128, 128), out="ref.h5")
    run_inproc(data, d)
    ref = d / "ref.h5"
    with h5py.File(ref) as f:
        per_event = {
            k: f[k][()]
            for k in (
                "timestamp",
                "event_index",
                "cam/roi0_sum",
                "cam/roi0_pj_ax_1_data",
                "cam/rebin_data",
                "cam/damaged",
            )
        }
    return data, ref.stat().st_size, per_event


def _check_kept(out, per_event, plain=True):
    """The file opens (plainly) and holds the first n events of the reference in every per-event dataset."""
    f = h5py.File(out, "r") if plain else open_result(out)
    with f:
        n = f["timestamp"].shape[0]
        for k, v in per_event.items():
            assert f[k].shape == (n, *v.shape[1:]), k
            np.testing.assert_array_equal(f[k][()], v[:n], err_msg=k)
        assert not bool(f.attrs["complete"])
    return n


@pytest.mark.parametrize("fraction", [0.5, 0.8, 0.98])
def test_full_disk_one_line_exit_1_and_every_completed_batch(tmp_path, reference, fraction):
    """Mid-run (0.5, 0.8) and at the end-of-run writes (0.98): no crash, one line, a file that opens."""
    data, size, per_event = reference
    data = dict(data, output=str(tmp_path / "full.h5"))
    cfg = write_cfg(tmp_path, data)
    out = tmp_path / "full.h5"
    p = subprocess.run(
        [sys.executable, "-m", "gpusmall", "run", str(cfg), "--quiet"],
        env=env(),
        preexec_fn=_limited(int(size * fraction)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in p.stderr.strip().splitlines() if "backend" not in ln]
    assert p.returncode == 1, p.stderr
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("gpusmall: error: ") and "(disk full?)" in lines[0] and str(out) in lines[0], lines
    n = _check_kept(out, per_event)
    assert f"keeps the {n} events" in lines[0]
    assert 0 < n <= 400 and n % 16 == 0
    if fraction < 0.9:
        assert n < 400


def test_full_disk_before_the_first_batch(tmp_path, reference):
    data, size, per_event = reference
    data = dict(data, output=str(tmp_path / "full.h5"))
    cfg = write_cfg(tmp_path, data)
    out = tmp_path / "full.h5"
    for limit in (size // 50, size // 5):  # in the set-up writes, in the first batch
        p = subprocess.run(
            [sys.executable, "-m", "gpusmall", "run", str(cfg), "--quiet"],
            env=env(),
            preexec_fn=_limited(limit),
            capture_output=True,
            text=True,
            timeout=300,
        )
        lines = [ln for ln in p.stderr.strip().splitlines() if "backend" not in ln]
        assert p.returncode == 1 and len(lines) == 1 and "(disk full?)" in lines[0], p.stderr
        assert "no events" in lines[0] or "cannot create" in lines[0], lines
        if out.exists():  # kept only when it opens
            with h5py.File(out, "r") as f:
                assert "timestamp" not in f or f["timestamp"].shape[0] == 0


@needs_mpi
def test_full_disk_under_mpi_master_over_the_completed_batches(tmp_path, reference):
    data, size, per_event = reference
    data = dict(data, output=str(tmp_path / "m.h5"))
    cfg = write_cfg(tmp_path, data)
    wrapper = tmp_path / "limited_rank.py"  # MPI's shared memory is set up before the limit
    wrapper.write_text(
        "import resource, signal, sys\nfrom mpi4py import MPI  # noqa: F401\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({size // 3}, {size // 3}))\n"
        "from gpusmall.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    p = subprocess.run(
        ["mpiexec", "-n", "2", sys.executable, str(wrapper), "run", str(cfg), "--quiet"],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in p.stderr.strip().splitlines() if "backend" not in ln]
    assert p.returncode != 0 and len(lines) == 2 and all("(disk full?)" in ln for ln in lines), p.stderr
    with h5py.File(tmp_path / "m.h5", "r") as f:
        ts = f["timestamp"][()]
        n = ts.shape[0]
        assert f["cam/roi0_sum"].is_virtual and 0 < n < 400 and not bool(f.attrs["complete"])
        idx = np.searchsorted(per_event["timestamp"], ts)
        for k, v in per_event.items():
            if k != "event_index":
                np.testing.assert_array_equal(f[k][()], v[idx], err_msg=k)
        assert not missing_sources(f)


def test_low_disk_space_stops_before_the_batch_and_closes_the_file(tmp_path, reference, monkeypatch, capsys):
    """The predictive check: the free space (a fake statvfs: a budget minus what the file takes) falls
    below a batch plus the margin -> the run stops as if interrupted, the file closed normally."""
    data, size, per_event = reference
    out = tmp_path / "low.h5"
    data = dict(data, output=str(out))
    margin = 2 << 20  # room for the run sums (0.5 MB)
    monkeypatch.setattr(writer_mod, "SPACE_MARGIN_BYTES", margin)
    budget = size // 2 + margin
    real = os.statvfs

    def statvfs(path):
        if Path(path) == out:
            used = out.stat().st_size if out.exists() else 0
            return SimpleNamespace(f_bavail=max(0, budget - used), f_frsize=1)
        return real(path)

    monkeypatch.setattr(os, "statvfs", statvfs)
    with pytest.raises(LowDiskSpace, match="almost full"):
        run_inproc(data, tmp_path)
    n = _check_kept(out, per_event)
    assert 0 < n < 400 and n % 16 == 0
    with h5py.File(out, "r") as f:  # closed normally: sums and attributes written
        assert int(f.attrs["events"]) == n and "Sums/cam_calib" in f
    # the command line: one line naming the file and its events, exit 1
    out.unlink()
    assert main(["run", str(write_cfg(tmp_path, data)), "--quiet"]) == 1
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if "backend" not in ln]
    assert len(err) == 1 and "almost full" in err[0] and str(out) in err[0] and f"keeps the {n} events" in err[0]
    # margin 0: no check
    out.unlink()
    monkeypatch.setattr(writer_mod, "SPACE_MARGIN_BYTES", 0)
    assert run_inproc(data, tmp_path).events == 400


def test_lookup3_and_clearing_the_flags_of_a_file_left_open(tmp_path):
    """HDF5's metadata checksum (Jenkins' published values), and a part left open by a killed writer opens
    plainly with every flushed batch once its open flags are cleared."""
    assert lookup3(b"") == 0xDEADBEEF
    assert lookup3(b"Four score and seven years ago") == 0x17770551
    assert lookup3(b"Four score and seven years ago", 1) == 0xCD628161
    p = tmp_path / "k.h5"
    subprocess.run([sys.executable, "-c", KILLED_RANK, str(p)], env=env(), check=True, timeout=60)
    with pytest.raises(OSError, match="already open for write"):
        h5py.File(p, "r")
    assert writer_mod._clear_open_flags(p)
    with h5py.File(p, "r") as f:
        np.testing.assert_array_equal(f["timestamp"][()], 1000 + 100 + np.arange(12))
    (tmp_path / "t.txt").write_text("x" * 100)
    assert not writer_mod._clear_open_flags(tmp_path / "t.txt")


# ---- 5. missing parts -------------------------------------------------------------------------------


@pytest.fixture
def master(tmp_path):
    data = cam_config(tmp_path, events=32, batch=8, out="w.h5")
    for r in (1, 0):
        run_inproc(data, tmp_path, comm=FakeComm(r, 2))
    return tmp_path / "w.h5"


def test_plot_and_cube_refuse_a_master_whose_part_is_missing(master, tmp_path, capsys):
    png = tmp_path / "p.png"
    assert main(["plot", str(master), "cam/roi0_sum", "--png", str(png)]) == 0
    assert main(["cube", str(master), "--by", "cam/roi0_sum", "--bins", "3"]) == 0
    capsys.readouterr()
    png.unlink()
    part_path(master, 1).unlink()
    for argv in (
        ["plot", str(master), "cam/roi0_sum", "--png", str(png)],
        ["plot", str(master), "cam/rebin_data", "--png", str(png)],
        ["cube", str(master), "--by", "cam/roi0_sum", "--bins", "3", "--out", str(tmp_path / "c.h5")],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(tmp_path / "w.part1.h5") in err and "w.part0.h5" not in err, err
    assert not png.exists() and not (tmp_path / "c.h5").exists()
    # the run sums are the master's own copy: still plotted
    assert main(["plot", str(master), "Sums/cam_calib", "--png", str(png)]) == 0
    # inspect warns
    assert main(["inspect", str(master)]) == 0
    out = capsys.readouterr().out
    assert "WARNING" in out and "w.part1.h5" in out


def test_master_reads_nan_where_a_part_is_missing(master):
    with h5py.File(master) as f, h5py.File(part_path(master, 0)) as p0:
        n0 = int(p0["timestamp"].shape[0])
        full = f["cam/roi0_sum"][()]
    part_path(master, 1).unlink()
    with h5py.File(master) as f:
        v, ts = f["cam/roi0_sum"][()], f["timestamp"][()]
        np.testing.assert_array_equal(v[:n0], full[:n0])
        assert np.isnan(v[n0:]).all() and (ts[n0:] == 0).all()
        assert missing_sources(f) == {k: [str(master.parent / "w.part1.h5")] for k in missing_sources(f)}
        assert "cam/roi0_sum" in missing_sources(f) and "Sums/cam_calib" not in missing_sources(f)


def test_missing_sources_resolve_beside_the_master_not_the_working_folder(master, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)
    moved = tmp_path / "moved"
    moved.mkdir()
    with h5py.File(master) as f:
        assert missing_sources(f) == {}
    shutil.move(master, moved / "w.h5")  # without its parts
    with h5py.File(moved / "w.h5") as f:
        gone = missing_sources(f)
        assert gone and all(v == [str(moved / "w.part0.h5"), str(moved / "w.part1.h5")] for v in gone.values())
    assert main(["plot", str(moved / "w.h5"), "timestamp", "--png", str(tmp_path / "p.png")]) == 2
