"""Small FrameContexts and Frames for the reduction-function tests."""

from __future__ import annotations

import numpy as np

from gpusmall.detectors import get_model
from gpusmall.detectors.constants import default_geometry
from gpusmall.funcs import FrameContext, Frames


def make_ctx(backend, shape, pixel_um=100.0, mask=None, noise=None, geometry=None, det_type="epix100"):
    x, y, z = geometry if geometry is not None else default_geometry(shape, pixel_um)
    mask = np.ones(shape, bool) if mask is None else mask
    noise = np.full(shape, 3.0, np.float32) if noise is None else noise
    d = backend.to_device
    return FrameContext(
        det="det",
        model=get_model(det_type),
        backend=backend,
        shape=tuple(shape),
        mask=d(mask),
        noise=d(np.asarray(noise, np.float32)),
        x=d(x),
        y=d(y),
        z=d(z),
        pixel_um=pixel_um,
    )


def make_frames(backend, data, good=None):
    data = np.asarray(data, np.float32)
    good = np.ones(data.shape, bool) if good is None else good
    data = np.where(good, data, 0).astype(np.float32)
    return Frames(backend.to_device(data), backend.to_device(good))


def setup(cls, backend, ctx, children=(), **params):
    f = cls(cls.Params(**params), list(children))
    f.setup(ctx)
    return f
