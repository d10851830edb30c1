"""Simulated detector runs (SPEC section 7): realistic raw events and the constants that calibrate them.

Each simulated detector has, per pixel and gain range, a pedestal with spread and a gain; per event
it draws Poisson photons from a static pattern of powder rings and speckle (with charge shared
between neighbouring pixels), a bright Bragg spot that makes pixels switch gain, correlated common-
mode offsets per bank and per row within a bank, and Gaussian noise. Event ``i`` depends only on
``(seed, detector name, i)``, so any split into batches or ranks gives the same events.

The geometry (panels laid out around the beam at (0, 0), the sample :data:`DISTANCE_MM` upstream,
photons of :data:`ENERGY_KEV`) matches the demo config, so its azimuthal integration shows the rings.
"""

from __future__ import annotations

import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..backend import cpu_threads
from ..detectors import get_model
from ..detectors.constants import Constants
from .base import DetectorSource, RawBatch, Source
from .context import LIGHT_STATUS, context_dtype

ENERGY_KEV = 9.5
DISTANCE_MM = 100.0
RING_Q = (1.2, 2.0, 2.9)  # Angstrom^-1, powder rings of the simulated sample
RING_WIDTH_Q = 0.03
T0_NS = 1_700_000_000 * 10**9  # first event's timestamp, ns since the Unix epoch (2023-11-14 22:13:20 UTC)
PERIOD_NS = 8_333_333  # 120 Hz

# per family: gain per range (ADU/keV), pedestal per range (ADU), high-gain noise (ADU rms),
# common-mode offsets (ADU rms) per bank and per row within a bank
FAMILY: dict[str, dict[str, Any]] = {
    "epix10ka": dict(
        gain=(16.4, 5.47, 0.164, 16.4, 5.47, 0.164, 0.164),
        pedestal=(2800, 2900, 3000, 2800, 2900, 3000, 3000),
        noise=3.0,
        ranges=(3, 5),
        cm=(8.0, 3.0),
    ),
    "jungfrau": dict(gain=(40.0, 1.5, 0.1), pedestal=(2500, 8000, 9000), noise=10.0, ranges=(0, 1, 2), cm=(2.0, 0.0)),
    "epix100": dict(gain=(4.4,), pedestal=(1000,), noise=3.0, ranges=(0,), cm=(8.0, 3.0)),
    "camera": dict(gain=(10.0,), pedestal=(32,), noise=2.0, ranges=(0,), cm=(0.0, 0.0)),
    "cspad": dict(gain=(4.4,), pedestal=(1200,), noise=4.0, ranges=(0,), cm=(8.0, 0.0)),
}
FAMILY["cs140k"] = FAMILY["cspad"]
I0_NAME = "ipm/sum"  # the simulated beam-intensity monitor (SimulateConfig.i0)
SWITCH_ADU = 12000.0  # a pixel leaves a range when its signal there would exceed this


def panel_layout(shape, pixel_um: float, gap_um: float = 2000.0):
    """x, y, z (um) placing ``panels`` in a near-square grid with gaps, centred on the beam (0, 0)."""
    p, r, c = shape
    ncol = int(np.ceil(np.sqrt(p)))
    nrow = int(np.ceil(p / ncol))
    w, h = c * pixel_um + gap_um, r * pixel_um + gap_um
    x = np.empty(shape, np.float32)
    y = np.empty(shape, np.float32)
    cols = (np.arange(c) + 0.5) * pixel_um
    rows = (np.arange(r) + 0.5) * pixel_um
    for k in range(p):
        i, j = divmod(k, ncol)
        x[k] = (j - ncol / 2) * w + gap_um / 2 + cols[None, :]
        y[k] = (i - nrow / 2) * h + gap_um / 2 + rows[:, None]
    return x, y, np.zeros(shape, np.float32)


