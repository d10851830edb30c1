"""The master file of an MPI run (SPEC section 8): one view over the ranks' part files.

Each rank ``r`` writes ``<stem>.part<r>.h5`` with the per-event datasets of its events, its
``/UserDataCfg`` and its own ``/Sums``. :func:`build_master` writes ``<stem>.h5`` with

- every per-event dataset as an HDF5 virtual dataset (h5py VDS) over the parts, in timestamp order:
  one mapping per run of consecutive events of one part (one per part for contiguous blocks, one per
  psana batch when psana's MPI distribution interleaves the ranks' events); the master holds sorted
  copies instead beyond :data:`MAX_MAPPINGS` runs, or when a part was left open by a rank killed hard
  (it then reads only in SWMR mode, which a virtual dataset's source cannot);
- ``event_index`` (and ``fiducials``, the event index too) as a virtual dataset, unless the parts count
  their events locally (attribute ``event_index_local``, psana's MPI distribution): then they are
  renumbered 0, 1, ... in timestamp order;
- every per-item (ragged) dataset (attributes ``items_count``, ``items_offset``: droplets, photons) as a virtual
  dataset over the parts' items in the same event order: one mapping per run of events, over the items of
  those events (copies where the per-event datasets are copied); its per-event ``offset`` recomputed over the
  whole run from the counts (a real dataset, 8 bytes an event), its count a virtual dataset as any other;
- the second names of datasets (hard links: smalldata_tools' names, root attribute ``aliases``) of the first
  part, made again over the master's datasets;
- the attributes ``truncated_events`` (events where a ``*_truncated`` dataset is > 0) and ``truncated`` (JSON:
  such events per dataset), counted from the parts' data;
- ``/UserDataCfg`` copied from the first part (rank 0 when it exists);
- ``/Sums`` reduced over the parts: ``max`` sums by maximum, the others by addition;
- the root attributes of the first part, with ``events``, ``parts`` and ``damaged`` (JSON: damaged
  events per detector) for the whole run.

Only what a part has flushed counts: a part cut short (an interrupted rank) contributes the events
of its completed batches, i.e. the shortest of its per-event datasets; an unreadable part is skipped
with a warning. ``gpusmall merge FILE`` calls the same function on the parts left on disk.
The virtual datasets name their parts by file name only, so the master and its parts move together.
Float virtual datasets have the fill value NaN: where a part is missing, HDF5 reads NaN, not zeros;
gpusmall's readers refuse such a master (:func:`missing_sources`, :func:`require_sources`).

The master is written to a temporary file of a unique name beside it (``tempfile.mkstemp``), renamed
over ``<stem>.h5`` once complete and removed when writing fails.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path

import h5py
import numpy as np

from ..errors import InputError
from .writer import (
    HDF5_ERRORS,
    HDF5_SIGNATURE,
    LIBVER,
    OutputWriteError,
    attr_value,
    failure_reason,
    open_for_reading,
    seal_file,
)

log = logging.getLogger(__name__)

STATIC_GROUPS = ("UserDataCfg", "Sums")
#: per-event counts of a part's own events when the parts count locally: renumbered in the master
LOCAL_COUNTS = ("event_index", "fiducials")
#: at most this many virtual-dataset mappings per dataset; more (a finely interleaved run) -> copies
MAX_MAPPINGS = 10_000
_MAX_SUM = re.compile(r"_max(_thresADU-?\d+(\.\d+)?)?$")


def part_path(output, rank: int) -> Path:
    """``<stem>.part<rank>.h5`` beside ``output``."""
    output = Path(output)
    return output.with_name(f"{output.stem}.part{rank}.h5")


def _numbered_parts(output) -> list[tuple[int, Path]]:
    """(rank, path) of every file named exactly ``<stem>.part<rank>.h5`` beside ``output``, in rank order.

    The folder is listed and each name matched in full (no glob: a stem such as ``run[1]`` holds glob
    brackets; ``out.partner.h5`` or ``out.part01.h5`` are not part names)."""
    output = Path(output)
    exact = re.compile(re.escape(output.stem) + r"\.part(0|[1-9][0-9]*)\.h5")
    found = []
    try:
        entries = list(output.parent.iterdir())
    except OSError:  # no such folder, or not listable
        return []
    for p in entries:
        m = exact.fullmatch(p.name)
        if m:
            found.append((int(m.group(1)), output.parent / p.name))
    return sorted(found)


def find_parts(output) -> list[Path]:
    """The part files of ``output`` on disk (by name: ``<stem>.part<rank>.h5``), in rank order."""
    return [p for _, p in _numbered_parts(output)]


def is_part_file(path, rank: int) -> bool:
    """Whether ``path`` is a gpusmall part file of rank ``rank``: an HDF5 file (signature at its start) whose
    root attributes are ``gpusmall_version``, ``rank == rank`` and ``ranks > 1``. A file that cannot be
    read (opened as every reader does: plain, then SWMR) is not taken for one."""
    path = Path(path)
    try:
        if not path.is_file() or path.is_symlink():
            return False
        with open(path, "rb") as fh:
            if fh.read(len(HDF5_SIGNATURE)) != HDF5_SIGNATURE:
                return False
        f = open_for_reading(path)[0]
    except (OSError, RuntimeError, ValueError):
        return False
    try:
        a = f.attrs
        return (
            "gpusmall_version" in a and "rank" in a and "ranks" in a and int(a["rank"]) == rank and int(a["ranks"]) > 1
        )
    except (OSError, RuntimeError, KeyError, TypeError, ValueError):
        return False
    finally:
        f.close()


def stale_parts(output, keep_ranks: int) -> list[Path]:
    """Part files of ``output`` left by an earlier MPI run with more ranks than ``keep_ranks``: named exactly
    ``<stem>.part<N>.h5`` with ``N >= keep_ranks``, and gpusmall part files of rank N
    (:func:`is_part_file`). Anything else of that name (someone's data, a text file) is not returned."""
    return [p for r, p in _numbered_parts(output) if r >= keep_ranks and is_part_file(p, r)]


def remove_stale_parts(output, ranks: int) -> list[Path]:
    """Delete :func:`stale_parts` ``(output, ranks)`` (a master built later by ``gpusmall merge`` would read
    them); returns those deleted. A file that cannot be deleted is logged and left."""
    removed = []
    for p in stale_parts(output, ranks):
        try:
            p.unlink()
        except OSError as exc:
            log.warning("could not remove %s, a part file of an earlier run with more ranks: %s", p, exc)
            continue
        log.info("removed %s, a part file of an earlier run with more ranks", p)
        removed.append(p)
    return removed


def _source_found(name: str, prefixes: list[Path]) -> bool:
    """Whether HDF5 finds a virtual dataset's source file ``name`` (as ``H5F_prefix_open_file`` looks for it:
    an absolute name as it is, then its last component in each prefix; a relative one in each prefix, then
    relative to the working folder)."""
    if name == ".":  # the virtual dataset's own file
        return True
    p = Path(name)
    if p.is_absolute():
        places = [p] + [d / p.name for d in prefixes]
    else:
        places = [d / p for d in prefixes] + [Path.cwd() / p]
    return any(c.is_file() for c in places)


def missing_sources(f: h5py.File, names=None) -> dict[str, list[str]]:
    """The source files of ``f``'s virtual datasets (every one, or those of ``names``) that are not there:
    dataset path -> missing files (relative names as beside ``f``). HDF5 reads such a dataset without an
    error, with its fill value (NaN in a gpusmall master, zeros in an older one) where the file is missing.

    Files are looked for as HDF5 does: in ``$HDF5_VDS_PREFIX`` (``${ORIGIN}`` = the folder of ``f``), in the
    folder of ``f``, then relative to the working folder."""
    base = Path(f.filename).absolute().parent
    env = os.environ.get("HDF5_VDS_PREFIX", "")
    prefixes = [Path(d.replace("${ORIGIN}", str(base))) for d in env.split(os.pathsep) if d]
    prefixes.append(base)
    if names is None:
        names = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    found: dict[str, bool] = {}
    out: dict[str, list[str]] = {}
    for name in names:
        ds = f.get(name)
        if not isinstance(ds, h5py.Dataset) or not ds.is_virtual:
            continue
        dcpl = ds.id.get_create_plist()
        files = {dcpl.get_virtual_filename(i) for i in range(dcpl.get_virtual_count())}
        for n in files:
            if n not in found:
                found[n] = _source_found(n, prefixes)
        gone = sorted(n if Path(n).is_absolute() else str(base / n) for n in files if not found[n])
        if gone:
            out[ds.name.lstrip("/")] = gone
    return out


def require_sources(f: h5py.File, names, what: str) -> None:
    """InputError (exit 2) naming the missing part files when a virtual dataset of ``names`` reads from one
    (:func:`missing_sources`): its events would read as NaN or zeros."""
    gone = missing_sources(f, names)
    if gone:
        files = sorted(set().union(*gone.values()))
        keys = ", ".join(list(gone)[:3]) + (", ..." if len(gone) > 3 else "")
        raise InputError(
            f"{what}: {f.filename} is a master file whose part files are missing: {', '.join(files)} "
            f"({keys} would read as NaN or zeros there); a master and its parts move together "
            f"(`gpusmall merge` writes a master over the parts there are)"
        )


def aliases(f: h5py.File) -> dict[str, str]:
    """Second names of datasets (hard links, root attribute ``aliases``): name -> the dataset's own path."""
    try:
        return dict(json.loads(str(attr_value(f.attrs["aliases"])))) if "aliases" in f.attrs else {}
    except (ValueError, TypeError):
        return {}


def per_event_names(f: h5py.File) -> list[str]:
    """Paths of the per-event datasets of a result file (everything outside /UserDataCfg and /Sums, except
    the per-item datasets of :func:`item_names`), each by its own name (not by one of its :func:`aliases`)."""
    names, own = [], aliases(f)

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and name.split("/")[0] not in STATIC_GROUPS and "items_count" not in obj.attrs:
            names.append(own.get(name, name))

    f.visititems(visit)
    return sorted(names)


def item_names(f: h5py.File) -> dict[str, tuple[str, str]]:
    """The per-item (ragged) datasets of a result file: path -> (path of its per-event count, of its per-event
    offset), from its attributes ``items_count`` and ``items_offset`` (names beside it; see
    :mod:`gpusmall.io.writer`)."""
    out, own = {}, aliases(f)

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and name.split("/")[0] not in STATIC_GROUPS and "items_count" in obj.attrs:
            name = own.get(name, name)
            group = name.rsplit("/", 1)[0] + "/" if "/" in name else ""
            out[name] = tuple(group + str(attr_value(obj.attrs[k])) for k in ("items_count", "items_offset"))

    f.visititems(visit)
    return dict(sorted(out.items()))


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
        self.items = item_names(self.file)
        self.n = min((self.file[k].shape[0] for k in self.names), default=0)
        ts = self.file["timestamp"][: self.n] if "timestamp" in self.file else np.arange(self.n, dtype=np.uint64)
        self.ts = np.asarray(ts)
        self._counts: dict[str, np.ndarray] = {}

    def counts(self, name: str) -> np.ndarray:
        """The per-event count dataset ``name`` (items of each of the first :attr:`n` events), int64."""
        if name not in self._counts:
            self._counts[name] = np.asarray(self.file[name][: self.n], np.int64)
        return self._counts[name]

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
    with_events = [p for p in parts if p.n > 0]
    with_events.sort(key=lambda p: (int(p.ts[0]), str(p.path)))
    runs = segments([p.ts for p in with_events])
    local_index = any(bool(p.file.attrs.get("event_index_local", False)) for p in parts)
    virtual = len(runs) <= MAX_MAPPINGS and all(p.clean for p in with_events)
    names = sorted(set().union(*(p.names for p in with_events))) if with_events else []
    names += sorted(set().union(*(p.items for p in with_events))) if with_events else []
    total = sum(p.n for p in with_events)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    out = None
    try:
        out = h5py.File(tmp, "w", libver=LIBVER)
        info = _write_into(out, output, parts, skipped, with_events, runs, local_index, virtual, names, total)
        out.close()
        _give_mode(tmp, output)
        tmp.replace(output)
    except BaseException as exc:
        if out is not None and out.id.valid:
            seal_file(out)  # a failed write: HDF5 must not go on writing (nor crash closing it)
        tmp.unlink(missing_ok=True)
        if isinstance(exc, HDF5_ERRORS):
            reason, full = failure_reason(exc)
            raise OutputWriteError(
                f"writing the master {output} failed: {reason}{' (disk full?)' if full else ''}; "
                f"the part files keep the events (`gpusmall merge {output}` writes it again)",
                output,
                0,
                full,
            ) from None
        raise
    return info


def _give_mode(tmp: Path, output: Path) -> None:
    """The permissions a file created as ``output`` would have (mkstemp makes it 0600)."""
    try:
        mode = output.stat().st_mode & 0o777
    except OSError:
        mask = os.umask(0o022)
        os.umask(mask)
        mode = 0o666 & ~mask
    os.chmod(tmp, mode)


def _write_into(
    out: h5py.File,
    output: Path,
    parts: list[_Part],
    skipped: list[str],
    with_events,
    runs,
    local_index: bool,
    virtual: bool,
    names: list[str],
    total: int,
) -> dict:
    first = parts[0]
    damaged = {}
    for k, v in first.file.attrs.items():
        if k not in ("rank", "first_event", "last_event", "event_index_local"):
            out.attrs[k] = attr_value(v)  # (a bool of an older part: uint8)
    out.attrs["ranks"] = len(parts) + len(skipped)
    if "UserDataCfg" in first.file:
        first.file.copy(first.file["UserDataCfg"], out, "UserDataCfg")
    items = {}
    for p in with_events:
        items.update(p.items)
    offsets = {o for _, o in items.values()}
    truncated, hit = {}, np.zeros(total, bool)
    for name in names:
        src = [p for p in with_events if name in p.file]
        if len(src) != len(with_events):
            log.warning("%s is missing from some parts; left out of the master", name)
            continue
        d0 = src[0].file[name]
        tail, dtype = d0.shape[1:], d0.dtype
        if name in offsets:
            continue  # recomputed with the per-item datasets
        if name in items:
            _write_items(out, output, name, items[name], src, with_events, runs, virtual)
            continue
        if name.endswith("_truncated") and d0.ndim == 1 and np.dtype(dtype).kind in "iu":
            h, whole = np.zeros(total, bool), [p.file[name][: p.n] > 0 for p in src]
            for i, a, c, o in runs:
                h[o : o + c] = whole[i][a : a + c]
            truncated[name] = int(h.sum())
            hit |= h
        if name in LOCAL_COUNTS and local_index:
            out.create_dataset(name, data=np.arange(total, dtype=np.int64))
        elif virtual:
            layout = h5py.VirtualLayout(shape=(total, *tail), dtype=dtype)
            sources = []
            for p in src:
                rel = p.path.name if p.path.parent.resolve() == output.parent.resolve() else str(p.path.resolve())
                sources.append(h5py.VirtualSource(rel, name, shape=(p.n, *tail)))
            for i, a, c, o in runs:
                layout[o : o + c] = sources[i][a : a + c]
            # NaN where a part is missing (moved, deleted): not zeros that look like data
            out.create_virtual_dataset(name, layout, fillvalue=np.nan if np.dtype(dtype).kind == "f" else None)
        else:  # the same runs, copied
            data = np.empty((total, *tail), dtype)
            whole = [p.file[name][: p.n] for p in src]
            for i, a, c, o in runs:
                data[o : o + c] = whole[i][a : a + c]
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
    out.attrs["truncated_events"] = int(hit.sum())
    out.attrs["truncated"] = json.dumps(truncated)
    made = {}
    for name, target in aliases(first.file).items():  # (the root attributes copied above include the part's)
        if name not in out and out.get(name, getlink=True) is None and isinstance(out.get(target), h5py.Dataset):
            out[name] = out[target]
            made[name] = target
    if made or "aliases" in out.attrs:
        out.attrs["aliases"] = json.dumps(made)
    complete = all(bool(p.file.attrs.get("complete", False)) for p in parts) and not skipped
    out.attrs["complete"] = np.uint8(complete)
    return {
        "complete": complete,
        "events": total,
        "parts": [str(p.path) for p in parts],
        "skipped": skipped,
        "damaged": damaged,
        "truncated_events": int(hit.sum()),
        "truncated": truncated,
    }


def _write_items(
    out: h5py.File, output: Path, name: str, spec: tuple[str, str], src: list[_Part], with_events, runs, virtual: bool
) -> None:
    """A per-item dataset of the master and (once per count) its offset: the items of each run of events
    (:func:`segments`) in the master's event order, as virtual-dataset mappings (or copies); the offsets
    recomputed from the counts over the whole run."""
    count, offset = spec
    if len(src) != len(with_events) or any(count not in p.file for p in src):
        log.warning("%s or its count %s is missing from some parts; left out of the master", name, count)
        return
    per_event = [p.counts(count) for p in src]
    short = [str(p.path) for p, c in zip(src, per_event) if p.file[name].shape[0] < int(c.sum())]
    if short:  # (a part whose rank died between writing the counts and the items)
        log.warning("%s holds fewer items than its counts say in %s; left out of the master", name, ", ".join(short))
        return
    starts = [np.cumsum(c) - c for c in per_event]  # each part's item offsets, from its counts
    total_events = sum(len(c) for c in per_event)
    counts = np.zeros(total_events, np.int64)
    for i, a, c, o in runs:
        counts[o : o + c] = per_event[i][a : a + c]
    master_start = np.cumsum(counts) - counts
    n_items = int(counts.sum())
    if offset not in out:
        out.create_dataset(offset, data=master_start.astype(np.int64))
    d0 = src[0].file[name]
    tail, dtype = d0.shape[1:], d0.dtype
    spans = []  # (part, its first item, items, the master's first item)
    for i, a, c, o in runs:
        k = int(per_event[i][a : a + c].sum())
        if k:
            spans.append((i, int(starts[i][a]), k, int(master_start[o])))
    if virtual:
        layout = h5py.VirtualLayout(shape=(n_items, *tail), dtype=dtype)
        sources = []
        for p, c in zip(src, per_event):
            rel = p.path.name if p.path.parent.resolve() == output.parent.resolve() else str(p.path.resolve())
            sources.append(h5py.VirtualSource(rel, name, shape=(int(c.sum()), *tail)))
        for i, a, k, o in spans:
            layout[o : o + k] = sources[i][a : a + k]
        ds = out.create_virtual_dataset(name, layout, fillvalue=np.nan if np.dtype(dtype).kind == "f" else None)
    else:
        data = np.empty((n_items, *tail), dtype)
        whole = [p.file[name][: int(c.sum())] for p, c in zip(src, per_event)]
        for i, a, k, o in spans:
            data[o : o + k] = whole[i][a : a + k]
        ds = out.create_dataset(name, data=data, chunks=True, maxshape=(None, *tail))
    ds.attrs["items_count"] = count.rsplit("/", 1)[-1]
    ds.attrs["items_offset"] = offset.rsplit("/", 1)[-1]
