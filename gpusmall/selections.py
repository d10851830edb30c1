"""Selections: named event filters over per-event values (SPEC 10), for run sums and cubes.

A config's ``selections`` maps a name to conditions, all of which an event must meet::

    selections:
      laser_on:  {lightStatus/xray: 1, lightStatus/laser: 1}   # equality
      good_i0:   {ipm/sum: [0.5, 3.0]}                        # lo <= value <= hi
      on_good:   {laser_on: true, good_i0: true}              # other selections: true = in it, false = not
      either:    {any: [laser_on, dropped]}                   # in at least one of them

A key is a per-event value (a context name such as ``ipm/sum``, or for ``gpusmall cube`` any per-event scalar
of the file) or another selection. A NaN value meets no condition. When the event context has
``lightStatus/xray`` (and ``lightStatus/laser``), the built-in selections :data:`BUILTIN` exist unless the
config defines the same names: ``dropped`` (no X-rays, smalldata_tools' ``calib_dropped`` sums over it),
``laser_on`` and ``laser_off`` (X-rays on).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .sources.context import current_name

BUILTIN: dict[str, dict] = {
    "dropped": {"lightStatus/xray": 0},
    "laser_on": {"lightStatus/xray": 1, "lightStatus/laser": 1},
    "laser_off": {"lightStatus/xray": 1, "lightStatus/laser": 0},
}
"""Selections every run with the light status has (a config's own of the same name win)."""


@dataclass(frozen=True)
class Condition:
    """One condition of a selection: ``kind`` ``equal`` (value), ``range`` ((lo, hi)), ``in`` (another selection,
    value True or False: in it or not) or ``any`` (value: tuple of selections)."""

    key: str
    kind: str
    value: object


class SelectionError(ValueError):
    """A selection that cannot be evaluated; the message starts with its key path (``selections.x.key``)."""


def _condition(name: str, key: str, value, names: set[str]) -> Condition:
    where = f"selections.{name}.{key}"
    key = key if key in names else current_name(key)
    if key == "any":
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise SelectionError(f"{where}: a list of selection names, not {value!r}")
        for v in value:
            if v not in names:
                raise SelectionError(f"{where}: no selection {v!r} (selections: {', '.join(sorted(names))})")
        return Condition(key, "any", tuple(value))
    if key in names:
        if not isinstance(value, bool):
            raise SelectionError(f"{where}: {key} is a selection: true (in it) or false (not in it), not {value!r}")
        return Condition(key, "in", value)
    if isinstance(value, bool):
        raise SelectionError(
            f"{where}: no selection {key!r} to be {str(value).lower()} about; a value is a number or [lo, hi]"
        )
    if isinstance(value, (int, float)):
        if not np.isfinite(value):
            raise SelectionError(f"{where}: {value!r} is not a finite number")
        return Condition(key, "equal", float(value))
    if (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        lo, hi = float(value[0]), float(value[1])
        if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
            raise SelectionError(f"{where}: [lo, hi] with finite lo <= hi, not {value!r}")
        return Condition(key, "range", (lo, hi))
    raise SelectionError(
        f"{where}: a number (equal to it), [lo, hi] (a range) or, for a selection, true/false; not {value!r}"
    )


class Selections:
    """A config's selections, parsed and checked for cycles (:class:`SelectionError` naming the key path).

    Args:
        config: name -> {key: condition} as the config gives them.
        builtin: True adds :data:`BUILTIN`; a set of per-event value names adds those built-ins whose keys are all
            in it (False: none). The config's own names win.
    """

    def __init__(self, config: Mapping[str, Mapping], builtin=False):
        if builtin is True:
            extra = dict(BUILTIN)
        elif builtin:  # the per-event values there are: the built-ins that read only those
            extra = {k: v for k, v in BUILTIN.items() if set(v) <= set(builtin)}
        else:
            extra = {}
        raw = {**extra, **dict(config or {})}
        names = set(raw)
        self.conditions: dict[str, list[Condition]] = {}
        for name, conds in raw.items():
            if not isinstance(conds, Mapping) or not conds:
                raise SelectionError(f"selections.{name}: a mapping of conditions (key: value), not {conds!r}")
            self.conditions[name] = [_condition(name, str(k), v, names) for k, v in conds.items()]
        for name in self.conditions:
            self._check_cycle(name, ())

    def _check_cycle(self, name: str, path: tuple) -> None:
        if name in path:
            raise SelectionError(f"selections.{path[0]}: refers to itself ({' -> '.join(path + (name,))})")
        for c in self.conditions[name]:
            for ref in c.value if c.kind == "any" else (c.key,) if c.kind == "in" else ():  # type: ignore[attr-defined]
                self._check_cycle(ref, path + (name,))

    def __contains__(self, name) -> bool:
        return name in self.conditions

    def __iter__(self):
        return iter(self.conditions)

    def keys_of(self, name: str) -> set[str]:
        """The per-event values selection ``name`` reads (through the selections it refers to)."""
        out = set()
        for c in self.conditions[name]:
            if c.kind in ("equal", "range"):
                out.add(c.key)
            else:
                for ref in c.value if c.kind == "any" else (c.key,):  # type: ignore[attr-defined]
                    out |= self.keys_of(ref)
        return out

    def check_keys(self, available, what: str = "the event context") -> None:
        """SelectionError naming ``selections.<name>.<key>`` for a key that is no per-event value of ``available``."""
        available = set(available)
        for name, conds in self.conditions.items():
            for c in conds:
                if c.kind in ("equal", "range") and c.key not in available:
                    raise SelectionError(
                        f"selections.{name}.{c.key}: no such per-event value in {what} "
                        f"(there are: {', '.join(sorted(available)) or 'none'})"
                    )

    def require(self, name: str, where: str) -> None:
        """SelectionError naming ``where`` when there is no selection ``name``."""
        if name not in self.conditions:
            raise SelectionError(f"{where}: no selection {name!r} (selections: {', '.join(sorted(self)) or 'none'})")

    def mask(self, name: str, values: Mapping[str, np.ndarray]) -> np.ndarray:
        """(events,) bool: the events of ``values`` (name -> (events,) host array) in selection ``name``."""
        out = None
        for c in self.conditions[name]:
            if c.kind == "equal":
                m = np.asarray(values[c.key], np.float64) == c.value
            elif c.kind == "range":
                v = np.asarray(values[c.key], np.float64)
                with np.errstate(invalid="ignore"):
                    m = (v >= c.value[0]) & (v <= c.value[1])  # type: ignore[index]
            elif c.kind == "in":
                m = self.mask(c.key, values) == c.value
            else:
                m = np.zeros_like(out) if out is not None else None
                for ref in c.value:  # type: ignore[attr-defined]
                    r = self.mask(ref, values)
                    m = r if m is None else m | r
            out = m if out is None else out & m
        return np.asarray(out, bool)
