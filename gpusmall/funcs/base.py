"""The reduction-function base: parameters, one-time setup, batched call, children, output names.

A function receives :class:`Frames` (a calibrated batch) and returns a dict of per-event arrays,
each with a leading events axis. Output names are ``<name>_<key>``; a child's are
``<name>_<childname>_<key>`` (SPEC section 6). Parameters are written once as ``<name>__<param>`` (a child's as
``<name>_<childname>__<param>``) and again under smalldata_tools' names (:meth:`ReductionFunction.smalldata_params`).

Geometry-only work happens in :meth:`ReductionFunction.prepare`, once per run, on the device.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from ..backend import Backend
from ..detectors.base import DetectorModel


class FunctionParams(BaseModel):
    """Parameters common to every function; subclasses add their own. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    name: str | None = None


@dataclass
class Frames:
    """A calibrated batch as functions see it.

    Attributes:
        data: (events, panels, rows, cols) float32 in the detector's units; bad pixels are 0.
        good: (events, panels, rows, cols) bool, False where the pixel is bad in that event.
        raw: (events, panels, rows, cols) raw words (for saturation counts), or None.
        events: the batch's :class:`EventInfo` (timestamps, indices, context), or None (e.g. a test batch).
    """

    data: Any
    good: Any
    raw: Any = None
    events: EventInfo | None = None

    def crop(self, index: tuple[slice, ...]) -> Frames:
        idx = (slice(None),) + tuple(index)
        return Frames(self.data[idx], self.good[idx], None if self.raw is None else self.raw[idx], self.events)


@dataclass
class EventInfo:
    """The events of a batch, on the host: ``timestamp`` (events,) uint64 ns since the Unix epoch,
    ``event_index`` (events,) int64, ``context`` name -> (events,) array (SPEC section 10)."""

    timestamp: Any
    event_index: Any
    context: dict = field(default_factory=dict)

    def __getitem__(self, events: slice) -> EventInfo:
        return EventInfo(
            self.timestamp[events], self.event_index[events], {k: v[events] for k, v in self.context.items()}
        )

    def describe(self) -> str:
        """``the batch starting at event N``, or ``the set-up call`` for :data:`SETUP_EVENT` (for messages)."""
        if not len(self.event_index) or int(self.event_index[0]) < 0:
            return "the set-up call (one event of zeros)"
        return f"the batch starting at event {int(self.event_index[0])}"


SETUP_EVENT = EventInfo(np.zeros(1, np.uint64), np.full(1, -1, np.int64))
"""The one event of zeros every pipeline calibrates and reduces at set-up (event index -1)."""


