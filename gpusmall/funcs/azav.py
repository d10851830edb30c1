"""azav: azimuthal integration of every event of a batch at once (SPEC section 6).

Geometry -> bin map (once, in :meth:`Azav.prepare`, on the device) -> engine (per batch):

* geometry: either ``center_um: [cx, cy]`` + ``distance_mm`` (pixel vector from the sample
  ``(x - cx, y - cy, distance + mean(z) - z)``: x, y, z are in psana's frame, whose z points against the
  beam (psana ``GeometryAccess``: "Z opposite to the beam"), so a pixel with a larger z is closer to the
  sample, as smalldata_tools also has it; ``mean(z)`` over the whole detector also under a ``roi``
  (``FrameContext.z_mean``), so a pixel's bin does not depend on the ROI it sits in; 2theta and
  phi = atan2(y - cy, x - cx) from it; optional tilts ``tx``, ``ty`` (degrees, see
  :func:`geometry_center`)), or
  ``poni: FILE`` read with pyFAI; then pyFAI computes 2theta, chi and the incidence angle of every pixel
  (rotations included) at the pixel centres ``ctx.x``, ``ctx.y`` (pyFAI's dim1 = rows = y, dim2 = cols = x;
  a pyFAI detector with 1 um pixels is evaluated at ``d1 = y/1um - 0.5``, ``d2 = x/1um - 0.5``, so a
  single panel built from its pixel size lands exactly on pyFAI's pixel centres).
* ``unit: r_mm`` is the radius perpendicular to the beam in the lab frame, ``hypot(vx, vy)`` of the pixel
  vector (pyFAI's ``r_mm``): ``hypot(x - cx, y - cy)`` for centre/distance, pyFAI's ``rFunction`` for a PONI.
* correction per pixel: ``P = 0.5 * (1 + cos^2(2th) - f cos(2 phi) sin^2(2th))`` (``polarization: f``,
  ``null`` = 1) and ``Omega = cos^3(alpha)`` (``solid_angle``), alpha the incidence angle on the detector;
  for a flat detector normal to the beam alpha = 2theta, as the SPEC writes it. ``c = P * Omega``.
* engine ``csr`` (default): a sparse matrix ``M`` (bins, pixels) of ones, built once; per batch one
  sparse x dense product ``num = M @ s^T`` for all events (bad pixels are 0 in ``s``). The denominators
  ``den = Mc @ good^T`` and ``count = M @ good^T`` are computed as the all-good totals (once) minus a
  ``bincount`` over the batch's bad (event, pixel) pairs, which are few (and mostly the static mask,
  whose pixels are in no bin): on 2 CPU cores this is ~4x cheaper than a second sparse product.
  On NumPy with numba the numerators are one pass over each event's pixels instead (float64 sums,
  :mod:`gpusmall.funcs.cpu_azav`); the denominators stay as above.
  ``I = num / den`` (NaN where a bin holds no good pixel).
  Engine ``histogram``: one atomic add per (event, pixel) (``kernels/azav.cu`` on CuPy, ``bincount`` on
  NumPy); the same numbers, kept as an alternative (slower than ``csr`` on the CPU).

Agreement with pyFAI: ``integrate1d(..., method=("no", "histogram", "cython"), correctSolidAngle=True,
polarization_factor=f)`` computes ``sum(s) / sum(P * Omega_pyFAI)`` with ``Omega_pyFAI =
cos^3(alpha)`` (pyFAI's solid angle is *relative*: 1 at the PONI, i.e. ``dist^3 / r^3``), which is exactly
this ``c``. So the two agree bin by bin without any renormalisation, as long as the radial range and the
bin count are the same (``range`` here, ``radial_range`` there) and the range holds every pixel: pyFAI's
histogram engine folds pixels below ``radial_range[0]`` into its first bin, azav leaves them out.
Axis note: pyFAI's dim1 is the slow axis (rows, y, ``poni1``) and dim2 the fast one (columns, x, ``poni2``);
azav follows pyFAI here (SPEC section 6 words it the other way round), verified against ``integrate1d``
with rotations in ``tests/test_azav.py``.

From smalldata_tools' azimuthalBinning (same geometry, different conventions; tested in
``tests/test_azav_geometry.py``):

* ``Pplane`` -> ``polarization: 1 - 2 * Pplane`` (its phi is measured from +y towards +x, ours from +x
  towards +y; its default ``Pplane: 0`` is ``polarization: 1``);
* ``phiBins: N`` -> ``phi_bins: N``, but our N bins cover the whole circle (-180, 180] degrees, 0 along +x;
  its N bins span the phi range the pixels cover, 0 along +y, 0..360 degrees (explicit phi edges: not
  supported);
* ``qbin`` -> ``bin_width`` (with ``unit: q_A^-1``); its edges start one bin below the smallest q,
  ours at the smallest q (or ``range``);
* ``tx``, ``ty`` -> ``tx``, ``ty`` (degrees, the same beam direction); here the beam crosses the detector
  plane at ``center_um`` for any tilt; smalldata_tools places the sample so that it does in x but not in
  y when ``tx`` is not 0 (its y offset has the opposite sign of its beam direction);
* ``dis_to_sam`` (mm) and ``center`` (um) -> ``distance_mm``, ``center_um``; its per-pixel distance
  ``d + mean(z) - z`` is ours;
* normalisation: it averages ``s / c`` over a bin's pixels, we divide sums, ``sum(s) / sum(c)``
  (pyFAI's); the two differ where ``c`` varies inside a bin (to first order not at all for narrow bins).

Outputs: ``azav`` (events, phi_bins, bins) float32, ``count`` (events, phi_bins, bins) int32 (number of good
pixels per bin); static: ``q`` (radial bin centres in ``unit``) and ``phi`` (azimuthal bin centres, degrees).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from ..errors import InputError
from ..kernel_specs import KernelSpec, blocks_1d
from . import cpu_azav
from .base import FrameContext, Frames, FunctionParams, ReductionFunction
from .droplet import bincount

HC_KEV_A = 12.398419843320026  # h*c in keV*Angstrom
CPU_CHUNK = 16  # events per sparse product on the NumPy backend
MAX_BINS = 1 << 24  # radial x phi bins of one azav (a 4M detector has 2**22 pixels)


class AzavParams(FunctionParams):
    center_um: list[float] | None = None
    distance_mm: float | None = Field(None, gt=0)
    poni: str | None = None
    energy_kev: float | None = Field(None, gt=0)
    unit: Literal["q_A^-1", "q_nm^-1", "2th_deg", "r_mm"] = "q_A^-1"
    bins: int | None = Field(None, ge=1, le=MAX_BINS)
    range: list[float] | None = None
    bin_width: float | None = Field(None, gt=0)
    phi_bins: int = Field(1, ge=1, le=1 << 16)
    polarization: float | None = Field(0.99, ge=-1.0, le=1.0)  # factor f of SPEC 6; null: no correction
    solid_angle: bool = True
    thres_adu: float | None = None
    thres_adu_high: float | None = None
    engine: Literal["csr", "histogram"] = "csr"
    tx: float = Field(0.0, gt=-90, lt=90)  # degrees: detector tilts against the beam (smalldata_tools' tx, ty)
    ty: float = Field(0.0, gt=-90, lt=90)

    @model_validator(mode="after")
    def _check(self):
        if self.poni is None:
            if self.center_um is None or self.distance_mm is None:
                raise ValueError("azav needs center_um and distance_mm, or poni")
            if len(self.center_um) != 2:
                raise ValueError("center_um must be [cx, cy]")
        elif self.center_um is not None or self.distance_mm is not None:
            raise ValueError("give either poni or center_um/distance_mm, not both")
        elif self.tx or self.ty:
            raise ValueError("tx, ty tilt the center_um/distance_mm geometry; a PONI file has its own rotations")
        if (self.bins is None) == (self.bin_width is None):
            raise ValueError("give exactly one of bins and bin_width")
        if self.bins is not None and self.bins * self.phi_bins > MAX_BINS:
            raise ValueError(f"bins x phi_bins = {self.bins * self.phi_bins} is more than {MAX_BINS}")
        if self.range is not None and (len(self.range) != 2 or self.range[1] <= self.range[0]):
            raise ValueError("range must be [low, high] with low < high")
        if self.unit in ("q_A^-1", "q_nm^-1") and self.poni is None and self.energy_kev is None:
            raise ValueError(f"unit {self.unit} needs energy_kev")
        return self


# ---- geometry (host, float64, once) ---------------------------------------------------------------
def beam_direction(tx_deg: float = 0.0, ty_deg: float = 0.0) -> np.ndarray:
    """(3,) unit vector of the incident beam in the detector frame (x, y as the pixel coordinates, z
    downstream) for tilts ``tx``, ``ty`` (degrees) of the detector normal against the beam, in
    smalldata_tools' convention: ``(-sin ty cos tx, -sin tx, cos ty cos tx)``."""
    tx, ty = np.radians(tx_deg), np.radians(ty_deg)
    return np.array([-np.sin(ty) * np.cos(tx), -np.sin(tx), np.cos(ty) * np.cos(tx)])


