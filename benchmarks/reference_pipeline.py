"""The straightforward per-event NumPy pipeline that whole-pipeline figures are compared with.

:class:`PerEventReference` does the work of a gpusmall detector pipeline (calibration with median common
mode, ROIs + projections, rebin, azimuthal average, droplets + photons, run sums) one event at a time,
the way a scientist would write it without gpusmall: masked-array medians as psana does them, NumPy
slicing, ``np.bincount`` and ``scipy.ndimage``. It is a timing reference of the same amount of work, not
a second implementation of the SPEC: ROI and rebin results agree with gpusmall to float32 rounding
(``tests/test_reference_pipeline.py``), the azimuthal average to ~1e-5, the droplets only roughly (grown
once with a binary dilation, no ``max_droplets`` bookkeeping of photon positions).

:func:`per_event_masked` (calibration alone) is also the reference row of ``benchmarks/bench_calib.py``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from gpusmall.calib import unit_scale
from gpusmall.detectors import get_model
from gpusmall.detectors.constants import Constants

EPIX10KA = get_model("epix10ka")


def calibrate_event(raw, c: Constants, mask, scale, high, max_correction=100.0, min_pixels=10,
                    common_mode=True, model=EPIX10KA):
    """One ePix10ka event (no config bits: auto ranges 3 and 5), psana-like, -> float32 ADU.

    Pedestal of the pixel's range, then (``common_mode``) masked-array medians per bank row segment
    (``rows``) and per half-panel column (``cols``) of the good high-gain pixels, applied where more than
    ``min_pixels`` entered and ``|median| < max_correction``; then ``* scale[g]``, bad pixels 0.

    Args:
        raw: (panels, rows, cols) uint16 raw words.
        c: constants with ``pedestal`` (gains, panels, rows, cols) ADU.
        mask: (panels, rows, cols) bool, True = good.
        scale: (gains, panels, rows, cols) float32 from ``unit_scale``.
        high: (gains,) bool, the ranges that take part in common mode.
    Returns:
        (panels, rows, cols) float32.
    """
    br, bc = model.bank_shape
    g = model.gain_index(raw[None])[0]
    s = (raw & 0x3FFF).astype(np.float32) - np.where(g == 5, c.pedestal[5], c.pedestal[3])
    if common_mode:
        use = mask & high[np.clip(g, 0, model.n_gains - 1)]
        p, r, cc = s.shape
        ma = np.ma.array(s.reshape(p, r, cc // bc, bc), mask=~use.reshape(p, r, cc // bc, bc))
        med = np.ma.median(ma, axis=-1).filled(0)
        ok = (ma.count(axis=-1) > min_pixels) & (np.abs(med) < max_correction)
        s = np.where(use, s - np.where(ok, med, 0)[..., None].repeat(bc, -1).reshape(s.shape), s)
        ma = np.ma.array(s.reshape(p, r // br, br, cc), mask=~use.reshape(p, r // br, br, cc))
        med = np.ma.median(ma, axis=2).filled(0)
        ok = (ma.count(axis=2) > min_pixels) & (np.abs(med) < max_correction)
        s = np.where(use, (s.reshape(p, r // br, br, cc) - np.where(ok, med, 0)[:, :, None]).reshape(s.shape), s)
    good = mask & (g >= 0)
    return np.where(good, s * np.where(g == 5, scale[5], scale[3]), 0).astype(np.float32)


def per_event_masked(raw, c: Constants, mask, max_correction=100.0, min_pixels=10, model=EPIX10KA):
    """:func:`calibrate_event` (median rows+cols, ADU) over a batch: (events, panels, rows, cols) uint16
    -> float32 of the same shape."""
    scale = unit_scale(c.gain, "adu")
    high = np.isin(np.arange(model.n_gains), model.high_gain_ranges)
    out = np.empty(raw.shape, np.float32)
    for e in range(raw.shape[0]):
        out[e] = calibrate_event(raw[e], c, mask, scale, high, max_correction, min_pixels, model=model)
    return out


def _thres(x, t):
    """``x`` with values below ``t`` set to 0 (``t`` None: unchanged)."""
    return x if t is None else np.where(x >= t, x, np.float32(0))


class PerEventReference:
    """One detector's reduction, event by event, in plain NumPy/SciPy (see the module docstring).

    Built from a :class:`gpusmall.producer.pipeline.DetectorPipeline` so that it uses the same validated
    config (function parameters, common mode, units, sums), the same constants and static mask, and the
    azimuthal bin map and per-pixel solid-angle x polarization correction that ``azav`` computed from the
    same geometry. Supported: an ``epix10ka`` without config bits in ``adu`` units, common mode ``median``
    (rows, cols; high ranges) or ``none``, functions roi (+ projection), rebin, azav (one phi bin), droplet
    (+ photons), and every run sum.

    :meth:`process_event` takes one raw event (panels, rows, cols) uint16 and returns a dict
    ``name -> value`` (short names as gpusmall's, e.g. ``roi0_sum`` float, ``roi0_pj_ax_1_data`` (n,)
    float64, ``rebin_data`` (panels, 22, 24) float32, ``azav_azav`` (bins,) float64 (NaN in empty bins),
    ``droplet_data`` (n_droplets,) ADU, ``droplet_photons_nPhotons`` int); all values in ADU of the first
    gain range. It also accumulates the run sums, read with :meth:`sum_results` ((panels, rows, cols) each).
    """

    def __init__(self, pipeline):
        cfg = pipeline.cfg
        self.model = pipeline.model
        if self.model.type != "epix10ka" or cfg.units != "adu" or pipeline.constants.config_bits is not None:
            raise ValueError("PerEventReference: an epix10ka without config bits, in adu units")
        self.constants = pipeline.constants
        self.mask = np.asarray(pipeline.mask, bool)
        self.shape = pipeline.shape
        self.scale = unit_scale(self.constants.gain, "adu")
        self.high = np.isin(np.arange(self.model.n_gains), self.model.high_gain_ranges)
        cm = cfg.common_mode
        self.common_mode = cm is not None and cm.type == "median"
        if cm is not None and cm.type not in ("median", "none"):
            raise ValueError(f"PerEventReference: common mode {cm.type} not supported")
        if self.common_mode and (sorted(cm.axes) != ["cols", "rows"] or (cm.gain_ranges or "high") != "high"):
            raise ValueError("PerEventReference: median common mode on rows+cols of the high ranges only")
        self.max_correction = (cm.max_correction if cm and cm.max_correction else 100.0)  # the median default
        self.min_pixels = cm.min_pixels if cm else 10
        self.saturation = self.model.saturation_value(np.uint16)
        noise = self.constants.noise
        self.noise = None if noise is None else (noise if noise.ndim == 3 else noise[0]).astype(np.float32)
        self.steps = [self._step(f) for f in pipeline.functions]
        self.sums = [(s.name, s.kind, s.thres) for s in pipeline.sums]
        self.acc = {}
        for name, kind, _ in self.sums:
            self.acc[name] = (np.full(self.shape, -np.inf, np.float32) if kind == "max" else
                              np.zeros(self.shape, np.int64 if kind == "nhits" else np.float64))
        self.events = 0

    # ---- set-up: one closure per configured function --------------------------------------------
    def _step(self, f):
        p = f.p
        if f.type == "roi":
            if isinstance(p.thres_adu, list):
                raise ValueError("PerEventReference: roi with a [lo, hi] thres_adu not supported")
            b = [[0, n] for n in self.shape] if p.bounds is None else p.bounds
            b = b if len(b) == 3 else [[0, 1], *b]
            index = tuple(slice(lo, hi) for lo, hi in b)
            kids = []
            for ch in f.children:
                if ch.type != "projection" or ch.p.mean or ch.p.thres_rms is not None or ch.p.single_photon:
                    raise ValueError(f"PerEventReference: roi child {ch.type} {ch.p} not supported")
                # smalldata_tools' axis: 0 / 1 of each panel's image (1 / 2 of (panels, rows, cols)), negative: all
                kids.append((f"{f.name}_{ch.name}_data", None if ch.p.axis < 0 else 1 + ch.p.axis, ch.p.thres_adu))
            return lambda frame, raw: self._roi(f.name, index, p.thres_adu, kids, frame, raw)
        if f.type == "rebin":
            r, c = self.shape[1:]
            fr, fc = r // p.shape[0], c // p.shape[1]
            return lambda frame, raw: {f"{f.name}_data": self._rebin(frame, fr, fc)}
        if f.type == "azav":
            if p.phi_bins != 1 or p.thres_adu is not None or p.thres_adu_high is not None:
                raise ValueError("PerEventReference: azav with one phi bin and no thresholds only")
            sel = f.bin_index_host >= 0  # the bin map excludes masked pixels and pixels out of range
            pix, bins = np.flatnonzero(sel), f.bin_index_host[sel]
            norm = np.bincount(bins, weights=f.c_host[sel], minlength=f.nbins)  # sum of P * Omega per bin
            count = np.bincount(bins, minlength=f.nbins)
            return lambda frame, raw: self._azav(f.name, pix, bins, norm, count, frame)
        if f.type == "droplet":
            low = p.threshold if p.threshold_low is None else p.threshold_low
            unit = self.noise if p.use_rms else np.float32(1)
            thr, thr_low = unit * np.float32(p.threshold), unit * np.float32(low)
            adu = [ch.p.adu_per_photon for ch in f.children if ch.type == "photons"]
            photons = (f"{f.name}_{f.children[0].name}", adu[0]) if adu else None
            return lambda frame, raw: self._droplets(f.name, thr, thr_low, low < p.threshold, p.thres_adu,
                                                     p.max_droplets, photons, frame)
        raise ValueError(f"PerEventReference: function type {f.type} not supported")

    # ---- per event -------------------------------------------------------------------------------
    def calibrate(self, raw) -> np.ndarray:
        """(panels, rows, cols) uint16 -> float32 ADU, bad pixels 0 (:func:`calibrate_event`)."""
        return calibrate_event(raw, self.constants, self.mask, self.scale, self.high, self.max_correction,
                               self.min_pixels, self.common_mode, self.model)

    def process_event(self, raw) -> dict[str, Any]:
        """One raw event (panels, rows, cols) uint16 -> results by name; adds the event to the run sums."""
        frame = self.calibrate(raw)
        out = {}
        for step in self.steps:
            out.update(step(frame, raw))
        self._accumulate(frame)
        return out

    def process(self, raw) -> list[dict[str, Any]]:
        """(events, panels, rows, cols) raw, one event after the other -> one result dict per event."""
        return [self.process_event(raw[e]) for e in range(raw.shape[0])]

    def sum_results(self) -> dict[str, np.ndarray]:
        """Run sums so far, name -> (panels, rows, cols)."""
        return dict(self.acc)

    # ---- the functions, one event -------------------------------------------------------------
    def _roi(self, name, index, thres, kids, frame, raw):
        area = _thres(frame[index], thres)  # (panels, rows, cols) of the ROI
        r, c = np.mgrid[0:area.shape[1], 0:area.shape[2]]
        w = np.maximum(area, 0).astype(np.float64)
        total = area.sum(dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            com = np.array([(w * r).sum(), (w * c).sum()]) / w.sum()
        good = self.mask[index] & (self.model.gain_index(raw[index][None])[0] >= 0)
        out = {f"{name}_sum": total, f"{name}_mean": total / area.size, f"{name}_max": area.max(),
               f"{name}_com": com, f"{name}_nsat": int((((raw[index] & 0x3FFF) >= self.saturation) & good).sum())}
        for key, axis, t in kids:
            if axis is None:  # the total of the image
                out[key] = _thres(area, t).sum(dtype=np.float64)
                continue
            pj = _thres(area, t).sum(axis=axis)  # axis 1 (rows) or 2 (cols) of (panels, rows, cols)
            out[key] = pj[0] if pj.shape[0] == 1 else pj
        return out

    @staticmethod
    def _rebin(frame, fr, fc):
        p, r, c = frame.shape  # block means, as smalldata_tools
        return frame.reshape(p, r // fr, fr, c // fc, fc).sum(axis=(2, 4)) / np.float32(fr * fc)

    @staticmethod
    def _azav(name, pix, bins, norm, count, frame):
        num = np.bincount(bins, weights=frame.ravel()[pix], minlength=norm.size)
        with np.errstate(invalid="ignore", divide="ignore"):
            return {f"{name}_azav": np.where(count > 0, num / norm, np.nan), f"{name}_count": count}

    @staticmethod
    def _droplets(name, thr, thr_low, grow, thres_adu, max_droplets, photons, frame):
        """Per panel: seeds >= thr, grown once into 4-neighbours >= thr_low, labelled; sum, npix, centre."""
        total, npix, com, tile = [], [], [], []
        for p in range(frame.shape[0]):
            img = frame[p]
            seeds = img >= (thr[p] if np.ndim(thr) else thr)
            if grow:
                low = img >= (thr_low[p] if np.ndim(thr_low) else thr_low)
                seeds = seeds | (ndimage.binary_dilation(seeds) & low)
            labels, n = ndimage.label(seeds)
            if n == 0:
                continue
            idx = np.arange(1, n + 1)
            total.append(ndimage.sum_labels(img, labels, idx))
            npix.append(ndimage.sum_labels(seeds, labels, idx))
            com.append(np.array(ndimage.center_of_mass(img, labels, idx)).reshape(n, 2))
            tile.append(np.full(n, p))
        cat = (lambda a, shape: np.concatenate(a) if a else np.zeros(shape))
        total, npix, com, tile = cat(total, 0), cat(npix, 0), cat(com, (0, 2)), cat(tile, 0)
        out = {f"{name}_nDroplets_all": total.size}
        keep = total >= thres_adu if thres_adu is not None else np.ones(total.size, bool)
        total, npix, com, tile = total[keep], npix[keep], com[keep], tile[keep]
        out[f"{name}_nDroplets"] = total.size
        out.update({f"{name}_data": total[:max_droplets], f"{name}_npix": npix[:max_droplets],
                    f"{name}_row": com[:max_droplets, 0], f"{name}_col": com[:max_droplets, 1],
                    f"{name}_tile": tile[:max_droplets]})
        if photons is not None:
            key, adu = photons
            n_ph = np.floor(total / adu + 0.5).clip(0).astype(np.int64)  # photons per droplet
            out[f"{key}_nPhotons"] = int(n_ph.sum())
            out[f"{key}_row"] = np.repeat(com[:, 0], n_ph)  # each photon at its droplet's centre
            out[f"{key}_col"] = np.repeat(com[:, 1], n_ph)
        return out

    # ---- run sums ---------------------------------------------------------------------------------
    def _accumulate(self, frame):
        self.events += 1
        for name, kind, t in self.sums:
            acc = self.acc[name]
            if kind == "nhits":  # smalldata_tools: values >= t, or > 0 without a threshold
                acc += frame >= t if t is not None else frame > 0
                continue
            d = _thres(frame, t)
            if kind == "calib":
                acc += d
            elif kind == "square":
                acc += d.astype(np.float64) ** 2
            else:
                np.maximum(acc, d, out=acc)
