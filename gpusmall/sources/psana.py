"""Raw events from psana (LCLS-II XTC2 files or an experiment/run), read sequentially.

Config::

    source:
      type: psana
      files: [r0014.xtc2]          # or  exp: xpptut15, run: 14
      events: 1000                 # optional limit
      psana: {skip_calib_load: all} # any further DataSource keyword

Each configured detector is the psana detector of the same name, or of its ``source_name``.
From psana come the detector type (checked against the config), shape (panels, rows, cols),
raw dtype, ePix10ka pixel configuration bits, pixel coordinates (um) and, when the config names no
constants file, psana's calibration constants. psana is imported here only, so the rest of the
package works without it.

psana's event loop is sequential: :meth:`PsanaSource.batches` walks ``run.events()`` once, so the
number of events is not known in advance (``n_events`` is None) and batches must be asked for in
order. An event where a detector has no data, or data of the wrong shape, is marked damaged for it
(its raw frame is zeros).

MPI: with ``exp``/``run`` (and ``psana: {dir: ...}`` for a local experiment folder holding ``xtc/`` and
``xtc/smalldata/``) under ``mpiexec -n K`` (K >= 3), psana distributes the events itself: rank 0
reads the small data, rank 1 builds events, the others receive events in batches. The source is then
``distributed``: every rank walks its own ``run.events()`` to the end (ranks 0 and 1 get none), and
``event_index`` counts the rank's own events (the master file renumbers them in timestamp order).

Timestamps: psana's ``evt.timestamp`` is packed (``(seconds << 32) | nanoseconds``, seconds since the
EPICS epoch 1990-01-01 UTC); batches carry it as ns since the Unix epoch (:func:`unix_ns`), the meaning
``/timestamp`` has for every source. psana's events give Python no pulse id: ``/fiducials`` is the
event index.
With ``files`` psana has no MPI distribution (every rank would read every event), so rank 0 reduces
them all. psana's ``max_events`` (our ``events``) counts over all ranks.

Event context (SPEC 10, the ``context`` block; :mod:`.psana_context`): ``lightStatus/*`` from the timing
detector, ``scan/varStep`` and ``scan/<variable>`` of step scans, ``epics/<pv>`` and configured values, in every
batch's ``context``. With the scan context on, the run is walked step by step (``run.steps()``, then each
step's ``events()``; the same under psana's MPI distribution, where every rank sees every step).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterator

import numpy as np

from ..detectors import get_model
from ..detectors.constants import Constants
from ..errors import ConstantsError, InputError
from .base import DetectorSource, RawBatch, Source
from .psana_context import PsanaContext

log = logging.getLogger(__name__)

#: psana detector type (``det.raw._dettype``) -> gpusmall model type
PSANA_TYPES = {
    "epix10ka": "epix10ka",
    "epix10ka2m": "epix10ka",
    "epix10kaquad": "epix10ka",
    "epix10k": "epix10ka",
    "jungfrau": "jungfrau",
    "jungfrauemu": "jungfrau",
    "epix100": "epix100",
    "epix100a": "epix100",
    "opal": "camera",
    "alvium": "camera",
    "piranha": "camera",
    "piranha4": "camera",
    "zyla": "camera",
    "andor": "camera",
    "axis": "camera",
    "archon": "camera",
    "manta": "camera",
    "rayonix": "camera",
}

#: ePix10ka pixel control bits SPEC section 1 uses: T, M, g, ga and trbit (bit 4)
EPIX10KA_CBITS = 0x1F

#: events looked at, at most, to find a detector's shape and dtype when psana does not say
PEEK_EVENTS = 100

#: seconds from the Unix epoch (1970-01-01 UTC) to the EPICS epoch (1990-01-01 UTC), psana's time origin
EPICS_EPOCH_UNIX_S = 631_152_000


def unix_ns(packed) -> np.ndarray:
    """psana's event timestamps (uint64 ``(seconds << 32) | nanoseconds``, seconds since the EPICS epoch
    1990-01-01) as uint64 ns since the Unix epoch, gpusmall's ``/timestamp``. The order is kept."""
    t = np.asarray(packed, dtype=np.uint64)
    sec = (t >> np.uint64(32)) + np.uint64(EPICS_EPOCH_UNIX_S)
    return sec * np.uint64(10**9) + (t & np.uint64(0xFFFFFFFF))


