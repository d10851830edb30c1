"""What a detector family is: panel layout, data bits, gain ranges, banks, ASIC boundaries.

A detector model is a small frozen description plus one method, :meth:`DetectorModel.gain_index`,
that decodes the per-pixel gain range of a raw batch. Adding a detector means adding one module
with one model (see ``epix10ka.py``) and registering it in ``detectors/__init__.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..errors import InputError

INVALID_GAIN = -1
"""Gain index of a pixel whose gain bits are invalid in that event (the pixel is bad then)."""


@dataclass(frozen=True)
class DetectorModel:
    """A detector family (SPEC section 1).

    Attributes:
        type: config name (``epix10ka``, ``jungfrau``, ``epix100``, ``camera``).
        panel_shape: (rows, cols) of one panel, or None where the config gives it (cameras).
        default_panels: panels when the config gives no shape.
        data_mask: bits of the raw word that hold the ADU value.
        gain_names: one name per gain range; ``len(gain_names)`` ranges.
        pixel_um: pixel pitch in micrometres (None: from the config, 1 = pixel units).
        saturation: raw value (after ``data_mask``) at and above which a pixel counts as saturated.
        bank_shape: (rows, cols) of a common-mode bank (None: the whole panel).
        asic_rows, asic_cols: first row/col index of each ASIC after the first, inside a panel.
        high_gain_ranges: gain ranges that take part in common mode with ``gain_ranges: high``.
        default_common_mode: common-mode parameters used when the config gives none; for a config
            whose ``common_mode.type`` is this one's, the parameters it does not give.
        derived_ranges: (range, from range) pairs: gain ranges a dark run cannot measure, whose
            pedestal and noise ``gpusmall darks`` takes from another range (ePix10ka: AHL-L and
            AML-L from FL; SPEC section 2).
        unbonded_pixels: (row, col) of each pixel of a panel whose sensor is not bonded (CsPad:
            the common-mode reference of ``common_mode: unbonded``); the ``unbonded`` mask source
            (SPEC section 5) when the constants file gives none.
        invalid_ranges: gain ranges decoded as invalid (``INVALID_GAIN``: the pixel is bad in that
            event): a run whose constants lack them (:meth:`with_invalid_ranges`); empty for the
            registered models.
        gain_shift, gain_bits: the raw word's bits that (with the pixel's configuration byte) decide its
            gain range, ``(raw >> gain_shift) & gain_bits`` (0: one range, the raw word says nothing).
            The CUDA calibration kernels decode through :meth:`gain_table`, built from
            :meth:`gain_index` itself: a new detector declares these bits and its ``decode_gain``,
            nothing else.
    """

    type: str
    panel_shape: tuple[int, int] | None
    default_panels: int
    data_mask: int
    gain_names: tuple[str, ...]
    pixel_um: float | None
    saturation: int | None
    bank_shape: tuple[int, int] | None
    asic_rows: tuple[int, ...] = ()
    asic_cols: tuple[int, ...] = ()
    high_gain_ranges: tuple[int, ...] = (0,)
    default_common_mode: dict[str, Any] = field(default_factory=lambda: {"type": "none"})
    derived_ranges: tuple[tuple[int, int], ...] = ()
    unbonded_pixels: tuple[tuple[int, int], ...] = ()
    invalid_ranges: tuple[int, ...] = ()
    gain_shift: int = 14
    gain_bits: int = 0

    @property
    def n_gains(self) -> int:
        return len(self.gain_names)

    def range_names(self, ranges) -> str:
        """``"AHL-L (5), AML-L (6)"``: names and indices of gain ranges, for messages."""
        return ", ".join(f"{self.gain_names[r]} ({r})" for r in ranges)

    def gain_index(self, raw, config_bits=None, xp=np):
        """Gain range per pixel (:meth:`decode_gain`, then ``invalid_ranges`` made invalid).

        Args:
            raw: (events, panels, rows, cols) raw words.
            config_bits: (panels, rows, cols) uint8 pixel configuration, where the family has it.
            xp: array module of ``raw``.
        Returns:
            (events, panels, rows, cols) int8 gain index, ``INVALID_GAIN`` where undecodable.
        """
        g = self.decode_gain(raw, config_bits, xp)
        for r in self.invalid_ranges:
            g = xp.where(g == r, xp.int8(INVALID_GAIN), g).astype(xp.int8, copy=False)
        return g

    def gain_table(self, with_config: bool) -> np.ndarray:
        """The gain range (int8, ``INVALID_GAIN``) per key ``((raw >> gain_shift) & gain_bits) << 8 | config``
        (config: the pixel's configuration byte, 0 ``with_config`` False), as :meth:`gain_index` decodes
        it (``invalid_ranges`` included): ``(gain_bits + 1) * 256`` entries. The CUDA calibration kernels
        read it (kernels/calib.cu), so they decode as this model does."""
        if (self.gain_bits << self.gain_shift) >> 16:
            raise ValueError(
                f"{self.type}: gain bits {self.gain_bits:#x} << {self.gain_shift} are not in a 16-bit word"
            )
        keys = np.arange((self.gain_bits + 1) * 256)
        words = ((keys >> 8) << self.gain_shift).astype(np.uint16).reshape(1, 1, 1, -1)
        cfg = (keys & 0xFF).astype(np.uint8).reshape(1, 1, -1) if with_config else None
        return np.ascontiguousarray(np.asarray(self.gain_index(words, cfg, np), np.int8).reshape(-1))

    def decode_gain(self, raw, config_bits=None, xp=np):
        """The gain range the raw words say (SPEC section 1); single-range families: 0."""
        return xp.zeros(raw.shape, dtype=xp.int8)

    def ranges_met(self, config_bits=None, mask=None) -> set[int] | None:
        """The gain ranges a run can meet, known before its events: the set, or None when the
        family's gain mode is not known from its configuration (e.g. JUNGFRAU: dynamic gain meets
        0, 1, 2, a forced-gain mode fewer, and the sources do not say which).

        Args:
            config_bits: (panels, rows, cols) pixel configuration the run uses, or None.
            mask: (panels, rows, cols) bool static mask; only pixels that are kept count (None: all).
        """
        return {0} if self.n_gains == 1 else None

    def with_invalid_ranges(self, ranges) -> DetectorModel:
        """This model, with the pixels of gain ranges ``ranges`` decoded as invalid (bad in the event)."""
        return replace(self, invalid_ranges=tuple(sorted(set(self.invalid_ranges) | set(int(r) for r in ranges))))

    def unbonded_mask(self, shape) -> np.ndarray | None:
        """(panels, rows, cols) bool, True on the model's :attr:`unbonded_pixels` of every panel
        (None when the family has none, or the panels are too small to hold them)."""
        if not self.unbonded_pixels:
            return None
        p, r, c = (int(v) for v in shape)
        rows, cols = np.asarray(self.unbonded_pixels, np.intp).T
        if rows.max() >= r or cols.max() >= c:
            return None
        m = np.zeros((p, r, c), bool)
        m[:, rows, cols] = True
        return m

    def check_raw_dtype(self, det: str, dtype) -> None:
        """InputError unless ``dtype`` is an integer type (SPEC section 1: every family's raw data is
        integer; the gain bits of a gain-switching detector cannot be read from floats)."""
        dtype = np.dtype(dtype)
        if dtype.kind not in "iu":
            raise InputError(
                f"detector {det}: raw data of dtype {dtype} cannot be calibrated: "
                f"{self.type} raw data must be of an integer type (SPEC section 1)"
            )

    def data(self, raw, xp=np):
        """ADU value of each pixel, ``raw & data_mask``, as the raw dtype."""
        if self.data_mask == 0 or raw.dtype.kind == "f":
            return raw
        return raw & raw.dtype.type(self.data_mask)

    def saturation_value(self, dtype) -> float:
        """Saturation threshold for data of ``dtype`` (a camera saturates at its dtype's maximum)."""
        if self.saturation is not None:
            return float(self.saturation)
        dtype = np.dtype(dtype)
        return float(np.iinfo(dtype).max) if dtype.kind in "iu" else float("inf")

    def banks(self, panel_shape: tuple[int, int]) -> tuple[int, int]:
        """(bank rows, bank cols) for a panel of this shape (whole panel when the family has no banks)."""
        return tuple(self.bank_shape) if self.bank_shape is not None else tuple(panel_shape)  # type: ignore[return-value]