@dataclass
class FrameContext:
    """What a function knows about the frames it will receive, (panels, rows, cols) arrays on the device.

    Attributes:
        det: detector name (for messages).
        model: the detector model.
        backend: the run's backend.
        shape: (panels, rows, cols) of each frame.
        mask: static mask, bool, True = keep.
        noise: ADU rms of the high (first) gain range, or None.
        x, y, z: pixel centres in micrometres, or None.
        z_mean: mean z (um, float64) of the whole detector, or None (= the mean of ``z``, i.e. this context
            covers the whole detector); :meth:`crop` sets it, so geometry that refers to the detector's mean z
            (azav's pixel vector) does not depend on the sub-region a pixel sits in.
        origin: (panel, row, col) of this frame's first pixel in the full detector.
        units: ``adu``, ``kev`` or ``photons``: the unit of the frames, and of every threshold applied to
            them (``thres_adu``, droplet thresholds without ``use_rms``, sums' ``_thresADU<t>``), as
            smalldata_tools applies its thresholds to the calibrated image; with the default ``adu`` the
            names say it.
        saturation: raw ADU value at which a pixel saturates.
        pixel_um: pixel pitch in micrometres (1 = pixel units).
        mask_value: what bad pixels become in stored pixel images (e.g. the ROI ``area``):
            ``"zero"`` (0) or ``"nan"`` (NaN); see :meth:`stored_image` (SPEC section 3).
    """

    det: str
    model: DetectorModel
    backend: Backend
    shape: tuple[int, int, int]
    mask: Any
    noise: Any = None
    x: Any = None
    y: Any = None
    z: Any = None
    z_mean: float | None = None
    origin: tuple[int, int, int] = (0, 0, 0)
    units: str = "adu"
    saturation: float = float("inf")
    pixel_um: float = 1.0
    mask_value: str = "zero"

    @property
    def xp(self):
        return self.backend.xp

    def detector_z_mean(self) -> float:
        """Mean z (um) of the whole detector: ``z_mean`` when set, else the mean of ``z`` (0 without z)."""
        if self.z_mean is not None:
            return self.z_mean
        if self.z is None:
            return 0.0
        return float(np.asarray(self.backend.to_host(self.z), np.float64).mean())

    def stored_image(self, data, good):
        """``data`` as written to the output file: bad pixels 0 (``mask_value: zero``) or NaN (``nan``).

        ``data`` and ``good`` have the same shape (any, e.g. (events, rows, cols)) on the backend's device;
        returns float32 on the same device. With ``zero`` the calibrated data already has 0 there and is
        returned as it is.
        """
        if self.mask_value != "nan":
            return data
        xp = self.xp
        return xp.where(good, data, xp.float32(np.nan)).astype(xp.float32, copy=False)

    def crop(self, index: tuple[slice, slice, slice]) -> FrameContext:
        """The context of a (panels, rows, cols) sub-region given as three slices with explicit bounds.

        Pixel arrays are cut; ``z_mean`` keeps the whole detector's mean z (see :meth:`detector_z_mean`).
        """

        def cut(a):
            return None if a is None else a[index]

        shape = tuple(s.stop - s.start for s in index)
        origin = tuple(o + s.start for o, s in zip(self.origin, index))
        return replace(
            self,
            shape=shape,
            mask=cut(self.mask),
            noise=cut(self.noise),
            x=cut(self.x),
            y=cut(self.y),
            z=cut(self.z),
            origin=origin,
            z_mean=None if self.z is None else self.detector_z_mean(),
        )


