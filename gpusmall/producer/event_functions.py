"""Event-level user functions: the user's code over several detectors' batches of the same events.

``event_functions: [{type: python, name: N, function: "file.py:f", detectors: [a, b], params: {...}}]``
(SPEC section 11) calls ``f(batches, **params)`` once per batch, with ``batches`` the named detectors'
:class:`~gpusmall.funcs.python.UserBatch` (calibrated frames on the run's backend, and in ``outputs`` the
detector's built-in results for the same events). It returns a dict of arrays with a leading events axis,
written as ``/<N>_<key>``; an event damaged in any of its detectors gets the damaged fill (NaN / -1 / 0).
The function is called once at set-up on one event of zeros of every detector, which fixes its keys,
shapes and dtypes (as for ``type: python`` under a detector). Its results come back to the host once per
batch (one more device->host copy on a GPU).
"""

from __future__ import annotations

from typing import Any

from ..errors import InputError
from ..funcs.base import SETUP_EVENT, EventInfo
from ..funcs.python import UserBatch, call_user, checked_outputs, load_callable


class EventFunction:
    """One entry of ``event_functions`` (a validated ``EventFunctionConfig``), loaded and checked."""

    def __init__(self, cfg, index: int):
        self.name, self.detectors, self.params, self.spec = (
            cfg.name,
            list(cfg.detectors),
            dict(cfg.params),
            cfg.function,
        )
        try:
            self.fn = load_callable(cfg.function)
        except InputError as exc:
            raise InputError(f"event_functions[{index}] ({cfg.name}): {exc}") from None
        self.layout: dict | None = None

    def _where(self, events: EventInfo) -> str:
        return f"event function {self.name} ({self.spec}), {events.describe()}"

    def __call__(self, batches: dict[str, UserBatch], events: EventInfo, xp) -> dict[str, Any]:
        """Outputs (on ``xp``) by key for the events of ``batches``."""
        n = len(events.event_index)
        out = call_user(self.fn, batches, self.params, self.layout is None, self._where(events))
        arrays, self.layout = checked_outputs(out, n, xp, self.layout, self._where(events))
        return arrays

    def setup(self, pipelines: dict) -> None:
        """The set-up call on each detector's event of zeros (``DetectorPipeline.setup_event``)."""
        batches = {}
        for det in self.detectors:
            frames, by_function = pipelines[det].setup_event()
            outputs = {k: v for out in by_function.values() for k, v in out.items()}
            batches[det] = UserBatch.of(pipelines[det].ctx, frames, outputs)
        self(batches, SETUP_EVENT, next(iter(pipelines.values())).backend.xp)

    def params_record(self) -> dict[str, Any]:
        return {"name": self.name, "function": self.spec, "detectors": self.detectors, "params": self.params}