def geometry_center(x, y, z, center_um, distance_mm, z_mean=None, tx=0.0, ty=0.0):
    """(2theta, phi, cos_incidence, r_um) per pixel (radians, um) for the centre/distance geometry.

    Pixel positions x, y, z in um in psana's frame (z points against the beam, towards the sample): a
    pixel lies ``z - z_mean`` closer to the sample than the detector's mean plane, so the pixel vector
    from the sample is ``(x - cx, y - cy, distance + z_mean - z)`` for a beam along the detector normal.
    With tilts ``tx``, ``ty`` (degrees, :func:`beam_direction`) the beam crosses the mean plane at the
    centre and the sample lies ``distance_mm`` before that plane. 2theta is the angle between the pixel
    vector and the beam, phi the azimuth around the beam (0 along +x, towards +y; (-pi, pi]), the
    incidence angle the one between the pixel vector and the detector normal (z), and ``r_um`` the pixel's
    distance from the beam axis (``r_mm``). ``z_mean``: the whole detector's mean z (um) when x, y, z are
    a part of it (None: ``z.mean()``).
    """
    x, y, z = (np.asarray(a, np.float64) for a in (x, y, z))
    d = beam_direction(tx, ty)
    depth = distance_mm * 1000.0
    sample = np.array([center_um[0], center_um[1], 0.0]) - depth / d[2] * d
    v = np.stack([x - sample[0], y - sample[1], (z.mean() if z_mean is None else z_mean) - z - sample[2]])
    length = np.sqrt((v**2).sum(axis=0))
    along = np.tensordot(d, v, axes=1)
    r_um = np.sqrt(((v - np.multiply.outer(d, along)) ** 2).sum(axis=0))  # distance from the beam axis
    tth = np.arctan2(r_um, along)  # better than arccos near the beam
    e1 = np.array([1.0, 0.0, 0.0]) - d[0] * d  # x, made perpendicular to the beam
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(d, e1)
    phi = np.arctan2(np.tensordot(e2, v, axes=1), np.tensordot(e1, v, axes=1))
    return tth, phi, v[2] / length, r_um


