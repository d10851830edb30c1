"""Calibration: raw -> calibrated (SPEC section 3) and common mode (section 4)."""

from .calibrate import Calibrator, calibrate_reference, unit_scale
from .common_mode import make_common_mode

__all__ = ["Calibrator", "calibrate_reference", "make_common_mode", "unit_scale"]
