"""Beam centre (and sample-detector distance) from the rings of an average image, for ``azav``.

Pure NumPy/SciPy on a (panels, rows, cols) image and its pixel centres ``x``, ``y`` (um, as
``/UserDataCfg/<det>/x``, ``y``; a camera has one panel, (rows, cols) is taken too). No GPU, no matplotlib.

The steps, each usable on its own (what smalldata_tools' ``FitCircle`` / ``fitCircle`` does, with an
algebraic start, ring grouping and sub-pixel ring maxima added):

1. :func:`ring_pixels`: the pixels above a threshold (default the 99th percentile of the good pixels).
2. :func:`kasa_circle`: algebraic (Kasa) least-squares circle through them, the starting centre.
3. :func:`group_rings`: the selected pixels grouped into concentric rings by their radius about the centre.
4. :func:`fit_concentric`: geometric least-squares fit of one centre and one radius per ring
   (``r_i - R_ring``, robust ``soft_l1`` loss, ``scipy.optimize.least_squares``).
5. :func:`ring_maxima`: per ring and azimuthal sector, the sub-pixel radius of the ring's maximum (centroid
   of the radial profile above its linear background); step 4 on these points gives :func:`fit_center`.
6. optionally :func:`refine_center_sharpness`: the centre maximising the sharpness of the azimuthal
   average (the between-bin variance of a radial profile with linear-interpolation binning, so the
   objective is continuous), Nelder-Mead.
7. :func:`ring_radii` (Gaussian + linear background fit of each ring's radial profile) and
   :func:`fit_distance`: with the photon energy and the rings' q (or a calibrant's d-spacings, matched
   automatically), the distance from ``R = D tan(2 theta)``.

:func:`find_geometry` runs them all and returns a :class:`BeamGeometry` whose :meth:`~BeamGeometry.azav_params`
are ``azav``'s ``center_um``, ``distance_mm``, ``energy_kev`` and whose :meth:`~BeamGeometry.write_poni`
writes the same geometry as a pyFAI PONI file (``azav``'s ``poni``). The model is a flat detector normal to
the beam (``tx = ty = 0``); pixel ``z`` is not used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HC_KEV_A = 12.398419843320026  # h*c in keV*Angstrom (as gpusmall.funcs.azav)


# ---- helpers -----------------------------------------------------------------------------------------
def _flat(image, x, y, mask=None):
    """Flattened finite (value, x, y) of the good pixels."""
    image = np.asarray(image, np.float64)
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if image.shape != x.shape or x.shape != y.shape:
        raise ValueError(f"image {image.shape}, x {x.shape} and y {y.shape} must have one shape")
    good = np.isfinite(image) & np.isfinite(x) & np.isfinite(y)
    if mask is not None:
        m = np.asarray(mask, bool)
        if m.shape != image.shape:
            raise ValueError(f"mask shape {m.shape} differs from the image's {image.shape}")
        good &= m
    if not good.any():
        raise ValueError("no good pixel")
    return image[good], x[good], y[good]


def pixel_size_um(x, y) -> float:
    """The pixel pitch (um): median distance between neighbouring pixel centres along a row."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.shape[-1] < 2:
        raise ValueError("need at least two columns to measure the pixel size")
    d = np.hypot(np.diff(x, axis=-1), np.diff(y, axis=-1)).ravel()
    d = d[np.isfinite(d) & (d > 0)]
    return float(np.median(d))


def two_theta(q, energy_kev):
    """2 theta (radians) of momentum transfer ``q`` (Angstrom^-1) at ``energy_kev``."""
    s = np.asarray(q, np.float64) * (HC_KEV_A / energy_kev) / (4 * np.pi)
    if np.any(s >= 1) or np.any(s <= 0):
        raise ValueError(f"q {q} is not reachable at {energy_kev} keV")
    return 2 * np.arcsin(s)


