"""Masks for a beamtime: bad pixels from per-pixel statistics, drawn regions, saved as ``mask.user``.

Pure NumPy on (panels, rows, cols) arrays (a camera: one panel; (rows, cols) is taken as one panel).
Every function here returns a **bad** map (bool, True = bad, the pixel is masked); the file that
:func:`save_user_mask` writes holds the opposite, **1 = keep**, as the config's ``mask.user`` and
:func:`gpusmall.detectors.masks.read_user_mask` take it (SPEC section 5).

* thresholds on the average / std / max images of a run (``gpusmall avimage``'s mean, a dark run's noise):
  :func:`hot_pixels` (mean above ``k`` robust sigma of the median, or above an ADU value), :func:`dead_pixels`
  (std, mean or max near zero), :func:`noisy_pixels` (std above ``k`` times the median std);
* drawn regions: :func:`rectangle_mask` (ROI bounds ``[[p0, p1], [r0, r1], [c0, c1]]``), :func:`polygon_mask`
  (vertices in (row, col) of one panel), :func:`circle_mask` (a disc or annulus around a centre in um, with
  the pixel coordinates x, y: a beam stop, a ring to leave out);
* :func:`combine` (OR of bad maps), :func:`save_user_mask`, :func:`load_user_mask`, :func:`show_mask`
  (matplotlib Figure, imported inside).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _as3d(a) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 2:
        return a[None]
    if a.ndim != 3:
        raise ValueError(f"expected a (panels, rows, cols) or (rows, cols) array, not shape {a.shape}")
    return a


def robust_sigma(values) -> float:
    """1.4826 x the median absolute deviation of the finite values (the sigma of a Gaussian)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def _stat_values(a, mask):
    """(values as (panels, rows, cols) float64, the finite good pixels the statistics use)."""
    a = _as3d(np.asarray(a, np.float64))
    use = np.isfinite(a)
    if mask is not None:
        use &= _as3d(np.asarray(mask, bool))  # mask: True = good, as a config mask
    return a, use


def hot_pixels(mean, *, k: float = 5.0, adu: float | None = None, mask=None, per_panel: bool = False) -> np.ndarray:
    """Bad map: ``mean > median + k * robust_sigma(mean)`` (statistics over the good finite pixels, or each
    panel's with ``per_panel``), or ``mean > adu`` when ``adu`` is given (``k=None`` for the ADU cut alone).
    ``mask``: optional good map (True = good) that the statistics leave out."""
    a, use = _stat_values(mean, mask)
    bad = np.zeros(a.shape, bool)
    with np.errstate(invalid="ignore"):
        if k is not None:
            groups = [slice(p, p + 1) for p in range(a.shape[0])] if per_panel else [slice(None)]
            for g in groups:
                vals = a[g][use[g]]
                if vals.size:
                    med, sig = np.median(vals), robust_sigma(vals)
                    bad[g] |= a[g] > med + k * sig
        if adu is not None:
            bad |= a > adu
    return bad.reshape(np.shape(mean))


def dead_pixels(
    *,
    std=None,
    mean=None,
    max=None,
    std_frac: float = 0.05,
    mean_abs: float | None = None,
    max_abs: float | None = None,
    mask=None,
) -> np.ndarray:
    """Bad map of pixels that do not respond: ``std < std_frac * median(std)`` (``std`` given), and/or
    ``|mean| <= mean_abs`` and ``max <= max_abs`` when those thresholds are given (a pedestal-subtracted
    dark has a mean near 0 everywhere: use the std there). Give at least one image."""
    imgs = [a for a in (std, mean, max) if a is not None]
    if not imgs:
        raise ValueError("dead_pixels needs std, mean or max")
    shape = np.shape(imgs[0])
    bad = np.zeros(shape, bool)
    with np.errstate(invalid="ignore"):
        if std is not None:
            s, use = _stat_values(std, mask)
            bad |= (s < std_frac * np.median(s[use])).reshape(shape)
        if mean is not None and mean_abs is not None:
            bad |= np.abs(np.asarray(mean, np.float64)) <= mean_abs
        if max is not None and max_abs is not None:
            bad |= np.asarray(max, np.float64) <= max_abs
    return bad


def noisy_pixels(std, *, k: float = 5.0, mask=None, per_panel: bool = False) -> np.ndarray:
    """Bad map: ``std > k * median(std)`` (over the good finite pixels, or per panel)."""
    s, use = _stat_values(std, mask)
    bad = np.zeros(s.shape, bool)
    groups = [slice(p, p + 1) for p in range(s.shape[0])] if per_panel else [slice(None)]
    with np.errstate(invalid="ignore"):
        for g in groups:
            vals = s[g][use[g]]
            if vals.size:
                bad[g] |= s[g] > k * np.median(vals)
    return bad.reshape(np.shape(std))


