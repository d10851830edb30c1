"""The simulated source: deterministic per event, consistent with the constants it writes."""

import numpy as np
import pytest

from gpusmall.calib import calibrate_reference, unit_scale
from gpusmall.detectors import get_model
from gpusmall.sources.sim import SimSource

DETS = {
    "epix10ka": [1, 352, 384],
    "jungfrau": [1, 512, 1024],
    "epix100": [1, 704, 768],
    "camera": [1, 64, 80],
}


def test_events_do_not_depend_on_batching():
    src = SimSource(6, {"e": {"type": "epix10ka", "shape": [1, 352, 384]}}, seed=7)
    whole = src.read(0, 6).raw["e"]
    parts = np.concatenate([src.read(0, 2).raw["e"], src.read(2, 6).raw["e"]])
    np.testing.assert_array_equal(whole, parts)
    other = SimSource(6, {"e": {"type": "epix10ka", "shape": [1, 352, 384]}}, seed=8).read(0, 6).raw["e"]
    assert not np.array_equal(whole, other)


@pytest.mark.parametrize("type_", sorted(DETS))
def test_calibrated_sim_is_signal_above_zero(type_):
    shape = DETS[type_]
    src = SimSource(4, {"d": {"type": type_, "shape": shape}}, seed=1)
    info = src.detectors["d"]
    c = info.constants
    model = get_model(type_)
    raw = src.read(0, 4).raw["d"]
    out, good = calibrate_reference(np, model, raw, c.pedestal, unit_scale(c.gain, "kev"), c.status == 0)
    # most pixels see no photon: their median is near 0 keV; photons give ~9.5 keV
    assert abs(np.median(out[good])) < 0.5
    assert np.isclose(np.percentile(out[good], 99.99), 9.5, atol=4.0) or out[good].max() > 9.0
    if type_ in ("epix10ka", "jungfrau"):
        g = model.gain_index(raw, None, np)
        assert (g > g.min()).any(), "the Bragg spot should switch gain"
        # pixels in the switched range still calibrate to the deposited energy (hundreds of keV)
        assert out[good & (g == g.max())].mean() > 100


def test_geometry_places_panels_around_the_beam():
    src = SimSource(1, {"d": {"type": "epix10ka", "shape": [16, 352, 384]}})
    x, y = src.detectors["d"].x, src.detectors["d"].y
    assert abs(x.mean()) < 1e3 and abs(y.mean()) < 1e3
    assert np.hypot(x, y).min() > 500  # a gap around the beam
    assert np.allclose(np.diff(x[0, 0]), 100.0, atol=1e-3)


@pytest.mark.parametrize("type_", ["epix10ka", "jungfrau"])
def test_events_do_not_depend_on_threads(type_):
    det = {"d": {"type": type_, "shape": [2, *DETS[type_][1:]]}}
    one = SimSource(5, det, seed=3, threads=1)
    three = SimSource(5, det, seed=3, threads=3)
    with one, three:
        np.testing.assert_array_equal(one.read(0, 5).raw["d"], three.read(0, 5).raw["d"])
        out = {"d": np.zeros((5, 2, *DETS[type_][1:]), np.uint16)}
        np.testing.assert_array_equal(three.read(1, 4, out=out).raw["d"], one.read(1, 4).raw["d"])
    assert three._pool is None  # closed with the source


def test_event_is_pedestal_noise_common_mode_and_photons():
    """The raw frame the simulator writes is pedestal + gain x signal + noise (+ common mode), rounded."""
    src = SimSource(1, {"d": {"type": "epix10ka", "shape": [1, 352, 384]}}, seed=5)
    sim = src.sims["d"]
    raw = src.read(0, 1).raw["d"][0]
    pix, kev = sim.signal_sparse(np.random.default_rng(sim.key + [1, 0]))  # the draws event 0 starts with
    assert np.all(np.diff(pix) > 0) and np.all(kev > 0) and pix.size > 100
    v = (raw & 0x3FFF).astype(np.float64).ravel()
    g = np.where(raw >> 14, 5, 3).ravel()  # auto high->low without config bits (SPEC 1)
    ped = sim.pedestal.reshape(7, -1)[g, np.arange(v.size)]
    gain = sim.gain.reshape(7, -1)[g, np.arange(v.size)]
    good = sim.status.ravel() == 0
    dark = np.ones(v.size, bool)
    dark[pix] = False
    # no signal: pedestal + noise (3 ADU) + common mode (8 ADU per bank, 3 per row) of a few ADU rms
    resid = (v - ped)[good & dark]
    assert abs(np.median(resid)) < 10 and 3 < np.std(resid) < 15
    # pixels with signal: the gain of their range times the deposited energy, on top of that
    ok = good[pix] & (v[pix] < 0x3FFF)
    err_adu = (v - ped)[pix] - gain[pix] * kev
    assert np.all(np.abs(err_adu[ok]) < 40), "within noise + common mode of gain x energy"
    assert (g[pix] == 5).any(), "the Bragg spot switches to the low range"
