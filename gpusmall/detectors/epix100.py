"""ePix100: one panel of 704 x 768 pixels, one gain range (SPEC section 1)."""

from .base import DetectorModel

EPIX100 = DetectorModel(
    type="epix100",
    panel_shape=(704, 768),
    default_panels=1,
    data_mask=0,  # all bits are data
    gain_names=("G",),
    pixel_um=50.0,
    saturation=None,
    bank_shape=(352, 96),
    asic_rows=(352,),
    asic_cols=(384,),
    default_common_mode={"type": "epix100"},
)
