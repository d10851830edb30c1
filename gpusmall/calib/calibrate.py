"""Raw -> calibrated (SPEC section 3) for one detector, on either backend.

:class:`Calibrator` holds the constants on the device (moved once per run) and turns a raw batch
(events, panels, rows, cols) into :class:`~gpusmall.funcs.base.Frames`: float32 in the run's
units with bad pixels set to 0, plus the per-event good-pixel map.

The NumPy path (:func:`calibrate_reference`) reads like the formulas and is the test oracle of the
fused CUDA kernel ``kernels/calib.cu:calibrate_u16``.
"""
from __future__ import annotations

import numpy as np

from ..backend import Backend
from ..detectors.base import DetectorModel
from ..detectors.constants import Constants
from ..funcs.base import Frames

FAMILY = {"epix10ka": 1, "jungfrau": 2}


def unit_scale(gain: np.ndarray, units: str, photon_energy_kev: float | None = None) -> np.ndarray:
    """Per gain range and pixel, the factor turning ADU above pedestal into the output unit.

    ``adu``: gain[0] / gain[g] (ADU of the first gain range); ``kev``: 1 / gain[g];
    ``photons``: 1 / (gain[g] * photon_energy_kev). Shape (gains, panels, rows, cols) float32.
    """
    gain = gain.astype(np.float64)
    if units == "adu":
        s = gain[:1] / gain
    elif units == "kev":
        s = 1.0 / gain
    elif units == "photons":
        s = 1.0 / (gain * float(photon_energy_kev))
    else:
        raise ValueError(f"unknown units {units!r}")
    return s.astype(np.float32)


def pedestal_subtract(xp, model: DetectorModel, raw, pedestal, config_bits=None):
    """(s, g): ADU above pedestal (float32) and gain range (int8, -1 invalid) per pixel.

    raw (events, panels, rows, cols); pedestal (gains, panels, rows, cols) float32.
    """
    g = model.gain_index(raw, config_bits, xp)
    v = model.data(raw, xp).astype(xp.float32)
    npix = v[0].size
    pix = xp.arange(npix, dtype=xp.int64).reshape(v.shape[1:])
    flat_index = xp.clip(g, 0, model.n_gains - 1).astype(xp.int64) * npix + pix
    s = v - pedestal.reshape(-1)[flat_index]
    return s, g


def calibrate_reference(xp, model: DetectorModel, raw, pedestal, scale, mask, config_bits=None, common_mode=None):
    """Readable calibration: returns (out, good), out float32 with bad pixels 0.

    Args:
        raw: (events, panels, rows, cols) raw words.
        pedestal, scale: (gains, panels, rows, cols) float32 (see :func:`unit_scale`).
        mask: (panels, rows, cols) bool static mask.
        common_mode: callable ``(s, good, g) -> s`` applied before scaling, or None.
    """
    s, g = pedestal_subtract(xp, model, raw, pedestal, config_bits)
    good = mask[None] & (g >= 0)
    if common_mode is not None:
        s = common_mode(s, good, g)
    npix = s[0].size
    pix = xp.arange(npix, dtype=xp.int64).reshape(s.shape[1:])
    gscale = scale.reshape(-1)[xp.clip(g, 0, model.n_gains - 1).astype(xp.int64) * npix + pix]
    out = xp.where(good, s * gscale, xp.float32(0)).astype(xp.float32)
    return out, good