def nonfinite_pixels(*images) -> np.ndarray:
    """Bad map: pixels that are NaN or infinite in any of the images (never good in the average)."""
    bad = np.zeros(np.shape(images[0]), bool)
    for a in images:
        bad |= ~np.isfinite(np.asarray(a, np.float64))
    return bad


# ---- drawn regions ------------------------------------------------------------------------------------
def rectangle_mask(shape, bounds) -> np.ndarray:
    """Bad map of the pixels inside ROI ``bounds`` (``[[p0, p1], [r0, r1], [c0, c1]]`` half-open, or
    ``[[r0, r1], [c0, c1]]`` on panel 0, as the roi function takes them) of a (panels, rows, cols) shape."""
    shape = tuple(shape)
    if len(bounds) == 2:
        bounds = [[0, 1], *bounds]
    if len(bounds) != 3 or any(len(b) != 2 for b in bounds):
        raise ValueError("bounds must be [[p0,p1],[r0,r1],[c0,c1]] or [[r0,r1],[c0,c1]]")
    for (lo, hi), n in zip(bounds, shape):
        if not 0 <= lo < hi <= n:
            raise ValueError(f"bounds {bounds} do not fit the shape {shape}")
    bad = np.zeros(shape, bool)
    bad[tuple(slice(int(lo), int(hi)) for lo, hi in bounds)] = True
    return bad


def polygon_mask(shape, panel: int, vertices) -> np.ndarray:
    """Bad map of the pixels of ``panel`` whose centres (row, col) lie inside the polygon ``vertices``
    (a list of (row, col), in pixel units: pixel (r, c) has its centre at (r, c)); even-odd rule."""
    shape = tuple(shape)
    v = np.asarray(vertices, np.float64)
    if v.ndim != 2 or v.shape[1] != 2 or len(v) < 3:
        raise ValueError("a polygon needs at least 3 (row, col) vertices")
    if not 0 <= panel < shape[0]:
        raise ValueError(f"panel {panel} is not in 0..{shape[0] - 1}")
    r, c = np.mgrid[0 : shape[1], 0 : shape[2]].astype(np.float64)
    inside = np.zeros(shape[1:], bool)
    vr, vc = v[:, 0], v[:, 1]
    for i in range(len(v)):
        r1, c1, r2, c2 = vr[i], vc[i], vr[i - 1], vc[i - 1]
        crosses = (r1 > r) != (r2 > r)
        with np.errstate(divide="ignore", invalid="ignore"):
            c_at = c1 + (r - r1) * (c2 - c1) / (r2 - r1)
        inside ^= crosses & (c < c_at)
    bad = np.zeros(shape, bool)
    bad[panel] = inside
    return bad


def circle_mask(x, y, center_um, r_max_um: float, r_min_um: float = 0.0) -> np.ndarray:
    """Bad map of the pixels whose centres (x, y um) lie within ``r_min_um <= r < r_max_um`` of
    ``center_um`` (x, y): a beam stop (``r_min_um = 0``) or an annulus."""
    r = np.hypot(np.asarray(x, np.float64) - center_um[0], np.asarray(y, np.float64) - center_um[1])
    return (r >= r_min_um) & (r < r_max_um)


def combine(*bad_maps) -> np.ndarray:
    """OR of bad maps of one shape; an argument may also be a dict (its values, as :func:`make_mask`
    returns) or a list of bad maps."""
    flat: list = []
    for m in bad_maps:
        if isinstance(m, dict):
            flat.extend(m.values())
        elif isinstance(m, (list, tuple)):
            flat.extend(m)
        else:
            flat.append(m)
    bad_maps = flat  # type: ignore[assignment]
    if not bad_maps:
        raise ValueError("nothing to combine")
    out = np.zeros(np.shape(bad_maps[0]), bool)
    for m in bad_maps:
        if np.shape(m) != out.shape:
            raise ValueError(f"mask shapes differ: {np.shape(m)} and {out.shape}")
        out |= np.asarray(m, bool)
    return out


def make_mask(
    mean=None,
    std=None,
    max=None,
    *,
    hot_k: float | None = 5.0,
    hot_adu: float | None = None,
    noisy_k: float | None = 5.0,
    dead_std_frac: float | None = 0.05,
    dead_max_abs: float | None = None,
    mask=None,
) -> dict[str, np.ndarray]:
    """The threshold bad maps of whatever images are given, by name (``hot``, ``noisy``, ``dead``,
    ``nonfinite``); a threshold of None leaves its map out. :func:`combine` ORs them."""
    out = {}
    given = [a for a in (mean, std, max) if a is not None]
    if not given:
        raise ValueError("make_mask needs mean, std or max")
    if mean is not None and (hot_k is not None or hot_adu is not None):
        out["hot"] = hot_pixels(mean, k=hot_k, adu=hot_adu, mask=mask)  # type: ignore[arg-type]
    if std is not None and noisy_k is not None:
        out["noisy"] = noisy_pixels(std, k=noisy_k, mask=mask)
    if (std is not None and dead_std_frac is not None) or (max is not None and dead_max_abs is not None):
        out["dead"] = dead_pixels(
            std=std if dead_std_frac is not None else None,
            max=max,
            std_frac=dead_std_frac or 0.0,
            max_abs=dead_max_abs,
            mask=mask,
        )
    out["nonfinite"] = nonfinite_pixels(*given)
    return out


