"""Throughput of the reduction functions (pytest-benchmark; not part of the test suite).

    GPUSMALL_BACKEND=numpy pytest benchmarks/bench_funcs.py --benchmark-only
    GPUSMALL_BACKEND=cupy  pytest benchmarks/bench_funcs.py --benchmark-only
    GPUSMALL_BENCH_EVENTS=8 ...   (smaller ePix10k2M batches on a small CPU; default 64)

Each function runs on one ePix10k2M batch (events, 16, 352, 384) on the backend from GPUSMALL_BACKEND
(events/s in ``extra_info``). Side by side on the CPU: NumPy azav vs pyFAI ``integrate1d`` (CSR, no pixel
splitting) on the same frame, and droplets+photons on 704x768 frames (sparse ~100 droplets, and dense) vs
``scipy.ndimage`` label + sum_labels + center_of_mass frame by frame.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from gpusmall.backend import get_backend
from gpusmall.detectors import get_model
from gpusmall.detectors.constants import default_geometry
from gpusmall.funcs import FrameContext, Frames
from gpusmall.funcs.acf import Acf
from gpusmall.funcs.azav import HC_KEV_A, Azav
from gpusmall.funcs.droplet import Droplet
from gpusmall.funcs.photon_count import PhotonCount
from gpusmall.funcs.photons import Photons
from gpusmall.funcs.projection import Projection
from gpusmall.funcs.rebin import Rebin
from gpusmall.funcs.roi import Roi
from gpusmall.funcs.sums import RunSums
from gpusmall.sources.sim import panel_layout

EVENTS = int(os.environ.get("GPUSMALL_BENCH_EVENTS", "64"))
EPIX = (16, 352, 384)
ADU = 156.0


@pytest.fixture(scope="module")
def backend():
    return get_backend()


def _sync(backend):
    backend.synchronize()


def photon_frames(rng, shape, events, photons_per_frame, noise=3.0, share=True):
    """Gaussian noise + photons of ADU each at random pixels, a third shared with the right neighbour."""
    data = rng.normal(0, noise, (events,) + shape).astype(np.float32)
    npx = int(np.prod(shape))
    for e in range(events):
        flat = data[e].reshape(-1)
        idx = rng.integers(0, npx, photons_per_frame)
        np.add.at(flat, idx, ADU)
        if share:
            s = idx[: photons_per_frame // 3]
            s = s[(s % shape[-1]) < shape[-1] - 1]
            frac = rng.uniform(0, 0.5, s.size).astype(np.float32) * ADU
            np.add.at(flat, s, -frac)
            np.add.at(flat, s + 1, frac)
    return data


def context(backend, shape, geometry=None, pixel_um=100.0):
    x, y, z = geometry if geometry is not None else default_geometry(shape, pixel_um)
    d = backend.to_device
    return FrameContext(det="bench", model=get_model("epix10ka"), backend=backend, shape=shape,
                        mask=d(np.ones(shape, bool)), noise=d(np.full(shape, 3.0, np.float32)),
                        x=d(x), y=d(y), z=d(z), pixel_um=pixel_um)


def make(cls, ctx, children=(), **params):
    f = cls(cls.Params(**params), list(children))
    f.setup(ctx)
    return f


@pytest.fixture(scope="module")
def epix_batch(backend):
    rng = np.random.default_rng(0)
    data = photon_frames(rng, EPIX, EVENTS, 20000)
    return Frames(backend.to_device(data), backend.to_device(np.ones(data.shape, bool)))


def run_batch(benchmark, backend, f, frames, rounds=3):
    def call():
        out = f(frames)
        _sync(backend)
        return out

    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info["backend"] = backend.name
    benchmark.extra_info["events"] = frames.data.shape[0]
    benchmark.extra_info["events_per_s"] = frames.data.shape[0] / benchmark.stats.stats.mean


# ---- one ePix10k2M batch per function ---------------------------------------------------------------
@pytest.mark.parametrize("engine", ["csr", "histogram"])
def test_azav_epix10k2m(benchmark, backend, epix_batch, engine):
    x, y, z = panel_layout(EPIX, 100.0)
    f = make(Azav, context(backend, EPIX, (x, y, z)), center_um=[0, 0], distance_mm=100, energy_kev=9.5, bins=500,
             engine=engine)
    run_batch(benchmark, backend, f, epix_batch)


def test_droplet_photons_epix10k2m(benchmark, backend, epix_batch):
    f = make(Droplet, context(backend, EPIX), [Photons(Photons.Params(adu_per_photon=ADU, max_photons=30000))],
             threshold=10, threshold_low=3, use_rms=True, max_droplets=30000)
    run_batch(benchmark, backend, f, epix_batch, rounds=2)


def test_photon_count_epix10k2m(benchmark, backend, epix_batch):
    f = make(PhotonCount, context(backend, EPIX), adu_per_photon=ADU, hist_max=5)
    run_batch(benchmark, backend, f, epix_batch)


def test_roi_projection_epix10k2m(benchmark, backend, epix_batch):
    """The whole detector as one ROI (sum, mean, max, com) with a column projection: the costliest ROI."""
    f = make(Roi, context(backend, EPIX), [Projection(Projection.Params(axis=-1))],
             bounds=[[0, EPIX[0]], [0, EPIX[1]], [0, EPIX[2]]], thres_adu=20)
    run_batch(benchmark, backend, f, epix_batch)


def test_rebin_epix10k2m(benchmark, backend, epix_batch):
    f = make(Rebin, context(backend, EPIX), shape=[22, 24])
    run_batch(benchmark, backend, f, epix_batch)


def test_sums_epix10k2m(benchmark, backend, epix_batch):
    """The demo's run sums (calib, square, max, nhits_thresADU80): one RunSums update per batch."""
    sums = RunSums(["calib", "square", "max", "nhits_thresADU80"], EPIX, backend)
    run_batch(benchmark, backend, lambda frames: sums.update(frames.data), epix_batch)


