"""``gpusmall avimage``: the average calibrated image of a run's first events, assembled with the geometry.

Three steps, each usable on its own:

1. :func:`average_frames` runs raw batches through a :class:`~gpusmall.producer.pipeline.DetectorPipeline`'s
   calibrator (pedestal, gain, mask, common mode: exactly what ``gpusmall run`` does, on the run's
   backend) and averages per pixel over the events in which that pixel is good (SPEC section 3: bad
   pixels are excluded from means). Damaged events are left out.
2. :func:`assemble` puts a (panels, rows, cols) image on one 2-D grid from the pixel centres ``x``, ``y``
   (um) exactly as psana's ``det.raw.image()`` lays it out: row ``floor((x - x.min()) / pixel_um + 0.5)``,
   column ``floor((y - y.min()) / pixel_um + 0.5)`` (psana's ``xy_to_rc_arrays``: rows follow ``x``, "along
   gravity", columns ``y``; where several pixels fall in one cell the largest value, psana's default
   ``mapmode=2``). With psana's geometry an unrotated JUNGFRAU module is 512 rows x 1024 columns, as its
   raw array; the default geometry (SPEC section 2: ``x = (col + 0.5) * pixel_um``, along the columns, as
   pyFAI's) comes back transposed. psana's image also fills holes inside a panel (cells no pixel falls in) from
   their neighbours; here they stay gaps.
3. :func:`plot_image` writes a PNG (matplotlib, Agg canvas; no pyplot state): colour scale from the
   1st to the 99th percentile of the finite values, bad pixels grey, gaps between panels blank, row 0 (the
   smallest x) at the top and a colour bar labelled with the unit (:mod:`gpusmall.analysis.imshow`); the
   horizontal axis is y, the vertical axis x.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import InputError
from ..producer.paths import png_metadata
from .imshow import color_limits as color_limits  # noqa: F401  (re-exported: older imports)
from .imshow import grid_extent, show_image, unit_name

#: an assembled image may have at most this many cells per detector pixel (plus a margin): a geometry in
#: the wrong unit (metres for micrometres) would otherwise ask for a gigantic array
MAX_CELLS_PER_PIXEL = 16


def pixel_grid(x_um, y_um, pixel_um: float):
    """Grid indices of every pixel, as psana's ``det.raw.image()`` has them: rows from ``x``, columns from ``y``.

    Row ``floor((x - x.min()) / pixel_um + 0.5)``, column ``floor((y - y.min()) / pixel_um + 0.5)``: psana's
    ``GeometryAccess.xy_to_rc_arrays`` (its ``pixel_coord_indexes``, ``img[iX, iY]``), so an assembled image
    equals psana's cell for cell.

    Args:
        x_um, y_um: pixel centres, any shape (e.g. (panels, rows, cols)), micrometres.
        pixel_um: grid pitch in micrometres (the detector's pixel size).

    Returns:
        ``(rows, cols, (H, W), (x0_um, y0_um))``: int64 arrays shaped like ``x_um`` (rows: index along x,
        columns: index along y), the grid shape, and the coordinates of the centre of grid cell (0, 0)
        (= ``x.min()``, ``y.min()``; cell [i, j] is centred at x = x0 + i * pixel_um, y = y0 + j * pixel_um).

    Example:
        >>> rows, cols, shape, origin = pixel_grid(np.array([50., 150.]), np.array([50., 350.]), 100.0)
        >>> rows.tolist(), cols.tolist(), shape, origin
        ([0, 1], [0, 3], (2, 4), (50.0, 50.0))
    """
    x = np.asarray(x_um, np.float64)
    y = np.asarray(y_um, np.float64)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, not {x.shape} and {y.shape}")
    if x.size == 0:
        raise ValueError("no pixels to assemble")
    if not (np.isfinite(pixel_um) and pixel_um > 0):
        raise ValueError(f"pixel size must be positive, not {pixel_um}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("pixel coordinates x, y must be finite")
    x0, y0 = float(x.min()), float(y.min())
    rows = np.floor((x - x0) / pixel_um + 0.5).astype(np.int64)
    cols = np.floor((y - y0) / pixel_um + 0.5).astype(np.int64)
    shape = (int(rows.max()) + 1, int(cols.max()) + 1)
    if shape[0] * shape[1] > MAX_CELLS_PER_PIXEL * x.size + 1_000_000:
        raise ValueError(
            f"the geometry spans {shape[0]} x {shape[1]} cells of {pixel_um} um for {x.size} pixels: "
            "are x, y in micrometres and the pixel size right?"
        )
    return rows, cols, shape, (x0, y0)


def assemble(image, x_um, y_um, pixel_um: float, fill: float = np.nan) -> np.ndarray:
    """One 2-D image from panels and their pixel coordinates.

    Args:
        image: (panels, rows, cols) (or any shape equal to ``x_um``'s), values to place; NaN = bad pixel.
        x_um, y_um: pixel centres, same shape, micrometres.
        pixel_um: grid pitch, micrometres.
        fill: value of grid cells that no pixel falls in (gaps between panels); psana uses 0.

    Returns:
        (H, W) float32, psana's ``det.raw.image()`` layout (:func:`pixel_grid`): cell ``[row, col]`` holds
        the pixel at row ``floor((x - x.min())/pixel_um + 0.5)``, column ``floor((y - y.min())/pixel_um + 0.5)``.
        Where several pixels fall in one cell (tilted panels) it holds the largest of their finite values
        (as psana's default ``mapmode=2``); a cell whose pixels are all NaN is NaN.

    Example:
        >>> y = np.array([[[50., 150.]], [[450., 550.]]]); x = np.full_like(y, 50.)
        >>> assemble(np.array([[[1., 2.]], [[3., 4.]]]), x, y, 100.0, fill=0)
        array([[1., 2., 0., 0., 3., 4.]], dtype=float32)
    """
    image = np.asarray(image)
    if image.shape != np.shape(x_um):
        raise ValueError(f"image shape {image.shape} differs from the geometry's {np.shape(x_um)}")
    rows, cols, (h, w), _ = pixel_grid(x_um, y_um, pixel_um)
    flat = (rows * w + cols).ravel()
    values = image.astype(np.float64, copy=False).ravel()
    finite = np.isfinite(values)
    n = h * w
    count = np.bincount(flat[finite], minlength=n)
    covered = np.bincount(flat, minlength=n) > 0
    best = np.full(n, -np.inf)
    np.maximum.at(best, flat[finite], values[finite])
    out = np.where(count > 0, best, np.where(covered, np.nan, fill))
    return out.reshape(h, w).astype(np.float32)


def tile_panels(stack, gap: int = 4, fill: float = np.nan) -> np.ndarray:
    """(panels, rows, cols) -> one 2-D image with the panels in a near-square grid, ``gap`` cells apart.

    Panel k sits in grid row ``k // ncol``, grid column ``k % ncol`` with ``ncol = ceil(sqrt(panels))``;
    a single panel is returned as it is (as float32).
    """
    stack = np.asarray(stack, np.float32)
    if stack.ndim == 2:
        return stack
    p, r, c = stack.shape
    if p == 1:
        return stack[0]
    ncol = int(np.ceil(np.sqrt(p)))
    nrow = int(np.ceil(p / ncol))
    out = np.full((nrow * r + (nrow - 1) * gap, ncol * c + (ncol - 1) * gap), fill, np.float32)
    for k in range(p):
        i, j = divmod(k, ncol)
        out[i * (r + gap) : i * (r + gap) + r, j * (c + gap) : j * (c + gap) + c] = stack[k]
    return out


def assembled_extent(x_um, y_um, pixel_um: float):
    """(extent, unit) of the image :func:`assemble` makes, for :func:`~gpusmall.analysis.imshow.show_image`:
    data coordinates = pixel centres in mm (in pixels for a camera in pixel units, ``pixel_um == 1``), the
    horizontal axis ``y`` (columns), the vertical axis ``x`` (rows, row 0 = the smallest x at the top): label
    them ``y (<unit>)`` and ``x (<unit>)`` (:func:`assembled_labels`)."""
    _, _, shape, (x0, y0) = pixel_grid(x_um, y_um, pixel_um)
    s, unit = (1.0, "pixels") if pixel_um == 1.0 else (1e-3, "mm")
    return grid_extent(y0 * s, x0 * s, pixel_um * s, shape), unit


def assembled_labels(unit: str) -> tuple[str, str]:
    """(xlabel, ylabel) of an assembled image's axes: ``("y (<unit>)", "x (<unit>)")`` (columns follow y,
    rows x: :func:`pixel_grid`)."""
    return f"y ({unit})", f"x ({unit})"


def image_figure(
    image,
    title: str,
    *,
    covered=None,
    extent=None,
    xlabel: str = "column",
    ylabel: str = "row",
    label: str = "value",
    unit: str = "a.u.",
):
    """matplotlib Figure (no pyplot state) of a 2-D image: percentile (1-99) colour scale, NaN grey, row 0
    at the top, colour bar ``"<label> [<unit>]"`` (:func:`~gpusmall.analysis.imshow.show_image`).

    Args:
        image: (H, W) values; NaN pixels are drawn grey.
        title: axes title.
        covered: optional (H, W) bool, False where no pixel is (gaps between panels: drawn blank).
        extent: optional (left, right, bottom, top) in axis units (:func:`assembled_extent`).
    """
    from matplotlib.figure import Figure

    image = np.asarray(image, np.float32)
    h, w = image.shape
    fig = Figure(figsize=(7.5, float(np.clip(6.0 * h / max(w, 1) + 1.0, 2.5, 12.0))), layout="constrained")
    ax = fig.add_subplot()
    alpha = None if covered is None else np.asarray(covered, np.float32)
    show_image(ax, image, label=label, unit=unit, extent=extent, alpha=alpha)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return fig


def plot_image(image, png, title: str, **kw) -> Path:
    """Write :func:`image_figure` (same arguments) as a PNG; returns its path."""
    png = Path(png)
    image_figure(image, title, **kw).savefig(
        png, dpi=100, bbox_inches="tight", pad_inches=0.15, metadata=png_metadata()
    )
    return png


@dataclass
class AverageImage:
    """The average of one detector over some events (host arrays).

    Attributes:
        det: detector name.
        mean: (panels, rows, cols) float32 in the run's units; NaN where the pixel was never good.
        count: (panels, rows, cols) int32, events in which the pixel was good.
        events: events averaged (damaged events are not counted).
        damaged: damaged events left out.
        x_um, y_um: (panels, rows, cols) float32 pixel centres, micrometres.
        pixel_um: pixel pitch, micrometres (1 = pixel units).
        units: ``adu``, ``kev`` or ``photons``.
        mask_value: ``zero`` or ``nan``: what bad pixels are in :meth:`stored` arrays.
    """

    det: str
    mean: np.ndarray
    count: np.ndarray
    events: int
    damaged: int
    x_um: np.ndarray
    y_um: np.ndarray
    pixel_um: float
    units: str = "adu"
    mask_value: str = "zero"
    extra: dict = field(default_factory=dict)

    @property
    def bad(self) -> np.ndarray:
        """(panels, rows, cols) bool, True where the pixel was never good."""
        return self.count == 0

    def image(self, fill: float = np.nan) -> np.ndarray:
        """(H, W) float32 assembled mean, NaN at bad pixels, ``fill`` in the gaps (:func:`assemble`)."""
        return assemble(self.mean, self.x_um, self.y_um, self.pixel_um, fill=fill)

    def stored(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, image) as written to a file: bad pixels (and gaps) 0 with ``mask_value: zero``, NaN with ``nan``."""
        if self.mask_value == "nan":
            return self.mean, self.image(np.nan)
        return np.nan_to_num(self.mean, nan=0.0), np.nan_to_num(self.image(0.0), nan=0.0)


def average_frames(pipeline, batches, backend, events: int | None = None) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Per-pixel sum and good count of the calibrated frames of ``batches``.

    Args:
        pipeline: a :class:`~gpusmall.producer.pipeline.DetectorPipeline` (its ``calibrator`` is used).
        batches: iterable of (raw (events, panels, rows, cols) host array, damaged (events,) bool or None).
        backend: the pipeline's backend; each batch is uploaded, calibrated and summed on its device.
        events: stop after this many events (damaged ones included), or None for all.

    Returns:
        ``(total, count, used, damaged)``: (panels, rows, cols) float64 sum of calibrated values over
        the events in which each pixel was good, int64 count of those events, number of events used and
        number of damaged events left out.
    """
    xp = backend.xp
    total = xp.zeros(pipeline.shape, xp.float64)
    count = xp.zeros(pipeline.shape, xp.int64)
    used = damaged = seen = 0
    for raw, bad in batches:
        if events is not None and seen >= events:
            break
        n = len(raw) if events is None else min(len(raw), events - seen)
        seen += n
        raw = raw[:n]
        if bad is not None:
            bad = np.asarray(bad[:n], bool)
            damaged += int(bad.sum())
            raw = raw[~bad]
        if len(raw) == 0:
            continue
        frames = pipeline.calibrator(backend.to_device(np.ascontiguousarray(raw)))
        good = frames.good
        total += xp.where(good, frames.data, xp.float32(0)).sum(axis=0, dtype=xp.float64)
        count += good.sum(axis=0, dtype=xp.int64)
        used += len(raw)
    return backend.to_host(total), backend.to_host(count), used, damaged


def _source_batches(source, det: str, batch_size: int, events: int | None):
    """(raw, damaged) of ``det`` for events [0, events) of a source (read until it runs dry if unknown)."""
    stop = source.n_events if events is None else (events if source.n_events is None else min(events, source.n_events))
    start = 0
    while stop is None or start < stop:
        end = start + batch_size if stop is None else min(start + batch_size, stop)
        batch = source.read(start, end)
        if len(batch) == 0:
            return
        yield batch.raw[det], batch.damaged.get(det)
        if len(batch) < end - start:
            return
        start = end


def average_image(cfg, det: str, backend, events: int | None = 100) -> AverageImage:
    """Average calibrated image of the first ``events`` events of a config's source, for detector ``det``.

    Calibration, mask and common mode are those of ``gpusmall run`` with the same config (the config's
    functions and sums are not run). Damaged events are left out of the average.
    """
    from ..producer.pipeline import DetectorPipeline
    from ..sources import open_source

    if det not in cfg.detectors:
        raise InputError(f"avimage: no detector {det!r} in the config ({', '.join(cfg.detectors)})")
    dcfg = cfg.detectors[det].model_copy(update={"functions": [], "sums": []})
    one = cfg.model_copy(update={"detectors": {det: dcfg}})  # read only this detector
    with open_source(one) as source:
        pipeline = DetectorPipeline(det, dcfg, source.detectors[det], [], backend)
        total, count, used, damaged = average_frames(
            pipeline, _source_batches(source, det, cfg.batch_size, events), backend, events
        )
    if used == 0:
        raise InputError(
            f"avimage: detector {det}: no undamaged events to average "
            f"({damaged} damaged of the first {events if events is not None else 'all'})"
        )
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)
    x, y, _ = pipeline.geometry
    return AverageImage(
        det,
        mean,
        count.astype(np.int32),
        used,
        damaged,
        x,
        y,
        float(pipeline.pixel_um),
        units=dcfg.units,
        mask_value=dcfg.mask_value,
    )


def average_figure(av: AverageImage, title: str | None = None):
    """matplotlib Figure of an :class:`AverageImage`: assembled as psana's ``det.raw.image()`` (rows from x,
    row 0 = smallest x at the top; columns from y), bad pixels grey, gaps blank, axes ``y``, ``x`` in mm
    (pixels for a camera in pixel units), colour bar ``mean [<units>]``."""
    covered = assemble(np.ones(av.mean.shape, np.float32), av.x_um, av.y_um, av.pixel_um, fill=0.0) > 0
    extent, unit = assembled_extent(av.x_um, av.y_um, av.pixel_um)
    title = title or f"{av.det}: mean of {av.events} events"
    if av.damaged:
        title += f" ({av.damaged} damaged left out)"
    xlabel, ylabel = assembled_labels(unit)
    return image_figure(
        av.image(np.nan),
        title,
        covered=covered,
        extent=extent,
        xlabel=xlabel,
        ylabel=ylabel,
        label=f"{av.det} calib mean",
        unit=unit_name(av.units),
    )


def plot_average(av: AverageImage, png, title: str | None = None) -> Path:
    """PNG of :func:`average_figure`; returns its path."""
    png = Path(png)
    average_figure(av, title).savefig(png, dpi=100, bbox_inches="tight", pad_inches=0.15, metadata=png_metadata())
    return png


def write_average(av: AverageImage, path, attrs: dict | None = None) -> Path:
    """HDF5 file: ``/<det>/mean`` (panels, rows, cols) float32, ``/<det>/image`` (H, W) float32 in psana's
    ``det.raw.image()`` layout (rows along x, columns along y: :func:`assemble`; bad pixels and gaps 0 or NaN
    after ``mask_value``), ``/<det>/count`` int32, ``/<det>/x``, ``y`` (um), and attributes ``events``,
    ``damaged``, ``pixel_um``, ``units``, ``image_origin_um`` (x, y of the centre of image cell [0, 0]; cell
    [i, j] is at x + i * pixel_um, y + j * pixel_um)."""
    import h5py

    from ..io.writer import LIBVER, attr_value

    mean, image = av.stored()
    _, _, _, origin = pixel_grid(av.x_um, av.y_um, av.pixel_um)
    path = Path(path)
    with h5py.File(path, "w", libver=LIBVER) as f:
        f.attrs["gpusmall_version"] = __version__  # gpusmall wrote it (may overwrite it)
        f.attrs["gpusmall_kind"] = "average"
        g = f.create_group(av.det)
        g.create_dataset("mean", data=mean)
        g.create_dataset("image", data=image)
        g.create_dataset("count", data=av.count)
        g.create_dataset("x", data=av.x_um)
        g.create_dataset("y", data=av.y_um)
        for k, v in {
            "events": av.events,
            "damaged": av.damaged,
            "pixel_um": av.pixel_um,
            "units": av.units,
            "mask_value": av.mask_value,
            "image_origin_um": np.asarray(origin),
            **(attrs or {}),
        }.items():
            g.attrs[k] = attr_value(v)
    return path
