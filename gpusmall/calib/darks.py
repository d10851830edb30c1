"""Pedestal, noise and status from dark runs (SPEC section 2; ``gpusmall darks``).

A dark run is read in batches; per gain range and pixel, running sums of the events in which the
pixel was in that range (count, sum and sum of squares of ``v - v_ref`` in float64, on the device;
``v_ref`` is the pixel's value in the first event, which keeps the sums small and exact for
integer data) plus the pixel's minimum and maximum. The whole run is never in memory.

From the sums: ``pedestal[g] = mean``, ``noise[g] = standard deviation`` (population, ADU rms) and
``status`` (0 = good), a bit field:

* 1: the pedestal of some gain range lies more than ``n_sigma`` robust standard deviations (median
  absolute deviation x 1.4826) from its panel's median (over the pixels seen in that range);
* 2: the same for the noise;
* 4: the pixel never changed during the run (its minimum equals its maximum);
* 8: the pixel was in no valid gain range in any event (e.g. JUNGFRAU gain bits always 2): it has
  no pedestal at all;
* 16: the pixel was never seen in a gain range that the file records as measured (below): it has no
  pedestal there.

Gain modes. A gain-switching detector's dark runs are taken one gain mode at a time (ePix10ka FH, FM,
FL, AHL, AML; JUNGFRAU G0, G1, G2, i.e. dynamic gain and forced G1 and G2): ``gpusmall darks`` takes
several runs and writes one file. Per gain range and pixel the pedestal and noise are those of the
events in which that pixel was in that range (one run: :class:`DarkAccumulator`); over several runs,
per range and pixel, those of the run with the most such events (:func:`combine_dark_runs`; on a tie
the run given first). A range is *measured* when at least :data:`MEASURED_FRACTION` of the pixels were
seen in it; ``gain_ranges_measured`` (gains,) uint8 records it (0 not measured, 1 measured, 2 derived).

Ranges a dark run cannot see (``DetectorModel.derived_ranges``: ePix10ka AHL-L (5) and AML-L (6),
where an auto-ranging pixel has switched to low) are *derived*: psana computes them from
charge-injection offsets, which gpusmall does not have, so they take the pedestal and noise of FL (2),
pixel by pixel where the pixel was not seen in them, and are recorded as 2 when FL was measured
(approximate: the switched-to-low baseline differs from FL's by the pixel's offset). Without an FL
run they stay 0 (not measured), and ``gpusmall run`` refuses the file for an auto-ranging run.

A pixel never seen in a range gets pedestal 0 and noise 0 there (not derived).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..backend import Backend
from ..detectors.base import DetectorModel
from ..detectors.constants import RANGE_DERIVED, RANGE_MEASURED, RANGE_NOT_MEASURED, Constants
from ..detectors.epix10ka import CONFIG_BITS_MASK

log = logging.getLogger(__name__)

MAD_TO_SIGMA = 1.4826
STATUS_PEDESTAL, STATUS_NOISE, STATUS_CONSTANT, STATUS_NO_RANGE, STATUS_RANGE_MISSING = 1, 2, 4, 8, 16
MEASURED_FRACTION = 0.5
"""A gain range is measured when at least this fraction of the pixels was seen in it (a few noisy pixels
switching in a dark run do not make a range measured)."""


class DarkAccumulator:
    """Running per-range sums of a dark run, kept on the backend's device.

    Args:
        model: detector model (gain decoding, data bits).
        shape: (panels, rows, cols).
        backend: the run's backend.
        config_bits: (panels, rows, cols) uint8 ePix10ka pixel configuration, or None.
    """

    def __init__(self, model: DetectorModel, shape, backend: Backend, config_bits=None):
        xp = backend.xp
        self.model, self.backend, self.shape = model, backend, tuple(shape)
        n = model.n_gains
        self.config_bits = None if config_bits is None else backend.to_device(np.asarray(config_bits, np.uint8))
        self.count = xp.zeros((n, *self.shape), xp.int64)
        self.sum1 = xp.zeros((n, *self.shape), xp.float64)
        self.sum2 = xp.zeros((n, *self.shape), xp.float64)
        self.vmin = self.vmax = self.ref = None
        self.events = 0

    def update(self, raw) -> None:
        """Add a raw batch (events, panels, rows, cols) on the device."""
        xp = self.backend.xp
        g = self.model.gain_index(raw, self.config_bits, xp)
        v = self.model.data(raw, xp).astype(xp.float64)
        if self.ref is None:
            self.ref = v[0].copy()
            self.vmin = v[0].copy()
            self.vmax = v[0].copy()
        self.vmin = xp.minimum(self.vmin, v.min(axis=0))
        self.vmax = xp.maximum(self.vmax, v.max(axis=0))
        d = v - self.ref[None]  # type: ignore[index]
        hist = self.backend.to_host(xp.bincount(g.ravel().astype(xp.int64) + 1, minlength=self.model.n_gains + 1))
        for r in np.flatnonzero(hist[1 : self.model.n_gains + 1]):
            m = g == r
            dm = xp.where(m, d, 0.0)
            self.count[r] += m.sum(axis=0)
            self.sum1[r] += dm.sum(axis=0)
            self.sum2[r] += (dm * dm).sum(axis=0)
        self.events += raw.shape[0]

    def result(self):
        """(pedestal, noise, count, constant) as host arrays; (gains, ...) float32, int64, (...) bool."""
        xp = self.backend.xp
        n = xp.maximum(self.count, 1).astype(xp.float64)
        mean = self.sum1 / n
        var = xp.maximum(self.sum2 / n - mean * mean, 0.0)
        seen = self.count > 0
        ped = xp.where(seen, self.ref[None] + mean, 0.0).astype(xp.float32)
        noise = xp.where(seen, xp.sqrt(var), 0.0).astype(xp.float32)
        h = self.backend.to_host
        return h(ped), h(noise), h(self.count), h(self.vmax == self.vmin)


def robust_outliers(values: np.ndarray, valid: np.ndarray, n_sigma: float) -> np.ndarray:
    """Per panel, pixels of ``values`` (panels, rows, cols) farther than ``n_sigma`` x 1.4826 x MAD
    from the panel median (statistics over ``valid`` pixels; a panel with MAD 0 flags nothing)."""
    out = np.zeros(values.shape, bool)
    for p in range(values.shape[0]):  # per panel: a handful of iterations, not per event
        vals = values[p][valid[p]]
        if vals.size == 0:
            continue
        med = np.median(vals)
        sigma = MAD_TO_SIGMA * np.median(np.abs(vals - med))
        if sigma > 0:
            out[p] = valid[p] & (np.abs(values[p] - med) > n_sigma * sigma)
    return out


def dark_status(
    ped: np.ndarray, noise: np.ndarray, count: np.ndarray, constant: np.ndarray, n_sigma: float = 6.0
) -> np.ndarray:
    """Status (panels, rows, cols) uint8 bit field (module docstring) from per-range results."""
    status = np.zeros(constant.shape, np.uint8)
    for r in range(ped.shape[0]):
        seen = count[r] > 0
        if not seen.any():
            continue
        status |= np.where(robust_outliers(ped[r], seen, n_sigma), STATUS_PEDESTAL, 0).astype(np.uint8)
        status |= np.where(robust_outliers(noise[r], seen, n_sigma), STATUS_NOISE, 0).astype(np.uint8)
    status |= np.where(constant, STATUS_CONSTANT, 0).astype(np.uint8)
    status |= np.where((count == 0).all(axis=0), STATUS_NO_RANGE, 0).astype(np.uint8)
    return status


@dataclass
class DarkRun:
    """What dark runs measured, per gain range and pixel, before derived ranges and status.

    Attributes:
        pedestal, noise: (gains, panels, rows, cols) float32 (0 where never seen).
        count: (gains, panels, rows, cols) int64 events in which the pixel was in the range.
        constant: (panels, rows, cols) bool, the pixel never changed during (one of) the run(s).
        events: events read (all runs).
        config_bits, x, y, z: from the source, or None.
        runs: the number of dark runs.
        mixed_config: the runs had different config_bits (then ``config_bits`` is None).
    """

    pedestal: np.ndarray
    noise: np.ndarray
    count: np.ndarray
    constant: np.ndarray
    events: int
    config_bits: np.ndarray | None = None
    x: np.ndarray | None = None
    y: np.ndarray | None = None
    z: np.ndarray | None = None
    runs: int = 1
    mixed_config: bool = False


@dataclass
class DarkResult:
    """What :func:`compute_darks` measured: the constants and the events per gain range."""

    constants: Constants
    events: int
    events_per_range: np.ndarray  # (gains,) median over pixels of the events seen in each range
    bad_pixels: int
    measured: np.ndarray | None = None  # (gains,) uint8, as constants.gain_ranges_measured


def measure_dark(
    source, det: str, model: DetectorModel, backend: Backend, *, events: int | None = None, batch_size: int = 64
) -> DarkRun:
    """Per-range sums of one dark run of detector ``det`` (see :func:`compute_darks` for the arguments)."""
    info = source.detectors[det]
    model.check_raw_dtype(det, info.dtype)  # InputError before any event for float raw data
    n = source.n_events
    if events is not None:
        n = events if n is None else min(n, events)
    acc = DarkAccumulator(model, info.shape, backend, info.config_bits)
    for batch in source.batches(batch_size, 0, n):
        acc.update(backend.to_device(batch.raw[det]))
    if acc.events == 0:
        from ..errors import InputError

        raise InputError(f"detector {det}: the dark run has no events")
    ped, noise, count, constant = acc.result()
    cbits_mask = np.uint8(CONFIG_BITS_MASK)  # the 5 control bits: what a constants file may hold
    cbits = None if info.config_bits is None else np.asarray(info.config_bits, np.uint8) & cbits_mask
    return DarkRun(ped, noise, count, constant, acc.events, cbits, info.x, info.y, info.z)


def combine_dark_runs(runs: list[DarkRun], det: str = "?") -> DarkRun:
    """One DarkRun from several (module docstring): per gain range and pixel, the run with the most
    events in that range (the first given on a tie); ``constant`` where the pixel never changed in one
    of them; config_bits only when every run that has them has the same (else None, with a warning:
    each gain mode's dark run has its own configuration); x, y, z of the first run that has them."""
    if not runs:
        raise ValueError("no dark runs")
    first = runs[0]
    out = DarkRun(
        first.pedestal.copy(),
        first.noise.copy(),
        first.count.copy(),
        first.constant.copy(),
        first.events,
        first.config_bits,
        first.x,
        first.y,
        first.z,
        first.runs,
        first.mixed_config,
    )
    for k, r in enumerate(runs[1:], 1):
        if r.count.shape != out.count.shape:
            from ..errors import InputError

            raise InputError(
                f"detector {det}: dark run {k + 1} has shape {r.count.shape[1:]} (gains "
                f"{r.count.shape[0]}), the first {out.count.shape[1:]} (gains {out.count.shape[0]})"
            )
        more = r.count > out.count  # strictly more: the earlier run keeps a tie
        out.pedestal = np.where(more, r.pedestal, out.pedestal)
        out.noise = np.where(more, r.noise, out.noise)
        out.count = np.where(more, r.count, out.count)
        out.constant |= r.constant
        out.events += r.events
        out.runs += r.runs
        if out.x is None and r.x is not None:
            out.x, out.y, out.z = r.x, r.y, r.z
    bits = [r.config_bits for r in runs if r.config_bits is not None]
    if any(r.mixed_config for r in runs):
        out.config_bits, out.mixed_config = None, True
    elif bits and any(not np.array_equal(b, bits[0]) for b in bits[1:]):
        log.warning(
            "detector %s: the dark runs have different pixel configurations (config_bits): none is "
            "written (a run reduced with these constants uses its own)",
            det,
        )
        out.config_bits, out.mixed_config = None, True
    elif bits:
        out.config_bits = bits[0]
    return out


def measured_ranges(count: np.ndarray) -> np.ndarray:
    """(gains,) uint8: 1 where at least :data:`MEASURED_FRACTION` of the pixels were seen in the range."""
    seen = (count > 0).reshape(count.shape[0], -1).mean(axis=1)
    return np.where(seen >= MEASURED_FRACTION, RANGE_MEASURED, RANGE_NOT_MEASURED).astype(np.uint8)


def dark_constants(run: DarkRun, model: DetectorModel, n_sigma: float = 6.0) -> DarkResult:
    """Constants from what dark runs measured: ranges measured, derived ranges, status (module docstring)."""
    ped, noise, count = run.pedestal.copy(), run.noise.copy(), run.count
    measured = measured_ranges(count)
    for r, src in model.derived_ranges:
        if measured[r] == RANGE_NOT_MEASURED and measured[src] == RANGE_MEASURED:
            fill = count[r] == 0
            ped[r] = np.where(fill, ped[src], ped[r])
            noise[r] = np.where(fill, noise[src], noise[r])
            measured[r] = RANGE_DERIVED
    status = dark_status(run.pedestal, run.noise, count, run.constant, n_sigma)
    missing = ((count == 0) & (measured == RANGE_MEASURED)[:, None, None, None]).any(axis=0)
    status |= np.where(missing, STATUS_RANGE_MISSING, 0).astype(np.uint8)
    c = Constants(
        pedestal=ped,
        gain=None,  # type: ignore[arg-type]
        noise=noise if model.n_gains > 1 else noise[0],
        status=status,
        config_bits=run.config_bits,
        x=run.x,
        y=run.y,
        z=run.z,
        gain_ranges_measured=measured,
    )
    per_range = np.median(count.reshape(count.shape[0], -1), axis=1)
    return DarkResult(c, run.events, per_range, int((status != 0).sum()), measured)


def compute_darks(
    source,
    det: str,
    model: DetectorModel,
    backend: Backend,
    *,
    events: int | None = None,
    batch_size: int = 64,
    n_sigma: float = 6.0,
) -> DarkResult:
    """Pedestal, noise and status of detector ``det`` from a dark run, in batches.

    Args:
        source: an open :class:`~gpusmall.sources.base.Source` of the dark run.
        det: detector name in the source.
        model: its detector model.
        backend: where the sums are kept.
        events: at most this many events (default: the whole run).
        batch_size: events per batch.
        n_sigma: status threshold in robust standard deviations.
    Returns:
        DarkResult with Constants: pedestal (gains, panels, rows, cols) float32 ADU, noise (gains, ...)
        float32 ADU rms ((panels, rows, cols) for single-range detectors), status uint8,
        gain_ranges_measured (gains,) uint8, plus config_bits and x, y, z when the source gives them.
        ``gain`` is not measured (left to defaults). The dark run's config_bits are only a fallback: a
        run reduced with these constants uses its own pixel configuration whenever its source gives one
        (:func:`~gpusmall.detectors.constants.select_config_bits`). Several dark runs:
        :func:`measure_dark` each, :func:`combine_dark_runs`, :func:`dark_constants`.
    """
    run = measure_dark(source, det, model, backend, events=events, batch_size=batch_size)
    return dark_constants(run, model, n_sigma)
