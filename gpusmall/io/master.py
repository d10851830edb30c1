"""The master file of an MPI run (SPEC section 8): one view over the ranks' part files.

Each rank ``r`` writes ``<stem>.part<r>.h5`` with the per-event datasets of its events, its
``/UserDataCfg`` and its own ``/Sums``. :func:`build_master` writes ``<stem>.h5`` with

- every per-event dataset as an HDF5 virtual dataset (h5py VDS) over the parts, in timestamp order:
  one mapping per run of consecutive events of one part (one per part for contiguous blocks, one per
  psana batch when psana's MPI distribution interleaves the ranks' events); the master holds sorted
  copies instead beyond :data:`MAX_MAPPINGS` runs, or when a part was left open by a rank killed hard
  (it then reads only in SWMR mode, which a virtual dataset's source cannot);
- ``event_index`` as a virtual dataset too, unless the parts count their events locally (attribute
  ``event_index_local``, psana's MPI distribution): then it is renumbered 0, 1, ... in timestamp order;
- ``/UserDataCfg`` copied from the first part (rank 0 when it exists);
- ``/Sums`` reduced over the parts: ``max`` sums by maximum, the others by addition;
- the root attributes of the first part, with ``events``, ``parts`` and ``damaged`` (JSON: damaged
  events per detector) for the whole run.

Only what a part has flushed counts: a part cut short (an interrupted rank) contributes the events
of its completed batches, i.e. the shortest of its per-event datasets; an unreadable part is skipped
with a warning. ``gpusmall merge FILE`` calls the same function on the parts left on disk.
The virtual datasets name their parts by file name only, so the master and its parts move together.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import h5py
import numpy as np

from .writer import open_for_reading

log = logging.getLogger(__name__)

STATIC_GROUPS = ("UserDataCfg", "Sums")
#: at most this many virtual-dataset mappings per dataset; more (a finely interleaved run) -> copies
MAX_MAPPINGS = 10_000
_MAX_SUM = re.compile(r"_max(_thresADU-?\d+(\.\d+)?)?$")
_PART = re.compile(r"\.part(\d+)\.h5$")


def part_path(output, rank: int) -> Path:
    """``<stem>.part<rank>.h5`` beside ``output``."""
    output = Path(output)
    return output.with_name(f"{output.stem}.part{rank}.h5")


def find_parts(output) -> list[Path]:
    """The part files of ``output`` on disk, in rank order."""
    output = Path(output)
    found = []
    for p in output.parent.glob(f"{output.stem}.part*.h5"):
        m = _PART.search(p.name)
        if m and p.name == f"{output.stem}.part{m.group(1)}.h5":
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def per_event_names(f: h5py.File) -> list[str]:
    """Paths of the per-event datasets of a result file (everything outside /UserDataCfg and /Sums)."""
    names = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and name.split("/")[0] not in STATIC_GROUPS:
            names.append(name)

    f.visititems(visit)
    return sorted(names)


def _merge_sum(name: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum(a, b) if _MAX_SUM.search(name) else a + b


class _Part:
    def __init__(self, path: Path):
        self.path = path
        # a rank killed hard (SIGKILL, node failure) leaves its part in SWMR mode: it reads with swmr=True,
        # but plain opens (as a virtual dataset's source) fail until `h5clear -s`
        self.file, self.clean = open_for_reading(path)
        if not self.clean:
            log.warning("part %s was not closed (its rank was killed?): the master copies its data", path)
        self.names = per_event_names(self.file)
        self.n = min((self.file[k].shape[0] for k in self.names), default=0)
        ts = self.file["timestamp"][: self.n] if "timestamp" in self.file else np.arange(self.n, dtype=np.uint64)
        self.ts = np.asarray(ts)

    def close(self):
        self.file.close()


def build_master(output, parts: list | None = None) -> dict:
    """Write the master file ``output`` over ``parts`` (default: those on disk); returns a summary.

    Returns:
        dict with ``events`` (total), ``parts`` (used), ``skipped`` (unreadable) and ``damaged``
        (detector -> damaged events).
    """
    output = Path(output)
    parts = [Path(p) for p in (parts if parts is not None else find_parts(output))]
    if not parts:
        raise FileNotFoundError(f"no part files {output.stem}.part*.h5 in {output.parent}")
    opened, skipped = [], []
    for p in parts:
        try:
            opened.append(_Part(p))
        except (OSError, KeyError) as exc:
            log.warning("part %s is not readable, skipped: %s", p, exc)
            skipped.append(str(p))
    if not opened:
        raise OSError(f"none of the parts of {output} is readable")
    try:
        return _write(output, opened, skipped)
    finally:
        for p in opened:
            p.close()


def segments(parts_ts: list[np.ndarray]) -> list[tuple[int, int, int, int]]:
    """Runs of the timestamp-sorted events that lie consecutively in one part.

    Args:
        parts_ts: each part's timestamps (uint64), in the part's own (event) order.
    Returns:
        ``(part, start, count, out_start)`` per run: the part's events ``[start, start + count)`` are
        the master's events ``[out_start, out_start + count)``. Ties keep part order (stable sort).
    """
    if not parts_ts or sum(len(t) for t in parts_ts) == 0:
        return []
    which = np.concatenate([np.full(len(t), i, np.int64) for i, t in enumerate(parts_ts)])
    local = np.concatenate([np.arange(len(t), dtype=np.int64) for t in parts_ts])
    order = np.argsort(np.concatenate(parts_ts), kind="stable")
    which, local = which[order], local[order]
    brk = np.flatnonzero((which[1:] != which[:-1]) | (local[1:] != local[:-1] + 1)) + 1
    starts = np.concatenate([[0], brk])
    counts = np.diff(np.concatenate([starts, [len(order)]]))
    return [(int(which[s]), int(local[s]), int(c), int(s)) for s, c in zip(starts, counts)]


def _write(output: Path, parts: list[_Part], skipped: list[str]) -> dict:
    first = parts[0]
    with_events = [p for p in parts if p.n > 0]
    with_events.sort(key=lambda p: (int(p.ts[0]), str(p.path)))
    runs = segments([p.ts for p in with_events])
    local_index = any(bool(p.file.attrs.get("event_index_local", False)) for p in parts)
    virtual = len(runs) <= MAX_MAPPINGS and all(p.clean for p in with_events)
    names = sorted(set().union(*(p.names for p in with_events))) if with_events else []
    total = sum(p.n for p in with_events)
    tmp = output.with_name(output.name + ".tmp")
    damaged = {}
    with h5py.File(tmp, "w", libver="latest") as out:
        for k, v in first.file.attrs.items():
            if k not in ("rank", "first_event", "last_event", "event_index_local"):
                out.attrs[k] = v
        out.attrs["ranks"] = len(parts) + len(skipped)
        if "UserDataCfg" in first.file:
            first.file.copy(first.file["UserDataCfg"], out, "UserDataCfg")
        for name in names:
            src = [p for p in with_events if name in p.file]
            if len(src) != len(with_events):
                log.warning("%s is missing from some parts; left out of the master", name)
                continue
            d0 = src[0].file[name]
            tail, dtype = d0.shape[1:], d0.dtype
            if name == "event_index" and local_index:
                out.create_dataset(name, data=np.arange(total, dtype=np.int64))
            elif virtual:
                layout = h5py.VirtualLayout(shape=(total, *tail), dtype=dtype)
                sources = []
                for p in src:
                    rel = p.path.name if p.path.parent.resolve() == output.parent.resolve() else str(p.path.resolve())
                    sources.append(h5py.VirtualSource(rel, name, shape=(p.n, *tail)))
                for i, a, c, o in runs:
                    layout[o: o + c] = sources[i][a: a + c]
                out.create_virtual_dataset(name, layout, fillvalue=None)
            else:  # the same runs, copied
                data = np.empty((total, *tail), dtype)
                whole = [p.file[name][: p.n] for p in src]
                for i, a, c, o in runs:
                    data[o: o + c] = whole[i][a: a + c]
                out.create_dataset(name, data=data, chunks=True if data.ndim else None)
            if name.endswith("/damaged"):
                damaged[name.rsplit("/", 1)[0]] = int(sum(np.count_nonzero(p.file[name][: p.n]) for p in src))
        sums: dict[str, np.ndarray] = {}
        for p in parts:
            if "Sums" not in p.file:
                continue
            for k, ds in p.file["Sums"].items():
                v = ds[()]
                sums[k] = v if k not in sums else _merge_sum(k, sums[k], v)
        g = out.require_group("Sums")
        for k, v in sums.items():
            g.create_dataset(k, data=v)
        for det, n in damaged.items():
            out.require_group(det).attrs["damaged_events"] = n
        out.attrs["events"] = total
        out.attrs["parts"] = json.dumps([p.path.name for p in parts])
        out.attrs["damaged"] = json.dumps(damaged)
        complete = all(bool(p.file.attrs.get("complete", False)) for p in parts) and not skipped
        out.attrs["complete"] = complete
    tmp.replace(output)
    return {"complete": complete, "events": total, "parts": [str(p.path) for p in parts], "skipped": skipped, "damaged": damaged}
