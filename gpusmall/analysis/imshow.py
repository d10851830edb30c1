"""The one way gpusmall draws an image (SPEC section 9, "Plots").

Every image the package draws (``gpusmall avimage``, ``gpusmall plot``, cube plots, the ROI picker,
``show_mask``, ``Run.plot_avimage``) goes through :func:`show_image`:

* **orientation**: array row 0 at the top, column 0 at the left (``origin="upper"``), as psana's image
  viewers show ``det.raw.image()`` and as matplotlib shows an array by default. An assembled image is
  psana's ``det.raw.image()`` cell for cell (:func:`gpusmall.analysis.avimage.pixel_grid`): rows follow ``x``
  and columns ``y``, so the horizontal axis is ``y`` (growing to the right) and the vertical axis ``x`` (row 0,
  the smallest ``x``, at the top: it grows downwards); in a tiled view row 0 is row 0 of the panels in the top
  row of tiles; in an events x bins image it is the first event.
* **colour bar**: labelled ``"<quantity> [<unit>]"``, e.g. ``calib mean [keV]``, ``ped [ADU]``,
  ``droplets [count]`` (:func:`colorbar_label`; detector units from :func:`unit_name`).

matplotlib is imported by the caller (an ``Axes`` is passed in); nothing here imports it.
"""

from __future__ import annotations

import numpy as np

#: the origin of every image gpusmall draws: array row 0 at the top
ORIGIN = "upper"

#: a detector's ``units`` (config, ``/UserDataCfg/<det>/units``) as written on a colour bar
UNIT_NAMES = {"adu": "ADU", "kev": "keV", "photons": "photons"}


def unit_name(units) -> str:
    """``adu`` -> ``ADU``, ``kev`` -> ``keV``, ``photons`` -> ``photons`` (bytes accepted; others as given,
    empty -> ``a.u.``)."""
    u = units.decode() if isinstance(units, bytes) else str(units or "")
    return UNIT_NAMES.get(u.lower(), u) or "a.u."


def colorbar_label(label: str, unit: str) -> str:
    """``"<label> [<unit>]"`` (``a.u.`` for an empty unit)."""
    return f"{label} [{unit or 'a.u.'}]".strip()


def color_limits(values, lo: float = 1.0, hi: float = 99.0) -> tuple[float, float]:
    """(vmin, vmax): the ``lo`` and ``hi`` percentiles of the finite values (a flat or empty image gets a
    unit-wide range around its value)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    vmin, vmax = (float(a) for a in np.percentile(v, [lo, hi]))
    if vmax <= vmin:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    return vmin, vmax


def grid_extent(col0: float, row0: float, step: float, shape) -> tuple[float, float, float, float]:
    """``imshow`` extent (left, right, bottom, top) of an (H, W) grid whose cell [i, j] is drawn centred at
    horizontal ``col0 + j * step``, vertical ``row0 + i * step``, for :data:`ORIGIN` (row 0 at the top:
    ``top = row0 - step / 2``). For an assembled image (columns along ``y``, rows along ``x``) ``col0`` is
    the smallest ``y`` and ``row0`` the smallest ``x`` (:func:`gpusmall.analysis.avimage.assembled_extent`)."""
    h, w = shape
    half = step / 2
    return col0 - half, col0 + (w - 1) * step + half, row0 + (h - 1) * step + half, row0 - half


def show_image(
    ax,
    image,
    *,
    label: str,
    unit: str,
    extent=None,
    cmap="viridis",
    vmin=None,
    vmax=None,
    alpha=None,
    colorbar: bool = True,
    shrink: float = 0.9,
    interpolation: str | None = None,
    aspect=None,
    bad="0.6",
):
    """``ax.imshow`` with gpusmall's orientation and a labelled colour bar; returns the AxesImage.

    Args:
        ax: matplotlib Axes.
        image: (H, W) values; NaN is drawn in the colour ``bad`` (grey).
        label, unit: the colour bar reads ``"<label> [<unit>]"``.
        extent: (left, right, bottom, top) in data units (:func:`grid_extent`); None: cell [i, j] at (j, i).
        cmap: colormap name or Colormap; vmin, vmax: colour range (default: :func:`color_limits`).
        alpha: optional (H, W) opacity (0 = not drawn, e.g. gaps between panels).
        colorbar: add the colour bar (False for an overlay).
        interpolation: default ``nearest`` up to 1200 cells a side, ``antialiased`` beyond.
    """
    from matplotlib import colormaps

    image = np.asarray(image)
    if vmin is None or vmax is None:
        lo, hi = color_limits(image)
        vmin, vmax = (lo if vmin is None else vmin), (hi if vmax is None else vmax)
    cm = colormaps[cmap] if isinstance(cmap, str) else cmap
    if bad is not None:
        cm = cm.with_extremes(bad=bad)
    if interpolation is None:
        interpolation = "nearest" if max(image.shape[:2], default=0) <= 1200 else "antialiased"
    im = ax.imshow(
        image,
        cmap=cm,
        vmin=vmin,
        vmax=vmax,
        origin=ORIGIN,
        extent=extent,
        alpha=alpha,
        interpolation=interpolation,
        aspect=aspect,
    )
    if colorbar:
        ax.figure.colorbar(im, ax=ax, label=colorbar_label(label, unit), shrink=shrink)
    return im