def load_poni(path):
    """The pyFAI geometry (AzimuthalIntegrator) of a PONI file; InputError when unreadable."""
    import pyFAI

    try:
        ai = pyFAI.load(path)
    except Exception as exc:
        raise InputError(f"azav: cannot read PONI file {path!r}: {exc}") from None
    values = {
        "Distance": ai.dist,
        "Poni1": ai.poni1,
        "Poni2": ai.poni2,
        "Rot1": ai.rot1,
        "Rot2": ai.rot2,
        "Rot3": ai.rot3,
    }
    if ai.wavelength is not None:
        values["Wavelength"] = ai.wavelength
    for key, v in values.items():
        if v is None or not np.isfinite(v):
            raise InputError(f"azav: PONI file {path!r}: {key} is {v}, not a finite number")
    if not ai.dist > 0 or (ai.wavelength is not None and not ai.wavelength > 0):
        key = "Distance" if not ai.dist > 0 else "Wavelength"
        raise InputError(f"azav: PONI file {path!r}: {key} must be positive, not {values[key]}")
    return ai


def geometry_poni(x, y, ai):
    """(2theta, chi, cos_incidence) per pixel from pyFAI at pixel centres x, y (um)."""
    from pyFAI.detectors import Detector
    from pyFAI.geometry import Geometry

    geo = Geometry(
        dist=ai.dist,
        poni1=ai.poni1,
        poni2=ai.poni2,
        rot1=ai.rot1,
        rot2=ai.rot2,
        rot3=ai.rot3,
        detector=Detector(pixel1=1e-6, pixel2=1e-6),
        wavelength=ai.wavelength,
    )
    d1 = np.asarray(y, np.float64).ravel() - 0.5
    d2 = np.asarray(x, np.float64).ravel() - 0.5
    shape = np.shape(x)
    tth = np.asarray(geo.tth(d1, d2, path="numpy")).reshape(shape)
    chi = np.asarray(geo.chi(d1, d2, path="numpy")).reshape(shape)
    cosi = np.asarray(geo.cos_incidence(d1, d2, path="numpy")).reshape(shape)
    return tth, chi, cosi


