"""Calibration constants of one detector (SPEC section 2): load, validate, default, save.

Shapes: ``pedestal`` and ``gain`` (gains, panels, rows, cols) float32 (ADU, ADU/keV); ``noise``
(panels, rows, cols) or (gains, panels, rows, cols) float32 ADU rms; ``status`` (panels, rows, cols)
0 = good; ``x``, ``y``, ``z`` (panels, rows, cols) float32 micrometres; ``config_bits`` (panels, rows,
cols) uint8; ``unbonded`` (panels, rows, cols) 1 = unbonded; ``mask`` (panels, rows, cols) 1 = keep;
``gain_ranges_measured`` (gains,) uint8, per gain range 0 = not measured (no pedestal: 0 there),
1 = measured by a dark run, 2 = derived from another range (``gpusmall darks`` writes it; a file
without it, an older or a user's file, is taken as it is).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path

import h5py
import numpy as np

from ..errors import ConstantsError
from ..io.writer import LIBVER, storable_array
from .base import DetectorModel
from .epix10ka import CONFIG_BITS_MASK

log = logging.getLogger(__name__)

PER_GAIN = ("pedestal", "gain")
PER_PIXEL = ("status", "x", "y", "z", "config_bits", "unbonded", "mask")


@dataclass
class Constants:
    """Host-side constants of one detector; every array is (panels, rows, cols) or (gains, ...)."""

    pedestal: np.ndarray
    gain: np.ndarray
    noise: np.ndarray | None = None
    status: np.ndarray | None = None
    x: np.ndarray | None = None
    y: np.ndarray | None = None
    z: np.ndarray | None = None
    config_bits: np.ndarray | None = None
    unbonded: np.ndarray | None = None
    mask: np.ndarray | None = None
    gain_ranges_measured: np.ndarray | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def save(self, path) -> None:
        """Write every array at the root of an HDF5 file (the format :func:`load_constants` reads), in the
        format of HDF5 1.10 (:data:`gpusmall.io.writer.LIBVER`), booleans as uint8."""
        from .. import __version__

        with h5py.File(path, "w", libver=LIBVER) as f:
            f.attrs["gpusmall_version"] = __version__  # gpusmall wrote it: a later darks may overwrite it
            f.attrs["gpusmall_kind"] = "constants"
            for name, arr in self.arrays().items():
                f.create_dataset(
                    name, data=storable_array(np.asarray(arr)), compression="gzip", compression_opts=1, shuffle=True
                )


def default_geometry(shape: tuple[int, int, int], pixel_um: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x = (col + 0.5) * pixel_um, y = (row + 0.5) * pixel_um, z = 0 for every panel (um)."""
    p, r, c = shape
    y, x = np.meshgrid((np.arange(r) + 0.5) * pixel_um, (np.arange(c) + 0.5) * pixel_um, indexing="ij")
    x = np.broadcast_to(x, shape).astype(np.float32)
    y = np.broadcast_to(y, shape).astype(np.float32)
    return x, y, np.zeros(shape, np.float32)


def _check_finite(det: str, name: str, arr: np.ndarray) -> None:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = np.unravel_index(np.flatnonzero(~np.isfinite(arr))[0], arr.shape)
        raise ConstantsError(
            f"detector {det}: constants dataset {name!r} is not finite at pixel {tuple(map(int, bad))}"
        )


def _per_gain(det: str, name: str, arr, n_gains: int, shape, optional_gains: bool) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float32)
    if arr.shape == tuple(shape) and (optional_gains or n_gains == 1):
        arr = np.broadcast_to(arr, (n_gains, *shape)).copy()
    if arr.shape != (n_gains, *shape):
        raise ConstantsError(
            f"detector {det}: constants dataset {name!r} has shape {arr.shape}, expected {(n_gains, *shape)}"
        )
    _check_finite(det, name, arr)
    return arr