# ---- files ------------------------------------------------------------------------------------------------
def save_user_mask(path, bad, dataset: str = "mask") -> str:
    """Write a bad map as a ``mask.user`` file: ``good = ~bad`` as uint8 (1 = keep), shape (panels, rows,
    cols). ``path`` ending in ``.npy``: a NumPy file; else an HDF5 file with the dataset ``dataset``
    (``FILE.h5:/dataset`` in ``path`` also names it). Returns the string to put in the config
    (``FILE.npy`` or ``FILE.h5:/dataset``)."""
    good = (~_as3d(np.asarray(bad, bool))).astype(np.uint8)
    s = str(path)
    if s.endswith(".npy"):
        np.save(s, good)
        return s
    file, sep, dset = s.partition(":")
    dset = dset if sep and dset else dataset
    import h5py

    with h5py.File(file, "a") as f:
        if dset in f:
            del f[dset]
        d = f.create_dataset(dset, data=good)
        d.attrs["meaning"] = "1 = keep, 0 = masked (gpusmall mask.user)"
    return f"{file}:{dset if dset.startswith('/') else '/' + dset}"


def load_user_mask(source, shape) -> np.ndarray:
    """The bad map (True = masked) of a ``mask.user`` file, read by gpusmall's own loader
    (:func:`gpusmall.detectors.masks.read_user_mask`)."""
    from ..detectors.masks import read_user_mask

    return ~read_user_mask(source, "user", tuple(shape))


# ---- a look ---------------------------------------------------------------------------------------------
def show_mask(
    image,
    bad,
    x=None,
    y=None,
    pixel_um: float | None = None,
    title: str = "",
    png=None,
    label: str = "value",
    unit: str = "ADU",
):
    """matplotlib Figure of ``image`` with the bad pixels in red (no pyplot state).

    With pixel coordinates ``x``, ``y`` (um) the panels are assembled as ``gpusmall avimage`` draws them
    (psana's ``det.raw.image()`` layout: rows from x, columns from y; axes ``y``, ``x`` in mm); without them they are tiled as ``gpusmall plot`` tiles them. Either way row 0
    is at the top (:mod:`gpusmall.analysis.imshow`); the colour bar reads ``"<label> [<unit>]"`` (``image``'s
    quantity and unit, e.g. a dark's mean in ADU). ``png``: also save it there. Returns the Figure.
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    from .avimage import assemble, assembled_extent, assembled_labels, tile_panels
    from .centre import pixel_size_um
    from .imshow import show_image

    img = _as3d(np.asarray(image, np.float32))
    badm = _as3d(np.asarray(bad, bool))
    if img.shape != badm.shape:
        raise ValueError(f"image {img.shape} and mask {badm.shape} differ in shape")
    if x is not None and y is not None:
        x, y = _as3d(np.asarray(x, np.float64)), _as3d(np.asarray(y, np.float64))
        pixel_um = pixel_size_um(x, y) if pixel_um is None else pixel_um
        shown = assemble(img, x, y, pixel_um)
        over = assemble(badm.astype(np.float32), x, y, pixel_um, fill=0.0) > 0
        extent, u = assembled_extent(x, y, pixel_um)
        labels = assembled_labels(u)
    else:
        shown = tile_panels(img)
        over = tile_panels(badm.astype(np.float32), fill=0.0) > 0
        extent, labels = None, ("column (panels tiled)", "row")
    fig = Figure(figsize=(7.5, 6.5), layout="constrained")
    ax = fig.add_subplot()
    show_image(ax, shown, label=label, unit=unit, extent=extent, cmap="gray")
    show_image(
        ax,
        np.where(over, 1.0, np.nan),
        label="masked",
        unit="",
        extent=extent,
        colorbar=False,
        cmap=ListedColormap(["red"]),
        vmin=0,
        vmax=1,
        alpha=0.8,
        bad=None,
        interpolation="nearest",
    )
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(title or f"{int(badm.sum())} of {badm.size} pixels masked (red)", fontsize=10)
    if png is not None:
        from ..producer.paths import png_metadata

        fig.savefig(Path(png), dpi=100, metadata=png_metadata())
    return fig
