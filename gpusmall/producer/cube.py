"""The cube during the run (SPEC 10, config ``cube:``): per bin of a context value, sums of full frames.

Events are binned by ``by`` (a per-event context value such as ``scan/varStep`` or ``ipm/sum``): one bin per distinct
value (``steps``), explicit ``edges``, ``n`` bins over a ``range`` or bins of a ``width`` over it (edges as
``gpusmall cube``: ``edges[k] <= v < edges[k+1]``, the last bin also holds ``v == edges[-1]``). Only events of
``selection`` enter, each bin is split by every selection of ``split`` (an event may be in several), and an event
is left out when it is damaged in a detector the cube reads, its ``by`` value is missing or outside the bins, or
its ``norm`` value is missing. Per bin (and split) the cube holds the event ``count``, the float64 sums of every
chosen detector's calibrated frame (and of its square), of chosen per-event outputs and of the ``norm`` scalar.

Frame sums stay on the device (:class:`DetectorCube`, kernel ``cube_add`` of ``kernels/sums.cu`` or its NumPy
twin :func:`cube_add_numpy`), one row per (bin, split); only the per-event bin rows go up per batch. Bins known
in advance (edges) are all on the device, checked at set-up (:func:`check_cube_fits`); ``steps`` keep a few rows
on the device and move a row's sums to the host when the scan moves on. Outputs, counts and norms are summed on
the host from the batch's columns. Under MPI every rank writes its sums to a part file and rank 0 adds them up
(:func:`merge_cube_parts`), keyed by bin (the value of a step): the cube does not depend on ranks or batches
(counts exactly, sums to float64 rounding).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .. import __version__
from ..errors import InputError
from ..io.writer import LIBVER
from ..kernel_specs import KernelSpec, blocks_1d
from ..sources.context import is_missing
from .memory import USABLE_FRACTION, available_device_bytes, available_host_bytes, gib

log = logging.getLogger(__name__)

CUBE_THREADS = 256
CUBE_ADD = KernelSpec(
    "sums.cu",
    "cube_add",
    lambda a: (blocks_1d(int(a["npix"]), CUBE_THREADS, 65535), (CUBE_THREADS,), 0),
    "gpusmall.producer.cube:cube_add_numpy",
    sizes=lambda a: dict(
        data=int(a["events"]) * int(a["npix"]),
        rows=int(a["splits"]) * int(a["events"]),
        sum=int(a["npix"]),
        sq=int(a["npix"]),
    ),
)
STEP_ROWS = 4  # device rows (bins) a ``steps`` cube keeps per split: a batch rarely spans more steps
MEANS_NOTE = "means are <key>_sum / bins/count (sums and counts per bin; bins/count per split when split)"


def cube_add_numpy(data: np.ndarray, rows: np.ndarray, acc: np.ndarray, sq: np.ndarray | None) -> None:
    """NumPy twin of the ``cube_add`` kernel: ``acc[rows[s, e]] += data[e]`` (and ``sq`` ``+= data[e]**2``) for
    every split ``s`` and event ``e`` with ``rows[s, e] >= 0``; data (events, npix) float32, rows (splits,
    events) int, acc and sq (n_rows, npix) float64. Consecutive events of one row are summed first."""
    scratch = np.empty(data.shape[1], np.float64) if sq is not None else None
    for s in range(rows.shape[0]):
        r = rows[s]
        starts = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])
        for a, b in zip(starts, np.r_[starts[1:], len(r)]):
            row = r[a]
            if row < 0:
                continue
            if b - a == 1:
                np.add(acc[row], data[a], out=acc[row])
            else:
                acc[row] += np.add.reduce(data[a:b], axis=0, dtype=np.float64)
            if sq is not None:
                for e in range(a, b):
                    np.multiply(data[e], data[e], out=scratch, dtype=np.float64)
                    sq[row] += scratch


PIXEL_CHUNK = 1 << 18  # pixels per thread task of the NumPy cube


class Binning:
    """Bin ids of ``by`` values: fixed ``edges``, or (steps) one id per distinct value in order of appearance."""

    def __init__(self, bins):
        self.steps = bool(bins.steps)
        self.values: dict[float, int] = {}  # steps: value -> id
        if bins.edges is not None:
            self.edges = np.asarray(bins.edges, np.float64)
        elif bins.n is not None:
            self.edges = np.linspace(bins.range[0], bins.range[1], bins.n + 1)
        elif bins.width is not None:
            lo, hi = bins.range
            k = max(1, math.ceil((hi - lo) / bins.width - 1e-9))
            self.edges = lo + bins.width * np.arange(k + 1)
        else:
            self.edges = None
        self.max_bins = bins.max_bins if self.steps else len(self.edges) - 1

    @property
    def n_known(self) -> int | None:
        """Bins known in advance (None for steps)."""
        return None if self.steps else len(self.edges) - 1

    def index(self, values: np.ndarray) -> np.ndarray:
        """(events,) int64 bin id of each value, -1 where it is missing or outside the bins (or past ``max_bins``
        distinct steps)."""
        v = np.asarray(values, np.float64)
        out = np.full(v.shape, -1, np.int64)
        finite = np.isfinite(v)
        if not self.steps:
            with np.errstate(invalid="ignore"):
                inside = finite & (v >= self.edges[0]) & (v <= self.edges[-1])
            k = np.searchsorted(self.edges, np.where(inside, v, self.edges[0]), side="right") - 1
            out[inside] = np.clip(k[inside], 0, len(self.edges) - 2)
            return out
        for u in np.unique(v[finite]):
            key = float(u)
            if key not in self.values:
                if len(self.values) >= self.max_bins:
                    continue
                self.values[key] = len(self.values)
            out[v == u] = self.values[key]
        return out

    def key_of(self) -> np.ndarray:
        """(ids,) float64: the key of each id (a step's value, or the bin index)."""
        if self.steps:
            keys = np.empty(len(self.values))
            for value, i in self.values.items():
                keys[i] = value
            return keys
        return np.arange(len(self.edges) - 1, dtype=np.float64)


class DetectorCube:
    """One detector's frame sums per (bin, split) on the backend: ``add`` per batch, ``host_sums`` at the end.

    Args:
        shape: (panels, rows, cols) of the calibrated frames.
        backend: the run's backend.
        splits: S, the number of splits (1 without).
        rows: bins held on the device at once (all of them for fixed edges).
        square: also sum the frames' squares.
    """

    def __init__(self, shape, backend, splits: int, rows: int, square: bool):
        self.shape, self.backend, self.splits, self.square = tuple(shape), backend, int(splits), bool(square)
        self.npix = int(np.prod(self.shape))
        self.capacity = int(rows)
        xp = backend.xp
        self.sum = xp.zeros((self.capacity * self.splits, self.npix), xp.float64)
        self.sq = xp.zeros_like(self.sum) if square else None
        self.slot: dict[int, int] = {}  # bin id -> device row block (of ``splits`` rows)
        self.host: dict[int, list] = {}  # bin id -> [sum (S, npix), sq (S, npix) or None] moved to the host
        self._pool: Any = None  # NumPy: threads over chunks of pixels

    @staticmethod
    def nbytes(shape, splits: int, rows: int, square: bool) -> int:
        return int(np.prod(shape)) * 8 * splits * rows * (2 if square else 1)

    def _flush(self) -> None:
        """Every held bin's sums to the host, the device rows zeroed."""
        if not self.slot:
            return
        to_host = self.backend.to_host
        s, sq = to_host(self.sum), None if self.sq is None else to_host(self.sq)
        for bin_id, k in self.slot.items():
            rows = slice(k * self.splits, (k + 1) * self.splits)
            have = self.host.setdefault(
                bin_id, [np.zeros((self.splits, self.npix)), None if sq is None else np.zeros((self.splits, self.npix))]
            )
            have[0] += s[rows]
            if sq is not None:
                have[1] += sq[rows]
        self.sum[...] = 0
        if self.sq is not None:
            self.sq[...] = 0
        self.slot.clear()

    def add(self, data, ids: np.ndarray) -> None:
        """Add a batch: ``data`` (events, panels, rows, cols) float32 on the device, ``ids`` (S, events) host int64
        bin id of each event in each split (-1: not in it)."""
        wanted = [int(i) for i in np.unique(ids) if i >= 0]
        if not wanted:
            return
        if any(i not in self.slot for i in wanted):
            if len(set(self.slot) | set(wanted)) > self.capacity:
                self._flush()
            if len(wanted) > self.capacity:  # a batch over more steps than rows: more rows from now on
                self.capacity = len(wanted)
                xp = self.backend.xp
                self.sum = xp.zeros((self.capacity * self.splits, self.npix), xp.float64)
                self.sq = None if self.sq is None else xp.zeros_like(self.sum)
            for i in wanted:
                if i not in self.slot:
                    self.slot[i] = len(self.slot)
        lut = np.full(max(wanted) + 1, -1, np.int64)
        for i, k in self.slot.items():
            if i < len(lut):
                lut[i] = k
        split = np.arange(self.splits)[:, None]
        rows = np.where(ids >= 0, lut[np.maximum(ids, 0)] * self.splits + split, -1).astype(np.int32)
        n = data.shape[0]
        flat = data.reshape(n, -1)
        if not self.backend.is_gpu:
            self._add_numpy(flat, rows)
            return
        xp = self.backend.xp
        sq = self.sq if self.sq is not None else self.sum  # not written without with_square
        CUBE_ADD.launch(
            self.backend,
            data=xp.ascontiguousarray(flat, dtype=xp.float32),
            rows=self.backend.to_device(rows),
            events=n,
            splits=self.splits,
            npix=self.npix,
            sum=self.sum,
            sq=sq,
            with_square=self.sq is not None,
        )

    def _add_numpy(self, flat: np.ndarray, rows: np.ndarray) -> None:
        """:func:`cube_add_numpy` over chunks of pixels, on ``backend.threads`` threads (NumPy drops the GIL)."""
        chunks = [slice(p, min(p + PIXEL_CHUNK, self.npix)) for p in range(0, self.npix, PIXEL_CHUNK)]
        if self.backend.threads < 2 or len(chunks) < 2:
            cube_add_numpy(flat, rows, self.sum, self.sq)
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.backend.threads, thread_name_prefix="gpusmall-cube")
        sq = self.sq
        list(
            self._pool.map(
                lambda c: cube_add_numpy(flat[:, c], rows, self.sum[:, c], None if sq is None else sq[:, c]), chunks
            )
        )

    def host_sums(self) -> dict[int, list]:
        """bin id -> [sum (S, npix) float64, sq (S, npix) float64 or None], everything moved to the host."""
        self._flush()
        return self.host