class Calibrator:
    """Calibration of one detector for a whole run.

    Args:
        model: the detector model.
        constants: validated host constants (pedestal and gain (gains, panels, rows, cols)).
        mask: (panels, rows, cols) bool static mask (SPEC section 5).
        backend: the run's backend; constants go to its device once, here.
        units: ``adu``, ``kev`` or ``photons``.
        photon_energy_kev: needed for ``photons``.
        common_mode: a common-mode corrector (``(s, good, g) -> s`` on the backend) or None;
            the string ``"raw"`` skips calibration (output = ``raw & data_mask``).
    """

    def __init__(self, model: DetectorModel, constants: Constants, mask: np.ndarray, backend: Backend,
                 units: str = "adu", photon_energy_kev: float | None = None, common_mode=None):
        self.model, self.backend, self.common_mode = model, backend, common_mode
        xp = backend.xp
        self.pedestal = backend.to_device(constants.pedestal, xp.float32)
        self.scale = backend.to_device(unit_scale(constants.gain, units, photon_energy_kev))
        self.mask = backend.to_device(np.asarray(mask, bool))
        self.config_bits = None if constants.config_bits is None else backend.to_device(constants.config_bits.astype(np.uint8))
        self.use_kernel = backend.is_gpu and common_mode != "raw"

    def __call__(self, raw) -> Frames:
        """raw: (events, panels, rows, cols) on the backend's device -> Frames."""
        xp = self.backend.xp
        if self.common_mode == "raw":
            out = self.model.data(raw, xp).astype(xp.float32)
            good = xp.broadcast_to(self.mask, out.shape)
            return Frames(xp.where(good, out, xp.float32(0)), good, raw)
        if self.use_kernel and raw.dtype == xp.uint16:
            out, good = self._kernel_cm(raw) if callable(self.common_mode) else self._kernel(raw)
        else:
            out, good = calibrate_reference(xp, self.model, raw, self.pedestal, self.scale, self.mask,
                                            self.config_bits, self.common_mode if callable(self.common_mode) else None)
        return Frames(out, good, raw)

    def _kernel(self, raw):
        xp = self.backend.xp
        n_events = raw.shape[0]
        npix = raw[0].size
        out = xp.empty(raw.shape, xp.float32)
        good = xp.empty(raw.shape, xp.bool_)
        k = self.backend.kernel("calib.cu", "calibrate_u16")
        threads = 256
        blocks_x = min((npix + threads - 1) // threads, 4096)
        cfg = self.config_bits if self.config_bits is not None else self.mask.view(xp.uint8)
        k((blocks_x, min(n_events, 65535)), (threads,),
          (xp.ascontiguousarray(raw), self.pedestal, self.scale, self.mask.view(xp.uint8), cfg, out, good,
           np.int64(n_events), np.int64(npix), np.int32(self.model.n_gains),
           np.int32(FAMILY.get(self.model.type, 0)), np.int32(self.config_bits is not None),
           np.uint32(self.model.data_mask or 0xFFFF)))
        return out, good

    def _kernel_cm(self, raw):
        """CuPy with a common mode: pedestal_u16 -> common mode (its own kernel) -> scale_apply."""
        xp = self.backend.xp
        raw = xp.ascontiguousarray(raw)
        n_events = raw.shape[0]
        npix = raw[0].size
        s = xp.empty(raw.shape, xp.float32)
        g = xp.empty(raw.shape, xp.int8)
        good = xp.empty(raw.shape, xp.bool_)
        threads = 256
        grid = (min((npix + threads - 1) // threads, 4096), min(n_events, 65535))
        cfg = self.config_bits if self.config_bits is not None else self.mask.view(xp.uint8)
        self.backend.kernel("calib.cu", "pedestal_u16")(
            grid, (threads,),
            (raw, self.pedestal, self.mask.view(xp.uint8), cfg, s, g, good,
             np.int64(n_events), np.int64(npix), np.int32(self.model.n_gains),
             np.int32(FAMILY.get(self.model.type, 0)), np.int32(self.config_bits is not None),
             np.uint32(self.model.data_mask or 0xFFFF)))
        if hasattr(self.common_mode, "gpu"):  # the median kernel corrects s in place
            s = self.common_mode.gpu(s, good, g, inplace=True)
        else:
            s = xp.ascontiguousarray(self.common_mode(s, good, g), dtype=xp.float32)
        out = xp.empty(raw.shape, xp.float32)
        self.backend.kernel("calib.cu", "scale_apply")(
            grid, (threads,), (s, g, good, self.scale, out, np.int64(n_events), np.int64(npix)))
        return out, good