def validate_constants(det: str, model: DetectorModel, shape, c: Constants) -> Constants:
    """Check shapes against the detector, NaN/inf and zero gains; broadcast single-range arrays.

    Raises ConstantsError naming the detector, the dataset and the first bad pixel.
    """
    shape = tuple(int(s) for s in shape)
    n = model.n_gains
    c.pedestal = _per_gain(det, "pedestal", c.pedestal, n, shape, optional_gains=False)
    c.gain = _per_gain(det, "gain", c.gain, n, shape, optional_gains=True)
    if (c.gain <= 0).any():
        i = int(np.flatnonzero(c.gain <= 0)[0])
        bad = np.unravel_index(i, c.gain.shape)
        raise ConstantsError(
            f"detector {det}: constants dataset 'gain' is {float(c.gain.flat[i]):g} at (gain, "
            f"panel, row, col) {tuple(map(int, bad))}; gains are positive (ADU per keV)"
        )
    if c.noise is not None:
        c.noise = np.asarray(c.noise, np.float32)
        if c.noise.shape not in (shape, (n, *shape)):
            raise ConstantsError(
                f"detector {det}: constants dataset 'noise' has shape {c.noise.shape}, "
                f"expected {shape} or {(n, *shape)}"
            )
        _check_finite(det, "noise", c.noise)
        if (c.noise < 0).any():
            i = int(np.flatnonzero(c.noise < 0)[0])
            raise ConstantsError(
                f"detector {det}: constants dataset 'noise' is {float(c.noise.flat[i]):g} at "
                f"{tuple(map(int, np.unravel_index(i, c.noise.shape)))}; noise (ADU rms) is not negative"
            )
    for name in PER_PIXEL:
        arr = getattr(c, name)
        if arr is None:
            continue
        arr = np.asarray(arr)
        if arr.shape != shape:
            raise ConstantsError(f"detector {det}: constants dataset {name!r} has shape {arr.shape}, expected {shape}")
        _check_finite(det, name, arr)
        if name in ("status", "unbonded", "mask") and arr.dtype.kind == "f" and (arr != np.round(arr)).any():
            i = int(np.flatnonzero(arr != np.round(arr))[0])
            raise ConstantsError(
                f"detector {det}: constants dataset {name!r} is {float(arr.flat[i])} at "
                f"{tuple(map(int, np.unravel_index(i, arr.shape)))}; expected whole numbers (flags)"
            )
        if name == "config_bits":
            arr = check_config_bits(det, arr, "constants dataset 'config_bits'")
        setattr(c, name, arr)
    if c.gain_ranges_measured is not None:
        c.gain_ranges_measured = _check_measured(det, c.gain_ranges_measured, n)
    return c


RANGE_NOT_MEASURED, RANGE_MEASURED, RANGE_DERIVED = 0, 1, 2
"""Values of ``gain_ranges_measured``: no pedestal, measured by a dark run, derived from another range."""


def _check_measured(det: str, arr, n_gains: int) -> np.ndarray:
    arr = np.asarray(arr)
    what = f"detector {det}: constants dataset 'gain_ranges_measured'"
    if arr.shape != (n_gains,):
        raise ConstantsError(f"{what} has shape {arr.shape}, expected ({n_gains},): one value per gain range")
    if arr.dtype.kind not in "biu" or not np.isin(arr, (RANGE_NOT_MEASURED, RANGE_MEASURED, RANGE_DERIVED)).all():
        raise ConstantsError(
            f"{what} is {arr.tolist()}; expected integers 0 (not measured), 1 (measured) or 2 (derived) per gain range"
        )
    return arr.astype(np.uint8)


