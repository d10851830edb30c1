"""Output paths checked before any event is read: writable, and never one of the run's inputs.

A result file opened for writing is truncated, so an ``output`` (or ``--out``) that is also the raw
HDF5 file, a constants file or a mask would destroy that input; a folder that cannot be written
would fail only after the events were reduced. :func:`check_output` raises
:class:`~gpusmall.errors.InputError` (exit 2) for both, naming the key or option.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import InputError


def _file_part(spec: str) -> Path:
    """``file.h5:/dataset`` -> ``file.h5`` (a Windows drive letter is not a dataset)."""
    if not re.match(r"^[A-Za-z]:[\\/]", spec):
        spec = spec.partition(":")[0]
    return Path(spec).expanduser()


def input_files(cfg) -> dict[str, Path]:
    """Every file a validated config reads, by key path: the source, constants, masks, PONI files."""
    out: dict[str, Path] = {}
    s = cfg.source
    if s.type == "hdf5" and s.path:
        out["source.path"] = Path(s.path)
    for i, f in enumerate(s.files or []):
        out[f"source.files[{i}]"] = Path(f)
    for name, det in cfg.detectors.items():
        if det.constants:
            out[f"detectors.{name}.constants"] = _file_part(det.constants)
        if det.mask.user:
            out[f"detectors.{name}.mask.user"] = _file_part(det.mask.user)
        stack = list(cfg.function_specs(name))
        while stack:
            spec = stack.pop()
            for key in ("poni", "user_mask"):
                value = getattr(spec.params, key, None)
                if isinstance(value, str):
                    out[f"{spec.path}.{key}"] = _file_part(value)
            stack.extend(spec.children)
    return out


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return a.resolve() == b.resolve()


def check_output(path, what: str, inputs: dict[str, Path] | None = None) -> Path:
    """InputError unless ``path`` can be created or overwritten and is none of ``inputs``.

    ``what`` names the key or option in the message (``output``, ``--out``, ``--png``). Missing
    folders on the way are created (as ``gpusmall run`` always did for its output).
    """
    p = Path(path).expanduser()
    for key, f in (inputs or {}).items():
        if _same(p, f):
            raise InputError(f"{what}: {str(p)!r} is also {key}; writing it would destroy that input")
    if p.is_dir():
        raise InputError(f"{what}: {str(p)!r} is a folder; give a file name")
    folder = p.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"{what}: cannot create {str(p)!r}: {str(folder)!r} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise InputError(f"{what}: cannot write {str(p)!r}: permission denied")
    p.absolute().parent.mkdir(parents=True, exist_ok=True)
    return p
