"""``gpusmall inspect FILE``: a one-screen description of what a result file holds."""
from __future__ import annotations

import h5py

from ..io.writer import open_result


def missing_sources(f: h5py.File, path) -> list[str]:
    """Part files a master's virtual datasets read from that are not there (HDF5 would fill with zeros)."""
    from pathlib import Path

    base = Path(path).resolve().parent
    files = set()

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and obj.is_virtual:
            files.update(vs.file_name for vs in obj.virtual_sources())

    f.visititems(visit)
    return sorted(n for n in files if n != "." and not (base / n).exists())


def describe(path) -> str:
    """One line per dataset: path, shape, dtype; groups indented."""
    lines = [str(path)]
    with open_result(path) as f:
        for k in ("events", "gpusmall_version", "backend"):
            if k in f.attrs:
                lines.append(f"  @{k} = {f.attrs[k]}")
        gone = missing_sources(f, path)
        if gone:
            lines.append(f"  WARNING: part files missing beside the master (their events read as zeros): "
                         f"{', '.join(gone)}")

        def visit(name, obj):
            depth = name.count("/")
            if isinstance(obj, h5py.Dataset):
                lines.append(f"{'  ' * (depth + 1)}{name.rsplit('/', 1)[-1]:<32} {str(obj.shape):<22} {obj.dtype}")
            else:
                lines.append(f"{'  ' * (depth + 1)}{name.rsplit('/', 1)[-1]}/")

        f.visititems(visit)
    return "\n".join(lines)