class RunCube:
    """The run's cube: binning and selections on the host, frame sums per detector on the device.

    Args:
        cfg: the validated CubeConfig.
        selections: the run's :class:`~gpusmall.selections.Selections`.
        pipelines: detector name -> DetectorPipeline (set up).
        backend: the run's backend.
        outputs: detector -> {output key: (per-event shape, dtype)} of the set-up event (to check ``outputs``).
    """

    def __init__(self, cfg, selections, pipelines: dict, backend, outputs: dict[str, dict]):
        self.cfg, self.selections = cfg, selections
        self.binning = Binning(cfg.bins)
        self.split = list(cfg.split)
        self.S = max(1, len(self.split))
        dets = cfg.detectors if cfg.detectors is not None else {name: None for name in pipelines}
        self.frame: dict[str, DetectorCube] = {}
        self.out_keys: dict[str, list[str]] = {}
        self.out_shapes: dict[str, tuple] = {}
        self.result_shape = {name: pl.sums.result_shape for name, pl in pipelines.items()}
        rows = self.binning.n_known or min(STEP_ROWS, self.binning.max_bins)
        for name, d in dets.items():
            frame, square, keys = (True, False, []) if d is None else (d.frame, d.square, list(d.outputs))
            for i, k in enumerate(keys):
                have = outputs[name]
                if k not in have:
                    raise InputError(
                        f"cube.detectors.{name}.outputs[{i}]: detector {name} has no per-event output "
                        f"{k!r} (it has: {', '.join(sorted(have)) or 'none'})"
                    )
                shape, dtype = have[k]
                if np.dtype(dtype).kind not in "biuf":
                    raise InputError(f"cube.detectors.{name}.outputs[{i}]: {k!r} holds {dtype}, not numbers")
                self.out_shapes[f"{name}/{k}"] = shape
            self.out_keys[name] = keys
            if frame:
                self.frame[name] = DetectorCube(pipelines[name].shape, backend, self.S, rows, square)
        self.readers = sorted(dets)  # detectors whose damage keeps an event out
        self.count: dict[int, np.ndarray] = {}
        self.norm: dict[int, np.ndarray] = {}
        self.out_sums: dict[str, dict[int, np.ndarray]] = {k: {} for k in self.out_shapes}
        self.info = {"events": 0, "used": 0, "damaged": 0, "missing": 0, "outside": 0, "unselected": 0, "unsplit": 0}

    @staticmethod
    def device_bytes(cfg, pipelines: dict) -> tuple[int, str]:
        """(bytes the cube's device rows take, the key to name) for :func:`check_cube_fits`."""
        b = Binning(cfg.bins)
        rows = b.n_known or min(STEP_ROWS, b.max_bins)
        dets = cfg.detectors if cfg.detectors is not None else {name: None for name in pipelines}
        total = 0
        for name, d in dets.items():
            if d is None or d.frame:
                total += DetectorCube.nbytes(
                    pipelines[name].shape, max(1, len(cfg.split)), rows, d is not None and d.square
                )
        return total, "cube.bins" if b.n_known else "cube.bins.max_bins"

    # -- per batch ---------------------------------------------------------------------------------
    def rows(self, context: dict, damaged: dict) -> np.ndarray:
        """(S, events) int64 bin id of each event of a batch in each split (-1: not in the cube); counts and
        norms are added here. ``context``: name -> (events,) host; ``damaged``: detector -> (events,) bool."""
        by = context[self.cfg.by]
        n = len(by)
        bad = np.zeros(n, bool)
        for d in self.readers:
            bad |= np.asarray(damaged.get(d, bad), bool)
        missing = is_missing(self.cfg.by, by) & ~bad
        keep = ~bad & ~missing
        if self.cfg.norm is not None:
            no_norm = is_missing(self.cfg.norm, context[self.cfg.norm]) & keep
            missing |= no_norm
            keep &= ~no_norm
        if self.cfg.selection is not None:
            sel = self.selections.mask(self.cfg.selection, context)
            self.info["unselected"] += int((keep & ~sel).sum())
            keep &= sel
        ids = self.binning.index(np.where(keep, np.asarray(by, np.float64), np.nan))
        self.info["outside"] += int((keep & (ids < 0)).sum())
        keep &= ids >= 0
        self.info["events"] += n
        self.info["damaged"] += int(bad.sum())
        self.info["missing"] += int(missing.sum())
        out = np.full((self.S, n), -1, np.int64)
        for s in range(self.S):
            m = keep if not self.split else keep & self.selections.mask(self.split[s], context)
            out[s, m] = ids[m]
        used = (out >= 0).any(axis=0)
        self.info["used"] += int(used.sum())
        self.info["unsplit"] += int((keep & ~used).sum())  # in none of the split selections
        norm = None if self.cfg.norm is None else np.asarray(context[self.cfg.norm], np.float64)
        for s in range(self.S):
            for i in np.unique(out[s][out[s] >= 0]):
                m = out[s] == i
                self.count.setdefault(int(i), np.zeros(self.S, np.int64))[s] += int(m.sum())
                if norm is not None:
                    self.norm.setdefault(int(i), np.zeros(self.S))[s] += float(norm[m].sum())
        return out

    def add_frames(self, det: str, data, ids: np.ndarray) -> None:
        """A detector's calibrated frames (events, ...) on the device with their ``ids`` (S, events)."""
        cube = self.frame.get(det)
        if cube is not None:
            cube.add(data, ids)

    def add_outputs(self, ids: np.ndarray, columns: dict) -> None:
        """The chosen outputs of a batch's host ``columns`` (``<det>/<key>`` -> (events, ...))."""
        for key, per_bin in self.out_sums.items():
            v = np.asarray(columns[key])
            for s in range(self.S):
                for i in np.unique(ids[s][ids[s] >= 0]):
                    m = ids[s] == i
                    acc = per_bin.setdefault(int(i), np.zeros((self.S, *v.shape[1:])))
                    acc[s] += v[m].astype(np.float64).sum(axis=0)

    # -- the end ----------------------------------------------------------------------------------
    def write(self, path, source: str = "", part: bool = False, complete: bool = True) -> Path:
        """This rank's cube as an HDF5 file: the cube itself, or (``part``) a part :func:`merge_cube_parts` adds up."""
        ids = sorted(set(self.count) | {i for c in self.frame.values() for i in c.host_sums()})
        keys = self.binning.key_of()
        if not self.binning.steps:
            ids = list(range(self.binning.n_known))  # type: ignore[arg-type]
        order = sorted(ids, key=lambda i: keys[i]) if self.binning.steps else ids
        n = len(order)
        S = self.S
        data: dict[str, np.ndarray] = {}
        count = np.zeros((S, n), np.int64)
        norm = np.zeros((S, n))
        for j, i in enumerate(order):
            count[:, j] = self.count.get(i, 0)
            norm[:, j] = self.norm.get(i, 0.0)
        for det, cube in self.frame.items():
            host = cube.host_sums()
            shape = self.result_shape[det]
            for which, name in ((0, "frame_sum"), (1, "frame_square_sum")):
                if which == 1 and not cube.square:
                    continue
                a = np.zeros((S, n, cube.npix))
                for j, i in enumerate(order):
                    if i in host:
                        a[:, j] = host[i][which]
                data[f"{det}/{name}"] = a.reshape(S, n, *shape)
        for key, per_bin in self.out_sums.items():
            a = np.zeros((S, n, *self.out_shapes[key]))
            for j, i in enumerate(order):
                if i in per_bin:
                    a[:, j] = per_bin[i]
            data[f"{key}_sum"] = a
        if self.cfg.norm is not None:
            data[f"{self.cfg.norm}_sum"] = norm
        bins = {"count": count, "keys": np.asarray([keys[i] for i in order], np.float64)}
        if self.binning.edges is not None:
            bins["edges"] = self.binning.edges
        return write_cube_file(path, self.cfg, bins, data, dict(self.info), source, part, complete)


