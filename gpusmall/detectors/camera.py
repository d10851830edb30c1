"""Any 2-D camera (Opal, Alvium, Zyla, ...): one panel of any shape, one gain range (SPEC section 1)."""

from .base import DetectorModel

CAMERA = DetectorModel(
    type="camera",
    panel_shape=None,
    default_panels=1,
    data_mask=0,  # all bits are data
    gain_names=("G",),
    pixel_um=None,  # from the config; 1 = pixel units
    saturation=None,  # the dtype's maximum
    bank_shape=None,  # one bank
    default_common_mode={"type": "none"},
)
