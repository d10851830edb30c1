"""Finding things in a result file (SPEC section 8): keys, per-event datasets, detectors, geometry.

Shared by ``gpusmall plot`` and ``gpusmall cube``. A *key* is a dataset path inside the file, with or
without the leading ``/`` (``epix/roi0_sum``, ``/Sums/epix_calib``).
"""

from __future__ import annotations

import difflib

import h5py
import numpy as np

from ..errors import InputError

STATIC_GROUPS = ("UserDataCfg", "Sums")


def normalize_key(key: str) -> str:
    """``"/epix//roi0_sum/"`` -> ``"epix/roi0_sum"``."""
    return "/".join(p for p in str(key).split("/") if p)


def dataset_paths(f: h5py.File) -> list[str]:
    """Every dataset path in the file (no leading ``/``), in HDF5 visiting order."""
    out: list[str] = []
    f.visititems(lambda name, obj: out.append(name) if isinstance(obj, h5py.Dataset) else None)
    return out


def require_dataset(f: h5py.File, key: str, what: str = "key") -> h5py.Dataset:
    """The dataset ``key`` of ``f``; InputError naming it (with close matches) when it is not there."""
    name = normalize_key(key)
    obj = f.get(name) if name else None
    if isinstance(obj, h5py.Dataset):
        return obj
    paths = dataset_paths(f)
    if isinstance(obj, h5py.Group):
        inside = [p for p in paths if p.startswith(name + "/")][:6]
        raise InputError(
            f"{what} {key!r} is a group in {f.filename}, not a dataset"
            + (f"; it holds e.g. {', '.join(inside)}" if inside else "")
        )
    # match on the full path and on the last component, so "roi0_sum" finds "epix/roi0_sum"
    close = difflib.get_close_matches(name, paths, n=5, cutoff=0.5)
    tails = {p.rsplit("/", 1)[-1]: p for p in paths}
    close += [
        tails[t]
        for t in difflib.get_close_matches(name.rsplit("/", 1)[-1], list(tails), n=5, cutoff=0.6)
        if tails[t] not in close
    ]
    hint = f"; close matches: {', '.join(close[:5])}" if close else "; `gpusmall inspect FILE` lists the keys"
    raise InputError(f"{what} {key!r} is not in {f.filename}{hint}")


def n_events(f: h5py.File) -> int:
    """Number of events of a result file: the length of ``/timestamp`` (else the ``events`` attribute)."""
    if "timestamp" in f and isinstance(f["timestamp"], h5py.Dataset):
        return int(f["timestamp"].shape[0])
    if "events" in f.attrs:
        return int(f.attrs["events"])
    raise InputError(f"{f.filename} has no /timestamp: not a gpusmall result file")


def is_per_event(f: h5py.File, path: str, n: int | None = None, offsets: dict | None = None) -> bool:
    """True for a dataset outside /UserDataCfg and /Sums whose first axis is the events axis; a ragged
    per-item dataset (attribute ``items_count``: droplets, photons) and its per-event offsets are not (their
    length can equal the events' by chance; an offset is a position, not a value to bin). ``offsets``: a dict
    that keeps each group's offset names between calls (one look at a group's datasets)."""
    path = normalize_key(path)
    if path.split("/", 1)[0] in STATIC_GROUPS:
        return False
    d = f.get(path)
    n = n_events(f) if n is None else n
    if not (isinstance(d, h5py.Dataset) and d.ndim >= 1 and d.shape[0] == n) or "items_count" in d.attrs:
        return False
    group = d.parent
    known = offsets if offsets is not None else {}
    if group.name not in known:
        known[group.name] = _ragged_offsets(group)
    return path.rsplit("/", 1)[-1] not in known[group.name]


def _ragged_offsets(group: h5py.Group) -> set[str]:
    """Names of the per-event offset datasets of the ragged datasets in ``group``."""
    out = set()
    for obj in group.values():
        if isinstance(obj, h5py.Dataset) and "items_offset" in obj.attrs:
            v = obj.attrs["items_offset"]
            out.add(v.decode() if isinstance(v, bytes) else str(v))
    return out


def per_event_datasets(f: h5py.File, group: str | None = None) -> list[str]:
    """Paths of the per-event datasets (all, or those directly or deeper under ``group``)."""
    n = n_events(f)
    prefix = normalize_key(group) + "/" if group else ""
    offsets: dict = {}
    return [p for p in dataset_paths(f) if p.startswith(prefix) and is_per_event(f, p, n, offsets)]


def detectors(f: h5py.File) -> list[str]:
    """Detector names: the groups of /UserDataCfg (else top-level groups holding a ``damaged`` dataset)."""
    if "UserDataCfg" in f:
        return [k for k in f["UserDataCfg"] if isinstance(f["UserDataCfg"][k], h5py.Group)]
    return [k for k in f if isinstance(f[k], h5py.Group) and "damaged" in f[k]]


def detector_of(f: h5py.File, path: str) -> str | None:
    """The detector a dataset belongs to: ``<det>/...``, ``UserDataCfg/<det>/...`` or ``Sums/<det>_<sum>``."""
    parts = normalize_key(path).split("/")
    dets = detectors(f)
    if parts[0] == "UserDataCfg" and len(parts) > 2:
        return parts[1]
    if parts[0] == "Sums" and len(parts) == 2:
        best = [d for d in dets if parts[1].startswith(d + "_")]
        return max(best, key=len) if best else None
    return parts[0] if len(parts) > 1 and parts[0] in dets else None


def geometry(f: h5py.File, det: str):
    """(x_um, y_um, pixel_um) of a detector from /UserDataCfg/<det>, or None when x or y is missing.

    ``pixel_um`` is the stored ``pixel_um`` when the file has it, else the median distance between
    neighbouring pixels along the columns.
    """
    g = f.get(f"UserDataCfg/{det}")
    if g is None or "x" not in g or "y" not in g:
        return None
    x, y = g["x"][()].astype(np.float64), g["y"][()].astype(np.float64)
    if "pixel_um" in g:
        pixel = float(g["pixel_um"][()])
    else:
        pixel = float(np.median(np.hypot(np.diff(x, axis=-1), np.diff(y, axis=-1)))) if x.shape[-1] > 1 else 1.0
    return x, y, pixel
