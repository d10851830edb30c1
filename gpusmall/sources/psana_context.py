"""Per-event context of a psana (LCLS-II) run (SPEC 10): light status, step scans, EPICS PVs, configured values.

What :class:`PsanaContext` reads, under smalldata_tools' names:

- ``lightStatus/xray``, ``lightStatus/laser`` (uint8 0/1; 255 when the event has no timing data) from the timing
  detector (``context.light_status.timing``, psana's ``ts_raw_*``), decoded by :func:`light_status`:
  x-ray on when the event's beam destination (``det.raw.destination(evt)``) is ``xray_destination``; with
  ``xray_destination: null`` when the timing system flags beam present (the ``ebeamPresent`` field of the
  timing data, 1 whatever the destination). Laser from the event codes (``det.raw.eventcodes(evt)``, 0/1 per
  code 0..287): a positive code present marks the laser off (a dropped shot), negative codes ``-c`` mean the
  laser is on only when one of those codes ``c`` is present; both kinds together: on = no drop code present
  and a requested code present. No code configured: laser on.
- ``scan/varStep`` (int64, the step index 0, 1, ... in the run) and ``scan/<variable>`` (float64) for each numeric
  scan variable of the run (``run.scannames`` less ``step_docstring``), read once per step with the step object;
  the run is then walked ``for step in run.steps(): for evt in step.events()``.
- ``epics/<pv>`` (float64) for each PV of ``context.epics`` (an alias or PV name of ``run.epicsinfo``), read per
  event from psana's EPICS store (the last update before the event; NaN before the first one, and for string
  PVs). Run constants: a configured PV whose value never changed over the events read (all non-missing values
  equal, at least one) is also returned once as ``epicsOnce/<pv>`` by :meth:`PsanaContext.once` (a float, or
  the string of a string PV). Under psana's MPI distribution each rank judges its own events.
- ``context.values``: name -> ``"<detector>.<attr>...<method>"`` (e.g. ``gmd.raw.milliJoulesPerPulse``), called
  with the event; a scalar result is the value, None (or a non-scalar, or a failed call) is missing.

A missing value is :func:`.context.missing_value` (NaN for floats). Every name is resolved when the run is open:
what the run lacks is an :class:`~gpusmall.errors.InputError` naming the config key.
"""

from __future__ import annotations

import logging

import numpy as np

from ..errors import InputError
from .context import (
    LIGHT_STATUS,
    MISSING_STATUS,
    as_context,
    context_dtype,
    missing_value,
)

log = logging.getLogger(__name__)

#: event codes psana's timing detector reports (``eventcodes(evt)`` has one 0/1 entry per code)
N_EVENT_CODES = 288
#: scan variables that are not numbers (the DAQ's step description, JSON)
SCAN_SKIP = ("step_docstring",)
_NOT_SET = object()


def light_status(
    codes, destination, present, xray_destination: int | None = None, laser_codes=(-272,)
) -> tuple[int, int]:
    """(xray, laser) of one event, each 0, 1 or 255 (:data:`.context.MISSING_STATUS`: no timing data).

    Args:
        codes: the event's codes, 0/1 indexed by code number (psana's ``eventcodes(evt)``), or None.
        destination: the event's beam destination (psana's ``destination(evt)``), or None.
        present: the timing system's beam-present flag (``ebeamPresent``), or None.
        xray_destination: x-ray on when ``destination`` equals it; None: when ``present`` is set.
        laser_codes: positive code present = laser off; negative ``-c``: on only when some such ``c`` is present.
    """
    if xray_destination is None:
        xray = MISSING_STATUS if present is None else int(bool(present))
    else:
        xray = MISSING_STATUS if destination is None else int(int(destination) == int(xray_destination))
    if codes is None:
        return xray, MISSING_STATUS

    def has(c):
        return 0 <= c < len(codes) and bool(codes[c])

    drop = [c for c in laser_codes if c > 0]
    want = [-c for c in laser_codes if c < 0]
    laser = not any(has(c) for c in drop) and (not want or any(has(c) for c in want))
    return xray, int(laser)


def _scalar(v) -> float:
    """A psana value as a float: None, a string, a non-scalar or a non-number is NaN."""
    if v is None or isinstance(v, (str, bytes)):
        return np.nan
    try:
        a = np.asarray(v)
        return float(a.reshape(())) if a.size == 1 and a.dtype.kind in "biuf" else np.nan
    except (TypeError, ValueError):
        return np.nan