def psana_model_type(dettype: str) -> str | None:
    """The gpusmall type of a psana detector type, or None when unknown."""
    t = (dettype or "").lower()
    if t in PSANA_TYPES:
        return PSANA_TYPES[t]
    for prefix, model in (
        ("epix10k", "epix10ka"),
        ("jungfrau", "jungfrau"),
        ("epix100", "epix100"),
        ("opal", "camera"),
        ("piranha", "camera"),
        ("alvium", "camera"),
    ):
        if t.startswith(prefix):
            return model
    return None


def psana_world() -> tuple[int, int]:
    """(rank, size) of the MPI world psana runs in: psana uses MPI unless ``PS_PARALLEL=none``."""
    if os.environ.get("PS_PARALLEL", "mpi") != "mpi":
        return 0, 1
    try:
        from mpi4py import MPI
    except ImportError:
        return 0, 1
    return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()


def tolerate_offline_file_lookup() -> None:
    """Let psana's ``exp``/``run`` mode work without the LCLS web service.

    psana 4.x asks ``pswww.slac.stanford.edu`` which files a run has and means to fall back to the files
    on disk when it gets no answer, but a connection error escapes before its own ``try`` (offline
    laptops, compute nodes without outside network). This wraps that one lookup so a connection error
    reads as "no answer"; psana then finds the files under ``dir``. Nothing else in psana changes.
    """
    try:
        import requests
        from psana.psexp import ds_base
    except ImportError:
        return
    base = getattr(ds_base, "DataSourceBase", None)
    lookup = getattr(base, "_get_file_info_from_db", None)
    if lookup is None or getattr(lookup, "_gpusmall_offline", False):
        return

    def file_info_or_nothing(self, runnum):
        try:
            return lookup(self, runnum)
        except requests.exceptions.RequestException as exc:
            log.info(
                "psana: no answer from the LCLS file database (%s); looking for run %s on disk",
                type(exc).__name__,
                runnum,
            )
            return {}

    file_info_or_nothing._gpusmall_offline = True  # type: ignore[attr-defined]
    base._get_file_info_from_db = file_info_or_nothing  # type: ignore[union-attr]


def _shape3(a: np.ndarray) -> tuple[int, ...]:
    return (1, *a.shape) if a.ndim == 2 else tuple(a.shape)


