"""HDF5 result file (SPEC section 8): per-event datasets extended and flushed per batch.

Layout::

    /timestamp (events,) uint64     /event_index (events,) int64
    /event_time (events,) uint64    /fiducials (events,) int64
    /<det>/<name>_<key>             per event, events first
    /<det>/<name>_<key>             per item (ragged: droplets, photons), items first (see below)
    /<det>/damaged                  (events,) uint8
    /UserDataCfg/<det>/...          written once: constants, masks, parameters
    /Sums/<det>_<sum>               run totals

Ragged outputs (``layout: ragged`` of droplet and photons; :class:`Columns`): a per-item dataset holds the
items of every event one after the other, shape (items of the run,); its attributes ``items_count`` and
``items_offset`` name two per-event datasets beside it: the items of each event (``<name>_len``, int32) and
the index of its first item (``<name>_offset``, int64, written by the writer: the running sum of the counts).
Event ``e``'s items are ``ds[offset[e]:offset[e] + len[e]]``, readable with plain h5py. smalldata_tools'
names are hard links to our datasets (``Columns.links``: the same dataset under a second name), made with
the datasets and listed in the root attribute ``aliases`` (JSON: name -> our dataset). Hard, not soft: PyTables
(smalldata_tools' SmallDataAna) names a soft link's node by its target and then looks that name up in the link's
own group. h5py's ``visititems`` visits each dataset once, under the first of its names.

The file is valid HDF5 after every :meth:`ResultWriter.append` (each batch is flushed). After the
first batch the file is in HDF5 SWMR mode, so it can be read while the run goes on
(:func:`open_result`, h5py ``File(path, "r", swmr=True)``; a reader calls ``dataset.refresh()`` to see
new events). SWMR forbids new objects, so the end-of-run writes (run sums, attributes) reopen the
file in normal mode.

Every file is written in the format of HDF5 1.10 (:data:`LIBVER`), so that HDF5 1.10 and later read it,
with booleans stored as uint8 and text in datasets as fixed-length bytes (:func:`_storable`), as PyTables
(smalldata_tools' SmallDataAna) needs.

A full disk (or any failed write): before each batch the free space of the output's file system is
checked (``os.statvfs``); below the batch's size plus :data:`SPACE_MARGIN_BYTES` the writer raises
:class:`LowDiskSpace` without writing, and the file can still be closed normally. When a write fails
anyway (ENOSPC, EFBIG, EDQUOT...), HDF5's file is left as it was after the last completed batch: the
writer *seals* it (:func:`seal_file`: every later HDF5 write, including the ones of closing it, goes to
a scratch file, never to the disk; the file's "open for writing" flags are then cleared so that it
opens plainly) and raises :class:`OutputWriteError`; later writes are refused. Without this, HDF5
went on writing into the file after the failure (a superblock naming space that was never written:
"truncated file", unreadable without ``h5clear``) and crashed the process when it closed the file.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import GpusmallError, InputError

log = logging.getLogger(__name__)

#: free space (bytes) a batch must leave on the output's file system, for the metadata HDF5 adds and the
#: end-of-run writes; below it the run stops before the batch (:class:`LowDiskSpace`)
SPACE_MARGIN_BYTES = 8 << 20
#: slack (bytes) for HDF5's metadata when the other writes (set-up, run sums) check the free space
STATIC_SLACK_BYTES = 64 << 10
#: errors of a full disk, a file-size limit or a quota
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
HDF5_ERRORS = (OSError, RuntimeError)  # what h5py raises for a failed HDF5 call
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # the first bytes of an HDF5 file (without a user block)


#: HDF5 file-format bounds (h5py ``libver``) of every file gpusmall writes: objects in the format of HDF5
#: 1.10 and nothing newer, so that HDF5 1.10 and later (h5py on HDF5 1.x, PyTables, h5dump, smalldata_tools'
#: SmallDataAna) read them. 1.10 is also the earliest with SWMR (it needs superblock version 3: a file
#: created with a lower bound of "v108" refuses ``swmr_mode``). ``libver="latest"`` under HDF5 2.0 writes
#: booleans in a datatype-message version HDF5 1.14 cannot decode ("bad version number for datatype message").
LIBVER = ("v110", "v110")


def storable_array(arr: np.ndarray) -> np.ndarray:
    """``arr`` as stored: booleans as uint8 (HDF5's enum of them is unreadable to PyTables, and to HDF5 1.x
    when HDF5 2.0 writes it), unicode text as fixed-length UTF-8 bytes (numpy ``S``)."""
    if arr.dtype.kind == "b":
        return arr.astype(np.uint8)
    if arr.dtype.kind == "U":
        return np.char.encode(arr, "utf-8")
    return arr


def text_value(text: str) -> np.ndarray:
    """Text as a 0-d fixed-length UTF-8 bytes array: PyTables cannot read variable-length string datasets
    (they become ``UnImplemented`` nodes); h5py reads it back as ``bytes``."""
    return np.array(text.encode("utf-8"), dtype=np.bytes_)


def _storable(value: Any):
    """A value h5py can store as a dataset readable everywhere: arrays and numbers as they are (booleans as
    uint8), lists of numbers as arrays, text (and JSON text of anything else) as fixed-length bytes."""
    if isinstance(value, np.ndarray):
        return storable_array(value)
    if isinstance(value, (bool, int, float, np.number, np.bool_)):
        return storable_array(np.asarray(value))
    if isinstance(value, str):
        return text_value(value)
    try:
        arr = np.asarray(value)
        if arr.dtype.kind in "biuf":
            return storable_array(arr)
    except (ValueError, TypeError):
        pass
    return text_value(json.dumps(value))


def attr_value(value: Any):
    """A value for an HDF5 attribute: as :func:`_storable`, but text stays a (variable-length) string, which
    PyTables and HDF5 1.10 read as attributes."""
    if isinstance(value, str):
        return value
    v = _storable(value)
    return v.item().decode("utf-8") if isinstance(v, np.ndarray) and v.dtype.kind == "S" and v.ndim == 0 else v


def open_for_reading(path) -> tuple[h5py.File, bool]:
    """(file, closed): an HDF5 file for reading, also while a writer holds it in SWMR mode (a run still
    going, or one killed before it could close the file); ``closed`` is False in that case, when plain
    opens (e.g. as a virtual dataset's source) fail."""
    try:
        return h5py.File(path, "r"), True
    except OSError as exc:
        if "already open for write" not in str(exc):
            raise
        return h5py.File(path, "r", swmr=True), False


def open_result(path) -> h5py.File:
    """A result file for reading, also while ``gpusmall run`` is still writing it (SWMR).

    :class:`UnreadableResult` (exit 2, also an OSError) when the file does not exist or is not HDF5."""
    if not Path(path).is_file():
        raise UnreadableResult(f"file {str(path)!r} does not exist")
    try:
        return open_for_reading(path)[0]
    except OSError as exc:
        raise UnreadableResult(f"{str(path)!r} is not a readable HDF5 file ({exc})") from None


class UnreadableResult(InputError, OSError):
    """A result file that does not exist or cannot be opened: bad input (exit 2) to the command line, and
    an OSError to a caller that polls a file still being created (as h5py's own error is)."""


class OutputWriteError(GpusmallError):
    """Writing a result file failed (a full disk, a quota...); the file was sealed with the batches completed
    before the failure (:attr:`events` of them). Exit status 1."""

    def __init__(self, message: str, path: Path, events: int, disk_full: bool):
        super().__init__(message)
        self.path, self.events, self.disk_full = path, events, disk_full


class LowDiskSpace(OutputWriteError):
    """Too little free space for the next write: raised before writing it, the file is intact and can be
    closed normally (the run stops as if interrupted)."""


def failure_reason(exc: BaseException) -> tuple[str, bool]:
    """(one line naming the cause of a failed write, whether it means a full disk, a size limit or a quota)."""
    no = getattr(exc, "errno", None)
    if not no:  # h5py puts the C errno into the message only: "..., errno = 28, error message = ..."
        m = re.search(r"errno = (\d+)", str(exc))
        no = int(m.group(1)) if m else None
    if no in DISK_FULL_ERRNOS:
        return f"[Errno {no}] {os.strerror(no)}", True
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return (line if len(line) <= 200 else line[:200] + "..."), False


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 1e6 else f"{nbytes / 1e3:.0f} kB"


def free_bytes(path) -> int | None:
    """Bytes an unprivileged process may still write on the file system holding ``path`` (None: unknown)."""
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):  # no such path, or no statvfs (Windows)
        return None
    return st.f_bavail * st.f_frsize


