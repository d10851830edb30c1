"""Plots against the scan: a per-event value against another with its binned mean, and a cube against its bins.

``gpusmall plot FILE Y --vs X --png OUT`` draws every event's ``Y`` against its ``X`` (both per-event scalars of a
result file, e.g. a ROI sum against ``ipm/sum`` or ``scan/delay``) with the mean of ``Y`` per bin of ``X``
(:func:`binned_mean`: one bin per distinct value when ``X`` takes few, e.g. scan steps; else ``bins`` equal bins)
and its standard error. ``gpusmall plot CUBE.h5 KEY --png OUT`` on a cube file (the run's or ``gpusmall cube``'s)
draws ``KEY``'s mean per bin (``<KEY>_sum / count``) against the bin centres, one line per split; a 1-D output per
bin (azav) as an image bins x values (bin 0 at the top, as every image gpusmall draws: SPEC section 9, "Plots";
colour bar in the unit of the result file the cube was made from); a full frame as its total per bin.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from ..errors import InputError
from ..producer.paths import png_metadata
from .imshow import show_image

STEP_VALUES = 50  # X with at most this many distinct values is binned per value (scan steps)


def binned_mean(x, y, bins: int = 20) -> dict[str, np.ndarray]:
    """Mean of ``y`` per bin of ``x`` over the events where both are finite.

    Args:
        x, y: (events,) numbers.
        bins: equal-width bins over the finite range of ``x``, unless ``x`` has at most :data:`STEP_VALUES`
            distinct values (then one bin per value).

    Returns:
        ``centers``, ``mean``, ``sem`` (standard error, NaN for one event), ``count`` per non-empty bin.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size == 0:
        return {k: np.zeros(0) for k in ("centers", "mean", "sem", "count")}
    values = np.unique(x)
    if values.size <= STEP_VALUES:
        idx = np.searchsorted(values, x)
        centers = values
    else:
        edges = np.linspace(x.min(), x.max(), bins + 1)
        idx = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, bins - 1)
        centers = 0.5 * (edges[1:] + edges[:-1])
    n = np.bincount(idx, minlength=len(centers))
    s = np.bincount(idx, weights=y, minlength=len(centers))
    s2 = np.bincount(idx, weights=y * y, minlength=len(centers))
    keep = n > 0
    n, s, s2, centers = n[keep], s[keep], s2[keep], centers[keep]
    mean = s / n
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.maximum(s2 / n - mean * mean, 0) * n / (n - 1)
        sem = np.where(n > 1, np.sqrt(var / n), np.nan)
    return {"centers": centers, "mean": mean, "sem": sem, "count": n.astype(np.int64)}


def _scalar(f: h5py.File, key: str, n: int, what: str) -> np.ndarray:
    key = key.strip("/")
    if key not in f or not isinstance(f[key], h5py.Dataset):
        raise InputError(f"plot: {what} {key!r} is not in {f.filename}")
    d = f[key]
    if d.shape != (n,) or d.dtype.kind not in "biuf":
        raise InputError(f"plot: {what} {key!r} must be a per-event scalar ({n},) of numbers, not {d.shape} {d.dtype}")
    v = d[()].astype(np.float64)
    det = key.split("/")[0]
    if f"{det}/damaged" in f and det != key:
        v[f[f"{det}/damaged"][()] != 0] = np.nan  # damaged events hold fill values
    return v


