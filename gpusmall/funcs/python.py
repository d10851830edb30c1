"""python: the user's own code in the event loop (SPEC section 11).

``{type: python, name: N, function: "module:function" | "file.py:function", params: {...}}`` calls
``function(batch, **params)`` once per batch, where ``batch`` (:class:`UserBatch`) holds the calibrated
frames ``(events, panels, rows, cols)`` on the run's backend (CuPy arrays on a GPU), ``xp`` (numpy or
cupy), the static ``mask``, ``noise``, the geometry ``x``, ``y``, ``z`` (um), the events' ``timestamps``
and ``event_index`` and ``context`` (per-event context arrays by name). The function returns a dict of
arrays (either backend, or anything ``xp.asarray`` takes) with a leading events axis; each is written as
``/<det>/<N>_<key>``. A ``file.py`` path is relative to the config file; a module is imported from the
user's environment.

The function is checked at set-up: it is called on one event of zeros (as every function is, to size the
run's memory) and what it returns fixes the keys, the per-event shapes and the dtypes. A later batch that
returns other keys, shapes or dtypes, a value without a leading events axis, a non-numeric array, or an
exception, stops the run with a :class:`UserFunctionError` naming the detector, the function, the first
event of the batch and (for an exception) the user's traceback; the batches before it are in the file.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from ..errors import GpusmallError, InputError
from .base import SETUP_EVENT, FrameContext, Frames, FunctionParams, ReductionFunction

_SPEC = re.compile(r"^(?P<where>.+):(?P<name>[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*)$")


class UserFunctionError(GpusmallError):
    """A user function failed or returned something else than at set-up (exit 1)."""


class UserFunctionSetupError(UserFunctionError, InputError):
    """A user function failed its set-up call (one event of zeros), before the run: bad input (exit 2)."""

    exit_code = 2


class PythonParams(FunctionParams):
    function: str
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("function")
    @classmethod
    def _spec(cls, v: str) -> str:
        if not _SPEC.match(v):
            raise ValueError("function must be 'module:function' or 'file.py:function'")
        return v


@dataclass
class UserBatch:
    """What a user function receives (see the module docstring); arrays on the run's backend.

    Attributes:
        frames: (events, panels, rows, cols) float32 calibrated frames; bad pixels 0.
        good: (events, panels, rows, cols) bool, False where a pixel is bad in that event.
        xp: the array module (numpy or cupy).
        mask: (panels, rows, cols) bool static mask (True = keep); noise: (panels, rows, cols) ADU or None.
        x, y, z: (panels, rows, cols) pixel centres in um, or None.
        timestamps: (events,) uint64 ns since the Unix epoch (host); event_index: (events,) int64 (host).
        context: per-event context arrays by name (host), e.g. ``lightStatus/laser``.
        det: the detector's name.
        outputs: (event functions only) the detector's built-in outputs by their names without ``<det>/``,
            e.g. ``roi0_sum``, on the backend; ragged droplet/photon outputs are flat (see ``<name>_len``).
    """

    frames: Any
    good: Any
    xp: Any
    mask: Any
    noise: Any
    x: Any
    y: Any
    z: Any
    timestamps: Any
    event_index: Any
    context: dict = field(default_factory=dict)
    det: str = ""
    outputs: dict = field(default_factory=dict)  # event functions: the detector's built-in outputs by short name

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    @classmethod
    def of(cls, ctx: FrameContext, frames: Frames, outputs: dict | None = None) -> UserBatch:
        """The batch a user function gets for ``frames`` (with their EventInfo) of the detector ``ctx`` describes."""
        ev = frames.events
        return cls(
            frames=frames.data,
            good=frames.good,
            xp=ctx.xp,
            mask=ctx.mask,
            noise=ctx.noise,
            x=ctx.x,
            y=ctx.y,
            z=ctx.z,
            timestamps=None if ev is None else ev.timestamp,
            event_index=None if ev is None else ev.event_index,
            context={} if ev is None else dict(ev.context),
            det=ctx.det,
            outputs=dict(outputs or {}),
        )


def load_callable(spec: str, base_dir: str | Path = "."):
    """The callable named by ``module:function`` or ``file.py:function`` (a path relative to ``base_dir``).

    Raises InputError naming what could not be found."""
    m = _SPEC.match(spec)
    if not m:
        raise InputError(f"function {spec!r}: must be 'module:function' or 'file.py:function'")
    where, name = m.group("where"), m.group("name")
    if where.endswith(".py"):
        path = Path(where).expanduser()
        path = path if path.is_absolute() else Path(base_dir) / path
        if not path.is_file():
            raise InputError(f"function {spec!r}: file {str(path)!r} does not exist")
        mod_name = f"gpusmall_user_{abs(hash(str(path.resolve())))}"
        loader = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(loader)  # type: ignore[arg-type]
        sys.modules[mod_name] = module
        try:
            loader.loader.exec_module(module)  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001 - the user's module failed to import
            raise InputError(f"function {spec!r}: importing {path} failed: {type(exc).__name__}: {exc}") from None
    else:
        try:
            module = importlib.import_module(where)
        except Exception as exc:  # noqa: BLE001
            raise InputError(
                f"function {spec!r}: cannot import module {where!r}: {type(exc).__name__}: {exc}"
            ) from None
    obj = module
    for part in name.split("."):
        obj = getattr(obj, part, None)  # type: ignore[assignment]
        if obj is None:
            raise InputError(f"function {spec!r}: {where} has no {name!r}")
    if not callable(obj):
        raise InputError(f"function {spec!r}: {name!r} is not callable")
    return obj


class PythonFunction(ReductionFunction):
    """A user function; see the module docstring."""

    type = "python"
    Params = PythonParams
    p: PythonParams  # ReductionFunction.p, narrowed to this function's parameters

    def prepare(self, ctx: FrameContext):
        try:
            self.fn = load_callable(self.p.function)  # a relative file.py was made absolute by the config
        except InputError as exc:
            raise InputError(f"detector {ctx.det}: function {self.name}: {exc}") from None
        self.layout: dict[str, tuple[tuple[int, ...], np.dtype]] | None = None  # fixed by the first call
        return None

    def _where(self, frames) -> str:
        at = (frames.events or SETUP_EVENT).describe()
        return f"detector {self.ctx.det}: function {self.name} ({self.p.function}), {at}"

    def compute(self, frames: Frames):
        where = self._where(frames)
        out = call_user(self.fn, UserBatch.of(self.ctx, frames), self.p.params, self.layout is None, where)
        arrays, self.layout = checked_outputs(out, int(frames.data.shape[0]), self.ctx.xp, self.layout, where)
        return arrays, None

    def params(self) -> dict[str, Any]:
        out = {f"{self.name}__function": self.p.function}
        for k, v in self.p.params.items():
            out[f"{self.name}__params__{k}"] = "null" if v is None else v
        return out


def checked_outputs(out, n: int, xp, layout, where: str):
    """(arrays, layout) of what a user function returned for a batch of ``n`` events: a non-empty dict of
    identifier keys -> numeric arrays (bools as uint8) with ``n`` rows, on ``xp``; ``layout`` (keys ->
    per-event shape and dtype) is fixed by the first call and later calls must match it. Raises
    UserFunctionError starting with ``where``."""
    error = UserFunctionSetupError if layout is None else UserFunctionError  # set-up: exit 2, later: exit 1
    if not isinstance(out, dict) or not out:
        raise error(f"{where}: must return a non-empty dict of arrays, not {type(out).__name__}")
    arrays = {}
    for key, value in out.items():
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise error(f"{where}: key {key!r} is not an identifier")
        try:
            arr = xp.asarray(value)
        except Exception as exc:  # noqa: BLE001
            raise error(f"{where}: {key!r} is not an array ({exc})") from None
        if arr.dtype.kind not in "biuf":
            raise error(f"{where}: {key!r} has dtype {arr.dtype}; numbers or bools only")
        if arr.ndim == 0 or arr.shape[0] != n:
            raise error(f"{where}: {key!r} has shape {tuple(arr.shape)}: its first axis must be the batch's {n} events")
        arrays[key] = arr.astype(xp.uint8) if arr.dtype.kind == "b" else arr
    got = {k: (tuple(a.shape[1:]), np.dtype(a.dtype)) for k, a in arrays.items()}
    if layout is not None and got != layout:
        raise error(
            f"{where}: returned {_describe(got)}, at set-up {_describe(layout)}; keys, "
            f"per-event shapes and dtypes must not change"
        )
    return arrays, got


def call_user(fn, args, params: dict, setup: bool, where: str):
    """``fn(args, **params)``; UserFunctionError (with the user's traceback) when it raises. The set-up call
    (on zeros) runs with NumPy's floating-point warnings off: its divisions by zero are not the user's."""
    try:
        if setup:
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return fn(args, **params)
        return fn(args, **params)
    except Exception:  # noqa: BLE001 - named, with the user's traceback
        error = UserFunctionSetupError if setup else UserFunctionError
        raise error(f"{where} raised:\n{traceback.format_exc().rstrip()}") from None


def _describe(layout) -> str:
    return ", ".join(f"{k} {list(s)} {d}" for k, (s, d) in sorted(layout.items()))