_M32 = 0xFFFFFFFF


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M32


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 ``hashlittle`` of ``data``: HDF5's metadata checksum (``H5_checksum_lookup3``)."""
    length = len(data)
    a = b = c = (0xDEADBEEF + length + initval) & _M32
    i = 0
    while length > 12:  # mix()
        a = (a + int.from_bytes(data[i : i + 4], "little")) & _M32
        b = (b + int.from_bytes(data[i + 4 : i + 8], "little")) & _M32
        c = (c + int.from_bytes(data[i + 8 : i + 12], "little")) & _M32
        for x, y, z, k in ((0, 2, 1, 4), (1, 0, 2, 6), (2, 1, 0, 8), (0, 2, 1, 16), (1, 0, 2, 19), (2, 1, 0, 4)):
            v = [a, b, c]
            v[x] = ((v[x] - v[y]) & _M32) ^ _rot(v[y], k)
            v[y] = (v[y] + v[z]) & _M32
            a, b, c = v
        length -= 12
        i += 12
    if length == 0:
        return c
    tail = bytes(data[i : i + length]) + bytes(12 - length)
    a = (a + int.from_bytes(tail[0:4], "little")) & _M32
    b = (b + int.from_bytes(tail[4:8], "little")) & _M32
    c = (c + int.from_bytes(tail[8:12], "little")) & _M32
    for x, y, k in ((2, 1, 14), (0, 2, 11), (1, 0, 25), (2, 1, 16), (0, 2, 4), (1, 0, 14), (2, 1, 24)):  # final()
        v = [a, b, c]
        v[x] = ((v[x] ^ v[y]) - _rot(v[y], k)) & _M32
        a, b, c = v
    return c


