"""``gpusmall inspect FILE``: a one-screen description of what a result file holds."""

from __future__ import annotations

import h5py

from ..io.master import missing_sources
from ..io.writer import open_result


def describe(path) -> str:
    """One line per dataset: path, shape, dtype; groups indented."""
    lines = [str(path)]
    with open_result(path) as f:
        for k in ("events", "gpusmall_version", "backend"):
            if k in f.attrs:
                lines.append(f"  @{k} = {f.attrs[k]}")
        gone = sorted(set().union(*missing_sources(f).values()))
        if gone:
            lines.append(
                f"  WARNING: part files missing beside the master (their events read as NaN or zeros; "
                f"plot and cube refuse it): {', '.join(gone)}"
            )

        def visit(name, obj):
            depth = name.count("/")
            if isinstance(obj, h5py.Dataset):
                lines.append(f"{'  ' * (depth + 1)}{name.rsplit('/', 1)[-1]:<32} {str(obj.shape):<22} {obj.dtype}")
            elif obj is not None:
                lines.append(f"{'  ' * (depth + 1)}{name.rsplit('/', 1)[-1]}/")

        if hasattr(f, "visititems_links"):  # every name, also a second hard link (smalldata_tools' aliases)
            f.visititems_links(lambda name, link: visit(name, f.get(name)))
        else:
            f.visititems(visit)
    return "\n".join(lines)
