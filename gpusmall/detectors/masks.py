"""Static pixel masks, computed once per run (SPEC section 5). 1 = keep, 0 = bad.

``mask = status_ok & edges & central & unbonded & user & calib``; ``unbonded`` comes from the
constants file, or from the model (CsPad's unbonded pixels) when the file has none. ``cmask`` is the same mask (it
includes ``user`` and ``calib``), kept under both names for smalldata_tools notebooks.
All arrays are (panels, rows, cols) bool.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
from scipy import ndimage

from ..errors import InputError
from .base import DetectorModel
from .constants import Constants


def edge_mask(shape, n: int) -> np.ndarray:
    """0 on the outer ``n`` rows and columns of every panel."""
    m = np.ones(shape, bool)
    if n > 0:
        m[:, :n, :] = m[:, -n:, :] = False
        m[:, :, :n] = m[:, :, -n:] = False
    return m


def central_mask(shape, model: DetectorModel, n: int) -> np.ndarray:
    """0 on ``n`` rows/cols each side of every ASIC boundary inside a panel."""
    m = np.ones(shape, bool)
    if n > 0:
        for r in model.asic_rows:
            m[:, max(r - n, 0) : r + n, :] = False
        for c in model.asic_cols:
            m[:, :, max(c - n, 0) : c + n] = False
    return m


def grow_bad(bad: np.ndarray, neighbours: int) -> np.ndarray:
    """Bad pixels plus their 4 or 8 neighbours within each panel (neighbours 0: unchanged)."""
    if neighbours == 0:
        return bad
    structure = ndimage.generate_binary_structure(2, 1 if neighbours == 4 else 2)
    return ndimage.binary_dilation(bad, structure=structure[None])


def read_user_mask(source, det: str, shape) -> np.ndarray:
    """A user mask from ``FILE.npy`` or ``FILE.h5:/dataset`` (1 = keep) of the detector shape
    (panels, rows, cols); a single-panel detector (camera, epix100) may give (rows, cols).
    Returns (panels, rows, cols) bool; InputError when it cannot be read, is not a dataset or has
    another shape."""
    s = str(source)
    try:
        if s.endswith(".npy"):
            m = np.load(s)
        else:
            file, _, dset = s.partition(":")
            with h5py.File(file, "r") as f:
                obj = f[dset or "mask"]
                if not isinstance(obj, h5py.Dataset):
                    raise InputError(f"detector {det}: mask.user {s!r} is not a dataset")
                m = obj[()]
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"detector {det}: mask.user {s!r} cannot be read: {exc}") from None
    m = np.asarray(m)
    shape = tuple(shape)
    if len(shape) == 3 and shape[0] == 1 and m.shape == shape[1:]:
        m = m.reshape(shape)
    if m.shape != shape:
        expected = f"{shape} or {shape[1:]}" if len(shape) == 3 and shape[0] == 1 else f"{shape}"
        raise InputError(f"detector {det}: mask.user {s!r} has shape {m.shape}, expected {expected}")
    return m != 0


def static_mask(
    det: str,
    model: DetectorModel,
    shape,
    constants: Constants,
    *,
    status: bool = True,
    edges: int = 0,
    central: int = 0,
    unbonded: bool = True,
    neighbours: int = 0,
    user=None,
    calib: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(mask, cmask), each (panels, rows, cols) bool, 1 = keep (SPEC section 5)."""
    shape = tuple(shape)
    m = np.ones(shape, bool)
    if status and constants.status is not None:
        m &= constants.status == 0
    m &= edge_mask(shape, edges)
    m &= central_mask(shape, model, central)
    if unbonded:  # the constants file's, else the model's own (CsPad)
        u = constants.unbonded != 0 if constants.unbonded is not None else model.unbonded_mask(shape)
        if u is not None:
            m &= ~grow_bad(u, neighbours)
    if user is not None:
        m &= read_user_mask(Path(user) if not isinstance(user, str) else user, det, shape)
    if calib and constants.mask is not None:
        m &= constants.mask != 0
    return m, m.copy()
