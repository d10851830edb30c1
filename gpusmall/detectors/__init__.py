"""Detector models (SPEC section 1), constants (section 2) and static masks (section 5)."""

from __future__ import annotations

from .base import INVALID_GAIN, DetectorModel
from .camera import CAMERA
from .cspad import CS140K, CSPAD
from .epix10ka import EPIX10KA
from .epix100 import EPIX100
from .jungfrau import JUNGFRAU

MODELS: dict[str, DetectorModel] = {m.type: m for m in (EPIX10KA, JUNGFRAU, EPIX100, CAMERA, CSPAD, CS140K)}


def get_model(type_name: str) -> DetectorModel:
    """The model registered under ``type_name``; KeyError lists the known types."""
    try:
        return MODELS[type_name]
    except KeyError:
        raise KeyError(f"unknown detector type {type_name!r}; known: {', '.join(MODELS)}") from None


__all__ = ["INVALID_GAIN", "DetectorModel", "MODELS", "get_model"]
