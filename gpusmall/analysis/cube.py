"""``gpusmall cube``: per-event data binned by a per-event scalar (smalldata_tools' "cube").

Events are put in ``N`` equal-width bins of a per-event scalar ``by`` (a ROI sum, a delay...) over its
finite range among the events used, or over a given range ``[lo, hi]`` (both ends included: bin k holds
``edges[k] <= v < edges[k+1]``, the last bin also ``v == hi``). Left out: events damaged in any detector
the cube reads (``/<det>/damaged == 1``), events whose ``by`` value is NaN or infinite, and events
outside the range. For every selected per-event dataset ``K`` of shape (events, ...) the cube holds

- ``K_sum``  (N, ...) float64: the sum over the events of each bin (a NaN value makes its element NaN,
  as ``numpy.sum`` does: a bad pixel written as NaN stays NaN);
- ``K_mean`` (N, ...) float64: ``K_sum / count``, NaN for an empty bin;

and ``bins/edges`` (N + 1,), ``bins/centers`` (N,), ``bins/count`` (N,) int64. Datasets are read in
chunks of events and summed per bin with a sort and ``numpy.add.reduceat`` (no Python loop over events).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .. import __version__
from ..errors import InputError
from ..io.master import require_sources
from ..io.writer import LIBVER, open_result
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


@dataclass
class Cube:
    """A binned result file (host arrays).

    Attributes:
        by: the binning key.
        edges: (N + 1,) float64 bin edges, in the key's unit.
        count: (N,) int64 events per bin.
        sums, means: key -> (N, *per-event shape) float64.
        info: numbers of events: ``events`` (in the file), ``used``, ``damaged``, ``nonfinite``, ``outside``.
    """

    by: str
    edges: np.ndarray
    count: np.ndarray
    sums: dict = field(default_factory=dict)
    means: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def centers(self) -> np.ndarray:
        return 0.5 * (self.edges[1:] + self.edges[:-1])


def bin_edges(values, bins: int, value_range=None) -> np.ndarray:
    """(bins + 1,) equal-width edges over ``value_range`` or the finite min..max of ``values``.

    A constant key (min == max) gets the range ``[v - 0.5, v + 0.5]``.
    """
    if bins < 1:
        raise InputError(f"cube: --bins must be a positive integer, not {bins}")
    if value_range is not None:
        lo, hi = (float(v) for v in value_range)
        if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
            raise InputError(f"cube: --range {lo} {hi}: need finite LO < HI")
    else:
        v = np.asarray(values, np.float64)
        v = v[np.isfinite(v)]
        if v.size == 0:
            raise InputError("cube: the binning key has no finite value in the events used")
        lo, hi = float(v.min()), float(v.max())
        if hi == lo:
            lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, bins + 1)


def bin_index(values, edges) -> tuple[np.ndarray, np.ndarray]:
    """(index, inside): bin of each value (int64, edges[k] <= v < edges[k+1]; v == edges[-1] goes to the
    last bin) and whether it is finite and inside [edges[0], edges[-1]]."""
    v = np.asarray(values, np.float64)
    n = len(edges) - 1
    with np.errstate(invalid="ignore"):
        inside = np.isfinite(v) & (v >= edges[0]) & (v <= edges[-1])
    idx = np.searchsorted(edges, np.where(inside, v, edges[0]), side="right") - 1
    return np.clip(idx, 0, n - 1).astype(np.int64), inside


def binned_sum(d, index, keep, bins: int) -> np.ndarray:
    """Per-bin sums of the rows of ``d`` (an h5py dataset or array, events first).

    Args:
        d: (events, ...) numbers.
        index: (events,) int64 bin of each event.
        keep: (events,) bool, events to include.
        bins: number of bins.

    Returns:
        (bins, ...) float64.
    """
    out = np.zeros((bins, *d.shape[1:]), np.float64)
    row = max(1, int(np.prod(d.shape[1:], dtype=np.int64)) * np.dtype(d.dtype).itemsize)
    step = max(1, CHUNK_BYTES // row)
    for a in range(0, d.shape[0], step):
        b = min(a + step, d.shape[0])
        sel = keep[a:b]
        if not sel.any():
            continue
        rows = np.asarray(d[a:b])[sel].astype(np.float64)
        ib = index[a:b][sel]
        order = np.argsort(ib, kind="stable")
        ib = ib[order]
        starts = np.flatnonzero(np.r_[True, ib[1:] != ib[:-1]])
        out[ib[starts]] += np.add.reduceat(rows[order], starts, axis=0)
    return out


def default_keys(f: h5py.File, by: str) -> list[str]:
    """The datasets a cube holds when none are named: every per-event dataset of ``by``'s detector group
    (``damaged`` excepted), or, for a key outside the detector groups, every per-event dataset with more
    than one value per event."""
    det = detector_of(f, by)
    if det is not None:
        return [k for k in per_event_datasets(f, det) if k != f"{det}/damaged"]
    return [k for k in per_event_datasets(f) if f[k].ndim >= 2 and k.rsplit("/", 1)[-1] != "damaged"]


def make_cube(path, by: str, bins: int, keys: list[str] | None = None, value_range=None) -> Cube:
    """Bin the events of result file ``path`` by the per-event scalar ``by`` (see the module docstring).

    Raises InputError (exit 2) for a missing key (naming it, with close matches), a ``by`` that is not a
    per-event scalar, a key that is not per event, no event left to bin, or a master file whose part
    files are missing (naming them).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"cube: file {str(path)!r} does not exist")
    with open_result(path) as f:
        n = n_events(f)
        by = normalize_key(by)
        d_by = require_dataset(f, by, "--by key")
        if not is_per_event(f, by, n) or d_by.ndim != 1 or d_by.dtype.kind not in "biuf":
            raise InputError(f"cube: --by key {by!r} must be a per-event scalar ({n},) of numbers, "
                             f"not {d_by.shape} {d_by.dtype}")
        if keys:
            keys = [normalize_key(k) for k in keys]
            for k in keys:
                d = require_dataset(f, k, "--keys entry")
                if not is_per_event(f, k, n):
                    raise InputError(f"cube: --keys entry {k!r} is not a per-event dataset (first axis {n})")
                if d.dtype.kind not in "biuf":
                    raise InputError(f"cube: --keys entry {k!r} holds {d.dtype} values, not numbers")
        else:
            keys = [k for k in default_keys(f, by) if f[k].dtype.kind in "biuf"]
        dets = {d for d in [detector_of(f, by), *(detector_of(f, k) for k in keys)] if d is not None}
        require_sources(f, [by, *keys, *(f"{det}/damaged" for det in sorted(dets))], "cube")
        damaged = np.zeros(n, bool)
        for det in sorted(dets & set(detectors(f))):
            if f"{det}/damaged" in f:
                damaged |= f[f"{det}/damaged"][()] != 0
        values = d_by[()].astype(np.float64)
        finite = np.isfinite(values)
        edges = bin_edges(values[~damaged & finite], bins, value_range)
        index, inside = bin_index(values, edges)
        keep = inside & ~damaged
        if not keep.any():
            raise InputError(f"cube: no event left to bin by {by!r} ({int(damaged.sum())} damaged, "
                             f"{int((~finite & ~damaged).sum())} non-finite, range {edges[0]:g}..{edges[-1]:g})")
        count = np.bincount(index[keep], minlength=bins).astype(np.int64)
        cube = Cube(by, edges, count, info={
            "events": n, "used": int(keep.sum()), "damaged": int(damaged.sum()),
            "nonfinite": int((~finite & ~damaged).sum()), "outside": int((finite & ~inside & ~damaged).sum())})
        shape_count = lambda s: count.reshape(-1, *([1] * (len(s) - 1)))  # noqa: E731
        for k in keys:
            s = binned_sum(f[k], index, keep, bins)
            cube.sums[k] = s
            with np.errstate(invalid="ignore", divide="ignore"):
                cube.means[k] = np.where(shape_count(s.shape) > 0, s / np.maximum(shape_count(s.shape), 1), np.nan)
    return cube


def write_cube(cube: Cube, out, source: str = "") -> Path:
    """HDF5: /bins/edges, /bins/centers, /bins/count, /<key>_sum, /<key>_mean (``/`` in keys = groups)."""
    out = Path(out)
    with h5py.File(out, "w", libver=LIBVER) as f:
        f.attrs["gpusmall_version"] = __version__  # gpusmall wrote it (may overwrite it)
        f.attrs["gpusmall_kind"] = "cube"
        g = f.create_group("bins")
        g.create_dataset("edges", data=cube.edges)
        g.create_dataset("centers", data=cube.centers)
        g.create_dataset("count", data=cube.count)
        g.attrs["by"] = cube.by
        for k in cube.sums:
            f.create_dataset(f"{k}_sum", data=cube.sums[k])
            f.create_dataset(f"{k}_mean", data=cube.means[k])
        f.attrs["by"] = cube.by
        f.attrs["source"] = str(source)
        f.attrs["keys"] = json.dumps(list(cube.sums))
        for k, v in cube.info.items():
            f.attrs[f"events_{k}" if k != "events" else "events"] = v
    return out
