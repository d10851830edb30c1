"""CsPad (32 panels) and CsPad 140k (``cs140k``, 2 panels) of 185 x 388 pixels, one gain range (SPEC section 1).

A panel is one 2x1 section: two ASICs of 185 x 194 pixels side by side (the boundary between columns
193 and 194). Raw data are int16 ADU (all bits are data), pixels 109.92 um (the wide pixels at the
ASIC boundary are not modelled: give x, y in the constants file or psana's geometry for them).

Unbonded pixels: in every section, (r, r) and (r, r + 194) for r = 10, 20, ..., 180 (36 pixels),
as psana has them. They are the ``unbonded`` mask source (SPEC section 5) when the constants file
has no ``unbonded`` dataset, and the reference of ``common_mode: {type: unbonded}`` (smalldata_tools
CsPad mode 5).

Default common mode: ``zero_peak`` with ``method: psana`` (smalldata_tools CsPad mode 1), see
:class:`gpusmall.calib.common_mode.ZeroPeakCommonMode`.
"""

from __future__ import annotations

from .base import DetectorModel

SECTION_ROWS, SECTION_COLS = 185, 388
ASIC_COLS = 194
UNBONDED_PIXELS = tuple((r, c) for r in range(10, SECTION_ROWS, 10) for c in (r, r + ASIC_COLS))
"""(row, col) of the 36 unbonded pixels of a 2x1 section (psana: ``applyCModeUnbond``)."""


def _cspad(type_name: str, panels: int) -> DetectorModel:
    return DetectorModel(
        type=type_name,
        panel_shape=(SECTION_ROWS, SECTION_COLS),
        default_panels=panels,
        data_mask=0,  # int16, all bits are data
        gain_names=("G",),
        pixel_um=109.92,
        saturation=None,  # the dtype's maximum
        bank_shape=None,  # common mode per 2x1 section (the whole panel)
        asic_rows=(),
        asic_cols=(ASIC_COLS,),
        default_common_mode={"type": "zero_peak", "method": "psana"},
        unbonded_pixels=UNBONDED_PIXELS,
    )


CSPAD = _cspad("cspad", 32)
CS140K = _cspad("cs140k", 2)