def plot_vs(path, y: str, x: str, png, bins: int = 20) -> str:
    """PNG of every event's ``y`` against its ``x`` with the binned mean (module docstring); returns a summary."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    with h5py.File(path, "r") as f:
        n = int(f["timestamp"].shape[0]) if "timestamp" in f else None
        if n is None:
            raise InputError(f"plot: {path} is not a result file (no /timestamp)")
        xv, yv = _scalar(f, x, n, "--vs key"), _scalar(f, y, n, "key")
    b = binned_mean(xv, yv, bins)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ok = np.isfinite(xv) & np.isfinite(yv)
    ax.plot(xv[ok], yv[ok], ".", ms=3, alpha=0.4, label=f"events ({int(ok.sum())})")
    ax.errorbar(b["centers"], b["mean"], yerr=b["sem"], fmt="o-", color="C3", label="mean per bin +- s.e.m.")
    ax.set_xlabel(x.strip("/"))
    ax.set_ylabel(y.strip("/"))
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, metadata=png_metadata())
    plt.close(fig)
    return f"{y} vs {x}: {int(ok.sum())} events, {len(b['centers'])} bins"


def _cube_unit(path, source: str, key: str) -> str:
    """The unit of a cube's ``key`` (:func:`gpusmall.analysis.plot.dataset_unit` of the result file the cube
    was made from, its ``source`` attribute), ``a.u.`` when that file is not there."""
    from .plot import dataset_unit

    src = Path(path).parent / source if source else None
    if src is None or src.suffix not in (".h5", ".hdf5") or not src.is_file():
        return "a.u."
    try:
        with h5py.File(src, "r") as f:
            return dataset_unit(f, key)
    except (OSError, KeyError, ValueError, InputError):
        return "a.u."


def plot_cube(path, key: str, png) -> str:
    """PNG of a cube file's ``key`` per bin (module docstring); returns a summary."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    key = key.strip("/").removesuffix("_sum").removesuffix("_mean")
    with h5py.File(path, "r") as f:
        if f.attrs.get("gpusmall_kind") != "cube":
            raise InputError(f"plot: {path} is not a cube file")
        if f"{key}_sum" not in f:
            have = sorted(k.removesuffix("_sum") for k in json.loads(f.attrs.get("keys", "[]")))
            raise InputError(f"plot: cube {path} has no {key!r} (it has: {', '.join(have)})")
        centers = f["bins/centers"][()]
        count = f["bins/count"][()].astype(np.float64)
        total = f[f"{key}_sum"][()]
        split = [s.decode() for s in f["bins/split"][()]] if "bins/split" in f else []
        by = str(f.attrs.get("by", "bin"))
        source = str(f.attrs.get("source", ""))
    if not split:
        count, total = count[None], total[None]
    names = split or [""]
    per_bin = total.reshape(total.shape[0], total.shape[1], -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = per_bin / count[:, :, None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    frame = key.endswith(("/frame", "/frame_square"))
    if per_bin.shape[2] == 1 or frame:  # a scalar per bin, or a full frame: its total per bin
        what = "mean per event" if per_bin.shape[2] == 1 else "frame total, mean per event"
        for s, name in enumerate(names):
            ax.plot(centers, mean[s].sum(axis=1) if per_bin.shape[2] > 1 else mean[s, :, 0], "o-", label=name or None)
        ax.set_ylabel(f"{key} ({what})")
        if split:
            ax.legend()
    else:  # a curve per bin (azav): bins x values, the first split; bin 0 at the top (row 0, as every image)
        show_image(
            ax,
            mean[0],
            label=f"{key}, mean per event" + (f" ({names[0]})" if split else ""),
            unit=_cube_unit(path, source, key),
            aspect="auto",
            interpolation="nearest",
            shrink=1.0,
            extent=(-0.5, mean.shape[2] - 0.5, len(centers) - 0.5, -0.5),
        )
        ax.set_yticks(range(len(centers)), [f"{c:g}" for c in centers])
        ax.set_xlabel(f"{key} index")
    if per_bin.shape[2] == 1 or frame:
        ax.set_xlabel(by)
    else:
        ax.set_ylabel(by)
    fig.tight_layout()
    fig.savefig(png, metadata=png_metadata())
    plt.close(fig)
    return f"cube {key}: {len(centers)} bins" + (f" x {len(split)} splits" if split else "")


def is_cube_file(path) -> bool:
    try:
        with h5py.File(Path(path), "r") as f:
            return f.attrs.get("gpusmall_kind") == "cube"
    except OSError:
        return False