# ---- 1-4: threshold, algebraic fit, rings, geometric fit -----------------------------------------------
def ring_pixels(image, mask=None, *, percentile: float = 99.0, threshold: float | None = None) -> np.ndarray:
    """Bool array (image shape): good pixels at or above ``threshold`` (default: the ``percentile`` of the
    finite good values), as smalldata_tools' threshold selection of the points to fit."""
    image = np.asarray(image, np.float64)
    good = np.isfinite(image)
    if mask is not None:
        good &= np.asarray(mask, bool)
    if threshold is None:
        if not good.any():
            raise ValueError("no good pixel")
        threshold = float(np.percentile(image[good], percentile))
    return good & (image >= threshold)


def kasa_circle(x, y, weights=None) -> tuple[float, float, float]:
    """Algebraic (Kasa) least-squares circle ``(cx, cy, r)`` through points x, y: the linear least squares
    of ``x^2 + y^2 + a x + b y + c = 0``."""
    x = np.asarray(x, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    if x.size < 3:
        raise ValueError("a circle needs at least 3 points")
    x0, y0 = x.mean(), y.mean()  # centred for conditioning
    u, v = x - x0, y - y0
    a = np.column_stack([u, v, np.ones_like(u)])
    b = -(u**2 + v**2)
    if weights is not None:
        w = np.sqrt(np.asarray(weights, np.float64).ravel())
        a, b = a * w[:, None], b * w
    (p, q, c), *_ = np.linalg.lstsq(a, b, rcond=None)
    cx, cy = -p / 2, -q / 2
    return float(cx + x0), float(cy + y0), float(np.sqrt(max(cx**2 + cy**2 - c, 0.0)))


def group_rings(r, *, bin_um: float, min_gap_um: float, min_points: int = 30, max_rings: int = 6) -> np.ndarray:
    """Ring label (0, 1, ... by increasing radius; -1 = none) of each radius ``r``: runs of occupied radius
    bins (``bin_um`` wide) separated by at least ``min_gap_um`` of empty ones; runs of fewer than
    ``min_points`` radii are dropped, and of the rest the ``max_rings`` most populated are kept."""
    r = np.asarray(r, np.float64)
    labels = np.full(r.shape, -1, np.int64)
    if r.size == 0:
        return labels
    lo = r.min()
    idx = np.floor((r - lo) / bin_um).astype(np.int64)
    counts = np.bincount(idx)
    occupied = np.flatnonzero(counts > 0)
    gap_bins = max(int(np.ceil(min_gap_um / bin_um)), 1)
    breaks = np.flatnonzero(np.diff(occupied) > gap_bins)
    starts = np.r_[occupied[0], occupied[breaks + 1]]
    stops = np.r_[occupied[breaks], occupied[-1]] + 1
    runs = [(counts[a:b].sum(), a, b) for a, b in zip(starts, stops) if counts[a:b].sum() >= min_points]
    runs = sorted(sorted(runs, reverse=True)[:max_rings], key=lambda t: t[1])
    for k, (_, a, b) in enumerate(runs):
        labels[(idx >= a) & (idx < b)] = k
    return labels


def fit_concentric(x, y, labels, guess, weights=None) -> tuple[np.ndarray, np.ndarray, float]:
    """Geometric least-squares fit of concentric circles: one centre, one radius per label (>= 0).

    Minimises ``sum w_i rho(|p_i - c| - R_label(i))`` with the robust ``soft_l1`` loss (scale: a fifth of
    the initial residual spread) so that stray pixels (hot pixels, other rings' tails) weigh little.
    Returns ``(centre (2,), radii (rings,), rms residual)``, lengths in the unit of x, y.
    """
    from scipy.optimize import least_squares

    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    labels = np.asarray(labels)
    sel = labels >= 0
    x, y, lab = x[sel], y[sel], labels[sel]
    w = np.ones(x.size) if weights is None else np.asarray(weights, np.float64)[sel]
    sw = np.sqrt(w / w.mean())
    n = int(lab.max()) + 1
    r0 = np.hypot(x - guess[0], y - guess[1])
    radii0 = np.array([r0[lab == k].mean() for k in range(n)])

    def resid(p):
        return (np.hypot(x - p[0], y - p[1]) - p[2:][lab]) * sw

    spread = np.std(resid(np.r_[guess, radii0]))
    res = least_squares(resid, np.r_[guess, radii0], loss="soft_l1", f_scale=max(spread / 5, 1e-9), x_scale="jac")
    rms = float(np.sqrt(np.mean((resid(res.x) / sw) ** 2)))
    return res.x[:2], res.x[2:], rms


def profile_peaks(
    image, x, y, center, mask=None, *, bin_um: float | None = None, prominence: float = 8.0, max_rings: int = 6
) -> np.ndarray:
    """Radii (um, increasing) of the ``max_rings`` most prominent peaks of the radial profile about
    ``center`` (bins of one pixel) whose prominence is at least ``prominence`` times the profile's noise
    (robust spread of its bin-to-bin differences)."""
    from scipy.signal import find_peaks

    pix = pixel_size_um(x, y)
    bin_um = pix if bin_um is None else bin_um
    v, xs, ys = _flat(image, x, y, mask)
    r = np.hypot(xs - center[0], ys - center[1])
    idx = ((r - r.min()) / bin_um).astype(np.int64)
    cnt = np.bincount(idx)
    tot = np.bincount(idx, weights=v)
    tot2 = np.bincount(idx, weights=v * v)
    ok = cnt >= 10
    if ok.sum() < 5:
        return np.empty(0)
    mean = tot[ok] / cnt[ok]
    err = np.sqrt(np.maximum(tot2[ok] / cnt[ok] - mean**2, 0) / cnt[ok])  # standard error per bin
    prof = np.interp(np.arange(cnt.size), np.flatnonzero(ok), mean)
    err = np.interp(np.arange(cnt.size), np.flatnonzero(ok), err)
    peaks, props = find_peaks(prof, prominence=0, distance=3)
    good = (props["prominences"] >= prominence * np.maximum(err[peaks], 1e-12)) & (peaks >= 3) & (peaks < cnt.size - 3)
    peaks, prom = peaks[good], props["prominences"][good]
    keep = peaks[np.argsort(prom)[::-1][:max_rings]]
    return np.sort(r.min() + (keep + 0.5) * bin_um)


# ---- 5: sub-pixel ring maxima ----------------------------------------------------------------------------
def ring_maxima(
    image,
    x,
    y,
    center,
    radius: float,
    half_width: float,
    *,
    mask=None,
    sectors: int = 36,
    bin_um: float | None = None,
    min_pixels: int = 8,
):
    """Points ``(px, py, weight)`` on the maximum of one ring, one per azimuthal sector.

    In each of ``sectors`` equal sectors around ``center``, the radial profile of the pixels within
    ``half_width`` of ``radius`` (bins ``bin_um``, default a third of the pixel) less the straight line
    through its two ends' means; its centroid over the positive part is the ring's radius in that sector,
    placed at the sector's mean azimuth. ``weight`` = the sector's pixel count; sectors with fewer than
    ``min_pixels`` pixels (gaps, masked areas) are left out.
    """
    v, xs, ys = _flat(image, x, y, mask)
    dx, dy = xs - center[0], ys - center[1]
    r = np.hypot(dx, dy)
    near = np.abs(r - radius) <= half_width
    v, r, phi = v[near], r[near], np.arctan2(dy[near], dx[near])
    if bin_um is None:
        bin_um = pixel_size_um(x, y) / 3
    nb = max(int(np.ceil(2 * half_width / bin_um)), 5)
    edges_lo = radius - half_width
    rb = np.clip(((r - edges_lo) / (2 * half_width) * nb).astype(np.int64), 0, nb - 1)
    sb = np.clip(((phi + np.pi) / (2 * np.pi) * sectors).astype(np.int64), 0, sectors - 1)
    centres = edges_lo + (np.arange(nb) + 0.5) * (2 * half_width / nb)
    out = []
    for s in range(sectors):
        in_s = sb == s
        npix = int(in_s.sum())
        if npix < min_pixels:
            continue
        cnt = np.bincount(rb[in_s], minlength=nb)
        tot = np.bincount(rb[in_s], weights=v[in_s], minlength=nb)
        ok = cnt > 0
        if ok.sum() < 5:
            continue
        prof, rc = tot[ok] / cnt[ok], centres[ok]
        k = max(len(prof) // 5, 1)
        x1, x2 = rc[:k].mean(), rc[-k:].mean()
        y1, y2 = prof[:k].mean(), prof[-k:].mean()
        above = prof - (y1 + (y2 - y1) * (rc - x1) / (x2 - x1))
        above = np.clip(above, 0, None)
        if above.sum() <= 0:
            continue
        rs = float((above * rc).sum() / above.sum())
        ph = float(np.angle(np.exp(1j * phi[in_s]).mean()))
        out.append((center[0] + rs * np.cos(ph), center[1] + rs * np.sin(ph), npix))
    if not out:
        return np.empty(0), np.empty(0), np.empty(0)
    px, py, w = (np.array(a, np.float64) for a in zip(*out))
    return px, py, w


@dataclass
class CircleFit:
    """Result of :func:`fit_center`: ``center_um`` (x, y), ring radii (um, increasing), the rms distance of
    the ring-maximum points from their circles (um), the points themselves and their ring labels."""

    center_um: tuple[float, float]
    radii_um: np.ndarray
    rms_um: float
    points_x: np.ndarray = field(repr=False)
    points_y: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)


def fit_center(
    image,
    x,
    y,
    mask=None,
    *,
    percentile: float = 99.0,
    threshold: float | None = None,
    guess_um=None,
    min_gap_um: float | None = None,
    min_points: int = 30,
    max_rings: int = 6,
    sectors: int = 36,
    iterations: int = 3,
    profile_rings: bool = True,
) -> CircleFit:
    """Beam centre from the rings of ``image`` (steps 1-5 of the module docstring).

    Args:
        image: (panels, rows, cols) (or (rows, cols)) average image; NaN = bad.
        x, y: pixel centres, same shape, um.
        mask: optional bool, True = good.
        percentile, threshold: the ring pixels are those >= ``threshold`` (default: that percentile).
        guess_um: optional (x, y) start; default the Kasa circle of the selected pixels.
        min_gap_um: empty radial gap separating two rings (default 3 pixels).
        min_points, max_rings: ring grouping (:func:`group_rings`).
        sectors: azimuthal sectors for the ring maxima.
        iterations: grouping + fit rounds on the thresholded pixels before the ring maxima.
        profile_rings: also fit the rings that stand out in the radial profile about the thresholded
            rings' centre (:func:`profile_peaks`), the fainter ones the threshold misses.
    """
    pix = pixel_size_um(x, y)
    gap = 3 * pix if min_gap_um is None else min_gap_um
    sel = ring_pixels(image, mask, percentile=percentile, threshold=threshold)
    xs, ys = np.asarray(x, np.float64)[sel], np.asarray(y, np.float64)[sel]
    if xs.size < 3:
        raise ValueError("fewer than 3 pixels above the threshold")
    c = np.asarray(kasa_circle(xs, ys)[:2] if guess_um is None else guess_um, np.float64)
    radii = None
    for _ in range(iterations):
        lab = group_rings(
            np.hypot(xs - c[0], ys - c[1]), bin_um=pix, min_gap_um=gap, min_points=min_points, max_rings=max_rings
        )
        if not (lab >= 0).any():
            raise ValueError("no ring found among the pixels above the threshold")
        c_new, radii, rms = fit_concentric(xs, ys, lab, c)
        done = np.hypot(*(c_new - c)) < 0.01 * pix
        c = c_new
        if done:
            break
    if profile_rings:  # the fainter rings: peaks of the radial profile about this centre
        more = profile_peaks(image, x, y, c, mask, max_rings=max_rings)
        merged = list(radii)  # type: ignore[arg-type]
        for rk in more:
            if np.min(np.abs(np.asarray(merged) - rk)) > gap:
                merged.append(rk)
        strongest = sorted(merged, key=lambda r: 0 if np.min(np.abs(radii - r)) < gap else 1)[:max_rings]
        radii = np.sort(np.asarray(strongest, np.float64))
    # sub-pixel: ring maxima per sector, each ring's window from its thresholded width
    for _ in range(2):
        pts = []
        for k, rk in enumerate(radii):  # type: ignore[arg-type]
            half = max(4 * pix, 2.5 * rms)
            half = min(half, 0.45 * np.min(np.abs(np.delete(radii, k) - rk))) if len(radii) > 1 else half  # type: ignore[arg-type]
            px, py, w = ring_maxima(image, x, y, c, rk, half, mask=mask, sectors=sectors)
            pts.append((px, py, w, np.full(px.size, k)))
        px, py, w, lab = (np.concatenate(a) for a in zip(*pts))
        if px.size < 3:
            raise ValueError("too few ring maxima to fit")
        c, radii, rms = fit_concentric(px, py, lab, c, weights=w)
    return CircleFit((float(c[0]), float(c[1])), radii, rms, px, py, lab)  # type: ignore[arg-type]


# ---- 6: sharpness of the azimuthal average ---------------------------------------------------------------
def profile_sharpness(v, xs, ys, center, r_lo: float, r_hi: float, bin_um: float) -> float:
    """Between-bin variance of the radial profile about ``center`` over [r_lo, r_hi): each pixel shared
    between its two nearest bins (linear interpolation), so it is a continuous function of the centre.
    Larger = sharper rings."""
    r = np.hypot(xs - center[0], ys - center[1])
    t = (r - r_lo) / bin_um - 0.5
    i0 = np.floor(t).astype(np.int64)
    f = t - i0
    nb = int(np.ceil((r_hi - r_lo) / bin_um))
    w_tot = np.zeros(nb + 2)
    s_tot = np.zeros(nb + 2)
    for idx, wt in ((i0 + 1, 1 - f), (i0 + 2, f)):  # shifted by 1: bin -1 and nb land in guard bins
        ok = (idx >= 0) & (idx < nb + 2)
        w_tot += np.bincount(idx[ok], weights=wt[ok], minlength=nb + 2)
        s_tot += np.bincount(idx[ok], weights=(wt * v)[ok], minlength=nb + 2)
    w_tot, s_tot = w_tot[1:-1], s_tot[1:-1]
    ok = w_tot > 0
    mean = s_tot[ok].sum() / w_tot[ok].sum()
    prof = s_tot[ok] / w_tot[ok]
    return float((w_tot[ok] * (prof - mean) ** 2).sum() / w_tot[ok].sum())


def refine_center_sharpness(
    image, x, y, center_um, mask=None, *, r_range_um=None, bin_um: float | None = None, step_um: float | None = None
) -> tuple[float, float]:
    """The centre (x, y, um) near ``center_um`` that maximises :func:`profile_sharpness` (Nelder-Mead).

    ``r_range_um``: radii used (default: all the good pixels' range about the start, less 2 pixels
    each side); ``bin_um``: profile bin (default half a pixel); ``step_um``: initial simplex step (default 1
    pixel).
    """
    from scipy.optimize import minimize

    pix = pixel_size_um(x, y)
    bin_um = pix / 2 if bin_um is None else bin_um
    v, xs, ys = _flat(image, x, y, mask)
    c0 = np.asarray(center_um, np.float64)
    if r_range_um is None:
        r = np.hypot(xs - c0[0], ys - c0[1])
        r_range_um = (r.min() + 2 * pix, r.max() - 2 * pix)
    lo, hi = r_range_um
    r = np.hypot(xs - c0[0], ys - c0[1])
    keep = (r >= lo - 3 * pix) & (r < hi + 3 * pix)
    v, xs, ys = v[keep], xs[keep], ys[keep]
    step = pix if step_um is None else step_um

    def cost(p):
        return -profile_sharpness(v, xs, ys, p, lo, hi, bin_um)

    simplex = np.array([c0, c0 + [step, 0], c0 + [0, step]])
    res = minimize(
        cost,
        c0,
        method="Nelder-Mead",
        options={"initial_simplex": simplex, "xatol": 0.005 * pix, "fatol": 0, "maxiter": 400},
    )
    return float(res.x[0]), float(res.x[1])


# ---- 7: ring radii and distance --------------------------------------------------------------------------
def ring_radii(
    image,
    x,
    y,
    center_um,
    approx_radii_um,
    mask=None,
    *,
    half_width_um: float | None = None,
    bin_um: float | None = None,
) -> np.ndarray:
    """Radius (um) of each ring: a Gaussian + straight-line fit to the radial profile about ``center_um``
    within ``half_width_um`` (default 5 pixels, at most 0.45 of the distance to the next ring) of the
    approximate radius."""
    from scipy.optimize import curve_fit

    pix = pixel_size_um(x, y)
    bin_um = pix / 4 if bin_um is None else bin_um
    v, xs, ys = _flat(image, x, y, mask)
    r = np.hypot(xs - center_um[0], ys - center_um[1])
    approx = np.asarray(approx_radii_um, np.float64)
    out = []
    for k, rk in enumerate(approx):
        half = 5 * pix if half_width_um is None else half_width_um
        if approx.size > 1:
            half = min(half, 0.45 * np.min(np.abs(np.delete(approx, k) - rk)))
        near = np.abs(r - rk) <= half
        nb = max(int(2 * half / bin_um), 5)
        idx = np.clip(((r[near] - rk + half) / (2 * half) * nb).astype(np.int64), 0, nb - 1)
        cnt = np.bincount(idx, minlength=nb)
        tot = np.bincount(idx, weights=v[near], minlength=nb)
        ok = cnt > 0
        rc = (rk - half + (np.arange(nb) + 0.5) * 2 * half / nb)[ok]
        prof = tot[ok] / cnt[ok]

        def model(t, a, mu, sig, b0, b1, rk=rk):
            return a * np.exp(-0.5 * ((t - mu) / sig) ** 2) + b0 + b1 * (t - rk)

        p0 = [prof.max() - np.median(prof), rc[np.argmax(prof)], pix, np.median(prof), 0.0]
        try:
            p, _ = curve_fit(model, rc, prof, p0=p0, sigma=1 / np.sqrt(cnt[ok]), maxfev=5000)
            mu = p[1] if abs(p[1] - rk) < half else rc[np.argmax(prof)]
        except RuntimeError:
            mu = rc[np.argmax(prof)]
        out.append(float(mu))
    return np.array(out)


def fit_distance(radii_um, energy_kev: float, *, ring_q=None, d_spacing=None, tol: float = 0.02):
    """Sample-detector distance (mm) from ring radii (flat detector normal to the beam: ``R = D tan 2th``).

    ``ring_q``: q (Angstrom^-1) of the rings: as many as ``radii_um``, in their order; or any other number,
    then matched as a calibrant's lines. ``d_spacing``: a calibrant's d-spacings (Angstrom), any order,
    possibly more lines than rings. Matching: every assignment of the smallest ring to a line fixes a
    distance, which assigns every other ring to its nearest line; the assignment with the smallest scatter
    wins (distinct lines, each ring within ``tol`` relative 2theta).
    Returns ``(distance_mm, q of each ring)``; ValueError when no assignment fits.
    """
    radii = np.asarray(radii_um, np.float64)
    if (ring_q is None) == (d_spacing is None):
        raise ValueError("give exactly one of ring_q and d_spacing")
    if ring_q is not None:
        q = np.atleast_1d(np.asarray(ring_q, np.float64))
        if q.shape == radii.shape:
            t = np.tan(two_theta(q, energy_kev))
            return float((radii * t).sum() / (t * t).sum() / 1000.0), q
        qs = q
    else:
        qs = 2 * np.pi / np.atleast_1d(np.asarray(d_spacing, np.float64))
    qs = qs[qs * HC_KEV_A / energy_kev / (4 * np.pi) < 1]
    tth_lines = two_theta(qs, energy_kev)
    order = np.argsort(radii)
    best = None
    for j in range(qs.size):
        dist = radii[order[0]] / np.tan(tth_lines[j])
        tth = np.arctan(radii / dist)
        nearest = np.argmin(np.abs(tth[:, None] - tth_lines[None, :]), axis=1)
        rel = np.abs(tth - tth_lines[nearest]) / tth
        if np.unique(nearest).size < radii.size or rel.max() > tol:
            continue
        t = np.tan(tth_lines[nearest])
        dist = (radii * t).sum() / (t * t).sum()
        score = np.sqrt(np.mean((radii / t / dist - 1) ** 2))
        if best is None or score < best[0]:
            best = (score, dist, qs[nearest])
    if best is None:
        raise ValueError("no assignment of the rings to the calibrant's lines fits")
    return float(best[1] / 1000.0), best[2]


# ---- all together -----------------------------------------------------------------------------------------
@dataclass
class BeamGeometry:
    """Beam centre (um, in the frame of x, y), distance (mm, None without ring q / calibrant), energy (keV),
    ring radii (um) and their q (Angstrom^-1, when known)."""

    center_um: tuple[float, float]
    distance_mm: float | None = None
    energy_kev: float | None = None
    radii_um: np.ndarray | None = None
    ring_q: np.ndarray | None = None
    rms_um: float | None = None

    def azav_params(self) -> dict:
        """``azav`` parameters: ``center_um``, ``distance_mm`` and (when known) ``energy_kev``."""
        if self.distance_mm is None:
            raise ValueError("no distance: fit with ring_q or d_spacing and energy_kev")
        p = {"center_um": [float(self.center_um[0]), float(self.center_um[1])], "distance_mm": float(self.distance_mm)}
        if self.energy_kev is not None:
            p["energy_kev"] = float(self.energy_kev)
        return p

    def write_poni(self, path) -> Path:
        if self.distance_mm is None:
            raise ValueError("no distance: fit with ring_q or d_spacing and energy_kev")
        return write_poni(path, self.center_um, self.distance_mm, self.energy_kev)


def find_geometry(
    image,
    x,
    y,
    mask=None,
    *,
    energy_kev: float | None = None,
    ring_q=None,
    d_spacing=None,
    refine: bool = False,
    **fit_kw,
) -> BeamGeometry:
    """:func:`fit_center`, then (``refine``) :func:`refine_center_sharpness` over the rings found, then the
    rings' radii (:func:`ring_radii`) and, with ``energy_kev`` and ``ring_q`` or ``d_spacing``, the distance
    (:func:`fit_distance`). ``fit_kw`` go to :func:`fit_center`."""
    fit = fit_center(image, x, y, mask, **fit_kw)
    c = fit.center_um
    if refine:
        pix = pixel_size_um(x, y)
        half = 6 * pix
        c = refine_center_sharpness(
            image, x, y, c, mask, r_range_um=(fit.radii_um.min() - half, fit.radii_um.max() + half)
        )
    radii = ring_radii(image, x, y, c, fit.radii_um, mask)
    geo = BeamGeometry((float(c[0]), float(c[1])), energy_kev=energy_kev, radii_um=radii, rms_um=fit.rms_um)
    if ring_q is not None or d_spacing is not None:
        if energy_kev is None:
            raise ValueError("the distance needs energy_kev")
        geo.distance_mm, geo.ring_q = fit_distance(radii, energy_kev, ring_q=ring_q, d_spacing=d_spacing)
    return geo


def write_poni(path, center_um, distance_mm: float, energy_kev: float | None = None) -> Path:
    """A pyFAI PONI file (format version 2) of the flat geometry ``center_um`` (x, y um), ``distance_mm``,
    no rotations, for ``azav``'s ``poni``: a detector of 1 um pixels, so that ``Poni1 = cy`` and
    ``Poni2 = cx`` (metres; pyFAI's dim1 = rows = y, dim2 = x), as ``gpusmall.funcs.azav.geometry_poni``
    evaluates it. ``energy_kev`` sets the wavelength."""
    lines = [
        "# Nota: C-Order, 1 refers to the Y axis, 2 to the X axis",
        "# Written by gpusmall.analysis.centre (beam centre fit); pixel positions in um as /UserDataCfg/<det>/x, y",
        "poni_version: 2",
        "Detector: Detector",
        'Detector_config: {"pixel1": 1e-06, "pixel2": 1e-06, "max_shape": null}',
        f"Distance: {float(distance_mm) * 1e-3!r}",
        f"Poni1: {float(center_um[1]) * 1e-6!r}",
        f"Poni2: {float(center_um[0]) * 1e-6!r}",
        "Rot1: 0.0",
        "Rot2: 0.0",
        "Rot3: 0.0",
    ]
    if energy_kev is not None:
        lines.append(f"Wavelength: {HC_KEV_A / float(energy_kev) * 1e-10!r}")
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path