def write_cube_file(
    path, cfg, bins: dict, data: dict, info: dict, source: str, part: bool, complete: bool = True
) -> Path:
    """The cube file (SPEC 10): ``/bins/centers``, ``/bins/edges`` (fixed bins), ``/bins/count``, ``/bins/split``,
    ``/<key>_sum``; with no split the split axis is dropped. A part keeps the split axis and ``/bins/keys``."""
    path = Path(path)
    split = list(cfg.split)
    keys = bins["keys"]
    edges = bins.get("edges")
    centers = keys if edges is None else 0.5 * (edges[1:] + edges[:-1])
    squeeze = (lambda a: a) if (split or part) else (lambda a: a[0])
    with h5py.File(path, "w", libver=LIBVER) as f:
        f.attrs["gpusmall_version"] = __version__
        f.attrs["gpusmall_kind"] = "cube_part" if part else "cube"
        f.attrs["by"] = cfg.by
        f.attrs["binning"] = "steps" if edges is None else "edges"
        f.attrs["selection"] = cfg.selection or ""
        f.attrs["split"] = json.dumps(split)
        f.attrs["norm"] = cfg.norm or ""
        f.attrs["keys"] = json.dumps(sorted(data))
        f.attrs["means"] = MEANS_NOTE
        f.attrs["source"] = str(source)
        f.attrs["cube_config"] = cfg.model_dump_json()
        f.attrs["complete"] = bool(complete)  # False: the run stopped early, the sums hold the events reduced
        for k, v in info.items():
            f.attrs["events" if k == "events" else f"events_{k}"] = int(v)
        g = f.create_group("bins")
        g.attrs["by"] = cfg.by
        g.create_dataset("centers", data=np.asarray(centers, np.float64))
        if edges is not None:
            g.create_dataset("edges", data=np.asarray(edges, np.float64))
        g.create_dataset("count", data=squeeze(bins["count"]))
        if part:
            g.create_dataset("keys", data=keys)
        if split:
            g.create_dataset("split", data=np.array([s.encode() for s in split], dtype=f"S{max(map(len, split))}"))
        for k, v in data.items():
            f.create_dataset(f"{k}", data=squeeze(v))
    return path


