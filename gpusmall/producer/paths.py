"""Output paths checked before any event is read: writable, and never one of the run's inputs.

A result file opened for writing is truncated, so an ``output`` (or ``--out``) that is also the raw
HDF5 file, a constants file or a mask would destroy that input; a folder that cannot be written
would fail only after the events were reduced. :func:`check_output` raises
:class:`~gpusmall.errors.InputError` (exit 2) for both, naming the key or option.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError
from .config import split_file_spec


def _file_part(spec: str) -> Path:
    """``file.h5:/dataset`` -> ``file.h5``."""
    return Path(split_file_spec(spec)[0]).expanduser()


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


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_SOFTWARE = "gpusmall"
"""The ``Software`` text of every PNG gpusmall writes (:func:`png_metadata`): the mark that lets it overwrite one."""


def png_metadata() -> dict[str, str]:
    """``savefig(..., metadata=png_metadata())``: marks a PNG as gpusmall's own."""
    from .. import __version__

    return {"Software": f"{PNG_SOFTWARE} {__version__}"}


def _other_data(p: Path, kind: str = "result") -> str | None:
    """What an existing ``p`` holds when it is not a gpusmall result (which a rerun may overwrite), or None.

    A file that is not HDF5, or an HDF5 file without the ``gpusmall_version`` attribute every result
    file gets at its creation, is someone else's data. An HDF5 file that cannot be opened (a result whose
    writer was killed) is taken as a result."""
    from ..io.writer import open_for_reading

    if not p.is_file() or p.stat().st_size == 0:
        return None
    with open(p, "rb") as f:
        head = f.read(8192)
    if head.startswith(PNG_SIGNATURE):  # a plot: ours when its Software text says so
        return None if PNG_SOFTWARE.encode() in head else "a PNG image that gpusmall did not write"
    if not head.startswith(HDF5_SIGNATURE):
        return "a file that gpusmall did not write (not HDF5)"
    try:
        f = open_for_reading(p)[0]  # also a result still held by a writer in SWMR mode
    except OSError:
        return None
    try:
        with f:
            if "gpusmall_version" not in f.attrs:
                return "an HDF5 file that gpusmall did not write"
            has = f.attrs.get("gpusmall_kind", "result")
            has = has.decode() if isinstance(has, bytes) else str(has)
    except (KeyError, RuntimeError, OSError):  # damaged metadata: a result whose writer failed is taken as one
        return None
    return None if has == kind else f"a gpusmall {has} file (this writes a {kind} file)"


def check_output(
    path, what: str, inputs: dict[str, Path] | None = None, results_only: bool = False, kind: str = "result"
) -> Path:
    """InputError unless ``path`` can be created or overwritten and is none of ``inputs``.

    ``what`` names the key or option in the message (``output``, ``--out``, ``--png``). Missing
    folders on the way are created (as ``gpusmall run`` always did for its output). ``results_only``:
    an existing file may be overwritten only when gpusmall wrote it (an HDF5 file with the root attribute
    ``gpusmall_version``, of the same ``kind`` (its ``gpusmall_kind`` attribute: ``result`` (the default, also
    for files without it), ``constants``, ``average``, ``cube``); a PNG marked by :func:`png_metadata`).
    """
    p = Path(path).expanduser()
    for key, f in (inputs or {}).items():
        if _same(p, f):
            raise InputError(f"{what}: {str(p)!r} is also {key}; writing it would destroy that input")
    other = _other_data(p, kind) if results_only else None
    if other:
        raise InputError(
            f"{what}: {str(p)!r} exists and is {other}; gpusmall overwrites only files it wrote: "
            f"remove it or choose another output"
        )
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
