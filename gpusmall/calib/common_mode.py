"""Common-mode correction (SPEC section 4), computed per event on pedestal-subtracted ADU.

:func:`make_common_mode` turns the config into a corrector ``(s, good, g) -> s`` working on
(events, panels, rows, cols) arrays of the run's backend, or returns None (``none``) or the
string ``"raw"`` (skip calibration).
"""
from __future__ import annotations

from ..errors import InputError


def make_common_mode(det: str, cfg, model, constants, backend):
    """A corrector for ``cfg`` (a CommonModeConfig or None = the model's default)."""
    ctype = cfg.type if cfg is not None else model.default_common_mode.get("type", "none")
    if ctype == "none":
        return None
    if ctype == "raw":
        return "raw"
    raise InputError(f"detector {det}: common_mode.type {ctype!r} is not implemented yet")