def merge_cube_parts(out, parts: list[Path], cfg, source: str = "", complete: bool = True) -> Path:
    """Add up the ranks' cube parts (bins matched by key) into the cube file ``out``; complete when every
    part is."""
    totals: dict[str, dict[float, np.ndarray]] = {}
    count: dict[float, np.ndarray] = {}
    info: dict[str, int] = {}
    edges = None
    for p in parts:
        with h5py.File(p, "r") as f:
            complete = complete and bool(f.attrs.get("complete", False))
            keys = f["bins/keys"][()]
            c = f["bins/count"][()]
            if "bins/edges" in f:
                edges = f["bins/edges"][()]
            for j, k in enumerate(keys):
                count[float(k)] = count.get(float(k), 0) + c[:, j]
            for name in json.loads(f.attrs["keys"]):
                a = f[name][()]
                per = totals.setdefault(name, {})
                for j, k in enumerate(keys):
                    per[float(k)] = per.get(float(k), 0) + a[:, j]
            for k, v in f.attrs.items():
                if k == "events" or k.startswith("events_"):
                    info[k] = info.get(k, 0) + int(v)
    order = sorted(count)
    S = max(1, len(cfg.split))
    data = {}
    for name, per in totals.items():
        first = next(iter(per.values()))
        data[name] = np.stack([per.get(k, np.zeros_like(first)) for k in order], axis=1)
    bins = {
        "count": np.stack([count[k] for k in order], axis=1) if order else np.zeros((S, 0), np.int64),
        "keys": np.asarray(order, np.float64),
    }
    if edges is not None:
        bins["edges"] = edges
    info = {("events" if k == "events" else k.removeprefix("events_")): v for k, v in info.items()}
    return write_cube_file(out, cfg, bins, data, info, source, part=False, complete=complete)