def _clear_open_flags(path) -> bool:
    """Clear the "open for writing" flags of a version 2/3 HDF5 superblock, as ``h5clear -s`` does, so
    that a file whose writer could not close it opens plainly again, and let its end of file cover what
    was written after the superblock (``h5clear --increment=0``: a flush cut short may have written
    metadata beyond the end the superblock names). Only done when the superblock is at the start of the
    file, its checksum verifies and the file is at least as long as the superblock says (the file then
    holds everything up to its last flush). Returns whether the superblock is clear now."""
    try:
        with open(path, "r+b") as fh:
            head = bytearray(fh.read(64))
            size = os.fstat(fh.fileno()).st_size
            if len(head) < 12 or head[:8] != HDF5_SIGNATURE or head[8] not in (2, 3):
                return False
            o = head[9]
            n = 12 + 4 * o
            if o not in (4, 8) or len(head) < n + 4:
                return False
            if int.from_bytes(head[n : n + 4], "little") != lookup3(bytes(head[:n])):
                return False
            eof = slice(12 + 2 * o, 12 + 3 * o)
            base = int.from_bytes(head[12 : 12 + o], "little")
            stored = int.from_bytes(head[eof], "little")
            if base != 0 or stored > size:  # the file lacks what the superblock names
                return False
            if head[11] == 0 and stored == size:
                return True
            head[11] = 0
            head[eof] = size.to_bytes(o, "little")
            head[n : n + 4] = lookup3(bytes(head[:n])).to_bytes(4, "little")
            fh.seek(0)
            fh.write(bytes(head[: n + 4]))
            fh.flush()
            os.fsync(fh.fileno())
        return True
    except OSError as exc:
        log.warning("could not clear the open-for-writing flags of %s: %s", path, exc)
        return False


def _memfd_can_take_all() -> bool:
    """Whether a memory file can stand in for a sealed file: it takes every write and the final resize to
    HDF5's end of file (so that the file closes without an error), unless a file-size limit
    (RLIMIT_FSIZE) stops them as it stopped the real file; /dev/null takes every write but cannot be
    resized (the close then fails, harmlessly)."""
    if not hasattr(os, "memfd_create"):
        return False
    try:
        import resource

        return resource.getrlimit(resource.RLIMIT_FSIZE)[0] == resource.RLIM_INFINITY
    except (ImportError, OSError, ValueError):
        return False


_SEALED: list = []  # sealed files whose close failed: kept, so that no garbage collection closes them again


def readable(path) -> tuple[str | None, list[str]]:
    """How a result file opens now: (``"plain"``, ``"swmr"`` (only with ``swmr=True``, as a file whose
    writer was killed) or None (not at all), the attributes that cannot be read). Every object is visited
    and every attribute read."""
    try:
        f, plain = open_for_reading(path)
    except (OSError, RuntimeError, ValueError):
        return None, []
    bad: list[str] = []

    def attrs(name, obj):
        for k in list(obj.attrs):
            try:
                obj.attrs[k]
            except Exception:  # noqa: BLE001 - whatever h5py raises for damaged metadata
                bad.append(f"/{name}@{k}" if name else f"/@{k}")

    try:
        with f:
            attrs("", f)
            f.visititems(attrs)
    except Exception:  # noqa: BLE001
        return None, bad
    return ("plain" if plain else "swmr"), bad


