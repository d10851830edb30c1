"""``gpusmall plot FILE KEY --png OUT``: a quick look at one dataset of a result file.

What is drawn depends on the dataset (events = the file's number of events, SPEC section 8):

=====================================================  ==================================================
dataset                                                 plot
=====================================================  ==================================================
per event, scalar ``(events,)``                         value vs event index, and a histogram
per event, a few values ``(events, k)``, k <= 4         each value vs event index, and histograms (e.g. com)
per event, 1-D ``(events, bins)``                       mean over events (NaN-skipping) vs bin, and an
                                                        image events x bins (azav: x axis = ``__q``)
per event, 2-D ``(events, rows, cols)``                 mean image over events (roi area, rebin, acf)
per event, 3-D ``(events, panels, rows, cols)``         mean image, panels tiled
/Sums, /UserDataCfg 1-D                                  value vs index
/Sums, /UserDataCfg 2-D                                  image
/Sums, /UserDataCfg 3-D (panels, rows, cols)            image assembled with ``/UserDataCfg/<det>/x, y``
                                                        when the shapes match, else panels tiled
/Sums, /UserDataCfg 4-D (gains, panels, rows, cols)     the first entry, as 3-D
per item (droplet, photons; ragged or padded) ``row``,  an image of the items' positions: items per
``col``                                                 detector pixel (``tile``, rounded ``row``, ``col``),
                                                        assembled or tiled as the 3-D images
per item, other fields (``data``, ``npix``, ``tile``)   a histogram of the values
=====================================================  ==================================================

Singleton axes after the events axis are dropped first (an azav with one phi bin is 1-D). Means over
events read the dataset in chunks; an image of all events shows at most :data:`MAX_ROWS` of them.
Per-item outputs (:mod:`gpusmall.analysis.items`) are never drawn as curves: padding (the zeros after each
event's stored items in the ``padded`` layout) is left out. Every image has row 0 at the top and a colour
bar ``"<key> [<unit>]"`` (:mod:`gpusmall.analysis.imshow`, :func:`dataset_unit`).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from ..errors import InputError
from ..io.master import require_sources
from ..io.writer import open_result
from ..producer.paths import png_metadata
from .avimage import assemble, assembled_extent, assembled_labels, plot_image, tile_panels
from .imshow import show_image, unit_name
from .items import ItemList, item_list
from .results import detector_of, geometry, is_per_event, normalize_key, require_dataset

MAX_ROWS = 4000  # events shown in an events x bins image (evenly strided beyond)
CHUNK_BYTES = 64 << 20
#: units of the constants and geometry in ``/UserDataCfg/<det>`` (colour bars)
STATIC_UNITS = {
    "ped": "ADU",
    "noise": "ADU",
    "rms": "ADU",
    "gain": "ADU/keV",
    "x": "um",
    "y": "um",
    "z": "um",
    "mask": "1 = good",
    "cmask": "1 = good",
    "status": "bits",
    "ix": "column",
    "iy": "row",
}
#: units of the per-item fields (droplets, photons); ``data`` is in the detector's unit
ITEM_UNITS = {"npix": "pixels", "tile": "panel", "row": "pixel", "col": "pixel"}


def _chunks(d: h5py.Dataset):
    """(start, stop) event ranges of about CHUNK_BYTES."""
    row = max(1, int(np.prod(d.shape[1:])) * d.dtype.itemsize)
    step = max(1, CHUNK_BYTES // row)
    return [(a, min(a + step, d.shape[0])) for a in range(0, d.shape[0], step)]


def event_mean(d: h5py.Dataset) -> np.ndarray:
    """Mean over the events axis skipping NaN (damaged events, mask_value nan), read in chunks.

    Returns float64 of shape ``d.shape[1:]``; NaN where no event has a finite value.
    """
    total = np.zeros(d.shape[1:], np.float64)
    count = np.zeros(d.shape[1:], np.int64)
    for a, b in _chunks(d):
        v = d[a:b].astype(np.float64)
        ok = np.isfinite(v)
        total += np.where(ok, v, 0.0).sum(axis=0)
        count += ok.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _radial_axis(f: h5py.File, key: str, nbins: int):
    """(x values, label) for a 1-D per-event dataset: the function's ``__q`` bin centres when the file
    has them (azav), else None."""
    det = detector_of(f, key)
    if det is None:
        return None
    base = key.rsplit("/", 1)[-1]
    cut = [i for i, ch in enumerate(base) if ch == "_"]
    for i in reversed(cut):
        stem = base[:i]
        q = f.get(f"UserDataCfg/{det}/{stem}__q")
        if isinstance(q, h5py.Dataset) and q.shape == (nbins,):
            unit = f.get(f"UserDataCfg/{det}/{stem}__unit")
            label = "q"
            if isinstance(unit, h5py.Dataset):
                u = unit[()]
                label = u.decode() if isinstance(u, bytes) else str(u)
            return q[()], label
    return None


def _figure(nrows=1, ncols=2, width=11.0, height=4.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)[0]


def _plot_scalars(f, key, d, png):
    v = d[()].astype(np.float64).reshape(d.shape[0], -1)  # (events, k)
    k = v.shape[1]
    idx = np.arange(v.shape[0])
    fig, (ax, axh) = _figure()
    for j in range(k):
        label = f"[{j}]" if k > 1 else None
        ax.plot(idx, v[:, j], ".", ms=2 if v.shape[0] > 2000 else 4, label=label)
        fin = v[np.isfinite(v[:, j]), j]
        if fin.size:
            axh.hist(fin, bins=min(100, max(10, int(np.sqrt(fin.size)))), histtype="step", label=label)
    nan = int((~np.isfinite(v)).any(axis=1).sum())
    ax.set_xlabel("event index")
    ax.set_ylabel(key)
    axh.set_xlabel(key)
    axh.set_ylabel("events")
    if k > 1:
        ax.legend(fontsize=8)
    ax.set_title(f"{key}: {v.shape[0]} events" + (f", {nan} NaN (damaged)" if nan else ""), fontsize=10)
    axh.set_title("histogram of the finite values", fontsize=10)
    fig.savefig(png, dpi=100, metadata=png_metadata())
    return f"{key}: {v.shape[0]} events, value vs event and histogram"


def _plot_curves(f, key, d, png):
    nb = int(np.prod(d.shape[1:]))
    mean = event_mean(d).reshape(nb)
    axis = _radial_axis(f, key, nb)
    x, xlabel = axis if axis is not None else (np.arange(nb), "bin")
    step = max(1, int(np.ceil(d.shape[0] / MAX_ROWS)))
    rows = d[::step].reshape(-1, nb).astype(np.float32)
    fig, (ax, axi) = _figure()
    ax.plot(x, mean)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"mean of {key}")
    ax.set_title(f"{key}: mean over {d.shape[0]} events", fontsize=10)
    # event 0 at the top, as every image gpusmall draws (row 0 at the top)
    show_image(
        axi,
        rows,
        label=key,
        unit=dataset_unit(f, key),
        aspect="auto",
        shrink=1.0,
        extent=(-0.5, nb - 0.5, (rows.shape[0] - 0.5) * step, -0.5 * step),
    )
    axi.set_xlabel("bin")
    axi.set_ylabel("event index")
    axi.set_title("every event" if step == 1 else f"every {step}th event", fontsize=10)
    fig.savefig(png, dpi=100, metadata=png_metadata())
    return f"{key}: mean of {d.shape[0]} events vs {xlabel}, and events x bins"


def _det_unit(f: h5py.File, det: str | None) -> str:
    u = f.get(f"UserDataCfg/{det}/units") if det else None
    return unit_name(u[()]) if isinstance(u, h5py.Dataset) else "a.u."


def dataset_unit(f: h5py.File, key: str) -> str:
    """The unit of dataset ``key``'s values as a colour bar shows it: the detector's calibrated unit
    (``/UserDataCfg/<det>/units``: ADU, keV, photons) for frames, sums and images, squared for ``acf`` and
    ``square`` sums; :data:`STATIC_UNITS` for the constants and geometry in ``/UserDataCfg/<det>``; ``a.u.``
    when the file does not say."""
    key = normalize_key(key)
    det = detector_of(f, key)
    u = _det_unit(f, det)
    tail = key.rsplit("/", 1)[-1]
    if key.startswith("UserDataCfg/"):
        return STATIC_UNITS.get(tail, "a.u.")
    if key.startswith("Sums/"):
        if "nhits" in tail:
            return "events"
        return f"{u}^2" if "square" in tail else u
    if det is None:
        return "a.u."
    if tail.endswith("_hist"):
        return "pixels"
    return f"{u}^2" if "acf" in tail else u


def _panel_image(f, key, stack):
    """2-D image of a (panels, rows, cols) array: assembled with the file's geometry when it fits."""
    det = detector_of(f, key)
    geo = geometry(f, det) if det else None
    if geo is not None and geo[0].shape == stack.shape:
        x, y, pixel = geo
        covered = assemble(np.ones(stack.shape, np.float32), x, y, pixel, fill=0.0) > 0
        extent, unit = assembled_extent(x, y, pixel)
        xlabel, ylabel = assembled_labels(unit)
        return (
            assemble(stack, x, y, pixel),
            dict(covered=covered, extent=extent, xlabel=xlabel, ylabel=ylabel),
            "assembled",
        )
    return tile_panels(stack), {}, "panels tiled"


