"""ePix10ka (quad: 4 panels, 2M: 16 panels) of 352 x 384 pixels, 7 gain ranges (SPEC section 1)."""

from __future__ import annotations

import numpy as np

from .base import INVALID_GAIN, DetectorModel

CONFIG_BITS_MASK = 0x1F
"""The per-pixel control bits c are 5 bits (bit 4 = trbit); kernels/calib.cu masks them the same way."""

# (index, mask, value) in the order SPEC tests them: b = config_bits | (data_bit14 << 5)
RANGE_CONDITIONS = (
    (0, 28, 28),  # FH  fixed high
    (1, 28, 12),  # FM  fixed medium
    (2, 12, 8),  # FL  fixed low
    (3, 60, 16),  # AHL-H auto high->low, in high
    (4, 60, 0),  # AML-M auto medium->low, in medium
    (5, 60, 48),  # AHL-L auto high->low, switched to low
    (6, 60, 32),  # AML-L auto medium->low, switched to low
)


class Epix10ka(DetectorModel):
    def decode_gain(self, raw, config_bits=None, xp=np):
        d = ((raw >> 14) & 1).astype(xp.uint8)
        if config_bits is None:
            # no configuration: auto-ranging high->low, d == 0 -> AHL-H (3), d == 1 -> AHL-L (5)
            return xp.where(d == 0, xp.int8(3), xp.int8(5)).astype(xp.int8, copy=False)
        # c: the 5 control bits (bits 5-7 of a configuration byte are not part of it; psana masks them too)
        b = (xp.asarray(config_bits, dtype=xp.uint8) & xp.uint8(CONFIG_BITS_MASK)) | (d << 5)
        out = xp.full(raw.shape, INVALID_GAIN, dtype=xp.int8)
        # the first condition that holds wins: assign in reverse order
        for index, mask, value in reversed(RANGE_CONDITIONS):
            out = xp.where((b & mask) == value, xp.int8(index), out)
        return out

    def ranges_met(self, config_bits=None, mask=None):
        """Per kept pixel, the ranges its configuration gives for data bit 14 = 0 and 1 (a fixed-gain
        FH pixel meets only 0, an auto-ranging AHL pixel 3 and 5); without configuration bits the
        SPEC's auto-ranging high->low: {3, 5}."""
        if config_bits is None:
            return {3, 5}
        c = np.asarray(config_bits, np.uint8)
        keep = np.ones(c.shape, bool) if mask is None else np.asarray(mask, bool)
        met = set()
        for d in (0, 1):
            raw = np.full((1, *c.shape), d << 14, np.uint16)
            g = self.decode_gain(raw, c, np)[0][keep]
            met |= {int(v) for v in np.unique(g) if v != INVALID_GAIN}
        return met


EPIX10KA = Epix10ka(
    type="epix10ka",
    panel_shape=(352, 384),
    default_panels=16,
    data_mask=0x3FFF,
    gain_names=("FH", "FM", "FL", "AHL-H", "AML-M", "AHL-L", "AML-L"),
    pixel_um=100.0,
    saturation=0x3FFF,
    bank_shape=(176, 48),
    asic_rows=(176,),
    asic_cols=(192,),
    high_gain_ranges=(0, 1, 3, 4),
    default_common_mode={"type": "median", "axes": ["rows", "cols"], "gain_ranges": "high"},
    # the switched-to-low ranges of the auto modes cannot be seen in a dark run; psana derives them
    # from charge-injection offsets, which gpusmall does not have: darks take FL's (SPEC section 2)
    derived_ranges=((5, 2), (6, 2)),
    gain_bits=1,  # bit 14 (with the configuration byte's control bits: decode_gain)
)
