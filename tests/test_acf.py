"""acf against scipy.signal.fftconvolve; photon_count against its formula."""

from __future__ import annotations

import numpy as np
import pytest
from helpers_funcs import make_ctx, make_frames, setup
from scipy.signal import fftconvolve

from gpusmall.funcs.acf import Acf
from gpusmall.funcs.photon_count import PhotonCount


@pytest.mark.parametrize("window", [7, 10])
def test_acf_vs_fftconvolve(backend, rng, window):
    shape = (1, 24, 31)
    data = rng.normal(10, 3, (3,) + shape).astype(np.float32)
    good = rng.random(data.shape) > 0.05
    ctx = make_ctx(backend, shape)
    f = setup(Acf, backend, ctx, window=window, resolution=2)
    out = {k: backend.to_host(v) for k, v in f.compute(make_frames(backend, data, good))[0].items()}
    assert out["acf"].shape == (3, window, window)
    h = window // 2
    for e in range(3):
        g = good[e, 0]
        img = np.where(g, data[e, 0], 0).astype(np.float64)
        x = np.where(g, img - img[g].mean(), 0)
        full = fftconvolve(x, x[::-1, ::-1])
        r0, c0 = shape[1] - 1 - h, shape[2] - 1 - h
        ref = full[r0 : r0 + window, c0 : c0 + window]
        np.testing.assert_allclose(out["acf"][e], ref, rtol=1e-4, atol=1e-3 * abs(ref).max())
        lags = np.arange(window) - h
        b = (np.hypot(lags[:, None], lags[None, :]) // 2).astype(int)
        prof = np.array([ref[b == k].mean() for k in range(b.max() + 1)])
        np.testing.assert_allclose(out["profile"][e], prof, rtol=1e-4, atol=1e-3 * abs(ref).max())
    assert f.static_outputs()["profile_r"][0] == 1.0


def test_photon_count(backend, rng):
    shape = (2, 10, 12)
    data = rng.uniform(-50, 700, (4,) + shape).astype(np.float32)
    good = rng.random(data.shape) > 0.1
    ctx = make_ctx(backend, shape)
    f = setup(PhotonCount, backend, ctx, adu_per_photon=150, thr_fraction=0.8, hist_max=3)
    assert f.name == "photon"
    out = {k: backend.to_host(v) for k, v in f.compute(make_frames(backend, data, good))[0].items()}
    n = np.where(good, np.maximum(np.floor(data / 150 + 0.2), 0), 0).astype(int)
    np.testing.assert_array_equal(out["nPhot"], n.reshape(4, -1).sum(axis=1))
    for e in range(4):
        ne = np.minimum(n[e][good[e]], 3)
        np.testing.assert_array_equal(out["hist"][e], np.bincount(ne, minlength=4))


def test_acf_profile_rings_without_lags_are_nan(backend, rng):
    """resolution 0.4 px: rings [0.4, 0.8), [1.6, 2.0), [2.4, 2.8) hold no lag of a 5 x 5 crop."""
    shape = (1, 12, 12)
    data = rng.normal(10, 3, (2,) + shape).astype(np.float32)
    good = np.ones(data.shape, bool)
    f = setup(Acf, backend, make_ctx(backend, shape), window=5, resolution=0.4)
    out = {k: backend.to_host(v) for k, v in f.compute(make_frames(backend, data, good))[0].items()}
    lags = np.arange(5) - 2
    b = np.floor(np.hypot(lags[:, None], lags[None, :]) / 0.4).astype(int)
    for e in range(2):
        want = np.array([out["acf"][e][b == k].mean() if (b == k).any() else np.nan for k in range(b.max() + 1)])
        np.testing.assert_allclose(out["profile"][e], want, rtol=1e-5)
    assert np.isnan(out["profile"][:, [1, 4, 6]]).all() and np.isfinite(out["profile"][:, [0, 2, 3, 5]]).all()