def _plot_items(f, key, items: ItemList, png) -> str:
    """Per-item values (droplets, photons), padding left out: ``row`` / ``col`` as a count image of the
    positions (per pixel of the detector, drawn as its images are), other fields as a histogram."""
    rc = ("row", "col")
    if items.field in rc and all(items.sibling(k) in f for k in rc):
        row, col = (np.floor(items.values(f, k) + 0.5).astype(np.int64) for k in rc)
        tile = items.values(f, "tile").astype(np.int64) if items.sibling("tile") in f else np.zeros_like(row)
        shape_ds = f.get(f"UserDataCfg/{items.det}/shape")
        if isinstance(shape_ds, h5py.Dataset) and shape_ds.shape == (3,):
            shape = tuple(int(v) for v in shape_ds[()])
        else:
            shape = (int(tile.max(initial=0)) + 1, int(row.max(initial=0)) + 1, int(col.max(initial=0)) + 1)
        ok = (tile >= 0) & (tile < shape[0]) & (row >= 0) & (row < shape[1]) & (col >= 0) & (col < shape[2])
        counts = np.zeros(shape, np.float64)
        np.add.at(counts, (tile[ok], row[ok], col[ok]), 1.0)
        img, opts, how = _panel_image(f, items.sibling("row"), counts)
        title = f"{items.full} ({items.layout}): {int(ok.sum())} item positions, {how}"
        plot_image(img, png, title, label=f"{items.full} items per pixel", unit="count", **opts)
        return f"{key}: per-item positions, {int(ok.sum())} items as an image {img.shape[0]} x {img.shape[1]}"
    v = items.values(f)
    v = v[np.isfinite(v)]
    fig, (ax,) = _figure(1, 1, 8.0, 4.2)
    if v.size:
        ax.hist(v, bins=min(100, max(10, int(np.sqrt(v.size)))), histtype="stepfilled")
    ax.set_xlabel(f"{key} [{ITEM_UNITS.get(items.field) or dataset_unit(f, key)}]")
    ax.set_ylabel("items")
    ax.set_title(f"{key} ({items.layout}): histogram of {v.size} items", fontsize=10)
    fig.savefig(png, dpi=100, metadata=png_metadata())
    return f"{key}: histogram of {v.size} per-item values"


