"""``gpusmall cube``: per-event data binned by a per-event scalar (smalldata_tools' "cube").

Events are binned by a per-event scalar ``by`` (a ROI sum, a delay, a scan step...) in one of four ways:

- ``bins=N``: N equal-width bins over a given range ``[lo, hi]`` or over the finite range of ``by`` among
  the events used (a constant ``by``: ``[v - 0.5, v + 0.5]``);
- ``edges=[e0, e1, ...]``: explicit, strictly increasing edges;
- ``width=W``: bins of width W from ``lo`` up to the first edge ``lo + k W`` that reaches ``hi`` (as the
  run's cube does: when ``(hi - lo) / W`` is not a whole number the last bin reaches past ``hi``, and holds
  the values up to its edge); with no range, the bins ``[k W, (k + 1) W)`` that
  hold the finite values of ``by``: edges from ``floor(min / W) * W`` to ``(floor(max / W) + 1) * W``;
- ``steps=True``: one bin per distinct finite value of ``by`` among the events used (scan steps,
  ``by="scan/varStep"``), ordered by value; ``centers`` are those values and there are no edges.

With edges, bin k holds ``edges[k] <= v < edges[k+1]``, the last bin also ``v == edges[-1]``. Left out:
events damaged in any detector the cube reads (``/<det>/damaged != 0``: the detectors of ``by``, of the
keys and of the selection keys), events whose ``by`` value is NaN or infinite, events not in ``selection``
(a selection of the file's config, SPEC 10) or failing an ad-hoc ``select`` condition, and events outside
the edges. ``split`` (selection names) splits every bin by each selection: an event counts in every split
selection it is in (selections that partition the events give sums that add up to the unsplit cube).
For every selected per-event dataset ``K`` of shape (events, ...) the cube holds

- ``K_sum``  (N, ...) float64 ((S, N, ...) with S split selections): the sum over the events of each bin (a
  NaN value makes its element NaN, as ``numpy.sum`` does: a bad pixel written as NaN stays NaN);
- ``K_mean`` same shape: ``K_sum / count``, NaN for an empty bin;

and ``bins/centers`` (N,), ``bins/edges`` (N + 1,) (not with steps), ``bins/count`` (N,) or (S, N) int64,
``bins/split`` (S,) the split names. Datasets are read in chunks of events (each chunk once, whatever the
number of split selections) and summed per bin with a sort and ``numpy.add.reduceat`` (no Python loop over
events).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .. import __version__
from ..errors import InputError
from ..io.master import require_sources
from ..io.writer import LIBVER, open_result
from ..selections import SelectionError, Selections
from .results import (
    detector_of,
    detectors,
    is_per_event,
    n_events,
    normalize_key,
    per_event_datasets,
    require_dataset,
)

CHUNK_BYTES = 64 << 20
MAX_BINS = 100_000  # width and steps: more bins than this is a mistake (a tiny width, steps of a float)
BOOKKEEPING = frozenset({"timestamp", "event_index", "event_time", "fiducials"})
"""Root per-event datasets that a cube leaves out by default (with every ``damaged`` and ``damage/<det>``)."""
MEANS_NOTE = "<key>_mean = <key>_sum / bins/count"


@dataclass
class Cube:
    """A binned result file (host arrays).

    Attributes:
        by: the binning key.
        edges: (N + 1,) float64 bin edges, in the key's unit; None with steps.
        count: (N,) int64 events per bin, (S, N) with split selections.
        sums, means: key -> (N, *per-event shape) float64, (S, N, ...) with split selections.
        info: numbers of events: ``events`` (in the file), ``used``, ``damaged``, ``nonfinite``,
            ``unselected`` (not in ``selection``/``select``), ``outside``; with split also ``unsplit``
            (used by no split selection).
        steps: (N,) the distinct values of ``by`` (steps), else None.
        split: the split selection names (empty: no split axis).
        selection: the selection the events are taken from (None: all), select: the ad-hoc conditions.
        binning: ``bins``, ``edges``, ``width`` or ``steps``.
    """

    by: str
    edges: np.ndarray | None
    count: np.ndarray
    sums: dict = field(default_factory=dict)
    means: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    steps: np.ndarray | None = None
    split: list = field(default_factory=list)
    selection: str | None = None
    select: list = field(default_factory=list)
    binning: str = "bins"

    @property
    def centers(self) -> np.ndarray:
        if self.edges is None:
            return np.asarray(self.steps)
        return 0.5 * (self.edges[1:] + self.edges[:-1])

    @property
    def nbins(self) -> int:
        return int(self.count.shape[-1])


def _finite(values) -> np.ndarray:
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise InputError("cube: the binning key has no finite value in the events used")
    return v


def _range(value_range, option: str = "--range") -> tuple[float, float]:
    lo, hi = (float(v) for v in value_range)
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        raise InputError(f"cube: {option} {lo} {hi}: need finite LO < HI")
    return lo, hi


def bin_edges(values, bins: int, value_range=None) -> np.ndarray:
    """(bins + 1,) equal-width edges over ``value_range`` or the finite min..max of ``values``.

    A constant key (min == max) gets the range ``[v - 0.5, v + 0.5]``.
    """
    if bins < 1:
        raise InputError(f"cube: --bins must be a positive integer, not {bins}")
    if value_range is not None:
        lo, hi = _range(value_range)
    else:
        v = _finite(values)
        lo, hi = float(v.min()), float(v.max())
        if hi == lo:
            lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, bins + 1)


def check_edges(edges) -> np.ndarray:
    """Explicit edges as float64, InputError unless there are >= 2, all finite and strictly increasing."""
    e = np.asarray(edges, np.float64).ravel()
    if e.size < 2 or not np.isfinite(e).all() or not (np.diff(e) > 0).all():
        raise InputError(
            f"cube: --edges {' '.join(f'{x:g}' for x in e)}: need at least two finite, strictly increasing edges"
        )
    return e


def _whole(q: float) -> float:
    """``q`` snapped to the nearest whole number when it is one up to rounding (0.3 / 0.1)."""
    r = round(q)
    return float(r) if abs(q - r) <= 1e-9 * max(1.0, abs(q)) else q


def width_edges(values, width: float, value_range=None) -> np.ndarray:
    """Edges of bins of width ``width`` (see the module docstring): from LO, the last reaching HI; with no range
    from ``floor(min / W) * W`` to ``(floor(max / W) + 1) * W`` of the finite values."""
    w = float(width)
    if not (np.isfinite(w) and w > 0):
        raise InputError(f"cube: --width must be a positive number, not {width}")
    if value_range is not None:
        lo, hi = _range(value_range)
        nb = max(1, math.ceil(_whole((hi - lo) / w)))
        if nb > MAX_BINS:
            raise InputError(f"cube: --width {w:g} over --range {lo:g} {hi:g} makes {nb} bins (at most {MAX_BINS})")
        return lo + w * np.arange(nb + 1, dtype=np.float64)  # as the run's cube: whole bins, the last reaching HI
    v = _finite(values)
    vmin, vmax = float(v.min()), float(v.max())
    k0, k1 = math.floor(_whole(vmin / w)), math.floor(_whole(vmax / w)) + 1
    if k1 - k0 > MAX_BINS:
        raise InputError(f"cube: --width {w:g} over {vmin:g}..{vmax:g} makes {k1 - k0} bins (at most {MAX_BINS})")
    e = w * np.arange(k0, k1 + 1, dtype=np.float64)
    e[0], e[-1] = min(e[0], vmin), max(e[-1], vmax)  # rounding never leaves the extremes out
    return e


def bin_index(values, edges) -> tuple[np.ndarray, np.ndarray]:
    """(index, inside): bin of each value (int64, edges[k] <= v < edges[k+1]; v == edges[-1] goes to the
    last bin) and whether it is finite and inside [edges[0], edges[-1]]."""
    v = np.asarray(values, np.float64)
    n = len(edges) - 1
    with np.errstate(invalid="ignore"):
        inside = np.isfinite(v) & (v >= edges[0]) & (v <= edges[-1])
    idx = np.searchsorted(edges, np.where(inside, v, edges[0]), side="right") - 1
    return np.clip(idx, 0, n - 1).astype(np.int64), inside


def step_index(values, steps) -> tuple[np.ndarray, np.ndarray]:
    """(index, inside) for one bin per value of ``steps`` (sorted, distinct): inside = the value is one of them."""
    v = np.asarray(values, np.float64)
    idx = np.clip(np.searchsorted(steps, np.where(np.isfinite(v), v, steps[0])), 0, len(steps) - 1)
    with np.errstate(invalid="ignore"):
        inside = np.isfinite(v) & (steps[idx] == v)
    return idx.astype(np.int64), inside


def binned_sum(d, index, keep, bins: int) -> np.ndarray:
    """Per-bin sums of the rows of ``d`` (an h5py dataset or array, events first).

    Args:
        d: (events, ...) numbers.
        index: (events,) int64 bin of each event.
        keep: (events,) bool, events to include; or (S, events) bool, one row per split: then the result
            has a leading split axis, and each chunk of ``d`` is still read once.
        bins: number of bins.

    Returns:
        (bins, ...) float64, or (S, bins, ...) for a 2-D ``keep``.
    """
    keep = np.asarray(keep, bool)
    masks = keep if keep.ndim == 2 else keep[None]
    out = np.zeros((masks.shape[0], bins, *d.shape[1:]), np.float64)
    anyk = masks.any(axis=0)
    row = max(1, int(np.prod(d.shape[1:], dtype=np.int64)) * (np.dtype(d.dtype).itemsize + 8))  # raw + float64
    step = max(1, CHUNK_BYTES // row)
    for a in range(0, d.shape[0], step):
        b = min(a + step, d.shape[0])
        if not anyk[a:b].any():
            continue
        chunk = np.asarray(d[a:b])
        for s in range(masks.shape[0]):
            sel = masks[s, a:b]
            if not sel.any():
                continue
            rows = chunk[sel].astype(np.float64)
            ib = index[a:b][sel]
            order = np.argsort(ib, kind="stable")
            ib = ib[order]
            starts = np.flatnonzero(np.r_[True, ib[1:] != ib[:-1]])
            out[s, ib[starts]] += np.add.reduceat(rows[order], starts, axis=0)
    return out if keep.ndim == 2 else out[0]


def _numeric(d) -> bool:
    return d.dtype.kind in "biuf"


def per_event_scalars(f: h5py.File) -> list[str]:
    """Paths of the per-event 1-D numeric datasets of the file (``damaged`` and bookkeeping included)."""
    return [k for k in per_event_datasets(f) if f[k].ndim == 1 and _numeric(f[k])]


def _bookkeeping(key: str) -> bool:
    return key in BOOKKEEPING or key.rsplit("/", 1)[-1] == "damaged" or key.startswith("damage/")


def default_keys(f: h5py.File, by: str) -> list[str]:
    """The datasets a cube holds when none are named: every per-event dataset of ``by``'s detector group
    (or, for a key outside the detector groups, every per-event dataset with more than one value per event),
    and every per-event numeric scalar of the file (context such as ``ipm/sum``, ``lightStatus/laser``, ROI
    sums); ``damaged`` and the bookkeeping columns (timestamp, event_index, event_time, fiducials) left out."""
    det = detector_of(f, by)
    every = per_event_datasets(f)
    if det is not None:
        base = [k for k in every if k.startswith(det + "/")]
    else:
        base = [k for k in every if f[k].ndim >= 2]
    base = set(base) | {k for k in every if f[k].ndim == 1}  # type: ignore[assignment]
    return [k for k in every if k in base and not _bookkeeping(k) and _numeric(f[k])]


def _config_selections(f: h5py.File) -> dict:
    raw = f.attrs.get("config")
    if raw is None:
        return {}
    if isinstance(raw, bytes):
        raw = raw.decode()
    try:
        cfg = json.loads(str(raw))
    except ValueError:
        return {}
    sel = cfg.get("selections") if isinstance(cfg, dict) else None
    return sel if isinstance(sel, dict) else {}


def _short_list(names, most: int = 40) -> str:
    names = sorted(names)
    return ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "") if names else "none"


def parse_select(text: str) -> tuple[str, str, object]:
    """``'KEY=V'`` -> (key, "equal", V); ``'KEY=LO:HI'`` -> (key, "range", (LO, HI)), LO or HI may be empty
    (no bound). InputError naming ``--select`` for anything else."""
    key, eq, val = str(text).partition("=")
    key = normalize_key(key.strip())
    val = val.strip()
    bad = InputError(f"cube: --select {text!r}: give KEY=VALUE or KEY=LO:HI (LO or HI may be left empty)")
    if not eq or not key or not val:
        raise bad
    try:
        if ":" in val:
            a, _, b = val.partition(":")
            lo = float(a) if a.strip() else -np.inf
            hi = float(b) if b.strip() else np.inf
            if (
                np.isnan(lo)
                or np.isnan(hi)
                or lo > hi
                or (a.strip() and not np.isfinite(lo))
                or (b.strip() and not np.isfinite(hi))
                or (not a.strip() and not b.strip())
            ):
                raise bad
            return key, "range", (lo, hi)
        v = float(val)
    except ValueError:
        raise bad from None
    if not np.isfinite(v):
        raise bad
    return key, "equal", v


def _select_mask(kind: str, value, v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float64)
    with np.errstate(invalid="ignore"):
        if kind == "equal":
            return v == value
        return (v >= value[0]) & (v <= value[1])


def make_cube(
    path,
    by: str,
    bins: int | None = None,
    keys: list[str] | None = None,
    value_range=None,
    *,
    edges=None,
    width: float | None = None,
    steps: bool = False,
    selection: str | None = None,
    split: list[str] | None = None,
    select: list[str] | None = None,
) -> Cube:
    """Bin the events of result file ``path`` by the per-event scalar ``by`` (see the module docstring).

    Exactly one of ``bins``, ``edges``, ``width``, ``steps``. ``selection`` and ``split`` name selections of
    the file's config (root attribute ``config``) or the built-in ones (``dropped``, ``laser_on``,
    ``laser_off``, when the file has ``lightStatus/xray``); ``select``: ad-hoc ``'KEY=V'`` / ``'KEY=LO:HI'``
    conditions that must all hold.

    Raises InputError (exit 2) for a missing key (naming it, with close matches), a ``by`` that is not a
    per-event scalar, a key that is not per event, an unknown selection or a selection key that is no
    per-event scalar of the file (naming the option and the key, listing what there is), bad edges, width or
    range, no event left to bin, or a master file whose part files are missing (naming them).
    """
    ways = [
        w
        for w, given in (
            ("--bins", bins is not None),
            ("--edges", edges is not None),
            ("--width", width is not None),
            ("--steps", bool(steps)),
        )
        if given
    ]
    if len(ways) != 1:
        raise InputError(
            f"cube: give exactly one of --bins, --edges, --width, --steps (got {', '.join(ways) or 'none'})"
        )
    if value_range is not None and ways[0] in ("--edges", "--steps"):
        raise InputError(f"cube: --range goes with --bins or --width, not {ways[0]}")
    if edges is not None:
        edges = check_edges(edges)
    split = list(split or [])
    select = list(select or [])
    conds = [parse_select(s) for s in select]
    path = Path(path)
    if not path.is_file():
        raise InputError(f"cube: file {str(path)!r} does not exist")
    with open_result(path) as f:
        n = n_events(f)
        by = normalize_key(by)
        d_by = require_dataset(f, by, "--by key")
        if not is_per_event(f, by, n) or d_by.ndim != 1 or not _numeric(d_by):
            raise InputError(
                f"cube: --by key {by!r} must be a per-event scalar ({n},) of numbers, not {d_by.shape} {d_by.dtype}"
            )
        if keys:
            keys = [normalize_key(k) for k in keys]
            for k in keys:
                d = require_dataset(f, k, "--keys entry")
                if not is_per_event(f, k, n):
                    raise InputError(f"cube: --keys entry {k!r} is not a per-event dataset (first axis {n})")
                if not _numeric(d):
                    raise InputError(f"cube: --keys entry {k!r} holds {d.dtype} values, not numbers")
        else:
            keys = default_keys(f, by)

        # selections: names and keys checked before anything is read
        scalars = set(per_event_scalars(f))
        sel_keys: set[str] = set()
        used_names = ([("--selection", selection)] if selection is not None else []) + [("--split", s) for s in split]
        sels = None
        if used_names:
            try:
                sels = Selections(_config_selections(f), builtin="lightStatus/xray" in scalars)
            except SelectionError as exc:
                raise InputError(f"cube: the selections of {f.filename}'s config: {exc}") from None
            for option, name in used_names:
                if name not in sels:
                    raise InputError(
                        f"cube: {option} {name!r}: no selection {name!r} in {f.filename} "
                        f"(selections: {_short_list(sels)})"
                    )
                for k in sorted(sels.keys_of(name)):
                    if k not in scalars:
                        raise InputError(
                            f"cube: {option} {name!r}: the selection reads {k!r}, which is no "
                            f"per-event scalar of {f.filename} (there are: {_short_list(scalars)})"
                        )
                sel_keys |= sels.keys_of(name)
        if len(set(split)) != len(split):
            raise InputError(f"cube: --split names a selection twice: {' '.join(split)}")
        for (k, _, _), text in zip(conds, select):
            if k not in scalars:
                raise InputError(
                    f"cube: --select {text!r}: {k!r} is no per-event scalar of {f.filename} "
                    f"(there are: {_short_list(scalars)})"
                )
            sel_keys.add(k)

        dets = {d for d in [detector_of(f, by), *(detector_of(f, k) for k in [*keys, *sel_keys])] if d is not None}
        require_sources(f, [by, *keys, *sorted(sel_keys), *(f"{det}/damaged" for det in sorted(dets))], "cube")
        damaged = np.zeros(n, bool)
        for det in sorted(dets & set(detectors(f))):
            if f"{det}/damaged" in f:
                damaged |= f[f"{det}/damaged"][()] != 0
        values = d_by[()].astype(np.float64)
        finite = np.isfinite(values)
        context = {k: f[k][()] for k in sorted(sel_keys)}
        selected = np.ones(n, bool)
        if selection is not None:
            selected &= sels.mask(selection, context)  # type: ignore[union-attr]
        for k, kind, value in conds:
            selected &= _select_mask(kind, value, context[k])
        candidates = ~damaged & finite & selected
        if ways[0] == "--steps":
            steps_v = np.unique(values[candidates])
            if steps_v.size == 0:
                raise InputError(
                    f"cube: no event left to bin by {by!r} ({int(damaged.sum())} damaged, "
                    f"{int((~finite & ~damaged).sum())} non-finite, "
                    f"{int((finite & ~damaged & ~selected).sum())} not selected)"
                )
            if steps_v.size > MAX_BINS:
                raise InputError(
                    f"cube: --steps: {by!r} has {steps_v.size} distinct values (at most {MAX_BINS}); "
                    f"bin it with --bins or --width"
                )
            cube_edges, nb = None, int(steps_v.size)
            index, inside = step_index(values, steps_v)
        else:
            steps_v = None
            if ways[0] == "--bins":
                cube_edges = bin_edges(values[candidates], bins, value_range)  # type: ignore[arg-type]
            elif ways[0] == "--width":
                cube_edges = width_edges(values[candidates], width, value_range)  # type: ignore[arg-type]
            else:
                cube_edges = edges
            nb = len(cube_edges) - 1
            index, inside = bin_index(values, cube_edges)
        keep = inside & candidates
        masks = None
        if split:
            masks = np.stack([sels.mask(s, context) & keep for s in split])  # type: ignore[union-attr]
            used = masks.any(axis=0)
        else:
            used = keep
        if not used.any():
            where = f"range {cube_edges[0]:g}..{cube_edges[-1]:g}" if cube_edges is not None else "steps"
            raise InputError(
                f"cube: no event left to bin by {by!r} ({int(damaged.sum())} damaged, "
                f"{int((~finite & ~damaged).sum())} non-finite, "
                f"{int((finite & ~damaged & ~selected).sum())} not selected, {where}"
                + (f", in none of --split {' '.join(split)}" if split else "")
                + ")"
            )
        if masks is None:
            count = np.bincount(index[keep], minlength=nb).astype(np.int64)
        else:
            count = np.stack([np.bincount(index[m], minlength=nb) for m in masks]).astype(np.int64)
        info = {
            "events": n,
            "used": int(used.sum()),
            "damaged": int(damaged.sum()),
            "nonfinite": int((~finite & ~damaged).sum()),
            "unselected": int((finite & ~damaged & ~selected).sum()),
            "outside": int((finite & ~damaged & selected & ~inside).sum()),
        }
        if split:
            info["unsplit"] = int((keep & ~used).sum())
        cube = Cube(
            by,
            cube_edges,
            count,
            info=info,
            steps=steps_v,
            split=split,
            selection=selection,
            select=select,
            binning=ways[0][2:],
        )
        for k in keys:
            s = binned_sum(f[k], index, keep if masks is None else masks, nb)
            c = count.reshape(*count.shape, *([1] * (s.ndim - count.ndim)))
            cube.sums[k] = s
            with np.errstate(invalid="ignore", divide="ignore"):
                cube.means[k] = np.where(c > 0, s / np.maximum(c, 1), np.nan)
    return cube


def write_cube(cube: Cube, out, source: str = "") -> Path:
    """HDF5: /bins/centers, /bins/edges (not with steps), /bins/count, /bins/split (with split), /<key>_sum,
    /<key>_mean (``/`` in keys = groups); root attributes gpusmall_version, gpusmall_kind = "cube", by,
    source, keys (JSON), means, binning ("edges" or "steps", as the run's cube), option (--bins, --edges,
    --width or --steps), selection, select (JSON), split (JSON), events*."""
    out = Path(out)
    with h5py.File(out, "w", libver=LIBVER) as f:
        f.attrs["gpusmall_version"] = __version__  # gpusmall wrote it (may overwrite it)
        f.attrs["gpusmall_kind"] = "cube"
        g = f.create_group("bins")
        if cube.edges is not None:
            g.create_dataset("edges", data=cube.edges)
        g.create_dataset("centers", data=cube.centers)
        g.create_dataset("count", data=cube.count)
        if cube.split:
            g.create_dataset(
                "split", data=np.array([s.encode("ascii", "backslashreplace") for s in cube.split], dtype=np.bytes_)
            )
        g.attrs["by"] = cube.by
        for k in cube.sums:
            f.create_dataset(f"{k}_sum", data=cube.sums[k])
            f.create_dataset(f"{k}_mean", data=cube.means[k])
        f.attrs["by"] = cube.by
        f.attrs["source"] = str(source)
        f.attrs["keys"] = json.dumps(list(cube.sums))
        f.attrs["means"] = MEANS_NOTE
        f.attrs["binning"] = "steps" if cube.edges is None else "edges"  # as the run's cube; how: "option"
        f.attrs["option"] = f"--{cube.binning}"
        f.attrs["selection"] = cube.selection or ""
        f.attrs["select"] = json.dumps(list(cube.select))
        f.attrs["split"] = json.dumps(list(cube.split))
        for k, v in cube.info.items():
            f.attrs[f"events_{k}" if k != "events" else "events"] = v
    return out