def check_measured_ranges(det: str, model: DetectorModel, where: str, c: Constants, mask=None) -> DetectorModel:
    """Refuse constants that lack a gain range the run can meet (SPEC section 2).

    With ``c.gain_ranges_measured`` (files from ``gpusmall darks``) and ranges marked 0 (not measured):

    * when the run's ranges are known before its events (:meth:`DetectorModel.ranges_met`: a
      single-range detector; an ePix10ka from its pixel configuration ``c.config_bits``, or the
      SPEC's auto-ranging high->low without one), a range the run can meet that is not measured is
      a ConstantsError naming the detector, ``where`` (the constants file) and the missing ranges;
    * when they are not (JUNGFRAU: the gain mode is not in the source), a warning names the missing
      ranges, and the returned model decodes them as invalid: a pixel in such a range is bad in that
      event (never calibrated with pedestal 0).

    A file without the record is used as it is. Ranges derived from another one (2) are accepted with
    a warning when the run can meet them. Returns the model to calibrate with.
    """
    m = c.gain_ranges_measured
    if m is None:
        return model
    missing = [r for r in range(model.n_gains) if m[r] == RANGE_NOT_MEASURED]
    derived = [r for r in range(model.n_gains) if m[r] == RANGE_DERIVED]
    held = [r for r in range(model.n_gains) if m[r] != RANGE_NOT_MEASURED]
    met = model.ranges_met(c.config_bits, mask)
    if met is None:
        if missing:
            log.warning(
                "detector %s: constants file %s has no pedestals for gain ranges %s (not measured by its "
                "dark runs); pixels in them are marked bad in those events",
                det,
                where,
                model.range_names(missing),
            )
            return model.with_invalid_ranges(missing)
        return model
    lacking = sorted(set(met) & set(missing))
    if lacking:
        if model.n_gains == 1:
            how = "(its only gain range)"
        elif c.config_bits is not None:
            how = "by its pixel configuration (config_bits)"
        else:
            how = "without configuration bits (decoded as auto-ranging high->low, SPEC section 1)"
        hint = ": make the file with `gpusmall darks` from a dark run in each of these modes" + (
            "; AHL-L and AML-L are derived from FL, so add an FL dark run"
            if set(lacking) & {5, 6} and model.type == "epix10ka"
            else ""
        )
        raise ConstantsError(
            f"detector {det}: constants file {where} lacks gain range(s) {model.range_names(lacking)}, "
            f"which this run can meet {how}; it holds {model.range_names(held) or 'none'}{hint}"
        )
    used = sorted(set(met) & set(derived))
    if used:
        sources = dict(model.derived_ranges)
        log.warning(
            "detector %s: constants file %s: gain ranges %s were not measured but derived (%s): their "
            "pedestals are approximate",
            det,
            where,
            model.range_names(used),
            ", ".join(
                f"{model.gain_names[r]} from {model.gain_names[sources[r]]}" if r in sources else model.gain_names[r]
                for r in used
            ),
        )
    return model


CONFIG_BITS_LIMIT = CONFIG_BITS_MASK + 1
"""ePix10ka pixel control bits are 5 bits (SPEC section 1): 0 <= c < 32."""


def check_config_bits(det: str, arr, what: str) -> np.ndarray:
    """``arr`` as uint8 after checking it holds ePix10ka control bits: an integer dtype, 0 <= c < 32.

    ``what`` names the array in the ConstantsError (e.g. ``constants dataset 'config_bits'``), which
    also gives the first bad pixel.
    """
    arr = np.asarray(arr)
    if arr.dtype.kind not in "iu":
        where = ""
        if arr.dtype.kind == "f":  # name the first value that could not be control bits
            bad = np.flatnonzero(~np.isfinite(arr) | (arr != np.round(arr)) | (arr < 0) | (arr >= CONFIG_BITS_LIMIT))
            if bad.size:
                where = (
                    f"; first bad value {float(arr.flat[bad[0]])} at (panel, row, col) "
                    f"{tuple(map(int, np.unravel_index(bad[0], arr.shape)))}"
                )
        raise ConstantsError(f"detector {det}: {what} has dtype {arr.dtype}, expected an integer dtype (uint8){where}")
    out_of_range = (arr < 0) | (arr >= CONFIG_BITS_LIMIT)
    if out_of_range.any():
        i = int(np.flatnonzero(out_of_range)[0])
        bad = tuple(map(int, np.unravel_index(i, arr.shape)))  # type: ignore[assignment]
        raise ConstantsError(
            f"detector {det}: {what} is {int(arr.flat[i])} at (panel, row, col) {bad}, "
            f"expected 0 <= config_bits < {CONFIG_BITS_LIMIT} (5 control bits)"
        )
    return arr.astype(np.uint8, copy=False)


