"""The run's event context against its config, once the source is open and before any event is read (SPEC 10).

:func:`check_run_context` makes the run's :class:`~gpusmall.selections.Selections` (with the built-ins the context
allows) and refuses, naming the key, a selection, sum or cube that reads a value the source does not deliver.
"""

from __future__ import annotations

from ..errors import InputError
from ..funcs.sums import parse_sums
from ..selections import SelectionError, Selections


def check_run_context(cfg, source) -> Selections:
    """The run's selections; InputError naming the key of the first one that the source's context cannot serve."""
    names = set(source.context)
    where = f"the event context of this {cfg.source.type} source"
    try:
        selections = Selections(cfg.selections, builtin=names)
        selections.check_keys(names, where)
        for name, det in cfg.detectors.items():
            for i, spec in enumerate(parse_sums(det.sums)):
                if spec.selection is not None:
                    selections.require(spec.selection, f"detectors.{name}.sums[{i}] ({spec.name})")
        cube = cfg.cube
        if cube is not None:
            for key, value in (("cube.by", cube.by), ("cube.norm", cube.norm)):
                if value is not None and value not in names:
                    raise SelectionError(
                        f"{key}: {value!r} is not a per-event value of {where} (there are: "
                        f"{', '.join(sorted(names)) or 'none'}{_hint(cfg)})"
                    )
            if cube.selection is not None:
                selections.require(cube.selection, "cube.selection")
            for i, s in enumerate(cube.split):
                selections.require(s, f"cube.split[{i}]")
    except SelectionError as exc:
        msg = str(exc)
        if "no selection 'dropped'" in msg or "no selection 'laser_" in msg:
            msg += f"; the built-in ones need lightStatus in the event context{_hint(cfg)}"
        elif "no such per-event value" in msg:
            msg += _hint(cfg)
        raise InputError(msg) from None
    return selections


def _hint(cfg) -> str:
    if cfg.source.type == "sim" and cfg.source.simulate is None:
        return "; a sim source makes context with source.simulate"
    if cfg.source.type == "hdf5":
        return "; an hdf5 source maps its datasets with context.values"
    return ""
