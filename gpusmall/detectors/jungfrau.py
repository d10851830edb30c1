"""JUNGFRAU (0.5M: 1, 1M: 2, 4M: 8 panels) of 512 x 1024 pixels, 3 gain stages (SPEC section 1)."""

from __future__ import annotations

import numpy as np

from .base import INVALID_GAIN, DetectorModel

# gain bits 14-15 -> stage: 0 -> 0, 1 -> 1, 3 -> 2, 2 is invalid
STAGE_OF_BITS = np.array([0, 1, INVALID_GAIN, 2], dtype=np.int8)


class Jungfrau(DetectorModel):
    """JUNGFRAU; :meth:`ranges_met` is None (unknown): dynamic gain meets stages 0, 1 and 2, a forced
    gain mode fewer, and no source says which mode a run used."""

    def decode_gain(self, raw, config_bits=None, xp=np):
        bits = (raw >> 14) & 3
        return xp.asarray(STAGE_OF_BITS)[bits.astype(xp.intp)]


JUNGFRAU = Jungfrau(
    type="jungfrau",
    panel_shape=(512, 1024),
    default_panels=8,
    data_mask=0x3FFF,
    gain_names=("G0", "G1", "G2"),
    pixel_um=75.0,
    saturation=0x3FFF,
    bank_shape=(256, 64),
    asic_rows=(256,),
    asic_cols=(256, 512, 768),
    high_gain_ranges=(0,),
    default_common_mode={"type": "none"},
    gain_bits=3,  # bits 14-15: STAGE_OF_BITS
)
