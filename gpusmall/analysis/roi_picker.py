"""ROI picking on an average image: panel / row / col under the cursor, drawn rectangles -> ``roi`` bounds.

A (panels, rows, cols) image is shown in one of the two views gpusmall already draws, in the same
orientation:

* **assembled** (pixel centres ``x``, ``y`` given, as ``gpusmall avimage`` / ``plot_average``): psana's
  ``det.raw.image()`` layout, image rows follow ``x`` and columns ``y``
  (:func:`gpusmall.analysis.avimage.pixel_grid`), axes in mm: the horizontal data coordinate is the pixel
  centres' ``y``, the vertical one their ``x`` (growing downwards);
* **tiled** (no geometry, as ``gpusmall plot`` shows panels without one: :func:`~gpusmall.analysis.avimage.tile_panels`):
  each panel as its array, data coordinates in cells (pixel (r, c) of a panel whose tile starts at (R, C) is
  centred at horizontal C + c, vertical R + r).

Both have row 0 at the top (``origin="upper"``, :mod:`gpusmall.analysis.imshow`, the one orientation of every
image gpusmall draws) and a colour bar ``"<label> [<unit>]"``. The maps below work in data coordinates
(horizontal, vertical: matplotlib's ``xdata``, ``ydata``, which on an assembled view are the pixels' y, x),
so they do not depend on the orientation.

:class:`PanelView` maps data coordinates to (panel, row, col) (``format_coord``) and a drawn rectangle to
ROI bounds: the pixels whose centres lie inside it, per panel their bounding box ``[[p, p+1], [r0, r1],
[c0, c1]]`` (half-open, the roi function's syntax, :mod:`gpusmall.funcs.roi`). :class:`RoiPicker` adds a
``matplotlib.widgets.RectangleSelector`` (Jupyter with ipympl: ``%matplotlib widget``); :func:`roi_figure` /
:func:`roi_png` draw the same view non-interactively with panel numbers, row / column labels every ``grid``
pixels along each panel's edges, and given ROIs. :func:`bounds_from_rectangle` is the rule for one panel in
its own pixel coordinates. matplotlib is imported inside the functions only.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def bounds_from_rectangle(panel: int, x0: float, y0: float, x1: float, y1: float, shape=None) -> list[list[int]]:
    """ROI bounds ``[[panel, panel + 1], [r0, r1], [c0, c1]]`` (half-open) of a rectangle drawn on one panel.

    ``x`` is the column and ``y`` the row coordinate in the panel's pixel units: pixel (r, c) is centred
    at (x=c, y=r) and covers [c - 0.5, c + 0.5) x [r - 0.5, r + 0.5). The corners may come in any order.
    The ROI holds the pixels whose centres lie inside the rectangle (edges included); along an axis where
    it holds no centre (narrower than a pixel), the pixel under the rectangle's middle. ``shape`` ((rows,
    cols) or (panels, rows, cols)): clip to the panel; ValueError when nothing is left.

    >>> bounds_from_rectangle(2, 9.6, 19.4, 30.2, 5.0)
    [[2, 3], [5, 20], [10, 31]]
    """

    def axis(a, b, n):
        lo, hi = min(a, b), max(a, b)
        i0, i1 = math.ceil(lo), math.floor(hi) + 1
        if i1 <= i0:
            i0 = math.floor((lo + hi) / 2 + 0.5)
            i1 = i0 + 1
        if n is not None:
            i0, i1 = max(i0, 0), min(i1, n)
            if i1 <= i0:
                raise ValueError(f"the rectangle ({x0}, {y0})-({x1}, {y1}) is outside the panel {tuple(shape)}")
        return [int(i0), int(i1)]

    rows = cols = None
    if shape is not None:
        shape = tuple(shape)
        if len(shape) == 3 and not 0 <= panel < shape[0]:
            raise ValueError(f"panel {panel} is not in 0..{shape[0] - 1}")
        rows, cols = shape[-2:]
    return [[int(panel), int(panel) + 1], axis(y0, y1, rows), axis(x0, x1, cols)]


def _as3d(a):
    a = np.asarray(a)
    return a[None] if a.ndim == 2 else a


class PanelView:
    """An image of (panels, rows, cols) as drawn, with the maps between data coordinates and pixels.

    Args:
        image: (panels, rows, cols) (or (rows, cols)) values, NaN = bad.
        x, y: optional pixel centres (um), same shape: the assembled view; without them, tiled.
        pixel_um: grid pitch of the assembled view (default: the pixel size measured from x, y).
        gap: cells between tiles in the tiled view (as ``tile_panels``).
        label, unit: the colour bar's quantity and unit (``"<label> [<unit>]"``).
    """

    def __init__(
        self,
        image,
        x=None,
        y=None,
        pixel_um: float | None = None,
        gap: int = 4,
        label: str = "value",
        unit: str = "a.u.",
    ):
        from .avimage import assemble, pixel_grid
        from .imshow import ORIGIN, color_limits, grid_extent

        self.label, self.unit, self.origin = label, unit, ORIGIN

        self.image = _as3d(np.asarray(image, np.float32))
        self.shape = self.image.shape
        p, r, c = self.shape
        pr, pc = np.mgrid[0:r, 0:c]
        if x is not None and y is not None:
            from .centre import pixel_size_um

            self.x, self.y = _as3d(np.asarray(x, np.float64)), _as3d(np.asarray(y, np.float64))
            if self.x.shape != self.shape or self.y.shape != self.shape:
                raise ValueError(f"x, y shapes {self.x.shape}, {self.y.shape} differ from the image's {self.shape}")
            self.kind = "assembled"
            self.pixel_um = pixel_size_um(self.x, self.y) if pixel_um is None else float(pixel_um)
            rows, cols, (h, w), (x0, y0) = pixel_grid(self.x, self.y, self.pixel_um)
            self.shown = assemble(self.image, self.x, self.y, self.pixel_um)
            s = 1e-3
            # columns along y (horizontal), rows along x (vertical), as psana's det.raw.image()
            self.extent = grid_extent(y0 * s, x0 * s, self.pixel_um * s, (h, w))
            self._grid0, self._step = (y0 * s, x0 * s), self.pixel_um * s
            # data coordinates (horizontal, vertical) of every pixel centre (mm): its y, x
            self.px, self.py = self.y * s, self.x * s
            self.xlabel, self.ylabel = "y (mm)", "x (mm)"
        else:
            self.kind = "tiled"
            ncol = int(np.ceil(np.sqrt(p))) if p > 1 else 1
            self.tile_origin = np.array([divmod(k, ncol) for k in range(p)]) * [r + gap, c + gap]  # (row, col)
            h = (int(np.ceil(p / ncol)) - 1) * (r + gap) + r
            w = (ncol - 1) * (c + gap) + c
            rows = self.tile_origin[:, 0, None, None] + pr[None]
            cols = self.tile_origin[:, 1, None, None] + pc[None]
            self.shown = np.full((h, w), np.nan, np.float32)
            self.shown[rows, cols] = self.image
            self.extent = None  # type: ignore[assignment]  # imshow's default: cell (i, j) centred at (j, i)
            self._grid0, self._step = (0.0, 0.0), 1.0
            self.px, self.py = cols.astype(np.float64), rows.astype(np.float64)
            self.xlabel, self.ylabel = "column (panels tiled)", "row"
        self.cell_rows, self.cell_cols = rows, cols
        self.lookup = np.full(self.shown.shape, -1, np.int64)  # flat pixel index of each cell
        self.lookup[rows.ravel(), cols.ravel()] = np.arange(self.image.size)
        self.vmin, self.vmax = color_limits(self.shown)

    # ---- coordinates ----
    def pixel_at(self, xd: float, yd: float):
        """(panel, row, col) of the pixel drawn at data coordinates (xd horizontal, yd vertical), or None
        (gap, outside)."""
        if xd is None or yd is None or not (np.isfinite(xd) and np.isfinite(yd)):
            return None
        j = int(np.floor((xd - self._grid0[0]) / self._step + 0.5))
        i = int(np.floor((yd - self._grid0[1]) / self._step + 0.5))
        h, w = self.lookup.shape  # type: ignore[misc]
        if not (0 <= i < h and 0 <= j < w) or self.lookup[i, j] < 0:
            return None
        return tuple(int(v) for v in np.unravel_index(self.lookup[i, j], self.shape))

    def format_coord(self, xd: float, yd: float) -> str:
        """The text matplotlib shows under the cursor: panel, row, col and value (or the coordinates: on an
        assembled view the horizontal data coordinate ``xd`` is the pixels' y, the vertical ``yd`` their x)."""
        where = self.pixel_at(xd, yd)
        if where is None:
            if self.kind == "assembled":
                return f"x={yd:.4g} mm, y={xd:.4g} mm"
            return f"x={xd:.4g}, y={yd:.4g}"
        p, r, c = where
        return f"panel {p}, row {r}, col {c}: {self.image[p, r, c]:.4g}"

    def data_xy(self, panel: int, row, col):
        """Data coordinates (horizontal, vertical) of fractional pixel positions (row, col) of ``panel`` (a
        panel is flat: affine in (row, col), from its pixel centres)."""
        row, col = np.asarray(row, np.float64), np.asarray(col, np.float64)
        px, py = self.px[panel], self.py[panel]
        if px.shape[0] > 1:
            dxr, dyr = px[1, 0] - px[0, 0], py[1, 0] - py[0, 0]
        else:  # a single row: perpendicular to the columns
            dxr, dyr = -(py[0, 1] - py[0, 0]), px[0, 1] - px[0, 0]
        if px.shape[1] > 1:
            dxc, dyc = px[0, 1] - px[0, 0], py[0, 1] - py[0, 0]
        else:
            dxc, dyc = py[1, 0] - py[0, 0], -(px[1, 0] - px[0, 0])
        return px[0, 0] + row * dxr + col * dxc, py[0, 0] + row * dyr + col * dyc

    def rectangle_to_bounds(self, xd0: float, yd0: float, xd1: float, yd1: float) -> list[list[list[int]]]:
        """ROI bounds of a rectangle drawn in data coordinates (horizontal ``xd``, vertical ``yd``, as
        matplotlib's ``xdata``, ``ydata``): for each panel with pixel centres inside it
        (edges included) the bounding box of those pixels, ``[[p, p+1], [r0, r1], [c0, c1]]``, by panel.
        A rectangle holding no centre gives the pixel under its middle (none over a gap)."""
        xlo, xhi = sorted((xd0, xd1))
        ylo, yhi = sorted((yd0, yd1))
        tol = 1e-9 * self._step
        inside = (self.px >= xlo - tol) & (self.px <= xhi + tol) & (self.py >= ylo - tol) & (self.py <= yhi + tol)
        out = []
        for p in np.flatnonzero(inside.any(axis=(1, 2))):
            r, c = np.nonzero(inside[p])
            out.append([[int(p), int(p) + 1], [int(r.min()), int(r.max()) + 1], [int(c.min()), int(c.max()) + 1]])
        if not out:
            where = self.pixel_at((xlo + xhi) / 2, (ylo + yhi) / 2)
            if where is not None:
                p, r, c = where
                out.append([[p, p + 1], [r, r + 1], [c, c + 1]])
        return out

    # ---- drawing ----
    def draw(self, ax, cmap: str = "viridis", colorbar: bool = True):
        """imshow the view on ``ax`` (percentile colour scale, NaN grey, row 0 at the top, colour bar
        ``"<label> [<unit>]"``), with this view's ``format_coord``; returns the AxesImage."""
        from .imshow import show_image

        im = show_image(
            ax,
            self.shown,
            label=self.label,
            unit=self.unit,
            extent=self.extent,
            cmap=cmap,
            vmin=self.vmin,
            vmax=self.vmax,
            colorbar=colorbar,
            shrink=0.85,
            interpolation="nearest",
        )
        ax.format_coord = self.format_coord
        ax.set_xlabel(self.xlabel)
        ax.set_ylabel(self.ylabel)
        return im

    def roi_outline(self, bounds):
        """(5, 2) data coordinates of the outline of ROI ``bounds`` (one panel: ``[[p, p+1], ...]``)."""
        if len(bounds) == 2:
            bounds = [[0, 1], *bounds]
        (p, _), (r0, r1), (c0, c1) = bounds
        rr = np.array([r0, r0, r1, r1, r0], np.float64) - 0.5
        cc = np.array([c0, c1, c1, c0, c0], np.float64) - 0.5
        return np.column_stack(self.data_xy(p, rr, cc))

    def draw_grid(self, ax, grid: int = 32, fontsize: float = 6):
        """Panel numbers at their centres, row labels every ``grid`` rows along column 0 and column labels
        along row 0 of every panel, and faint lines at those rows and columns."""
        p, r, c = self.shape
        for k in range(p):
            xc, yc = self.data_xy(k, (r - 1) / 2, (c - 1) / 2)
            ax.text(xc, yc, f"p{k}", ha="center", va="center", fontsize=fontsize * 2, color="w", weight="bold")
            for rr in range(0, r, grid):
                xs, ys = self.data_xy(k, [rr, rr], [-0.5, c - 0.5])
                ax.plot(xs, ys, color="w", lw=0.3, alpha=0.5)
                ax.text(xs[0], ys[0], f"r{rr}", fontsize=fontsize, color="w", ha="center", va="center")
            for cc in range(0, c, grid):
                xs, ys = self.data_xy(k, [-0.5, r - 0.5], [cc, cc])
                ax.plot(xs, ys, color="w", lw=0.3, alpha=0.5)
                ax.text(xs[0], ys[0], f"c{cc}", fontsize=fontsize, color="w", ha="center", va="center")


def roi_config(rois, prefix: str = "roi") -> str:
    """YAML lines for the config's ``functions:`` list, one ``roi`` per bounds."""
    return "\n".join(f"- {{type: roi, name: {prefix}{i}, bounds: {b}}}" for i, b in enumerate(rois))


class RoiPicker:
    """Interactive ROI picking: the view on ``ax`` (default: a new pyplot figure, for Jupyter with
    ``%matplotlib widget``), the pixel under the cursor in the toolbar, and a RectangleSelector whose every
    rectangle appends its bounds (one per panel it covers) to :attr:`rois`, outlines them and prints the
    config line. :meth:`config` gives the YAML of all of them."""

    def __init__(self, view: PanelView, ax=None, verbose: bool = True):
        from matplotlib.widgets import RectangleSelector

        if ax is None:
            import matplotlib.pyplot as plt

            _, ax = plt.subplots(figsize=(8, 7), layout="constrained")
        self.view, self.ax, self.verbose = view, ax, verbose
        self.rois: list[list[list[int]]] = []
        view.draw(ax)
        self.selector = RectangleSelector(
            ax,
            self.onselect,
            useblit=True,
            button=[1],  # type: ignore[list-item]
            minspanx=0,
            minspany=0,
            spancoords="data",
            interactive=False,
        )

    def onselect(self, eclick, erelease):
        """RectangleSelector callback: the press and release events' data coordinates -> bounds."""
        new = self.view.rectangle_to_bounds(eclick.xdata, eclick.ydata, erelease.xdata, erelease.ydata)
        for b in new:
            i = len(self.rois)
            self.rois.append(b)
            xy = self.view.roi_outline(b)
            self.ax.plot(xy[:, 0], xy[:, 1], color="r", lw=1)
            self.ax.text(xy[0, 0], xy[0, 1], f"roi{i}", color="r", fontsize=8)
            if self.verbose:
                print(f"roi{i}: bounds: {b}")
        self.ax.figure.canvas.draw_idle()
        return new

    def config(self, prefix: str = "roi") -> str:
        return roi_config(self.rois, prefix)


def roi_figure(
    image,
    x=None,
    y=None,
    pixel_um: float | None = None,
    rois=(),
    grid: int = 32,
    title: str = "",
    label: str = "value",
    unit: str = "a.u.",
):
    """matplotlib Figure (no pyplot state) of the :class:`PanelView` with its grid labels
    (:meth:`PanelView.draw_grid`) and the outlines of ``rois`` (bounds), labelled roi0, roi1...; ``label``,
    ``unit``: the colour bar's (a PanelView given as ``image`` keeps its own)."""
    from matplotlib.figure import Figure

    view = image if isinstance(image, PanelView) else PanelView(image, x, y, pixel_um, label=label, unit=unit)
    fig = Figure(figsize=(9, 8), layout="constrained")
    ax = fig.add_subplot()
    view.draw(ax)
    view.draw_grid(ax, grid)
    for i, b in enumerate(rois):
        xy = view.roi_outline(b)
        ax.plot(xy[:, 0], xy[:, 1], color="r", lw=1, label=f"roi{i}")
        ax.text(xy[0, 0], xy[0, 1], f"roi{i}", color="r", fontsize=8)
    ax.set_title(title or f"{view.shape[0]} panel(s) of {view.shape[1]} x {view.shape[2]}, {view.kind}", fontsize=10)
    return fig


def roi_png(
    image,
    png,
    x=None,
    y=None,
    pixel_um: float | None = None,
    rois=(),
    grid: int = 32,
    title: str = "",
    label: str = "value",
    unit: str = "a.u.",
) -> Path:
    """Write :func:`roi_figure` as a PNG; returns its path."""
    from ..producer.paths import png_metadata

    fig = roi_figure(image, x, y, pixel_um, rois, grid, title, label, unit)
    png = Path(png)
    fig.savefig(png, dpi=100, metadata=png_metadata())
    return png