def plot_key(path, key: str, png) -> str:
    """Plot dataset ``key`` of result file ``path`` into ``png``; returns a one-line description.

    Raises InputError (exit 2) naming the key when it is not in the file (with close matches) or cannot
    be plotted (text, a single value), and naming the part files when ``path`` is a master file whose
    parts are missing (the key would read as NaN or zeros).
    """
    path, png = Path(path), Path(png)
    if not path.is_file():
        raise InputError(f"plot: file {str(path)!r} does not exist")
    with open_result(path) as f:
        d = require_dataset(f, key)
        key = normalize_key(key)
        require_sources(f, [key], "plot")
        if d.dtype.kind not in "biuf":
            raise InputError(f"plot: {key!r} holds {d.dtype} values, not numbers")
        if d.ndim == 0:
            raise InputError(f"plot: {key!r} is a single value ({d[()]}), nothing to plot")
        items = item_list(f, key)
        if items is not None:  # droplets, photons: never a curve of a padded or ragged list
            return _plot_items(f, key, items, png)
        try:
            per_event = is_per_event(f, key)
        except InputError:
            per_event = False
        if per_event:
            inner = tuple(s for s in d.shape[1:] if s != 1)
            if len(inner) == 0 or (len(inner) == 1 and inner[0] <= 4):
                return _plot_scalars(f, key, d, png)
            if len(inner) == 1:
                return _plot_curves(f, key, d, png)
            mean = event_mean(d).reshape(inner)
            title = f"{key}: mean of {d.shape[0]} events"
            label = f"{key} mean per event"
        else:
            mean = d[()].astype(np.float64)
            if mean.ndim == 1:
                fig, (ax,) = _figure(1, 1, 8.0, 4.2)
                ax.plot(np.arange(mean.size), mean)
                ax.set_xlabel("index")
                ax.set_ylabel(key)
                ax.set_title(f"{key} ({mean.size} values)", fontsize=10)
                fig.savefig(png, dpi=100, metadata=png_metadata())
                return f"{key}: {mean.size} values"
            title = label = key
            while mean.ndim > 3:
                title += " [0]"
                mean = mean[0]
        if mean.ndim > 3:
            raise InputError(f"plot: {key!r} has {mean.ndim} dimensions per event; plot takes up to 3")
        if mean.ndim == 2:
            img, opts, how = mean, {}, "image"
        else:
            img, opts, how = _panel_image(f, key, mean)
        plot_image(
            img, png, f"{title} ({how})" if how != "image" else title, label=label, unit=dataset_unit(f, key), **opts
        )
        return f"{title}: {how} {img.shape[0]} x {img.shape[1]}"