class ReductionFunction:
    """Base of every reduction function.

    Subclasses set ``type``, ``Params`` (``passes`` when they hand frames on, ``takes`` when they need more
    than an image) and implement
    :meth:`compute`; they may override :meth:`prepare` (one-time set-up, returns the context for the children) and
    :meth:`static_outputs` (arrays written once to /UserDataCfg, e.g. bin centres).
    """

    type: ClassVar[str] = "function"
    Params: ClassVar[builtins.type[FunctionParams]] = FunctionParams  # builtins: ``type`` is the str above
    passes: ClassVar[str | tuple[str, ...] | None] = None
    """What :meth:`prepare` and :meth:`compute` hand on to children, one kind or a tuple of kinds: ``"image"``
    (a region of the calibrated frames, roi), ``("droplets", "image")`` (droplet: the droplet image, i.e. the
    calibrated values at the pixels of the droplets kept and 0 elsewhere, with the lists of those pixels), or
    None (no children: config validation rejects ``children`` under such a function). See :func:`kinds`."""
    takes: ClassVar[tuple[str, ...]] = ("image",)
    """What this function can be given: the detector's calibrated frames are an ``"image"``; config validation
    rejects a function under a parent (or at the top level) that passes none of these kinds."""

    def __init__(self, params: FunctionParams, children: list[ReductionFunction] | None = None):
        self.p = params
        self.children = children or []
        self.ctx: FrameContext = None  # type: ignore[assignment]  # set by setup(), before any compute()

    @property
    def name(self) -> str:
        return self.p.name or self.default_name()

    def default_name(self) -> str:
        return self.type

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"

    # ---- one-time set-up ----------------------------------------------------------
    def setup(self, ctx: FrameContext) -> None:
        """Precompute everything that depends only on geometry and constants, then set up children."""
        self.ctx = ctx
        child_ctx = self.prepare(ctx)
        if self.children and child_ctx is None:
            raise ValueError(f"detector {ctx.det}: function {self.name} passes nothing to children")
        for child in self.children:
            child.setup(child_ctx)  # type: ignore[arg-type]

    def prepare(self, ctx: FrameContext) -> FrameContext | None:
        """Subclass hook for set-up; returns the context of the frames children receive (or None)."""
        return ctx

    # ---- per batch ----------------------------------------------------------------
    def compute(self, frames: Frames) -> tuple[dict[str, Any], Frames | None]:
        """(outputs keyed by short key, frames for the children or None). Every output has events first."""
        raise NotImplementedError

    def __call__(self, frames: Frames) -> dict[str, Any]:
        """Outputs of this function and its children, keyed by full output name."""
        outputs, child_frames = self.compute(frames)
        out = {f"{self.name}_{k}": v for k, v in outputs.items()}
        for child in self.children:
            for k, v in child(child_frames).items():  # type: ignore[arg-type]
                out[f"{self.name}_{k}"] = v
        return out

    # ---- for the output file --------------------------------------------------------
    def static_outputs(self) -> dict[str, np.ndarray]:
        """Arrays written once under /UserDataCfg/<det>/ as ``<name>__<key>`` (host arrays)."""
        return {}

    def params(self) -> dict[str, Any]:
        """Parameters (and static outputs) of this function and its children, by full key.

        Every parameter is there, also those that are None: they are written as the string ``"null"`` (their
        YAML spelling), so that e.g. ``polarization: null`` (switched off) is told from the default.
        """
        out = {}
        for k, v in self.p.model_dump(exclude={"name"}).items():
            out[f"{self.name}__{k}"] = "null" if v is None else v
        for k, v in self.static_outputs().items():
            out[f"{self.name}__{k}"] = v
        for child in self.children:
            for k, v in child.params().items():
                out[f"{self.name}_{k}"] = v
        return out

    SMALLDATA_PARAM_NAMES: ClassVar[dict[str, str]] = {"thres_adu": "thresADU"}
    """Parameters whose smalldata_tools name differs from ours (subclasses add theirs); the others keep theirs."""

    def smalldata_params(self, top: str | None = None) -> dict[str, Any]:
        """The same parameters (and static outputs) under smalldata_tools' names, for a top-level function.

        smalldata_tools writes every parameter of a function tree under its top function as
        ``<top>__<owner>_<param>``: ``owner`` is the function the parameter belongs to (the top function
        itself or any function below it, by its own name, without its parents'), e.g. ``roi0__roi0_bound``,
        ``roi0__pj_ax_1_axis``, ``azav__azav_q``; parameter names as :attr:`SMALLDATA_PARAM_NAMES` renames them.
        Values are those of :meth:`params`. A key that two functions of the tree would both write (two
        functions of the same name under one top function), or that is one of :meth:`params`' keys (names
        with ``__`` in them can do that), is left out: :meth:`params`' keys, which name the whole path, are
        always there.
        """
        seen: dict[str, list] = {}
        self._smalldata_collect(self.name if top is None else top, seen)
        ours = self.params()
        return {k: v[0] for k, v in seen.items() if len(v) == 1 and k not in ours}

    def _smalldata_collect(self, top: str, seen: dict[str, list]) -> None:
        own = {k: "null" if v is None else v for k, v in self.p.model_dump(exclude={"name"}).items()}
        own.update(self.static_outputs())
        for k, v in own.items():
            seen.setdefault(f"{top}__{self.name}_{self.SMALLDATA_PARAM_NAMES.get(k, k)}", []).append(v)
        for child in self.children:
            child._smalldata_collect(top, seen)


def kinds(passes) -> tuple[str, ...]:
    """A function's ``passes`` as a tuple of kinds (``"image"`` -> ``("image",)``, None -> ``()``)."""
    if passes is None:
        return ()
    return (passes,) if isinstance(passes, str) else tuple(passes)


def threshold(xp, data, thres):
    """``data`` with values below ``thres`` set to 0 (no copy when ``thres`` is None)."""
    if thres is None:
        return data
    return xp.where(data >= thres, data, xp.float32(0))
