"""Reduction functions (SPEC section 6), one module each, registered by config ``type``."""

from __future__ import annotations

from .acf import Acf
from .azav import Azav
from .base import FrameContext, Frames, FunctionParams, ReductionFunction
from .droplet import Droplet
from .photon_count import PhotonCount
from .photons import Photons
from .projection import Projection
from .python import PythonFunction
from .rebin import Rebin
from .roi import Roi

FUNCTIONS: dict[str, type[ReductionFunction]] = {
    f.type: f for f in (Roi, Projection, Rebin, Azav, Droplet, Photons, PhotonCount, Acf, PythonFunction)
}


def build_function(spec) -> ReductionFunction:
    """A function tree from a validated :class:`~gpusmall.producer.config.FunctionSpec`."""
    return FUNCTIONS[spec.type](spec.params, [build_function(c) for c in spec.children])


__all__ = ["FUNCTIONS", "FrameContext", "Frames", "FunctionParams", "ReductionFunction", "build_function"]
