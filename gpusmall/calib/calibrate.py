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
from ..kernel_specs import KernelSpec

KERNEL_THREADS = 256
KERNEL_EVENTS_PER_THREAD = 8  # EVENTS_PER_THREAD of kernels/calib.cu


def kernel_grid(npix: int, n_events: int) -> tuple[int, int]:
    """Grid of the calib.cu kernels: x covers the pixels (grid-stride beyond 4096 blocks of
    KERNEL_THREADS), y the events in chunks of KERNEL_EVENTS_PER_THREAD."""
    x = min((npix + KERNEL_THREADS - 1) // KERNEL_THREADS, 4096)
    y = min((n_events + KERNEL_EVENTS_PER_THREAD - 1) // KERNEL_EVENTS_PER_THREAD, 65535)
    return max(x, 1), max(y, 1)


def _calib_launch(args):
    return kernel_grid(int(args["npix"]), int(args["n_events"])), (KERNEL_THREADS,), 0


def _decode_sizes(a, *batch):
    """Elements the calib.cu kernels index: (events, pixels) arrays, (gains, pixels) pedestal, the per-pixel
    mask and config bits, the gain table of the model's gain bits."""
    n, e = int(a["npix"]), int(a["n_events"]) * int(a["npix"])
    return dict(
        {k: e for k in ("raw",) + batch},
        pedestal=int(a["n_gains"]) * n,
        mask=n,
        config_bits=n if a["has_config"] else 0,
        gain_table=(int(a["gain_bits"]) + 1) * 256,
    )


CALIBRATE_U16 = KernelSpec(
    "calib.cu",
    "calibrate_u16",
    _calib_launch,
    "gpusmall.calib.calibrate:calibrate_reference",
    sizes=lambda a: dict(_decode_sizes(a, "out", "good"), scale=int(a["n_gains"]) * int(a["npix"])),
)
PEDESTAL_U16 = KernelSpec(
    "calib.cu",
    "pedestal_u16",
    _calib_launch,
    "gpusmall.calib.calibrate:pedestal_subtract",
    sizes=lambda a: _decode_sizes(a, "s", "gain_index", "good"),
)
SCALE_APPLY = KernelSpec(
    "calib.cu",
    "scale_apply",
    _calib_launch,
    "gpusmall.calib.calibrate:calibrate_reference",
    sizes=lambda a: dict(
        {k: int(a["n_events"]) * int(a["npix"]) for k in ("s", "gain_index", "good", "out")}, scale=int(a["npix"])
    ),
)


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
        s = 1.0 / (gain * float(photon_energy_kev))  # type: ignore[arg-type]
    else:
        raise ValueError(f"unknown units {units!r}")
    return s.astype(np.float32)


CHUNK_EVENTS = 1
"""NumPy: events calibrated together. Small chunks keep the temporaries in cache and reuse their
memory: on a 64-event ePix10k2M batch (2-core machine, 32 MB L3) one event at a time calibrates ~3x
faster than the whole batch at once (~2x with median common mode); 2 or 4 at a time measured the same
as 1 within noise. Every step is per event, so the result does not depend on it."""


class RangeLookup:
    """Per-pixel use of per-gain-range constants, ``table[g]``, for one batch without a full gather.

    Most pixels of a gain-switching detector sit in one range (the base range): ``op(x, table[g])`` is
    one dense pass with ``table[base]``, then the pixels in other ranges (a sparse list of flat
    indices) are recomputed with their own range's constants. The result is that of ``table[g]`` pixel
    by pixel whatever the ranges are; only the speed depends on how many pixels left the base range.

    Args:
        g: (events, *pixel shape) gain range per pixel (int8, -1 invalid). Clipped to the ranges: an
            invalid pixel reads range 0, as in the CUDA kernels.
        n_gains: ranges in the tables.
    """

    def __init__(self, xp, g, n_gains: int):
        gc = xp.clip(g, 0, n_gains - 1)
        # the base range decides the speed only, not the result: take the most common one in a sample
        self.base = int(xp.argmax(xp.bincount(gc.reshape(-1)[::97], minlength=n_gains)))
        self.other = xp.flatnonzero(gc != self.base)  # flat indices into the batch
        npix = int(np.prod(g.shape[1:]))
        self.const_index = gc.reshape(-1)[self.other].astype(xp.int64) * npix + self.other % npix

    def apply(self, op, x, table, out):
        """``out = op(x, table[g])`` per pixel: ``op`` a ufunc, x and out contiguous and shaped like g,
        table (gains, *pixel shape)."""
        op(x, table[self.base], out=out)
        if self.other.size:
            out.reshape(-1)[self.other] = op(x.reshape(-1)[self.other], table.reshape(-1)[self.const_index])
        return out


def _subtract_pedestal(xp, model: DetectorModel, raw, pedestal, config_bits):
    """(s, g, lookup): s = (raw & data_mask) - pedestal[g] float32, g, and the batch's RangeLookup."""
    g = model.gain_index(raw, config_bits, xp)
    v = xp.ascontiguousarray(model.data(raw, xp))
    if not xp.can_cast(v.dtype, xp.float32):  # uint16 and smaller go to float32 exactly inside the subtraction
        v = v.astype(xp.float32)
    lookup = RangeLookup(xp, g, model.n_gains)
    s = lookup.apply(xp.subtract, v, pedestal, xp.empty(raw.shape, xp.float32))
    return s, g, lookup


def pedestal_subtract(xp, model: DetectorModel, raw, pedestal, config_bits=None):
    """(s, g): ADU above pedestal (float32) and gain range (int8, -1 invalid) per pixel.

    raw (events, panels, rows, cols); pedestal (gains, panels, rows, cols) float32.
    s = (raw & data_mask) - pedestal[g], g clipped to the ranges (an invalid pixel reads range 0).
    """
    s, g, _ = _subtract_pedestal(xp, model, raw, pedestal, config_bits)
    return s, g


def calibrate_reference(xp, model: DetectorModel, raw, pedestal, scale, mask, config_bits=None, common_mode=None):
    """Readable calibration: returns (out, good), out float32 with bad pixels 0.

    Args:
        raw: (events, panels, rows, cols) raw words.
        pedestal, scale: (gains, panels, rows, cols) float32 (see :func:`unit_scale`).
        mask: (panels, rows, cols) bool static mask.
        common_mode: callable ``(s, good, g) -> s`` applied before scaling, or None.

    On NumPy the batch goes through :data:`CHUNK_EVENTS` events at a time (same result: every step,
    common mode included, is per event).
    """
    out = xp.empty(raw.shape, xp.float32)
    good = xp.empty(raw.shape, xp.bool_)
    step = CHUNK_EVENTS if xp is np else max(raw.shape[0], 1)
    for e0 in range(0, raw.shape[0], step):
        events = slice(e0, e0 + step)
        _calibrate_events(
            xp, model, raw[events], pedestal, scale, mask, config_bits, common_mode, out[events], good[events]
        )
    return out, good


def _calibrate_events(xp, model, raw, pedestal, scale, mask, config_bits, common_mode, out, good):
    """SPEC section 3 for a few events, written into ``out`` and ``good`` (contiguous)."""
    s, g, lookup = _subtract_pedestal(xp, model, raw, pedestal, config_bits)
    xp.logical_and(mask[None], g >= 0, out=good)
    if common_mode is not None:
        s = xp.ascontiguousarray(common_mode(s, good, g), dtype=xp.float32)
    lookup.apply(xp.multiply, s, scale, out)  # out = s * scale[g]
    out[~good] = 0  # bad pixels are 0


def decode_arguments(
    backend: Backend, model: DetectorModel, raw, pedestal, mask, config_bits=None, gain_table=None
) -> dict:
    """The arguments calibrate_u16 and pedestal_u16 share, by name: the raw batch (made contiguous), its size,
    the per-pixel constants on the device (mask bool, config bits uint8 or None) and how the model's gain
    range is decoded: ``gain_table`` (:meth:`~gpusmall.detectors.base.DetectorModel.gain_table` on the
    device; built and uploaded when not given) and the model's gain bits."""
    xp = backend.xp
    mask = mask.view(xp.uint8)
    if gain_table is None:
        gain_table = backend.to_device(model.gain_table(config_bits is not None))
    return dict(
        raw=xp.ascontiguousarray(raw),
        pedestal=pedestal,
        mask=mask,
        config_bits=config_bits if config_bits is not None else mask,
        n_events=raw.shape[0],
        npix=raw[0].size,
        n_gains=model.n_gains,
        gain_table=gain_table,
        gain_shift=model.gain_shift,
        gain_bits=model.gain_bits,
        has_config=config_bits is not None,
        data_mask=model.data_mask or 0xFFFF,
    )


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
        det: detector name for error messages (default: the model's type).

    Raw batches must be of an integer dtype (SPEC section 1); another raises InputError.
    """

    def __init__(
        self,
        model: DetectorModel,
        constants: Constants,
        mask: np.ndarray,
        backend: Backend,
        units: str = "adu",
        photon_energy_kev: float | None = None,
        common_mode=None,
        det: str | None = None,
    ):
        self.model, self.backend, self.common_mode, self.det = model, backend, common_mode, det
        xp = backend.xp
        self.pedestal = backend.to_device(constants.pedestal, xp.float32)
        self.scale = backend.to_device(unit_scale(constants.gain, units, photon_energy_kev))
        self.mask = backend.to_device(np.asarray(mask, bool))
        self.config_bits = (
            None if constants.config_bits is None else backend.to_device(constants.config_bits.astype(np.uint8))
        )
        self.use_kernel = backend.is_gpu and common_mode != "raw"
        # the CUDA kernels' gain decoding: the model's own, tabulated once per run (a few kB)
        self.gain_table = (
            backend.to_device(model.gain_table(constants.config_bits is not None)) if self.use_kernel else None
        )
        self.cpu = None  # NumPy backend: numba's fused kernels when numba is there and handles the model
        if not backend.is_gpu and common_mode != "raw":
            from . import cpu_kernels  # imports numba (optional): only NumPy runs pay for it

            self.cpu = cpu_kernels.for_calibrator(
                model, self.pedestal, self.scale, self.mask, self.config_bits, backend.threads
            )

    def __call__(self, raw) -> Frames:
        """raw: (events, panels, rows, cols) on the backend's device -> Frames."""
        xp = self.backend.xp
        self.model.check_raw_dtype(self.det or self.model.type, raw.dtype)  # InputError for float raw data
        if self.common_mode == "raw":
            out = self.model.data(raw, xp).astype(xp.float32)
            good = xp.broadcast_to(self.mask, out.shape)
            return Frames(xp.where(good, out, xp.float32(0)), good, raw)
        if self.use_kernel and raw.dtype == xp.uint16:
            out, good = self._kernel_cm(raw) if callable(self.common_mode) else self._kernel(raw)
        elif self.cpu is not None and self.cpu.supports(raw):  # NumPy backend with numba: fused kernels
            out, good = self._cpu_kernels(raw)
        else:
            out, good = calibrate_reference(
                xp,
                self.model,
                raw,
                self.pedestal,
                self.scale,
                self.mask,
                self.config_bits,
                self.common_mode if callable(self.common_mode) else None,
            )
        return Frames(out, good, raw)

    def _cpu_kernels(self, raw):
        """NumPy backend, numba kernels (:mod:`gpusmall.calib.cpu_kernels`), bit-identical to
        :func:`calibrate_reference`: one pass without a common mode; with one, per CHUNK_EVENTS events
        pedestal -> common mode -> scale, as the reference."""
        if not callable(self.common_mode):
            return self.cpu.calibrate(raw)
        from . import cpu_median

        out, good = self.cpu.outputs(raw.shape[0])  # reused once nobody holds them: no page faults per batch
        cm = self.common_mode
        if getattr(cm, "cpu", None) is not None and cpu_median.blocked(cm) and raw.ndim == 4:
            cpu_median.calibrate_blocked(self.cpu, cm, raw, out, good, self.cpu.threads)
            return out, good
        for e0 in range(0, raw.shape[0], CHUNK_EVENTS):
            events = slice(e0, e0 + CHUNK_EVENTS)
            s, g, good[events] = self.cpu.pedestal_subtract(raw[events])
            if getattr(self.common_mode, "cpu", None) is not None and cpu_median.supports(s):
                s = self.common_mode.cpu(s, good[events], g, inplace=True)  # s is this call's own
            else:
                s = np.ascontiguousarray(self.common_mode(s, good[events], g), dtype=np.float32)
            self.cpu.scale_apply(raw[events], s, good[events], out[events])
        return out, good

    def _decode_args(self, raw) -> dict:
        return decode_arguments(
            self.backend, self.model, raw, self.pedestal, self.mask, self.config_bits, self.gain_table
        )

    def _kernel(self, raw):
        xp = self.backend.xp
        out = xp.empty(raw.shape, xp.float32)
        good = xp.empty(raw.shape, xp.bool_)
        CALIBRATE_U16.launch(self.backend, **self._decode_args(raw), scale=self.scale, out=out, good=good)
        return out, good

    def _kernel_cm(self, raw):
        """CuPy with a common mode: pedestal_u16 -> common mode (its own kernels) -> scale_apply; with a
        median whose last step is cols, that step applies the scale itself (no scale_apply pass)."""
        xp = self.backend.xp
        s = xp.empty(raw.shape, xp.float32)
        g = xp.empty(raw.shape, xp.int8)
        good = xp.empty(raw.shape, xp.bool_)
        PEDESTAL_U16.launch(self.backend, **self._decode_args(raw), s=s, gain_index=g, good=good)
        if hasattr(self.common_mode, "gpu"):  # the median kernels correct s in place
            if self.common_mode.fuses_scale():  # the last (cols) step applies the gain scale too
                return self.common_mode.gpu(s, good, g, inplace=True, scale=self.scale), good
            s = self.common_mode.gpu(s, good, g, inplace=True)
        else:
            s = xp.ascontiguousarray(self.common_mode(s, good, g), dtype=xp.float32)
        out = xp.empty(raw.shape, xp.float32)
        SCALE_APPLY.launch(
            self.backend,
            s=s,
            gain_index=g,
            good=good,
            scale=self.scale,
            out=out,
            n_events=raw.shape[0],
            npix=raw[0].size,
        )
        return out, good