class PsanaSource(Source):
    """Events of one psana run.

    Args:
        cfg: the validated ``source`` block (SourceConfig).
        detectors: name -> {"type", "shape", "source_name", "constants", ...} from the config.
        context: the ``context`` block (ContextConfig); None: its defaults (light status when the run has the
            timing detector, scans when it has scan variables).
    """

    def __init__(self, cfg, detectors: dict[str, dict], context=None):
        try:
            from psana import DataSource
        except ImportError as exc:
            raise InputError(f"source.type: psana is not installed ({exc}); pip install psana") from None
        kwargs = dict(cfg.psana or {})
        rank, size = psana_world()
        if cfg.files:
            kwargs["files"] = cfg.files if len(cfg.files) > 1 else cfg.files[0]
            if size > 1 and rank == 0:
                log.info(
                    "psana reads 'files' on every rank without distributing them: rank 0 reduces them "
                    "all (for psana's MPI distribution give exp, run and psana: {dir: ...})"
                )
        else:
            kwargs["exp"], kwargs["run"] = cfg.exp, cfg.run
            tolerate_offline_file_lookup()
            if size > 1:
                need = 3 + int(os.environ.get("PS_SRV_NODES", "0") or 0)
                if size < need:
                    raise InputError(
                        f"source: psana distributes exp {cfg.exp} run {cfg.run} over MPI ranks only "
                        f"with at least {need} (one reads small data, one builds events, the "
                        f"others reduce); got {size}: run with 1 rank or mpiexec -n {need} or more"
                    )
                self.distributed = True
        if cfg.follow:  # psana's live mode waits for the files of a run still being written
            kwargs.setdefault("live", True)
        if cfg.events is not None:
            kwargs.setdefault("max_events", int(cfg.events))
        self.limit = None if self.distributed else cfg.events  # psana's max_events counts over all ranks
        what = cfg.files if cfg.files else f"exp {cfg.exp} run {cfg.run}"
        try:
            self.ds = DataSource(**kwargs)
            self.run = next(self.ds.runs())
        except StopIteration:
            raise InputError(f"source: psana found no run in {what}") from None
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as exc:
            raise InputError(f"source: psana cannot open {what}: {exc or type(exc).__name__}") from None
        self.n_events = None
        self.ctx = PsanaContext(self.run, context)  # resolved before any event is read
        self.context = dict(self.ctx.names)
        self._events = None  # iterator over (event, step) of the run, made once
        self._ahead: deque = deque()  # events read ahead to learn shapes, not yet delivered
        self._pos = 0  # index of the next event the iterator delivers
        self.dets = {}
        self.detectors = {}
        self._config_shape = {
            name: (d.get("shape") if d.get("shape_given", True) else None) for name, d in detectors.items()
        }
        known = sorted(getattr(self.run, "detnames", []) or [])
        for name, d in detectors.items():
            psname = d.get("source_name") or name
            if known and psname not in known:
                raise InputError(f"detectors.{name}: psana run has no detector {psname!r}; it has {', '.join(known)}")
            try:
                det = self.run.Detector(psname)
            except Exception as exc:  # psana raises various errors for unknown names
                raise InputError(f"detectors.{name}: psana detector {psname!r}: {exc}") from None
            if not hasattr(det, "raw"):
                raise InputError(f"detectors.{name}: psana detector {psname!r} has no raw data")
            self.dets[name] = det.raw
            self.detectors[name] = self._describe(name, det.raw, d)

    # -- description ---------------------------------------------------------------------------
    def _describe(self, name: str, raw, d: dict) -> DetectorSource:
        dettype = str(getattr(raw, "_dettype", "") or "")
        mtype = psana_model_type(dettype)
        if mtype is None:
            mtype = d["type"]
            log.info("detector %s: psana type %r unknown, using the config's %r", name, dettype, mtype)
        elif mtype != d["type"]:
            raise InputError(
                f"detectors.{name}.type: {d['type']!r}, but psana says {name} is a {dettype!r} "
                f"(gpusmall type {mtype!r})"
            )
        model = get_model(mtype)
        shape, dtype = self._shape_dtype(name, raw, model)
        want = d.get("shape") if d.get("shape_given", True) else None
        if want is not None and tuple(want) != shape:
            raise InputError(f"detectors.{name}.shape: {list(want)}, but psana delivers {list(shape)}")
        cbits = None
        if mtype == "epix10ka" and hasattr(raw, "_cbits_config_detector"):
            try:
                cb = raw._cbits_config_detector()
            except Exception as exc:  # noqa: BLE001 - psana config parsing can fail in many ways
                log.warning("detector %s: no pixel config bits from psana: %s", name, exc)
                cb = None
            if cb is not None and not (isinstance(cb, list) and cb and cb[0] is None):
                cb = np.asarray(cb)
                if _shape3(cb) == shape:
                    cbits = (cb.reshape(shape) & EPIX10KA_CBITS).astype(np.uint8)
                else:
                    log.warning("detector %s: config bits of shape %s ignored", name, cb.shape)
        x = y = z = None
        try:
            xyz = raw._pixel_coords()
            if xyz is not None and all(a is not None and np.size(a) == np.prod(shape) for a in xyz):
                x, y, z = (np.asarray(a, np.float32).reshape(shape) for a in xyz)
        except Exception as exc:  # noqa: BLE001 - no geometry: the pipeline uses its default
            log.info("detector %s: no geometry from psana: %s", name, exc)
        segments = None
        try:
            seg = getattr(raw, "_segment_numbers", None)
            if seg is not None and len(seg) == shape[0]:
                segments = np.asarray(seg, np.int32)
        except Exception as exc:  # noqa: BLE001 - older psana: no segment numbers
            log.info("detector %s: no segment numbers from psana: %s", name, exc)
        constants = None
        if not d.get("constants"):
            constants = self._psana_constants(name, raw, model, shape)
        return DetectorSource(
            name,
            mtype,
            shape,
            np.dtype(dtype),
            config_bits=cbits,
            x=x,
            y=y,
            z=z,
            constants=constants,
            segments=segments,
        )

    def _shape_dtype(self, name, raw, model):
        shape = None
        try:
            s = raw._shape_as_daq()
            if s is not None and None not in tuple(s):
                shape = tuple(int(v) for v in s)
                shape = (1, *shape) if len(shape) == 2 else shape
        except Exception:  # noqa: BLE001
            shape = None
        dtype = np.uint16 if model.type in ("epix10ka", "jungfrau", "epix100") else None
        if self.distributed and (shape is None or dtype is None):
            # ranks 0 and 1 of psana's MPI distribution see no events: nothing to peek at
            if shape is None:
                want = self._config_shape.get(name)
                if want is None:
                    raise InputError(
                        f"detectors.{name}.shape: psana does not say it, and under psana's MPI "
                        f"distribution not every rank sees events; give the shape in the config"
                    )
                shape = tuple(want)
            if dtype is None:
                dtype = np.uint16
                log.info("detector %s: raw dtype taken as uint16 (psana's MPI distribution)", name)
        if shape is None or dtype is None:
            for evt in self._peek():
                a = raw.raw(evt)
                if a is not None:
                    a = np.asarray(a)
                    shape, dtype = shape or _shape3(a), dtype or a.dtype
                    break
        if shape is None or len(shape) != 3:
            raise InputError(
                f"detectors.{name}: psana gives no raw data in the first {PEEK_EVENTS} events, cannot tell its shape"
            )
        return shape, dtype

    def _psana_constants(self, name, raw, model, shape) -> Constants | None:
        """psana's own constants (pedestals, gain, rms, status, and its ``pixel_mask`` as the ``calib`` mask,
        1 = keep), or ConstantsError when a gain-switching detector has none (e.g. offline with
        skip_calib_load)."""

        def get(method):
            try:
                a = getattr(raw, method)()
            except Exception:  # noqa: BLE001
                return None
            return None if a is None else np.asarray(a)

        peds = get("_pedestals")
        if peds is None:
            if model.n_gains > 1:
                raise ConstantsError(
                    f"detector {name}: psana has no calibration constants for it (offline, or "
                    f"skip_calib_load); give a constants file with 'constants:' in "
                    f"detectors.{name}"
                )
            return None
        n = model.n_gains
        peds = peds.astype(np.float32).reshape((n, *shape) if peds.size == n * np.prod(shape) else shape)
        offs = (getattr(raw, "_calibconst", None) or {}).get("pixel_offset") if model.type == "jungfrau" else None
        if offs is not None and offs[0] is not None:
            peds = peds + np.asarray(offs[0], np.float32).reshape(peds.shape)
        gain = get("_gain")
        gain = np.ones_like(peds) if gain is None else gain.astype(np.float32).reshape(peds.shape)
        noise = get("_rms")
        if noise is not None:
            noise = noise.astype(np.float32).reshape((n, *shape) if noise.size == n * np.prod(shape) else shape)
        status = get("_status")
        if status is not None:
            status = status.reshape((-1, *shape)).any(axis=0).astype(np.uint8)
        calib_mask = get("_mask_calib")  # psana's pixel_mask constants (det.raw._mask_calib), 1 = keep
        if calib_mask is not None:
            calib_mask = calib_mask.reshape((-1, *shape)).all(axis=0).astype(np.uint8)
        return Constants(pedestal=peds, gain=gain, noise=noise, status=status, mask=calib_mask)

    # -- events --------------------------------------------------------------------------------
    def context_once(self) -> dict[str, object]:
        """``epicsOnce/<pv>`` of the configured PVs that never changed (:meth:`.PsanaContext.once`)."""
        return self.ctx.once()

    def _walk(self) -> Iterator[tuple]:
        """(event, step) of every event in run order; step: (index, {``scan/<var>``: value}) when the run is
        walked step by step, else None."""
        if not self.ctx.steps:
            for evt in self.run.events():
                yield evt, None
            return
        for i, step in enumerate(self.run.steps()):
            values = self.ctx.step_values(step)
            for evt in step.events():
                yield evt, (i, values)

    def _iter(self):
        if self._events is None:
            self._events = self._walk()
        return self._events

    def _peek(self) -> Iterator:
        """Events read ahead (kept for delivery later) to learn shapes and dtypes."""
        yield from [evt for evt, _ in list(self._ahead)]
        it = self._iter()
        while len(self._ahead) < PEEK_EVENTS:
            item = next(it, None)
            if item is None:
                return
            self._ahead.append(item)
            yield item[0]

    def _next_event(self):
        """(event, step) of the next event (see :meth:`_walk`), or None at the end."""
        if self.limit is not None and self._pos >= self.limit:
            return None
        item = self._ahead.popleft() if self._ahead else next(self._iter(), None)
        if item is not None:
            self._pos += 1
        return item

    def batches(
        self, batch_size: int, start: int = 0, stop: int | None = None, out: dict[str, np.ndarray] | None = None
    ) -> Iterator[RawBatch]:
        """Batches of events ``[start, stop)`` in run order (``stop`` None: to the end).

        psana reads sequentially: ``start`` may not lie before events already delivered. ``out``: host
        buffers (batch_size, ...) per detector to fill (the run's pinned buffers); each batch then lives
        in them, so take one batch at a time.
        """
        if start < self._pos:
            raise ValueError(f"psana source: events are read in order; event {start} was already read")
        while self._pos < start and self._next_event() is not None:
            pass
        while stop is None or self._pos < stop:
            n_max = batch_size if stop is None else min(batch_size, stop - self._pos)
            ts = np.zeros(n_max, np.uint64)
            idx = np.zeros(n_max, np.int64)
            raw = {
                name: (out[name][:n_max] if out is not None and name in out else np.zeros((n_max, *s.shape), s.dtype))
                for name, s in self.detectors.items()
            }
            damaged = {name: np.zeros(n_max, bool) for name in self.detectors}
            context = self.ctx.new_arrays(n_max)
            n = 0
            while n < n_max:
                item = self._next_event()
                if item is None:
                    break
                evt, step = item
                ts[n], idx[n] = np.uint64(evt.timestamp), self._pos - 1
                self.ctx.fill(context, n, evt, step)
                for name, det in self.dets.items():
                    a = det.raw(evt)
                    if a is None or np.size(a) != raw[name][n].size or _shape3(np.asarray(a)) != raw[name].shape[1:]:
                        damaged[name][n] = True
                        raw[name][n] = 0
                    else:
                        raw[name][n] = np.asarray(a).reshape(raw[name].shape[1:])
                n += 1
            if n == 0:
                return
            yield RawBatch(
                unix_ns(ts[:n]),
                idx[:n],
                {k: v[:n] for k, v in raw.items()},
                {k: v[:n] for k, v in damaged.items()},
                self.ctx.finish(context, n),
            )
            if n < n_max:
                return

    def read(self, start: int, stop: int, out=None) -> RawBatch:
        """Events ``[start, stop)``, only at or after the events already read (psana is sequential)."""
        for batch in self.batches(stop - start, start, stop, out=out):
            return batch
        return RawBatch(
            np.zeros(0, np.uint64),
            np.zeros(0, np.int64),
            {k: np.zeros((0, *s.shape), s.dtype) for k, s in self.detectors.items()},
            {k: np.zeros(0, bool) for k in self.detectors},
            self.ctx.finish(self.ctx.new_arrays(0), 0),
        )