def seal_file(f: h5py.File) -> tuple[str | None, list[str]]:
    """After a failed write into ``f``: end every write into its file on disk and close it.

    HDF5 keeps the failed write's space and metadata in memory and writes them when the file is flushed
    or closed, which fails again (a superblock naming space never written: "truncated file") or crashes
    the process. Here the file's descriptor is pointed at a scratch file (``memfd``, else ``/dev/null``)
    before closing, so the disk keeps the file as it was at its last successful flush (in SWMR mode,
    every completed batch); then its open flags are cleared (:func:`_clear_open_flags`). Returns how the
    file opens afterwards (:func:`readable`)."""
    path = f.filename
    try:
        fd = f.id.get_vfd_handle()
    except Exception:  # noqa: BLE001 - not the sec2 driver, or the file is closed already
        fd = None
    if isinstance(fd, int) and fd >= 0:
        try:
            scratch = os.memfd_create("gpusmall-sealed") if _memfd_can_take_all() else os.open(os.devnull, os.O_RDWR)
            os.dup2(scratch, fd)
            os.close(scratch)
        except OSError as exc:
            log.warning("could not detach %s from its file: %s", path, exc)
            fd = None
    if fd is None:  # nothing to detach: leave it open rather than let HDF5 write the failed state
        _SEALED.append(f)
        return readable(path)
    try:
        f.close()
    except Exception:  # noqa: BLE001 - the scratch file takes what HDF5 writes; a failure here is moot
        pass
    if f.id.valid:  # the close failed (the scratch file could not be resized): keep it from a second try
        _SEALED.append(f)
    _clear_open_flags(path)
    return readable(path)


class Columns(dict):
    """The columns of one batch (name -> host array) with what is not per event.

    Attributes:
        ragged: per-item column -> (its per-event count column, the per-event offset column the writer adds).
            A per-item column holds ``count.sum()`` items of the batch, event after event.
        links: other name -> column: hard links made with the datasets (smalldata_tools' names).
    """

    def __init__(self, *args, ragged=None, links=None, **kw):
        super().__init__(*args, **kw)
        self.ragged: dict[str, tuple[str, str]] = dict(ragged or {})
        self.links: dict[str, str] = dict(links or {})


ITEM_CHUNK_BYTES = 1 << 17
"""Largest chunk (bytes) of a per-item dataset. The whole chunks of a batch's items are written directly, the
partial ones at its two ends through HDF5's chunk cache (default 1 MiB: the chunk a batch ends in is completed
by the next without being read back). Appends of the demo's batches on /dev/shm took 7.4-7.7 ms with chunks of
128 KiB, 9.5 with 512 KiB and 1 MiB (``benchmarks/bench_writer.py``, 2026-12-02)."""


class _Layout:
    """What :class:`ResultWriter` needs per per-event (or per-item) dataset, read from HDF5 once: chunk length
    (events or items), dtype, whether whole chunks may be written directly (uncompressed, at least 2-D or
    per-item), and a low-level write of whole rows."""

    def __init__(self, ds: h5py.Dataset):
        self.id = ds.id
        self.tail = tuple(ds.shape[1:])
        self.chunk = ds.chunks[0]
        self.dtype = ds.dtype
        # per-item datasets too: a batch's items cover whole chunks, and later batches never write them again
        self.direct = (ds.ndim >= 2 or "items_count" in ds.attrs) and ds.compression is None
        self.zeros = (0,) * len(self.tail)

    def grow(self, n_events: int) -> None:
        """Extend the events axis to ``n_events``."""
        self.id.set_extent((n_events, *self.tail))

    def write_rows(self, start: int, arr: np.ndarray) -> None:
        """Rows ``start .. start + len(arr)`` of the file dataset from ``arr`` (converted to its dtype)."""
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        fspace = self.id.get_space()
        fspace.select_hyperslab((start, *self.zeros), arr.shape)
        self.id.write(h5py.h5s.create_simple(arr.shape), fspace, arr)