def test_acf_epix10k2m(benchmark, backend, epix_batch):
    f = make(Acf, context(backend, EPIX), window=41, resolution=2)
    run_batch(benchmark, backend, f, epix_batch, rounds=1)


# ---- azav vs pyFAI on the same flat frame -------------------------------------------------------------
FLAT = (1, 1408, 1536)  # as many pixels as an ePix10k2M, one flat panel, 100 um


@pytest.fixture(scope="module")
def flat_setup(tmp_path_factory):
    from pyFAI.detectors import Detector
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    ai = AzimuthalIntegrator(dist=0.1, poni1=0.0704, poni2=0.0768, detector=Detector(1e-4, 1e-4, max_shape=FLAT[1:]),
                             wavelength=HC_KEV_A / 9.5 * 1e-10)
    poni = tmp_path_factory.mktemp("poni") / "flat.poni"
    ai.save(str(poni))
    img = photon_frames(np.random.default_rng(1), FLAT, 1, 40000)
    return ai, str(poni), img


def test_azav_numpy_flat_frame(benchmark, flat_setup):
    ai, poni, img = flat_setup
    from gpusmall.backend import Backend

    b = Backend("numpy")
    f = make(Azav, context(b, FLAT), poni=poni, bins=500, unit="q_A^-1", range=[0.0, 4.0])
    frames = Frames(img, np.ones(img.shape, bool))
    benchmark.pedantic(lambda: f(frames), rounds=10, iterations=1, warmup_rounds=1)
    benchmark.extra_info["events_per_s"] = 1 / benchmark.stats.stats.mean


def test_pyfai_integrate1d_csr_flat_frame(benchmark, flat_setup):
    ai, poni, img = flat_setup
    kw = dict(unit="q_A^-1", method=("no", "csr", "cython"), correctSolidAngle=True, polarization_factor=0.99,
              radial_range=(0.0, 4.0))
    ai.integrate1d(img[0, 0], 500, **kw)  # builds and caches the CSR matrix
    benchmark.pedantic(lambda: ai.integrate1d(img[0, 0], 500, **kw), rounds=10, iterations=1, warmup_rounds=1)
    benchmark.extra_info["events_per_s"] = 1 / benchmark.stats.stats.mean


# ---- droplets+photons on 704x768 frames vs scipy frame by frame -------------------------------------------
CAM = (1, 704, 768)
CAM_EVENTS = 16


@pytest.fixture(scope="module", params=[("sparse", 100), ("dense", 20000)], ids=lambda p: p[0])
def cam_frames(request):
    return request.param[0], photon_frames(np.random.default_rng(2), CAM, CAM_EVENTS, request.param[1])


def test_droplet_photons_704x768(benchmark, backend, cam_frames):
    kind, data = cam_frames
    f = make(Droplet, context(backend, CAM), [Photons(Photons.Params(adu_per_photon=ADU, max_photons=40000))],
             threshold=10, threshold_low=3, use_rms=True, max_droplets=30000)
    frames = Frames(backend.to_device(data), backend.to_device(np.ones(data.shape, bool)))
    run_batch(benchmark, backend, f, frames)
    benchmark.extra_info["ms_per_frame"] = 1000 * benchmark.stats.stats.mean / CAM_EVENTS


def test_scipy_droplets_704x768(benchmark, cam_frames):
    from scipy import ndimage

    kind, data = cam_frames
    s4 = ndimage.generate_binary_structure(2, 1)

    def per_frame():
        out = []
        for img in data[:, 0]:
            seeds = img >= 30
            grown = seeds | (ndimage.binary_dilation(seeds, s4) & (img >= 9))
            lab, n = ndimage.label(grown, s4)
            ids = np.arange(1, n + 1)
            out.append((ndimage.sum_labels(img, lab, ids), ndimage.sum_labels(np.ones_like(img), lab, ids),
                        ndimage.center_of_mass(img, lab, ids)))
        return out

    benchmark.pedantic(per_frame, rounds=2, iterations=1, warmup_rounds=0)
    benchmark.extra_info["ms_per_frame"] = 1000 * benchmark.stats.stats.mean / CAM_EVENTS