def check_cube_fits(cfg, pipelines: dict, backend) -> None:
    """InputError naming ``cube.bins`` when the cube's rows (bins x splits x frame, float64) do not fit the GPU
    (CuPy) or the host (NumPy) next to what the run already needs."""
    need, key = RunCube.device_bytes(cfg, pipelines)
    have = available_device_bytes(backend) if backend.is_gpu else available_host_bytes()
    if have is None:
        return
    have = int(have * USABLE_FRACTION * 0.5)  # the other half: batches, constants, outputs
    if need > have:
        where = "GPU" if backend.is_gpu else "host"
        raise InputError(
            f"{key}: the cube's sums (bins x splits x pixels, float64) need {gib(need)} of {where} "
            f"memory, about {gib(have)} is free for them; use fewer bins or splits, or leave out "
            f"detectors' frames (cube.detectors.<det>.frame: false)"
        )


def default_cube_path(output: Path) -> Path:
    """``<output stem>.cube.h5`` beside the result (``gpusmall cube``'s own default is ``<stem>_cube.h5``)."""
    output = Path(output)
    return output.with_name(output.stem + ".cube.h5")


def cube_part_path(cube: Path, rank: int) -> Path:
    return Path(cube).with_name(Path(cube).stem + f".part{rank}.h5")