class ResultWriter:
    """Writes one result file; use as a context manager (closing flushes).

    Args:
        path: output file (overwritten).
        chunk_events: events per HDF5 chunk of per-event datasets (the batch size is a good choice).

    A write that fails seals the file (see the module docstring): :attr:`sealed` is then True, the
    method raises :class:`OutputWriteError` and every later write raises it again; :attr:`n_events`
    events (the batches completed before) are in the file. :attr:`space_margin` (bytes, default
    :data:`SPACE_MARGIN_BYTES`; 0 turns the check off) is the free space each batch must leave.
    """

    def __init__(self, path, chunk_events: int = 64):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file: Any = None  # the h5py.File while open
        self.sealed = False
        self.space_margin = SPACE_MARGIN_BYTES
        self.chunk_events = max(1, int(chunk_events))
        self.n_events = 0
        self._datasets: dict[str, h5py.Dataset] = {}
        self._layout: dict[str, _Layout] = {}  # HDF5 path -> cached layout of a per-event dataset
        self._ragged: dict[str, tuple[str, str]] = {}  # per-item column -> (count, offset), from the first batch
        self._items: dict[str, int] = {}  # offset column -> items written so far
        #: events whose ``*_truncated`` column is > 0, by column, and events where any of them is
        self.truncated: dict[str, int] = {}
        self.truncated_events = 0
        self.swmr = False
        try:
            self.file = h5py.File(self.path, "w", libver=LIBVER)
        except HDF5_ERRORS as exc:
            reason, full = failure_reason(exc)
            raise OutputWriteError(
                f"cannot create {self.path}: {reason}{' (disk full?)' if full else ''}", self.path, 0, full
            ) from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.close()
        except OutputWriteError as err:
            if exc[0] is None:
                raise
            log.warning("%s", err)  # the exception in flight is the one to report
        return False

    def close(self) -> None:
        if self.sealed or self.file is None or not self.file.id.valid:
            return
        try:
            self.file.flush()
            self.file.close()
        except HDF5_ERRORS as exc:
            raise self._failed(exc, "closing it") from None

    def _failed(self, exc: BaseException, doing: str) -> OutputWriteError:
        """Seal the file after the failed write ``exc``; the error to raise."""
        reason, full = failure_reason(exc)
        state, bad = seal_file(self.file) if self.file is not None else readable(self.path)
        self.sealed, self._datasets, self._layout = True, {}, {}
        how = {
            "plain": "",
            "swmr": " (it opens as a file still being written: h5py.File(path, 'r', swmr=True))",
            None: " but is not readable",
        }[state]
        if state and bad:
            how += f" (attributes not readable: {', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''})"
        kept = (
            f"the file keeps the {self.n_events} events of the batches completed before"
            if self.n_events
            else "the file holds no events"
        )
        if state is None and not self.n_events:  # nothing of value, and unreadable: not left in the way
            try:
                self.path.unlink()
                kept, how = "the file held no events yet and was removed", ""
            except OSError:
                pass
        return OutputWriteError(
            f"writing {self.path} failed ({doing}): {reason}{' (disk full?)' if full else ''}; {kept}{how}",
            self.path,
            self.n_events,
            full,
        )

    def _usable(self) -> None:
        if self.sealed:
            raise OutputWriteError(
                f"{self.path}: an earlier write failed; nothing more is written into it",
                self.path,
                self.n_events,
                False,
            )

    def check_space(self, nbytes: int, what: str, margin: int | None = None) -> None:
        """:class:`LowDiskSpace` unless the output's file system has room for ``nbytes`` plus ``margin``
        (default :attr:`space_margin`). Nothing is checked with a margin of 0 or when the free space is
        unknown."""
        margin = self.space_margin if margin is None else margin
        if margin <= 0 or self.space_margin <= 0:
            return
        free = free_bytes(self.path)
        if free is None or free >= nbytes + margin:
            return
        raise LowDiskSpace(
            f"{self.path}: its disk is almost full ({_size(free)} free; {what} needs {_size(nbytes)} "
            f"and {_size(margin)} more are kept free): stopped before writing it; the file keeps the "
            f"{self.n_events} events written before",
            self.path,
            self.n_events,
            True,
        )

    def _create(self, name: str, arr: np.ndarray) -> h5py.Dataset:
        """Chunks of whole events, at most ~1 MiB, and (for per-event arrays) a divisor of the batch size,
        so that full batches fill whole chunks (written directly, see :meth:`_write`)."""
        tail = arr.shape[1:]
        per_event = max(1, int(np.prod(tail)) * arr.dtype.itemsize)
        limit = max(1, (1 << 20) // per_event)
        if tail:
            most = min(self.chunk_events, limit)
            chunk0 = max(d for d in range(1, most + 1) if self.chunk_events % d == 0)
            if 4 * chunk0 < most:  # e.g. a prime batch size: no tiny chunks (those batches go through h5py)
                chunk0 = most
            chunks = (chunk0, *tail)
        else:
            chunks = (max(min(self.chunk_events, limit), 1024),)
        return self.file.create_dataset(name, shape=(0, *tail), maxshape=(None, *tail), dtype=arr.dtype, chunks=chunks)

    def _create_items(self, name: str, arr: np.ndarray, count: str, offset: str) -> h5py.Dataset:
        """A per-item dataset: (0, ...) growing along its items; chunks of the first batch's items (a power of
        two, 4096 at least, :data:`ITEM_CHUNK_BYTES` at most); attributes naming its count and offset."""
        per_item = max(1, int(np.prod(arr.shape[1:])) * arr.dtype.itemsize)
        most = max(1, ITEM_CHUNK_BYTES // per_item)
        chunk0 = min(most, max(4096, 1 << max(0, int(len(arr) - 1).bit_length())))
        ds = self.file.create_dataset(
            name,
            shape=(0, *arr.shape[1:]),
            maxshape=(None, *arr.shape[1:]),
            dtype=arr.dtype,
            chunks=(chunk0, *arr.shape[1:]),
        )
        ds.attrs["items_count"] = count.rsplit("/", 1)[-1]
        ds.attrs["items_offset"] = offset.rsplit("/", 1)[-1]
        return ds

    def _item_offsets(self, arrays: dict, ragged: dict, n: int) -> dict[str, np.ndarray]:
        """The offset columns of this batch's ragged columns (checked: each per-item column holds the sum of
        its count column's items)."""
        offsets = {}
        for name, (count, offset) in ragged.items():
            if count not in arrays or arrays[count].shape != (n,):
                raise ValueError(f"output {name}: its count {count} is not a per-event column of the batch")
            c = arrays[count].astype(np.int64)
            if (c < 0).any() or int(c.sum()) != len(arrays[name]):
                raise ValueError(f"output {name}: {len(arrays[name])} items, its count {count} says {int(c.sum())}")
            if offset in arrays and offset not in offsets:
                raise ValueError(f"output {offset} is the offset the writer adds for {name}")
            if offset not in offsets:
                offsets[offset] = self._items.get(offset, 0) + np.cumsum(c) - c
        return offsets

    def _make_links(self, links: dict[str, str]) -> None:
        """Hard links ``name`` to the datasets ``links[name]`` (made before SWMR mode, which forbids new objects),
        listed in the root attribute ``aliases``; a name that is taken (a column of that name) is left out with a
        warning."""
        made = {}
        for name, target in links.items():
            if name in self.file or self.file.get(name, getlink=True) is not None or target not in self._datasets:
                log.warning(
                    "%s: %s is taken (or %s is not an output); that name of smalldata_tools' is left out",
                    self.path,
                    name,
                    target,
                )
                continue
            self.file[name] = self._datasets[target]
            made[name] = target
        if made:
            self.file.attrs["aliases"] = json.dumps(made)

    def _write(self, ds: h5py.Dataset, start: int, arr: np.ndarray) -> None:
        """``ds[start:start + len(arr)] = arr`` for a dataset this writer created (its layout cached in
        :class:`_Layout`). Whole chunks go to the file directly (no chunk cache, no type conversion:
        ~1.6x faster for the padded per-event arrays), the rest through HDF5's low-level write of a
        hyperslab (h5py's slicing machinery costs ~0.1 ms of Python per call, GIL held)."""
        lay = self._layout[ds.name]
        c, n = lay.chunk, arr.shape[0]
        first = -start % c  # events before the first chunk boundary
        if not lay.direct or arr.dtype != lay.dtype or first + c > n:
            lay.write_rows(start, arr)
            return
        arr = np.ascontiguousarray(arr)
        if first:
            lay.write_rows(start, arr[:first])
        k = first
        while k + c <= n:
            ds.id.write_direct_chunk((start + k, *lay.zeros), memoryview(arr[k : k + c]).cast("B"))  # type: ignore[arg-type]
            k += c
        if k < n:
            lay.write_rows(start + k, arr[k:])

    def append(
        self,
        columns: dict[str, np.ndarray],
        ragged: dict[str, tuple[str, str]] | None = None,
        links: dict[str, str] | None = None,
    ) -> None:
        """Append one batch: every array has the same leading events axis, except the per-item columns of
        ``ragged`` (default: ``columns.ragged`` of :class:`Columns`), whose items are appended along their own
        axis, with their offsets (module docstring). Flushes the file.

        The first batch creates the datasets and the hard links ``links`` (default ``columns.links``); later
        batches must bring the same names. Before writing, :meth:`check_space` (:class:`LowDiskSpace`, nothing
        written); a failed write seals the file (:class:`OutputWriteError`). Counts in :attr:`truncated` the
        events whose ``*_truncated`` columns are > 0.
        """
        self._usable()
        ragged = {**getattr(columns, "ragged", {}), **(ragged or {})}
        links = {**getattr(columns, "links", {}), **(links or {})}
        if self.n_events and ragged != self._ragged:
            raise ValueError(f"ragged outputs {sorted(set(ragged) ^ set(self._ragged))} differ from the first batch's")
        arrays, n = {}, None
        for name, arr in columns.items():  # checked before anything is written
            arr = arrays[name] = storable_array(np.asarray(arr))
            if name in ragged:
                if name not in self._datasets and self.n_events:
                    raise ValueError(f"output {name} appears after the first batch")
                continue
            if n is None:
                n = arr.shape[0]
            elif arr.shape[0] != n:
                raise ValueError(f"output {name}: {arr.shape[0]} events in a batch of {n}")
            if name not in self._datasets and self.n_events:
                raise ValueError(f"output {name} appears after the first batch")
        offsets = self._item_offsets(arrays, ragged, n) if ragged else {}  # type: ignore[arg-type]
        arrays.update(offsets)
        self.check_space(sum(a.nbytes for a in arrays.values()), "the next batch")
        try:
            for name, arr in arrays.items():
                ds = self._datasets.get(name)
                item = ragged.get(name)
                if ds is None:
                    ds = self._datasets[name] = (
                        self._create(name, arr) if item is None else self._create_items(name, arr, *item)
                    )
                    self._layout[ds.name] = _Layout(ds)
                start = self.n_events if item is None else self._items.get(item[1], 0)
                self._layout[ds.name].grow(start + len(arr))
                if len(arr):
                    self._write(ds, start, arr)
            if not self.n_events:
                self._ragged = dict(ragged)
                self._make_links(links)
            self.file.flush()
            for offset in offsets:
                count = next(c for c, o in ragged.values() if o == offset)
                self._items[offset] = self._items.get(offset, 0) + int(arrays[count].sum())
            if n is not None:
                self.n_events += n
            self._count_truncated(arrays, ragged)
            if not self.swmr and self._datasets:
                self.file.swmr_mode = True  # readers may now follow the file as it grows
                self.swmr = True
        except HDF5_ERRORS as exc:
            raise self._failed(exc, "appending a batch") from None

    def _count_truncated(self, arrays: dict, ragged: dict) -> None:
        """Events of the batch with a ``*_truncated`` column > 0 (items a padded or bounded output left out)."""
        hit = None
        for name, arr in arrays.items():
            if name.endswith("_truncated") and name not in ragged and arr.ndim == 1 and arr.dtype.kind in "iu":
                h = arr > 0
                self.truncated[name] = self.truncated.get(name, 0) + int(h.sum())
                hit = h if hit is None else hit | h
        if hit is not None:
            self.truncated_events += int(hit.sum())

    def _leave_swmr(self) -> None:
        """Reopen the file in normal mode so that new objects and attributes can be written."""
        if not self.swmr:
            return
        try:
            self.file.flush()
            self.file.close()
        except HDF5_ERRORS as exc:
            raise self._failed(exc, "closing it in SWMR mode") from None
        self.swmr = False
        try:
            self.file = h5py.File(self.path, "a", libver=LIBVER)
            self._datasets = {name: self.file[name] for name in self._datasets}
            self._layout = {ds.name: _Layout(ds) for ds in self._datasets.values()}
        except (*HDF5_ERRORS, KeyError) as exc:  # the file was closed cleanly: it stays as it is
            if self.file is not None and not self.file.id.valid:
                self.file = None
            raise self._failed(exc, "reopening it") from None

    def write_static(self, group: str, values: dict[str, Any]) -> None:
        """Write values once under ``group`` (e.g. ``UserDataCfg/<det>``); replaces existing ones.

        :class:`LowDiskSpace` before anything is written when the disk lacks room for the values."""
        self._usable()
        same: dict[str, str] = {}  # key -> an earlier key given the very same array: stored once, hard-linked
        first: dict[int, str] = {}
        for k, v in values.items():
            if isinstance(v, np.ndarray) and v.size:
                same[k] = first.setdefault(id(v), k)
        values = {k: _storable(v) for k, v in values.items() if v is not None}
        size = sum(
            v.nbytes if isinstance(v, np.ndarray) else len(str(v)) for k, v in values.items() if same.get(k, k) == k
        )
        self.check_space(size, f"{group}/", margin=STATIC_SLACK_BYTES)
        self._leave_swmr()
        try:
            g = self.file.require_group(group)
            for key, v in values.items():
                if key in g:
                    del g[key]
                if same.get(key, key) != key:  # e.g. UserDataCfg rms: the noise under smalldata_tools' name
                    g[key] = g[same[key]]
                    continue
                if isinstance(v, np.ndarray) and v.size > 4096:
                    ds = g.create_dataset(
                        key, shape=v.shape, dtype=v.dtype, compression="gzip", compression_opts=1, shuffle=True
                    )
                    ds[...] = v
                else:
                    ds = g.create_dataset(key, data=v)
                # a write that fails raises here: when h5py drops a dataset whose chunks HDF5 cannot write, the
                # error is only printed, and the next flush of the file crashes the process
                ds.flush()
            self.file.flush()
        except HDF5_ERRORS as exc:
            raise self._failed(exc, f"writing {group}/") from None

    def set_attrs(self, path: str, attrs: dict[str, Any]) -> None:
        """Set attributes of a group (``/``: the file); flushes the file."""
        self._usable()
        self._leave_swmr()
        try:
            obj = self.file.require_group(path) if path not in ("", "/") else self.file
            for k, v in attrs.items():
                obj.attrs[k] = attr_value(v)
            self.file.flush()
        except HDF5_ERRORS as exc:
            raise self._failed(exc, f"writing attributes of {path or '/'}") from None


class BackgroundAppender:
    """Appends batches to a :class:`ResultWriter` from a thread of its own, so that writing batch k
    overlaps the reduction of batch k+1 (h5py lets other threads run during HDF5 I/O).

    At most ``depth`` batches wait; :meth:`append` blocks beyond that. A batch is a dict of host
    arrays or an object whose ``result()`` gives one (:class:`gpusmall.producer.process.PendingColumns`,
    waited for here). ``on_written`` runs in the writer thread once its batch is in the file (flushed).
    An error in the thread stops every later write (the file keeps the batches before it) and is
    raised by the next :meth:`append` or by :meth:`drain`. After :meth:`drain` every
    batch handed over is in the file and the caller may use the writer again; :meth:`close` (or the
    context manager) drains and ends the thread.

    While it runs, the interpreter's thread switch interval is at most ``switch_interval_s`` (restored by
    :meth:`close`; None leaves it alone). h5py lets the GIL go around each HDF5 call, and taking it back
    waits until the other thread yields it: up to the switch interval, 5 ms by default. Beside a main
    thread busy with Python (launching GPU work) that stalls the writer: a demo batch took 18-19 ms with
    9 ms of main-thread Python per batch, 14-15 ms with 0.1 ms (8.7 ms alone; ``benchmarks/bench_writer.py``).
    """

    def __init__(self, writer: ResultWriter, depth: int = 2, switch_interval_s: float | None = 1e-4):
        import queue
        import sys
        import threading

        self._switch_before = None
        if switch_interval_s is not None:
            self._switch_before = sys.getswitchinterval()
            sys.setswitchinterval(min(self._switch_before, switch_interval_s))
        self.writer = writer
        self.error: BaseException | None = None
        self._broken = False  # set by the thread at its first error: nothing after it is written
        self._failed = False  # set once the error was raised in the caller's thread
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._thread = threading.Thread(target=self._run, name="gpusmall-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if not self._broken:
                    columns, on_written = item
                    if hasattr(columns, "result"):  # PendingColumns: results still on their way
                        columns = columns.result()
                    self.writer.append(columns)
                    if on_written is not None:
                        on_written()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                self.error, self._broken = exc, True
            finally:
                self._queue.task_done()

    def _raise(self) -> None:
        if self.error is not None:
            exc, self.error = self.error, None
            self._failed = True
            raise exc

    def append(self, columns, on_written=None) -> None:
        """Queue one batch: host arrays the caller no longer changes, or an object whose ``result()``
        gives them (waited for in the writer thread)."""
        self._raise()
        if self._failed:
            raise RuntimeError("the writer thread failed earlier; no more batches are written")
        self._queue.put((columns, on_written))

    def drain(self) -> None:
        """Wait until every queued batch is written; raise the writer thread's error if it had one."""
        self._queue.join()
        self._raise()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.join()
            self._queue.put(None)
            self._thread.join()
        if self._switch_before is not None:
            import sys

            sys.setswitchinterval(self._switch_before)
            self._switch_before = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