def select_config_bits(det: str, shape, from_constants, from_source):
    """The ePix10ka pixel configuration a run uses (SPEC section 1: the run's own configuration).

    The source's bits (the run being reduced) whenever the source gives them; the constants file's bits
    only when it gives none (None when neither has any). When both exist and differ, a warning gives the
    number of differing pixels. The source's bits must be (panels, rows, cols) of a non-negative integer
    dtype; only their 5 control bits are kept (``& 0x1F``, as psana does: a configuration word's higher
    bits are something else). ``from_constants`` is already validated (:func:`check_config_bits`).
    """
    if from_source is None:
        return from_constants
    shape = tuple(int(v) for v in shape)
    bits = np.asarray(from_source)
    if bits.shape != shape:
        raise ConstantsError(f"detector {det}: the source's config_bits have shape {bits.shape}, expected {shape}")
    if bits.dtype.kind in "iu" and not (bits < 0).any():
        bits = bits & CONFIG_BITS_MASK
    bits = check_config_bits(det, bits, "the source's config_bits")
    if from_constants is not None:
        differ = int(np.count_nonzero(np.asarray(from_constants) != bits))
        if differ:
            log.warning(
                "detector %s: the run's config_bits differ from the constants file's in %d of %d pixels; "
                "using the run's",
                det,
                differ,
                bits.size,
            )
    return bits


def load_constants(path, det: str, model: DetectorModel, shape) -> Constants:
    """Read and validate a constants file; ConstantsError names the detector and dataset."""
    path = Path(path)
    if not path.is_file():
        raise ConstantsError(f"detector {det}: constants file {str(path)!r} does not exist")
    data = read_constants_file(path, det)
    if "pedestal" not in data:
        if model.n_gains > 1:
            raise ConstantsError(f"detector {det}: constants file {str(path)!r} has no 'pedestal' dataset")
        log.warning("detector %s: constants file %s has no 'pedestal': pedestal 0", det, path)
        data["pedestal"] = np.zeros(shape, np.float32)
    data.setdefault("gain", np.ones(shape, np.float32))
    return validate_constants(det, model, shape, Constants(**data))


KNOWN = tuple(fl.name for fl in fields(Constants))
"""The datasets a constants file may hold at its root (SPEC section 2)."""


def read_constants_file(path: Path, det: str) -> dict[str, np.ndarray]:
    """The root datasets of a constants file, validated like a config: ConstantsError (exit 2) for a file
    that is not HDF5, holds none of :data:`KNOWN`, holds anything else (a misspelt name is named, with the
    closest known one), a group where a dataset belongs, or data that is not numbers."""
    import difflib

    where = f"detector {det}: constants file {str(path)!r}"
    try:
        with h5py.File(path, "r") as f:
            items = {k: f[k] for k in f}
            for k, obj in items.items():
                if k not in KNOWN:
                    close = difflib.get_close_matches(k, KNOWN, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise ConstantsError(
                        f"{where}: unknown dataset {k!r}{hint}; a constants file holds {', '.join(KNOWN)}"
                    )
                if not isinstance(obj, h5py.Dataset):
                    raise ConstantsError(f"{where}: {k!r} is a group, not a dataset")
                if obj.dtype.kind not in "biuf":
                    raise ConstantsError(f"{where}: dataset {k!r} has dtype {obj.dtype}, not numbers")
            data = {k: obj[()] for k, obj in items.items()}
    except OSError as exc:
        raise ConstantsError(f"{where}: cannot read it: {exc}") from None
    if not data:
        raise ConstantsError(f"{where} is empty; a constants file holds {', '.join(KNOWN)} (pedestal at least)")
    return data


def default_constants(model: DetectorModel, shape) -> Constants:
    """Constants for a detector without a constants file: zero pedestal, unit gain (single-range only)."""
    shape = tuple(shape)
    return Constants(
        pedestal=np.zeros((model.n_gains, *shape), np.float32),
        gain=np.ones((model.n_gains, *shape), np.float32),
    )
