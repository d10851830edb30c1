"""An HDF5 source that is truncated while it is read, or has a corrupt chunk (issue 13, items 7, 15):
the events whose bytes are gone or unreadable are damaged (named once in a warning), the others are
read as written, and the run goes on (exit 0).

HDF5 reads bytes beyond the end of a file as zeros without an error, and refuses to open a file that
is shorter than its superblock says: so the files here are truncated after the source has opened them.
"""

from __future__ import annotations

import logging
import os

import h5py
import numpy as np
import pytest
import yaml

from gpusmall.cli import main
from gpusmall.sources.hdf5 import Hdf5Source

N = 40
DETS = {"cam": {"type": "camera", "shape": (1, 16, 16), "dataset": "/cam/raw"}}
CHUNKS = {"contiguous": None, "chunked": (1, 1, 16, 16)}


def events(n=N) -> np.ndarray:
    """(n, 1, 16, 16) uint16, no zero anywhere (a zeroed row shows)."""
    return (np.arange(n * 256) % 50000 + 1).astype(np.uint16).reshape(n, 1, 16, 16)


def write_raw(path, layout="chunked", compression=None, ts_chunks=None, two_dets=False) -> np.ndarray:
    """The raw file: /timestamp first (so that it lies before the event data), then /cam/raw."""
    data = events()
    with h5py.File(path, "w") as f:
        f.create_dataset(
            "timestamp",
            data=1000 + 10 * np.arange(N, dtype=np.uint64),
            chunks=ts_chunks,
            compression="gzip" if ts_chunks else None,
        )
        f.create_dataset("cam/raw", data=data, chunks=CHUNKS[layout], compression=compression)
        if two_dets:
            f.create_dataset("cam2/raw", data=data)
    return data


def event_ends(path, dataset="/cam/raw") -> np.ndarray:
    """(events,) byte in the file where each event's storage ends (one event per chunk, or contiguous)."""
    with h5py.File(path, "r") as f:
        ds = f[dataset]
        if ds.chunks is None:
            return ds.id.get_offset() + (np.arange(ds.shape[0]) + 1) * 512
        return np.array(
            [(c := ds.id.get_chunk_info_by_coord((i, 0, 0, 0))).byte_offset + c.size for i in range(ds.shape[0])]
        )


