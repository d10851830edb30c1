"""One detector's reduction for a run: constants, mask, calibration, function tree, run sums.

Everything that depends only on constants and geometry is built here once and kept on the device;
:meth:`DetectorPipeline.process` then handles one raw batch.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..backend import Backend
from ..calib import Calibrator, make_common_mode
from ..detectors import get_model
from ..detectors.constants import (
    check_measured_ranges,
    default_constants,
    default_geometry,
    load_constants,
    select_config_bits,
    validate_constants,
)
from ..detectors.masks import static_mask
from ..errors import ConstantsError
from ..funcs import FrameContext, build_function
from ..funcs.base import SETUP_EVENT
from ..funcs.sums import RunSums
from ..sources.base import DetectorSource

log = logging.getLogger(__name__)


def _uses_geometry(specs) -> bool:
    """Whether a function tree holds a function whose numbers depend on the pixel positions (azav)."""
    return any(s.type == "azav" or _uses_geometry(s.children) for s in specs)


class DetectorPipeline:
    """Reduction of one detector.

    Args:
        name: detector name.
        cfg: its validated DetectorConfig.
        src: what the source says of it (shape, dtype, geometry, constants).
        specs: validated function specs.
        backend: the run's backend.
    """

    def __init__(self, name: str, cfg, src: DetectorSource, specs, backend: Backend, selections=None):
        self.name, self.cfg, self.backend = name, cfg, backend
        self.model = model = get_model(cfg.type)
        self.shape = shape = tuple(src.shape)
        if cfg.constants:
            c = load_constants(cfg.constants, name, model, shape)
        elif src.constants is not None:
            c = validate_constants(name, model, shape, src.constants)
        elif model.n_gains == 1:
            log.warning(
                "detector %s: no constants file: pedestal 0 and gain 1 (raw ADU); set detectors.%s.constants "
                "for a calibrated run",
                name,
                name,
            )
            c = default_constants(model, shape)
        else:
            raise ConstantsError(
                f"detector {name}: a {model.type} needs a constants file with pedestals (detectors.{name}.constants)"
            )
        # the run's own pixel configuration decides (SPEC 1); the constants file's only when the run has none
        c.config_bits = select_config_bits(name, shape, c.config_bits, src.config_bits)
        model.check_raw_dtype(name, src.dtype)  # before any event: gain bits need integer raw data
        self.pixel_um = pixel_um = cfg.pixel_um or model.pixel_um or 1.0
        if src.x is not None:
            x, y, z = src.x, src.y, src.z
        elif c.x is not None and c.y is not None:
            x, y, z = c.x, c.y, c.z if c.z is not None else np.zeros(shape, np.float32)
        else:
            x, y, z = default_geometry(shape, pixel_um)  # type: ignore[arg-type]
            if not (cfg.pixel_um or model.pixel_um) and _uses_geometry(specs):
                log.warning(
                    "detector %s: no pixel_um and no x, y in the constants: azav takes 1 um pixels (pixel "
                    "units); set detectors.%s.pixel_um",
                    name,
                    name,
                )
        self.constants = c
        self.segments = src.segments  # psana's segment numbers, or None
        self.geometry = tuple(np.asarray(a, np.float32) for a in (x, y, z))
        m = cfg.mask
        self.mask, self.cmask = static_mask(
            name,
            model,
            shape,
            c,
            status=m.status,
            edges=m.edges,
            central=m.central,
            unbonded=m.unbonded,
            neighbours=m.neighbours,
            user=m.user,
            calib=m.calib,
        )
        # a gain range the run can meet must have pedestals (SPEC 2): refused here, or (gain mode unknown
        # before the events) its pixels are bad in those events through the model's decoding
        where = repr(str(cfg.constants)) if cfg.constants else "(from the source)"
        self.model = model = check_measured_ranges(name, model, where, c, self.mask)
        self.common_mode = make_common_mode(name, cfg.common_mode, model, c, backend)
        self.calibrator = Calibrator(
            model,
            c,
            self.mask,
            backend,
            units=cfg.units,
            photon_energy_kev=cfg.photon_energy_kev,
            common_mode=self.common_mode,
            det=name,
        )
        if model.invalid_ranges:  # the CUDA kernels decode gain ranges themselves: take the xp path
            self.calibrator.use_kernel = False
        noise = c.noise if c.noise is None or c.noise.ndim == 3 else c.noise[0]
        saturation = cfg.saturation if cfg.saturation is not None else model.saturation_value(src.dtype)
        to_dev = backend.to_device
        self.ctx = FrameContext(
            det=name,
            model=model,
            backend=backend,
            shape=shape,  # type: ignore[arg-type]
            mask=to_dev(self.mask),
            noise=to_dev(noise),
            x=to_dev(self.geometry[0]),
            y=to_dev(self.geometry[1]),
            z=to_dev(self.geometry[2]),
            units=cfg.units,
            saturation=saturation,
            pixel_um=pixel_um,
            mask_value=cfg.mask_value,
        )
        self.raw_dtype = np.dtype(src.dtype)
        self.functions = [build_function(s) for s in specs]
        self.function_paths = [s.path for s in specs]  # config key path of each, for messages
        self._setup_event = None  # see setup_event
        for f in self.functions:
            f.setup(self.ctx)
        self.sums = RunSums(
            cfg.sums,
            shape,
            backend,
            mask=self.mask,
            mask_value=cfg.mask_value,
            camera=model.type == "camera",
            selections=selections,
        )
        self.cube = None  # the run's producer.cube.RunCube, when it sums this detector's frames
        # NumPy with threads: the events of a batch are split over a pool of this pipeline's
        self.pool = (
            ThreadPoolExecutor(backend.threads, thread_name_prefix=f"gpusmall-{name}")
            if not backend.is_gpu and backend.threads > 1
            else None
        )

    def _accumulate(self, data, keep, events, cube_ids) -> None:
        """Run sums and cube rows of a block of calibrated events."""
        self.sums.update(data, keep, None if events is None else events.context)
        if self.cube is not None and cube_ids is not None:
            self.cube.add_frames(self.name, data, cube_ids)

    def process(self, raw, keep=None, events=None, frames_out: list | None = None, cube_ids=None) -> dict[str, Any]:
        """raw (events, panels, rows, cols) on the device -> outputs (device arrays) by short name.
        ``keep``: (events,) host bool, the events that enter the run sums (None: all; damaged: False).
        ``events``: the batch's :class:`~gpusmall.funcs.base.EventInfo` (what user functions see), or None.
        ``frames_out``: a list that receives (frames, outputs) of each block of events, in order (event functions).
        ``cube_ids``: (splits, events) host int64 cube bin of each event (:meth:`~gpusmall.producer.cube.RunCube.rows`).

        On NumPy with ``backend.threads`` > 1 the batch is cut into that many blocks of consecutive
        events (fewer for a short batch), each calibrated and reduced in a thread of the pool (NumPy, SciPy's
        labelling and sparse products release the GIL; the CPU kernels take one thread there, so they run
        their one-thread builds); the run sums take the blocks in order. Every function works event by
        event, so the outputs are those of one thread (test)."""
        n = raw.shape[0]
        if self.pool is None or n == 0:
            frames = self.calibrator(raw)
            frames.events = events
            self._accumulate(frames.data, keep, events, cube_ids)
            out = self._reduce(frames)
            if frames_out is not None:
                frames_out.append((frames, out))
            return out
        edges = np.linspace(0, n, min(self.backend.threads, n) + 1).astype(int)
        blocks = [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]

        def block(which):
            frames = self.calibrator(raw[which])
            frames.events = None if events is None else events[which]
            return frames, self._reduce(frames)

        done = list(self.pool.map(block, blocks))
        for which, (frames, out) in zip(blocks, done):
            self._accumulate(
                frames.data,
                None if keep is None else keep[which],
                frames.events,
                None if cube_ids is None else cube_ids[:, which],
            )
            if frames_out is not None:
                frames_out.append((frames, out))
        return {k: np.concatenate([out[k] for _, out in done]) for k in done[0][1]}

    def event_output_nbytes(self) -> dict[str, int]:
        """Bytes of one event's outputs per top-level function (by config key path), measured by calibrating
        and reducing one event of zeros: the shapes are those of every real event (padded outputs); ragged
        per-item outputs (droplets, photons) count as many items as their bound per event (``max_droplets``...)."""
        from ..funcs.droplet import sparse_columns

        _, by_function = self.setup_event()
        out = {}
        for path, f in zip(self.function_paths, self.functions):
            bounds = sparse_columns([f]).bounds
            out[path] = int(
                sum(int(v.nbytes) + bounds.get(k, 0) * v.dtype.itemsize for k, v in by_function[path].items())
            )
        return out

    def setup_event(self):
        """(frames, outputs by top-level function path) of one event of zeros, calibrated and reduced once at
        set-up (event index -1: :data:`~gpusmall.funcs.base.SETUP_EVENT`): what sizes the run's memory and
        fixes what user functions return, before the output file exists."""
        if self._setup_event is None:

            def one_event():
                frames = self.calibrator(self.backend.xp.zeros((1, *self.shape), self.raw_dtype))
                frames.events = SETUP_EVENT
                return frames, {p: f(frames) for p, f in zip(self.function_paths, self.functions)}

            # in the pool where there is one, as every batch: the same (one-thread) builds of the CPU kernels
            self._setup_event = one_event() if self.pool is None else self.pool.submit(one_event).result()
        return self._setup_event

    def _reduce(self, frames) -> dict[str, Any]:
        out = {}
        for f in self.functions:
            out.update(f(frames))
        return out

    def user_data_cfg(self) -> dict[str, Any]:
        """What /UserDataCfg/<det>/ holds: constants, geometry, masks, corrections, function parameters.

        Also under smalldata_tools' names: ``rms`` (= ``noise``), ``ix``, ``iy`` ((panels, rows, cols) int32
        column and row of each pixel in the image assembled from ``x``, ``y`` as ``gpusmall avimage`` assembles
        it: :func:`~gpusmall.analysis.avimage.pixel_grid`; left out, with a warning, for a geometry that does
        not fit a grid), and every function parameter as ``<top function>__<function>_<param>``
        (:meth:`~gpusmall.funcs.base.ReductionFunction.smalldata_params`) beside ours, which win a clash.
        """
        from ..analysis.avimage import pixel_grid

        c = self.constants
        out = {
            "ped": c.pedestal,
            "gain": c.gain,
            "noise": c.noise,
            "rms": c.noise,
            "status": c.status,
            "x": self.geometry[0],
            "y": self.geometry[1],
            "z": self.geometry[2],
            "mask": self.mask.astype(np.uint8),
            "cmask": self.cmask.astype(np.uint8),
            "config_bits": c.config_bits,
            "type": self.model.type,
            "units": self.cfg.units,
            "shape": np.asarray(self.shape),
            "pixel_um": float(self.pixel_um),
            "mask_value": self.cfg.mask_value,
            "segments": None if self.segments is None else np.asarray(self.segments, np.int32),
        }
        cm = self.cfg.common_mode.model_dump() if self.cfg.common_mode else dict(self.model.default_common_mode)
        for k, v in cm.items():
            if v is not None:
                out[f"common_mode__{k}"] = v
        for k, v in self.cfg.mask.model_dump().items():
            out[f"mask__{k}"] = "null" if v is None else v  # as function parameters: every key is there
        try:
            rows, cols, _, _ = pixel_grid(self.geometry[0], self.geometry[1], self.pixel_um)
            out["ix"], out["iy"] = rows.astype(np.int32), cols.astype(np.int32)  # psana iX (image row, along x), iY
        except ValueError as exc:
            log.warning("detector %s: no ix, iy in /UserDataCfg: %s", self.name, exc)
        for f in self.functions:
            out.update(f.params())
        for f in self.functions:
            for k, v in f.smalldata_params().items():
                if k in out:
                    log.warning(
                        "detector %s: parameter %s under smalldata_tools' name is also one of ours; ours is written",
                        self.name,
                        k,
                    )
                    continue
                out[k] = v
        return out

    def sum_results(self) -> dict[str, np.ndarray]:
        return {f"{self.name}_{k}": v for k, v in self.sums.results().items()}


def make_pipelines(cfg, source, backend: Backend) -> dict[str, DetectorPipeline]:
    """{detector: DetectorPipeline} of a validated run config for an open source, with the run's selections
    (:func:`~gpusmall.producer.context.check_run_context`: InputError before any event for a context key the
    source lacks)."""
    from .context import check_run_context

    selections = check_run_context(cfg, source)
    return {
        name: DetectorPipeline(
            name, dcfg, source.detectors[name], cfg.function_specs(name), backend, selections=selections
        )
        for name, dcfg in cfg.detectors.items()
    }