class PsanaContext:
    """The context of one psana run: names resolved at open, values read per step and per event.

    Args:
        run: the psana run (before any event is read).
        cfg: the ``context`` block (:class:`~gpusmall.producer.config.ContextConfig`), or None for its defaults.

    Attributes:
        names: context name -> dtype of what every batch carries.
        steps: True when the run must be walked step by step (scan context on).
    """

    def __init__(self, run, cfg=None):
        if cfg is None:
            from ..producer.config import ContextConfig

            cfg = ContextConfig()
        self.run = run
        detnames = set(getattr(run, "detnames", ()) or ())
        self._warned: set[str] = set()
        self.values = {name: self._resolve_value(name, where, detnames) for name, where in cfg.values.items()}
        self.timing, self.light = self._resolve_light(cfg.light_status, detnames)
        self.steps = cfg.scan is not False and bool(getattr(run, "scannames", None))
        self.scan = self._resolve_scan(cfg.scan)
        self.epics = self._resolve_epics(cfg.epics)
        names = ([*LIGHT_STATUS] if self.timing is not None else []) + (
            ["scan/varStep", *self.scan] if self.steps else []
        )
        names += list(self.epics) + list(self.values)
        self.names = {n: context_dtype(n) for n in dict.fromkeys(names)}
        self._once: dict[str, object] = {}  # epics name -> its first value; _NOT_SET once it changed

    # -- resolution at open ------------------------------------------------------------------------
    def _resolve_value(self, name, where, detnames):
        key = f"context.values.{name}"
        det_name, *attrs = where.split(".")
        if det_name not in detnames:
            raise InputError(
                f"{key}: {where!r}: the psana run has no detector {det_name!r}; it has "
                f"{', '.join(sorted(detnames)) or 'none'}"
            )
        try:
            obj = self.run.Detector(det_name)
        except Exception as exc:  # noqa: BLE001 - psana raises various errors
            raise InputError(f"{key}: psana detector {det_name!r}: {exc}") from None
        for i, a in enumerate(attrs):
            if not hasattr(obj, a):
                have = sorted(k for k in dir(obj) if not k.startswith("_"))
                raise InputError(
                    f"{key}: {where!r}: {'.'.join([det_name, *attrs[:i]])} has no {a!r}; it has "
                    f"{', '.join(have) or 'nothing'}"
                )
            obj = getattr(obj, a)
        if not callable(obj):
            raise InputError(f"{key}: {where!r} is not a method called with the event")
        return obj

    def _resolve_light(self, ls, detnames):
        from ..producer.config import LightStatusConfig

        if ls is False:
            return None, None
        given = ls is not None
        ls = ls if isinstance(ls, LightStatusConfig) else LightStatusConfig()
        bad = [c for c in ls.laser_codes if c == 0 or abs(c) >= N_EVENT_CODES]
        if bad:
            raise InputError(
                f"context.light_status.laser_codes: {bad}: codes are 1..{N_EVENT_CODES - 1} (negative: required)"
            )
        raw = None
        if ls.timing in detnames:
            try:
                raw = getattr(self.run.Detector(ls.timing), "raw", None)
            except Exception:  # noqa: BLE001
                raw = None
            if raw is not None and not hasattr(raw, "eventcodes"):
                raw = None
        if raw is None:
            if given:
                raise InputError(
                    f"context.light_status.timing: the psana run has no timing detector "
                    f"{ls.timing!r} with event codes; it has {', '.join(sorted(detnames)) or 'none'}"
                )
            return None, None
        if ls.xray_destination is not None and not hasattr(raw, "destination"):
            raise InputError(
                f"context.light_status.xray_destination: psana's {ls.timing!r} "
                f"({type(raw).__name__}) gives no beam destination"
            )
        return raw, ls

    def _resolve_scan(self, scan):
        if scan is True and not self.steps:
            raise InputError("context.scan: true, but the psana run has no scan variables (run.scannames)")
        if not self.steps:
            return {}
        names = sorted(set(self.run.scannames) - set(SCAN_SKIP))
        dets = {}
        for n in names:
            det = self.run.Detector(n)
            try:
                if getattr(det, "dtype", float) in (str, bytes):
                    continue
            except Exception:  # noqa: BLE001 - dtype unknown: read it, non-numbers are NaN
                pass
            dets[f"scan/{n}"] = det
        return dets

    def _resolve_epics(self, pvs):
        if not pvs:
            return {}
        try:
            info = dict(self.run.epicsinfo)
        except Exception:  # noqa: BLE001 - no epics store in the run
            info = {}
        known = set()
        for k, pv in info.items():
            known.update(k if isinstance(k, tuple) else (k,))
            known.add(pv)
        aliases = sorted({k[0] if isinstance(k, tuple) else k for k in info})
        dets = {}
        for i, pv in enumerate(pvs):
            if pv not in known:
                raise InputError(
                    f"context.epics[{i}]: {pv!r}: the psana run has no such EPICS PV; it has "
                    f"{', '.join(aliases) or 'none'}"
                )
            dets[f"epics/{pv}"] = self.run.Detector(pv)
        return dets

    # -- values ------------------------------------------------------------------------------------
    def _call(self, name, fn, arg):
        try:
            return fn(arg)
        except Exception as exc:  # noqa: BLE001 - one event never ends the run
            if name not in self._warned:
                self._warned.add(name)
                log.warning(
                    "context %s: psana failed on an event (%s: %s); such events are missing",
                    name,
                    type(exc).__name__,
                    exc,
                )
            return None

    def step_values(self, step) -> dict[str, float]:
        """``scan/<variable>`` -> value of the step (psana's step object)."""
        return {n: _scalar(self._call(n, det, step)) for n, det in self.scan.items()}

    def new_arrays(self, n: int) -> dict[str, np.ndarray]:
        """(n,) arrays of every name, filled with the missing value."""
        return {
            k: np.full(n, missing_value(k), dtype=np.float64 if d.kind == "f" else np.int64)
            for k, d in self.names.items()
        }

    def fill(self, arrays: dict[str, np.ndarray], i: int, evt, step) -> None:
        """Row ``i`` of ``arrays`` (from :meth:`new_arrays`) for ``evt``; ``step``: (index, values) or None."""
        if self.timing is not None:
            info = self._call("lightStatus", self.timing._info, evt)
            if info is not None:
                codes = self._call("lightStatus", self.timing.eventcodes, evt)
                dest = (
                    self._call("lightStatus", self.timing.destination, evt)
                    if self.light.xray_destination is not None
                    else None
                )
                x, las = light_status(
                    codes,
                    dest,
                    getattr(info, "ebeamPresent", None),
                    self.light.xray_destination,
                    self.light.laser_codes,
                )
                arrays[LIGHT_STATUS[0]][i], arrays[LIGHT_STATUS[1]][i] = x, las
        if step is not None and "scan/varStep" in arrays:
            arrays["scan/varStep"][i] = step[0]
            for n, v in step[1].items():
                arrays[n][i] = v
        for n, det in self.epics.items():
            v = self._call(n, det, evt)
            arrays[n][i] = _scalar(v)
            if v is not None:
                first = self._once.setdefault(n, v)
                if first is not _NOT_SET and not _same(first, v):
                    self._once[n] = _NOT_SET
        for n, fn in self.values.items():
            v = self._call(n, fn, evt)
            arrays[n][i] = _scalar(v)
            if v is not None and np.size(v) != 1 and n not in self._warned:
                self._warned.add(n)
                log.warning(
                    "context %s: psana gives %s values per event, not one; such events are missing", n, np.size(v)
                )

    def finish(self, arrays: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        """The first ``n`` rows of ``arrays`` as context arrays (:func:`.context.as_context`)."""
        return {k: as_context(k, v[:n]) for k, v in arrays.items()}

    def once(self) -> dict[str, object]:
        """``epicsOnce/<pv>`` -> value of each configured PV that never changed over the events read."""
        out = {}
        for n, v in self._once.items():
            if v is _NOT_SET:
                continue
            out["epicsOnce/" + n[len("epics/") :]] = v if isinstance(v, str) else _scalar(v)
        return out  # type: ignore[return-value]


def _same(a, b) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    x, y = _scalar(a), _scalar(b)
    return x == y or (np.isnan(x) and np.isnan(y))