def cut_point(path) -> tuple[int, np.ndarray]:
    """(length, (events,) bool): a length that cuts the last half of the events (the first of them
    partly), and the events it cuts."""
    ends = event_ends(path)
    cut = int(ends[N // 2]) - 100
    return cut, ends > cut


def corrupt(path, event, dataset="/cam/raw") -> None:
    """Overwrite the start of the (compressed) chunk holding ``event``: reading it fails."""
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info_by_coord((event,) + (0,) * (f[dataset].ndim - 1))
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset)
        fh.write(b"\xff" * 16)


def read_all(src, batch=8):
    """(raw (events, 1, 16, 16), damaged (events,)) of detector cam, read in batches."""
    got = [src.read(a, min(a + batch, N)) for a in range(0, N, batch)]
    return np.concatenate([b.raw["cam"] for b in got]), np.concatenate([b.damaged["cam"] for b in got])


def warnings_of(caplog, text):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


# ---- truncated while read -----------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "chunked"])
def test_events_beyond_the_end_of_a_truncated_file_are_damaged(tmp_path, caplog, layout):
    raw = tmp_path / "raw.h5"
    data = write_raw(raw, layout)
    cut, gone = cut_point(raw)
    assert 0 < gone.sum() < N and gone[-1]
    with caplog.at_level(logging.WARNING), Hdf5Source(str(raw), DETS) as src:
        os.truncate(raw, cut)
        got, damaged = read_all(src)
    np.testing.assert_array_equal(damaged, gone)
    np.testing.assert_array_equal(got[~gone], data[~gone])
    assert not got[gone].any()
    first = int(np.argmax(gone))
    said = warnings_of(caplog, "beyond the end of the file")
    assert len(said) == 1  # once per file and detector, not per batch
    assert str(raw) in said[0] and "'cam'" in said[0] and f"event {first}" in said[0]
    assert f"{gone.sum()} events" in said[0]


def test_a_growing_file_that_shrinks_is_checked_again(tmp_path):
    """follow mode: the chunk index is read again once the file is shorter than it was."""
    raw = tmp_path / "raw.h5"
    data = write_raw(raw, "chunked")
    cut, gone = cut_point(raw)
    with Hdf5Source(str(raw), DETS, follow=True, follow_timeout_s=0) as src:
        first = src.read(0, 8)
        os.truncate(raw, cut)
        rest = src.read(8, N)
    damaged = np.concatenate([first.damaged["cam"], rest.damaged["cam"]])
    np.testing.assert_array_equal(damaged, gone)
    np.testing.assert_array_equal(rest.raw["cam"][~gone[8:]], data[8:][~gone[8:]])


def write_config(tmp_path, raw, **det) -> str:
    cfg = {
        "source": {"type": "hdf5", "path": str(raw)},
        "batch_size": 8,
        "output": str(tmp_path / "out.h5"),
        "detectors": {
            "cam": {
                "type": "camera",
                "shape": [16, 16],
                "dataset": "/cam/raw",
                **det,
                "functions": [{"type": "roi", "bounds": [[0, 8], [0, 8]]}],
            }
        },
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def check_result(out, data, damaged):
    """The result flags exactly ``damaged``; the other events' ROI sums are those of ``data``."""
    with h5py.File(out, "r") as f:
        assert f.attrs["complete"] and f.attrs["events"] == N
        np.testing.assert_array_equal(f["cam/damaged"][:].astype(bool), damaged)
        np.testing.assert_array_equal(f["damage/cam"][:], (~damaged).astype(np.uint8))  # smalldata_tools' cut
        np.testing.assert_allclose(
            f["cam/roi_sum"][:][~damaged], data[~damaged, 0, :8, :8].sum(axis=(1, 2), dtype=np.float64)
        )


def test_a_run_over_a_file_truncated_while_it_runs_flags_the_lost_events(tmp_path, monkeypatch, caplog):
    raw = tmp_path / "raw.h5"
    data = write_raw(raw, "chunked")
    cut, gone = cut_point(raw)
    opened = Hdf5Source.__init__

    def open_then_truncate(self, *args, **kw):  # the file is cut once the run has opened it
        opened(self, *args, **kw)
        os.truncate(raw, cut)

    monkeypatch.setattr(Hdf5Source, "__init__", open_then_truncate)
    out = tmp_path / "out.h5"
    with caplog.at_level(logging.WARNING):
        assert main(["run", write_config(tmp_path, raw), "--out", str(out), "--quiet"]) == 0
    check_result(out, data, gone)
    assert len(warnings_of(caplog, "beyond the end of the file")) == 1


# ---- corrupt chunks -----------------------------------------------------------------------------


def test_a_corrupt_chunk_damages_its_event_only_and_the_run_goes_on(tmp_path, caplog):
    raw = tmp_path / "raw.h5"
    data = write_raw(raw, "chunked", compression="gzip")
    corrupt(raw, 13)
    bad = np.arange(N) == 13
    with Hdf5Source(str(raw), DETS) as src:
        got, damaged = read_all(src)
    np.testing.assert_array_equal(damaged, bad)
    np.testing.assert_array_equal(got[~bad], data[~bad])
    assert not got[bad].any()
    out = tmp_path / "out.h5"
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["run", write_config(tmp_path, raw), "--out", str(out), "--quiet"]) == 0
    check_result(out, data, bad)
    said = warnings_of(caplog, "cannot be read")
    assert len(said) == 1 and str(raw) in said[0] and "'cam'" in said[0] and "event 13" in said[0]


def test_further_corrupt_chunks_are_counted_not_each_warned(tmp_path, caplog):
    raw = tmp_path / "raw.h5"
    write_raw(raw, "chunked", compression="gzip")
    for event in (3, 4, 30):
        corrupt(raw, event)
    with caplog.at_level(logging.WARNING), Hdf5Source(str(raw), DETS) as src:
        _, damaged = read_all(src)
    np.testing.assert_array_equal(np.flatnonzero(damaged), [3, 4, 30])
    assert len(warnings_of(caplog, "cannot be read")) == 1 and "event 3 " in warnings_of(caplog, "cannot be read")[0]
    assert len(warnings_of(caplog, "2 more events could not be read")) == 1


def test_a_corrupt_timestamp_chunk_damages_its_events_for_every_detector(tmp_path, caplog):
    raw = tmp_path / "raw.h5"
    data = write_raw(raw, "chunked", ts_chunks=(4,), two_dets=True)
    corrupt(raw, 9, "/timestamp")  # the chunk of events 8 .. 11
    bad = (np.arange(N) >= 8) & (np.arange(N) < 12)
    dets = {**DETS, "cam2": dict(DETS["cam"], dataset="/cam2/raw")}
    with caplog.at_level(logging.WARNING), Hdf5Source(str(raw), dets) as src:
        batch = src.read(0, N)
    for name in dets:
        np.testing.assert_array_equal(batch.damaged[name], bad)
        np.testing.assert_array_equal(batch.raw[name][~bad], data[~bad])
    assert np.all(np.diff(batch.timestamp.astype(np.int64)) >= 0)  # still in time order
    np.testing.assert_array_equal(batch.timestamp[~bad], 1000 + 10 * np.flatnonzero(~bad))
    said = warnings_of(caplog, "cannot be read")
    assert len(said) == 1 and "timestamp" in said[0] and "event 8" in said[0] and "every detector" in said[0]