def radius_poni(x, y, ai):
    """r_mm per pixel from pyFAI at pixel centres x, y (um): pyFAI's ``r_mm``, the lab-frame
    ``sqrt(x^2 + y^2)`` of the pixel (distance to the incident beam), rotations included."""
    from pyFAI.detectors import Detector
    from pyFAI.geometry import Geometry

    geo = Geometry(
        dist=ai.dist,
        poni1=ai.poni1,
        poni2=ai.poni2,
        rot1=ai.rot1,
        rot2=ai.rot2,
        rot3=ai.rot3,
        detector=Detector(pixel1=1e-6, pixel2=1e-6),
        wavelength=ai.wavelength,
    )
    d1 = np.asarray(y, np.float64).ravel() - 0.5
    d2 = np.asarray(x, np.float64).ravel() - 0.5
    return np.asarray(geo.rFunction(d1, d2, path="numpy")).reshape(np.shape(x)) * 1000.0


def correction(tth, phi, cos_inc, polarization, solid_angle):
    """c = P * Omega per pixel (SPEC formulas), float64."""
    c = np.ones_like(tth)
    if polarization is not None:
        c = c * 0.5 * (1 + np.cos(tth) ** 2 - polarization * np.cos(2 * phi) * np.sin(tth) ** 2)
    if solid_angle:
        c = c * cos_inc**3
    return c


def radial(tth, unit, wavelength_a, r_mm=None):
    """Radial coordinate of each pixel in ``unit``; ``r_mm`` (the transverse radius per pixel, from
    :func:`geometry_center` or :func:`radius_poni`) is what ``unit: r_mm`` returns."""
    if unit == "2th_deg":
        return np.degrees(tth)
    if unit == "r_mm":
        if r_mm is None:
            raise ValueError("unit r_mm needs the per-pixel radius r_mm")
        return np.asarray(r_mm, np.float64)
    q = 4 * np.pi / wavelength_a * np.sin(tth / 2)
    return q if unit == "q_A^-1" else 10 * q


# ---- engines ----------------------------------------------------------------------------------------
AZAV_HISTOGRAM = KernelSpec(
    "azav.cu",
    "azav_histogram",
    lambda a: (blocks_1d(int(a["events"]) * int(a["pixels"]), 256), (256,), 0),
    "gpusmall.funcs.azav:histogram_numpy",
    sizes=lambda a: dict(
        data=int(a["events"]) * int(a["pixels"]),
        good=int(a["events"]) * int(a["pixels"]),
        bin=int(a["pixels"]),
        c=int(a["pixels"]),
        num=int(a["events"]) * int(a["nbins"]),
        den=int(a["events"]) * int(a["nbins"]),
        cnt=int(a["events"]) * int(a["nbins"]),
    ),
)


def histogram_numpy(data, good, bin_index, c, nbins):
    """NumPy twin of ``azav_histogram``: (num, den, count) each (events, nbins), float64/float64/int64.

    ``bin_index`` (pixels,) int, -1 = outside; ``data``/``good`` (events, pixels); ``c`` (pixels,).
    """
    e = data.shape[0]
    sel = bin_index >= 0
    b = bin_index[sel]
    d = data[:, sel]
    g = good[:, sel]
    flat = (np.arange(e)[:, None] * nbins + b[None, :]).ravel()
    gw = g.ravel()
    num = np.bincount(flat, weights=np.where(g, d, 0).ravel().astype(np.float64), minlength=e * nbins)
    den = np.bincount(flat, weights=(gw * np.broadcast_to(c[sel], g.shape).ravel()), minlength=e * nbins)
    cnt = np.bincount(flat, weights=gw, minlength=e * nbins).astype(np.int64)
    return num.reshape(e, nbins), den.reshape(e, nbins), cnt.reshape(e, nbins)


