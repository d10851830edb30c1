"""Per-item outputs (droplets, photons: SPEC section 6) in a result file, padding left out, for ``gpusmall plot``.

A function with per-item outputs (``droplet``, ``photons``) stores ``<det>/<full>_<field>`` (``field``: ``data``,
``npix``, ``row``, ``col``, ``tile``) in one of two layouts:

* ``ragged``: flat (items of the run,), attributes ``items_count`` / ``items_offset``: every entry is an item;
* ``padded``: (events, max_items), ``/UserDataCfg/<det>/<full>__layout == "padded"``, event ``e``'s items in
  ``[e, :n[e]]`` and 0 after them, where ``n = <full>_n<X> - <full>_n<X>_truncated`` (``nDroplets``,
  ``nPhotons``: the items stored per event).

smalldata_tools' second names (``<full>_sparse_<field>``, ``var_<full>_sparse/<field>``, root attribute
``aliases``) are followed to the dataset they name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import h5py
import numpy as np

from ..errors import InputError
from .results import detector_of, normalize_key


def _text(v) -> str:
    v = v[()] if isinstance(v, h5py.Dataset) else v
    return v.decode() if isinstance(v, bytes) else str(v)


@dataclass
class ItemList:
    """One per-item output of a result file.

    Attributes:
        key: the dataset (after smalldata_tools' aliases), ``<det>/<full>_<field>``.
        det, full, field: its detector, function output name (``droplet``, ``droplet_photons``) and field.
        layout: ``ragged`` or ``padded``.
        stored: padded only: (events,) int64, the items stored per event (the rest of each row is padding).
    """

    key: str
    det: str | None
    full: str
    field: str
    layout: str
    stored: np.ndarray | None = None

    def sibling(self, field: str) -> str:
        """The key of another field of the same items (``row`` -> ``col``)."""
        return f"{self.key.rsplit('/', 1)[0]}/{self.full}_{field}"

    def values(self, f: h5py.File, field: str | None = None, chunk: int = 4096) -> np.ndarray:
        """(items,) float64 values of ``field`` (default: this one), padding left out."""
        d = f[self.sibling(field) if field else self.key]
        if self.layout == "ragged":
            return d[()].astype(np.float64).ravel()
        assert self.stored is not None
        out = []
        for a in range(0, d.shape[0], chunk):
            v = d[a : a + chunk]
            keep = np.arange(v.shape[1])[None, :] < self.stored[a : a + chunk, None]
            out.append(v[keep].astype(np.float64))
        return np.concatenate(out) if out else np.zeros(0)


def resolve_alias(f: h5py.File, key: str) -> str:
    """The dataset a smalldata_tools second name stands for (root attribute ``aliases``), else ``key``."""
    key = normalize_key(key)
    try:
        aliases = json.loads(f.attrs.get("aliases", "{}"))
    except (TypeError, ValueError):
        return key
    return normalize_key(aliases.get(key, key))


def item_list(f: h5py.File, key: str) -> ItemList | None:
    """The :class:`ItemList` of dataset ``key``, or None when it is not a per-item output."""
    key = resolve_alias(f, key)
    d = f.get(key)
    if not isinstance(d, h5py.Dataset):
        return None
    tail = key.rsplit("/", 1)[-1]
    det = detector_of(f, key)
    if "items_count" in d.attrs:
        count = _text(d.attrs["items_count"])
        full = count.rsplit("_", 1)[0]
        if tail.startswith(full + "_"):
            return ItemList(key, det, full, tail[len(full) + 1 :], "ragged")
        return ItemList(key, det, tail, "", "ragged")
    cfg = f.get(f"UserDataCfg/{det}") if det else None
    if d.ndim != 2 or not isinstance(cfg, h5py.Group):
        return None
    fulls = [n[: -len("__layout")] for n in cfg if n.endswith("__layout") and _text(cfg[n]) == "padded"]
    fulls = sorted((s for s in fulls if tail.startswith(s + "_")), key=len, reverse=True)
    if not fulls:
        return None
    full = fulls[0]
    field = tail[len(full) + 1 :].removeprefix("sparse_")
    group = d.parent
    stored = None
    for name in group:
        if name.startswith(f"{full}_n") and f"{name}_truncated" in group and not name.endswith("_all"):
            n, cut = group[name], group[f"{name}_truncated"]
            if n.shape == cut.shape == (d.shape[0],):
                stored = np.clip(n[()].astype(np.int64) - cut[()].astype(np.int64), 0, d.shape[1])
                break
    if stored is None:
        raise InputError(
            f"plot: {key!r} is a padded per-item output of {full!r} but the file has no "
            f"{full}_n<items> and {full}_n<items>_truncated to tell items from padding"
        )
    return ItemList(key, det, full, field, "padded", stored)