def default_threads() -> int:
    """Threads for making simulated events: half the cores this process may use, 1 to 8 (the other
    half reduces; under MPI, the node's cores are shared by its ranks as SLURM binds them)."""
    return max(1, min(8, cpu_threads() // 2))


class SimDetector:
    """One simulated detector: constants, static photon pattern, and an event generator."""

    def __init__(self, name: str, type: str, shape, seed: int = 0, pixel_um: float | None = None, photons: bool = True):
        """photons: False makes a dark run (pedestal, noise and common mode only, no photons)."""
        self.name, self.type = name, type
        self.photons = bool(photons)
        self.model = get_model(type)
        self.shape = tuple(int(s) for s in shape)
        self.key = [int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode())]
        fam = FAMILY[type]
        self.pixel_um = float(pixel_um or self.model.pixel_um or 1.0)
        self.dtype = np.dtype(np.uint16)
        self.max_adu = self.model.data_mask or 0xFFFF
        rng = np.random.default_rng(self.key + [0])
        p, r, c = self.shape
        npix = p * r * c
        g = np.asarray(fam["gain"], np.float32)
        ped = np.asarray(fam["pedestal"], np.float32)
        self.gain = (g[:, None] * rng.normal(1.0, 0.02, (len(g), npix))).astype(np.float32).reshape(len(g), *self.shape)
        self.pedestal = (ped[:, None] + rng.normal(0, 120.0, (len(g), npix))).clip(200, 15000).astype(np.float32)
        self.pedestal = np.round(self.pedestal).reshape(len(g), *self.shape)
        self.noise = np.abs(rng.normal(fam["noise"], 0.1 * fam["noise"], self.shape)).astype(np.float32)
        self.status = (rng.random(self.shape) < 5e-4).astype(np.uint8)
        self.ranges = fam["ranges"]
        self.cm_sigma = fam["cm"]
        if type == "camera":
            self.x = self.y = self.z = None
            xs, ys = np.meshgrid((np.arange(c) + 0.5) * self.pixel_um, (np.arange(r) + 0.5) * self.pixel_um)
            xs, ys = xs - xs.mean(), ys - ys.mean()
            rad_um = np.broadcast_to(np.hypot(xs, ys), self.shape)
            scale_um = rad_um.max() / 3.0  # rings spread over the frame in pixel units
            two_theta = None
        else:
            self.x, self.y, self.z = panel_layout(self.shape, self.pixel_um)
            rad_um = np.hypot(self.x, self.y)
            two_theta = np.arctan2(rad_um, DISTANCE_MM * 1000.0)
        # static photon pattern: rings (in q) + speckle, in expected photons per pixel per event
        if two_theta is not None:
            wavelength = 12.398419843320026 / ENERGY_KEV
            q = 4 * np.pi * np.sin(two_theta / 2) / wavelength
        else:
            q = rad_um / scale_um
        rings = sum(np.exp(-0.5 * ((q - q0) / RING_WIDTH_Q) ** 2) for q0 in RING_Q)
        speckle = rng.exponential(1.0, self.shape) * np.exp(-q / 2.0)
        pattern = 0.02 * rings + 0.002 * speckle
        self.mean_photons = float(pattern.sum())
        self.cdf = np.cumsum(pattern.ravel() / pattern.sum())
        # a Bragg spot bright enough to switch gain ranges
        self.spot = (p // 2, r // 3, c // 3)
        # noise pool: unit normals, sliced at a random offset per event (no per-event draw of npix normals)
        self.pool_pad = 1 << 16
        self.pool = rng.standard_normal((4, npix + self.pool_pad), dtype=np.float32)
        self.bank = self.model.banks(self.shape[1:])  # type: ignore[arg-type]
        # per event: the frame starts from the first range's pedestal (+ 5000 ADU on bad pixels, + 0.5
        # that makes the final cast round); flat views of gain and pedestal for the pixels with signal
        self.base = self.pedestal[self.ranges[0]] + np.float32(5000.0) * (self.status != 0) + np.float32(0.5)
        self.gain_flat = self.gain.reshape(len(g), -1)
        self.ped_flat = self.pedestal.reshape(len(g), -1)
        self._local = threading.local()

    # ---- constants ----------------------------------------------------------------
    def constants(self) -> Constants:
        """The constants this simulation calibrates with (what a dark run would measure)."""
        return Constants(
            pedestal=self.pedestal, gain=self.gain, noise=self.noise, status=self.status, x=self.x, y=self.y, z=self.z
        )

    def source_info(self) -> DetectorSource:
        return DetectorSource(
            self.name,
            self.type,
            self.shape,  # type: ignore[arg-type]
            self.dtype,
            x=self.x,
            y=self.y,
            z=self.z,
            constants=self.constants(),
        )

    # ---- events -------------------------------------------------------------------
    def signal_sparse(self, rng, intensity: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Deposited energy of one event where there is any: (pixels,) int64 flat indices into
        (panels, rows, cols), unique and increasing, and (pixels,) float64 keV. ``intensity``: the shot's
        intensity (photons scale with it; None: drawn here, per detector)."""
        p, r, c = self.shape
        npix = p * r * c
        pulse = rng.gamma(5.0, 1.0 / 5.0) if intensity is None else float(intensity)  # shot-to-shot intensity
        n = rng.poisson(self.mean_photons * pulse)
        # sorted draws: searchsorted walks the 2M-entry CDF in order (5x faster than random order)
        where = np.searchsorted(self.cdf, np.sort(rng.random(n))).clip(0, npix - 1)
        energy = np.full(n, ENERGY_KEV)
        # charge sharing: a third of the photons split with a neighbour in the same row
        share = np.flatnonzero(rng.random(n) < 0.33)
        frac = rng.random(share.size) * 0.5
        nb = where[share] + np.where(rng.random(frac.size) < 0.5, -1, 1)
        same_row = (nb // c) == (where[share] // c)
        energy[share[same_row]] -= ENERGY_KEV * frac[same_row]
        pix = [where, nb[same_row]]
        kev = [energy, ENERGY_KEV * frac[same_row]]
        if self.type != "camera":  # the Bragg spot, 3 x 3 pixels
            sp, sr, sc = self.spot
            rows, cols = np.mgrid[sr - 1 : sr + 2, sc - 1 : sc + 2]
            pix.append(((sp * r + rows) * c + cols).ravel())
            kev.append(rng.poisson(300 * pulse, 9) * ENERGY_KEV)
        pix, inverse = np.unique(np.concatenate(pix), return_inverse=True)  # type: ignore[assignment]
        return pix, np.bincount(inverse, weights=np.concatenate(kev), minlength=pix.size)  # type: ignore[attr-defined, return-value]

    def _scratch(self) -> np.ndarray:
        """A (panels, rows, cols) float32 work frame of the calling thread (events are made in threads)."""
        frame = getattr(self._local, "frame", None)
        if frame is None:
            frame = self._local.frame = np.empty(self.shape, np.float32)
        return frame

    def event(self, index: int, out: np.ndarray, intensity: float | None = None) -> None:
        """Write raw event ``index`` into ``out`` (panels, rows, cols) uint16; ``intensity``: the shot's
        (:meth:`SimSource.shot`; 0: no X-rays), None: drawn per detector.

        Five passes over the frame (noise, pedestal, common mode, clip, cast); photons, gain
        switching and gain bits touch only the pixels that hold signal.
        """
        rng = np.random.default_rng(self.key + [1, int(index)])
        if self.photons and intensity != 0:
            pix, kev = self.signal_sparse(rng, intensity)
        else:
            pix, kev = np.zeros(0, np.int64), np.zeros(0)
        # gain switching, per pixel with signal: a pixel leaves a range when its signal would exceed SWITCH_ADU
        r0 = self.ranges[0]
        gidx = np.full(pix.size, r0, np.int8)
        adu = kev * self.gain_flat[r0, pix]
        for hi in self.ranges[1:]:
            switch = np.flatnonzero(adu > SWITCH_ADU)
            gidx[switch] = hi
            adu[switch] = kev[switch] * self.gain_flat[hi, pix[switch]]
        if len(self.ranges) > 1:  # the frame below carries the first range's pedestal
            adu += self.ped_flat[gidx, pix] - self.ped_flat[r0, pix]
        p, r, c = self.shape
        off = int(rng.integers(0, self.pool_pad))
        noise = self.pool[int(rng.integers(0, 4)), off : off + p * r * c].reshape(self.shape)
        frame = self._scratch()
        np.multiply(noise, self.noise, out=frame)
        frame += self.base
        # common mode: an offset per bank and per row within each bank
        br, bc = self.bank
        nbr, nbc = r // br, c // bc
        cm = rng.normal(0, self.cm_sigma[0], (p, nbr, 1, nbc, 1)).astype(np.float32)
        cm = cm + rng.normal(0, self.cm_sigma[1], (p, nbr, br, nbc, 1)).astype(np.float32)
        view = frame.reshape(p, nbr, br, nbc, bc)
        view += cm
        frame.reshape(-1)[pix] += adu.astype(np.float32)
        # base holds +0.5: truncating the clipped values rounds them to the nearest ADU
        np.clip(frame, 0, self.max_adu, out=frame)
        np.copyto(out, frame, casting="unsafe")
        flat = out.reshape(-1)
        if self.type == "epix10ka":
            flat[pix[gidx == 5]] |= np.uint16(1 << 14)
        elif self.type == "jungfrau":
            bits = np.where(gidx == 1, 1, 3).astype(np.uint16) << np.uint16(14)
            sel = gidx != 0
            flat[pix[sel]] |= bits[sel]


class SimSource(Source):
    """A simulated run of ``events`` events for the configured detectors."""

    def __init__(
        self,
        events: int,
        detectors: dict[str, dict],
        seed: int = 0,
        damage_every: int = 0,
        photons: bool = True,
        threads: int | None = None,
        simulate=None,
    ):
        """detectors: name -> {type, shape (panels, rows, cols), pixel_um}; photons False: a dark run.

        ``damage_every`` N > 0 makes every N-th event (index % N == N - 1) damaged for every detector:
        its raw data is garbage (all 0xFFFF) and ``RawBatch.damaged`` marks it (for tests).
        ``threads``: threads that make the events of a batch (NumPy releases the GIL in the frame
        passes); None takes :func:`default_threads`. Events do not depend on it.
        ``simulate``: a :class:`~gpusmall.producer.config.SimulateConfig` (scan, laser, dropped shots, I0), or None.
        """
        self.n_events = int(events)
        self.seed, self.simulate = int(seed), simulate
        self.context = {} if simulate is None else {k: context_dtype(k) for k in self.context_names(simulate)}
        self.damage_every = int(damage_every)
        self.threads = int(threads) if threads else default_threads()
        self._pool: ThreadPoolExecutor | None = None
        self.sims = {
            name: SimDetector(name, d["type"], d["shape"], seed, d.get("pixel_um"), photons)
            for name, d in detectors.items()
        }
        self.detectors = {name: s.source_info() for name, s in self.sims.items()}

    @staticmethod
    def context_names(simulate) -> list[str]:
        """The context names a ``simulate`` block makes."""
        names = list(LIGHT_STATUS)
        if simulate.i0:
            names.append(I0_NAME)
        if simulate.scan is not None:
            names += [f"scan/{simulate.scan.variable}", "scan/varStep"]
        return names

    def shots(self, idx: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """(context name -> (events,) values, (events,) float64 intensity scaling each event's photons) of
        events ``idx``; with no ``simulate`` ({}, None)."""
        sim = self.simulate
        if sim is None:
            return {}, None  # type: ignore[return-value]
        n = len(idx)
        laser = np.ones(n, np.uint8) if not sim.laser_off_every else (idx % sim.laser_off_every != 0).astype(np.uint8)
        xray = (
            np.ones(n, np.uint8)
            if not sim.xray_off_every
            else (idx % sim.xray_off_every != sim.xray_off_every - 1).astype(np.uint8)
        )
        pulse = (
            np.array([np.random.default_rng([self.seed & 0xFFFFFFFF, 0xC0FFEE, int(i)]).gamma(5.0, 0.2) for i in idx])
            * xray
        )
        ctx = {"lightStatus/xray": xray, "lightStatus/laser": laser}
        pumped = laser.astype(bool)
        if sim.i0:
            ctx[I0_NAME] = pulse.astype(np.float64)
        if sim.scan is not None:
            step = (idx // sim.scan.events_per_step).astype(np.int64)
            value = sim.scan.start + sim.scan.step * step
            ctx[f"scan/{sim.scan.variable}"], ctx["scan/varStep"] = value.astype(np.float64), step
            pumped &= value > 0
        return ctx, pulse * np.where(pumped, 1.0 + sim.pump, 1.0)

    def _make(self, jobs) -> None:
        """Run ``(sim, index, out, intensity)`` jobs, on the thread pool when there is more than one thread."""
        if self.threads > 1 and len(jobs) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="gpusmall-sim")
            for _ in self._pool.map(lambda job: job[0].event(job[1], job[2], job[3]), jobs):
                pass  # re-raises the first error
        else:
            for sim, index, buf, intensity in jobs:
                sim.event(index, buf, intensity)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def read(self, start: int, stop: int, out=None) -> RawBatch:
        n = stop - start
        idx = np.arange(start, stop, dtype=np.int64)
        context, intensity = self.shots(idx)
        raw, jobs = {}, []
        for name, sim in self.sims.items():
            buf = out[name][:n] if out is not None and name in out else np.empty((n, *sim.shape), sim.dtype)
            jobs += [(sim, start + k, buf[k], None if intensity is None else float(intensity[k])) for k in range(n)]
            raw[name] = buf
        self._make(jobs)
        ts = (T0_NS + idx * PERIOD_NS).astype(np.uint64)
        if self.damage_every > 0:
            bad = idx % self.damage_every == self.damage_every - 1
            for buf in raw.values():
                buf[bad] = 0xFFFF
        else:
            bad = np.zeros(n, bool)
        return RawBatch(ts, idx, raw, {name: bad.copy() for name in raw}, context)
