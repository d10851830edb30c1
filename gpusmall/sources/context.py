"""Per-event context (SPEC 10): what each name holds, and the value of a missing one.

Names are smalldata_tools': ``lightStatus/xray``, ``lightStatus/laser`` (uint8 0/1), ``scan/varStep`` (int64),
``scan/<variable>``, ``epics/<pv>`` and any configured value such as ``ipm/sum`` (float64). A value the source
lacks in an event is :func:`missing_value`: NaN for floats, -1 for ``scan/varStep``, 255 for the light status
(neither on nor off, so no selection on it takes the event); the run counts them per name.
"""

from __future__ import annotations

import numpy as np

LIGHT_STATUS = ("lightStatus/xray", "lightStatus/laser")
MISSING_STATUS = 255
RENAMED = {"scan/step": "scan/varStep"}
"""Context names of earlier releases -> today's, still accepted in configs (``cube.by``, ``cube.norm``,
selection keys). ``scan/step`` became smalldata_tools' ``scan/varStep``: SmallDataAna takes every
``scan/<name>`` without ``var`` in it for a scan variable."""


def current_name(name: str) -> str:
    """Today's name of context ``name`` (:data:`RENAMED`)."""
    return RENAMED.get(name, name)


def context_dtype(name: str) -> np.dtype:
    """The dtype of context ``name``: uint8 for the light status, int64 for ``scan/varStep``, float64 otherwise."""
    if name.startswith("lightStatus/"):
        return np.dtype(np.uint8)
    if name == "scan/varStep":
        return np.dtype(np.int64)
    return np.dtype(np.float64)


def missing_value(name: str):
    """What an event holds for context ``name`` when the source has no value."""
    kind = context_dtype(name).kind
    if kind == "f":
        return np.nan
    return MISSING_STATUS if kind == "u" else -1


def is_missing(name: str, values: np.ndarray) -> np.ndarray:
    """(events,) bool: the events whose ``values`` of context ``name`` are missing."""
    v = np.asarray(values)
    if v.dtype.kind == "f":
        return ~np.isfinite(v)
    return v == missing_value(name)


def as_context(name: str, values) -> np.ndarray:
    """``values`` (events,) as context ``name`` holds them: cast to :func:`context_dtype`, a non-finite value
    (or one that does not fit, for integers) is the missing value."""
    dtype = context_dtype(name)
    v = np.asarray(values)
    if v.dtype.kind == "b":
        v = v.astype(np.uint8)
    if dtype.kind == "f":
        return v.astype(np.float64)
    f = v.astype(np.float64)
    info = np.iinfo(dtype)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(f) | (f < info.min) | (f > info.max)
        if name.startswith("lightStatus/"):
            bad |= (f != 0) & (f != 1)
    out = np.where(bad, 0, f).astype(dtype)
    out[bad] = missing_value(name)
    return out