class Azav(ReductionFunction):
    """Azimuthal integration; see the module docstring for geometry, corrections and engines."""

    type = "azav"
    Params = AzavParams
    p: AzavParams  # ReductionFunction.p, narrowed to this function's parameters

    def prepare(self, ctx: FrameContext):
        p = self.p
        if ctx.x is None or ctx.y is None:
            raise InputError(f"detector {ctx.det}: function {self.name}: azav needs pixel positions x, y")
        b = ctx.backend
        x, y = b.to_host(ctx.x), b.to_host(ctx.y)
        z = b.to_host(ctx.z) if ctx.z is not None else np.zeros_like(x)
        r_mm = None
        if p.poni is not None:
            ai = load_poni(p.poni)
            tth, phi, cosi = geometry_poni(x, y, ai)
            if p.unit == "r_mm":
                r_mm = radius_poni(x, y, ai)
            wl = ai.wavelength * 1e10 if ai.wavelength else None
            if p.energy_kev is not None:
                wl = HC_KEV_A / p.energy_kev
            if wl is None and p.unit.startswith("q"):
                raise InputError(
                    f"detector {ctx.det}: function {self.name}: no wavelength in {p.poni} and no energy_kev"
                )
        else:
            z_mean = ctx.detector_z_mean() if ctx.z is not None else None
            tth, phi, cosi, r_um = geometry_center(x, y, z, p.center_um, p.distance_mm, z_mean=z_mean, tx=p.tx, ty=p.ty)
            wl = HC_KEV_A / p.energy_kev if p.energy_kev else None
            if p.unit == "r_mm":
                r_mm = r_um / 1000.0
        rad = radial(tth, p.unit, wl, r_mm)
        mask = b.to_host(ctx.mask).astype(bool) if ctx.mask is not None else np.ones(x.shape, bool)
        if p.range is not None:
            lo, hi = p.range
        elif not mask.any():
            raise InputError(
                f"detector {ctx.det}: function {self.name}: no unmasked pixel to set the radial range; give range"
            )
        else:
            lo, hi = float(rad[mask].min()), float(rad[mask].max())
        if p.bins is not None:
            nb = p.bins
            width = (hi - lo) / nb
        else:
            width = p.bin_width  # type: ignore[assignment]
            if (hi - lo) / width * p.phi_bins > MAX_BINS:
                raise InputError(
                    f"detector {ctx.det}: function {self.name}: bin_width {width:g} makes "
                    f"{(hi - lo) / width:.3g} bins over [{lo:g}, {hi:g}] ({p.unit}); at most {MAX_BINS} "
                    f"bins x phi_bins"
                )
            nb = max(int(np.ceil((hi - lo) / width)), 1)
            hi = lo + nb * width
        rb = np.floor((rad - lo) / width).astype(np.int64)
        rb[rad == hi] = nb - 1  # the upper edge belongs to the last bin
        inside = mask & (rb >= 0) & (rb < nb) & (rad <= hi)
        nphi = p.phi_bins
        phi_deg = np.degrees(phi)
        pb = np.clip(np.floor((phi_deg + 180.0) / (360.0 / nphi)).astype(np.int64), 0, nphi - 1)
        self.nbins, self.nrad, self.nphi = nb * nphi, nb, nphi
        bin_index = np.where(inside, pb * nb + rb, -1).ravel()
        c = correction(tth, phi, cosi, p.polarization, p.solid_angle).ravel()
        self.radial_centres = lo + (np.arange(nb) + 0.5) * width
        self.phi_centres = -180.0 + (np.arange(nphi) + 0.5) * 360.0 / nphi
        self.npix = bin_index.size
        # host copies for the NumPy reference / tests
        self.bin_index_host, self.c_host = bin_index, c
        self.bin_index = b.to_device(bin_index.astype(np.int32 if p.engine == "histogram" else np.int64))
        self.c = b.to_device(c.astype(np.float32 if p.engine == "histogram" else np.float64))
        if p.engine == "csr":
            self._build_csr(ctx, bin_index, c)
            inside_ = bin_index >= 0
            self.den0 = b.to_device(np.bincount(bin_index[inside_], weights=c[inside_], minlength=self.nbins))
            self.count0 = b.to_device(np.bincount(bin_index[inside_], minlength=self.nbins).astype(np.int64))
            self.in_bin = b.to_device(inside_)  # (pixels,) bool: the pixels the totals hold
        # the numba numerators read the bin of every pixel for every event: the narrowest integer that holds
        # the bins (int16 for up to 32767: 2 bytes a pixel instead of 8)
        self.bin_index_narrow = bin_index.astype(np.int16 if self.nbins <= np.iinfo(np.int16).max else np.int32)
        return None

    def _build_csr(self, ctx, bin_index, c):
        import scipy.sparse as sp

        sel = np.flatnonzero(bin_index >= 0)
        rows = bin_index[sel]
        nb, npix = self.nbins, self.npix
        m = sp.csr_matrix((np.ones(sel.size, np.float32), (rows, sel)), shape=(nb, npix))
        m.sum_duplicates()
        if ctx.backend.is_gpu:
            import cupyx.scipy.sparse as csp  # only reached on the CuPy backend

            m = csp.csr_matrix(m)
        self.M = m

    def compute(self, frames: Frames):
        xp = self.ctx.xp
        e = frames.data.shape[0]
        data = frames.data.reshape(e, -1)
        good = frames.good.reshape(e, -1)
        if self.p.thres_adu is not None or self.p.thres_adu_high is not None:
            keep = xp.ones(data.shape, bool)
            if self.p.thres_adu is not None:
                keep &= data >= self.p.thres_adu
            if self.p.thres_adu_high is not None:
                keep &= data <= self.p.thres_adu_high
            data = xp.where(keep, data, xp.float32(0))
        if self.p.engine == "csr":
            num, den, cnt = self._csr(xp, data, good)
        else:
            num, den, cnt = self._histogram(xp, data, good)
        with np.errstate(invalid="ignore", divide="ignore"):
            azav = xp.where(cnt > 0, num / den, xp.nan).astype(xp.float32)
        shape = (e, self.nphi, self.nrad)
        return {"azav": azav.reshape(shape), "count": cnt.astype(xp.int32).reshape(shape)}, None

    def _csr(self, xp, data, good):
        # bad pixels hold 0 in Frames.data (Frames contract), so the numerator needs no mask
        if self.ctx.backend.is_gpu:
            # data.T is already Fortran-ordered, which cuSPARSE's spmm takes as is (cupyx makes any other
            # layout Fortran-ordered: a C-ordered copy here would cost two extra passes over the batch)
            num = (self.M @ data.T).T.astype(xp.float64)  # (events, bins)
        elif cpu_azav.supports(data):  # numba: one pass over the pixels in memory order, float64 sums
            num = cpu_azav.numerators(data, self.bin_index_narrow, self.nbins, getattr(self.ctx.backend, "threads", 1))
        else:  # on the CPU the transposed copy stays in cache in groups of 16 events (2.5x faster at 64)
            num = np.concatenate(
                [
                    (self.M @ np.ascontiguousarray(data[i : i + CPU_CHUNK].T)).T
                    for i in range(0, data.shape[0], CPU_CHUNK)
                ]
            ).astype(np.float64)
        e, nb = data.shape[0], self.nbins
        # denominators: the totals over the pixels in a bin (once, in prepare) minus the few (event, pixel)
        # pairs of the batch that are in a bin but bad in that event (invalid gain bits...); pixels the static
        # mask or the range leave out are in no total, so they stay out here (no atomics piling on them)
        bad = xp.flatnonzero(xp.less(good, self.in_bin[None, :]))  # in a bin and not good
        pix = bad % self.npix
        flat = (bad // self.npix) * nb + self.bin_index[pix]
        den = self.den0[None, :] - bincount(xp, flat, weights=self.c[pix], minlength=e * nb).reshape(e, nb)
        cnt = self.count0[None, :] - bincount(xp, flat, minlength=e * nb).reshape(e, nb)
        return num, den, cnt

    def _histogram(self, xp, data, good):
        if not self.ctx.backend.is_gpu:
            return histogram_numpy(data, good, self.bin_index, self.c, self.nbins)
        e, npix = data.shape
        nb = self.nbins
        num = xp.zeros((e, nb), xp.float64)
        den = xp.zeros((e, nb), xp.float64)
        cnt = xp.zeros((e, nb), xp.int32)
        AZAV_HISTOGRAM.launch(
            self.ctx.backend,
            data=xp.ascontiguousarray(data, dtype=xp.float32),
            good=xp.ascontiguousarray(good, dtype=xp.bool_),
            bin=self.bin_index,
            c=self.c,
            events=e,
            pixels=npix,
            nbins=nb,
            num=num,
            den=den,
            cnt=cnt,
        )
        return num, den, cnt.astype(xp.int64)

    def static_outputs(self):
        return {"q": self.radial_centres, "phi": self.phi_centres}
