"""Calibration (SPEC sections 1 and 3) against direct transcriptions, with and without common mode."""

from __future__ import annotations

import numpy as np
import pytest

from gpusmall.backend import Backend
from gpusmall.calib import Calibrator, unit_scale
from gpusmall.calib.common_mode import MedianCommonMode
from gpusmall.detectors import get_model
from gpusmall.detectors.constants import Constants

EPIX = get_model("epix10ka")
JF = get_model("jungfrau")

# (range index, config bits c (5 bits, bit 4 = trbit), data bit d) built by hand from the SPEC table
EPIX_CASES = [
    (0, 0b11100, 0),
    (0, 0b11100, 1),
    (0, 0b11101, 0),  # FH: b & 28 == 28
    (1, 0b01100, 0),
    (1, 0b01100, 1),
    (1, 0b01111, 0),  # FM: b & 28 == 12
    (2, 0b01000, 0),
    (2, 0b11000, 1),
    (2, 0b01011, 1),  # FL: b & 12 == 8
    (3, 0b10000, 0),
    (3, 0b10011, 0),  # AHL-H: b & 60 == 16
    (4, 0b00000, 0),
    (4, 0b00011, 0),  # AML-M: b & 60 == 0
    (5, 0b10000, 1),
    (5, 0b10010, 1),  # AHL-L: b & 60 == 48
    (6, 0b00000, 1),
    (6, 0b00001, 1),  # AML-L: b & 60 == 32
    (-1, 0b00100, 0),
    (-1, 0b10100, 1),  # none holds: bad
]


def spec_epix_range(c, d):
    b = c | (d << 5)
    for index, mask, value in ((0, 28, 28), (1, 28, 12), (2, 12, 8), (3, 60, 16), (4, 60, 0), (5, 60, 48), (6, 60, 32)):
        if b & mask == value:
            return index
    return -1


@pytest.mark.parametrize("index,c,d", EPIX_CASES)
def test_epix10ka_range_table(index, c, d):
    assert spec_epix_range(c, d) == index
    raw = np.array([[[[(d << 14) | 1234]]]], np.uint16)
    assert int(EPIX.gain_index(raw, np.array([[[c]]], np.uint8))[0, 0, 0, 0]) == index


def test_epix10ka_all_config_bits():
    c = np.arange(32, dtype=np.uint8)
    raw = np.stack([np.full(32, 100, np.uint16), np.full(32, (1 << 14) | 100, np.uint16)])[:, None, None, :]
    got = EPIX.gain_index(raw, c[None, None, :])
    want = np.array([[spec_epix_range(int(ci), d) for ci in c] for d in (0, 1)])
    np.testing.assert_array_equal(got[:, 0, 0], want)
    assert set(want.ravel()) == {-1, 0, 1, 2, 3, 4, 5, 6}


def test_epix10ka_no_config_bits_is_auto_high_low():
    raw = np.array([100, (1 << 14) | 100, (1 << 15) | 100, (3 << 14) | 7], np.uint16)[None, None, None]
    np.testing.assert_array_equal(EPIX.gain_index(raw, None)[0, 0, 0], [3, 5, 3, 5])
    assert EPIX.gain_index(raw, None).dtype == np.int8


def spec_calibrate(model, raw, ped, gain, mask, config_bits, units, photon_kev=None, cm=None):
    """SPEC section 3 pixel by pixel (cm: applied to the whole s array as in the SPEC)."""
    e_, p_, r_, c_ = raw.shape
    s = np.zeros(raw.shape, np.float32)
    gidx = np.zeros(raw.shape, np.int8)
    for idx in np.ndindex(raw.shape):
        w = int(raw[idx])
        px = idx[1:]
        if model is EPIX:
            d = (w >> 14) & 1
            g = spec_epix_range(int(config_bits[px]), d) if config_bits is not None else (3 if d == 0 else 5)
        elif model is JF:
            g = {0: 0, 1: 1, 3: 2, 2: -1}[(w >> 14) & 3]
        else:
            g = 0
        gidx[idx] = g
        v = np.float32(w & (model.data_mask or 0xFFFF))
        s[idx] = v - ped[(max(g, 0),) + px]
    good = mask[None] & (gidx >= 0)
    if cm is not None:
        s = cm(s, good, gidx)
    out = np.zeros(raw.shape, np.float32)
    for idx in np.ndindex(raw.shape):
        if not good[idx]:
            continue
        g, px = int(gidx[idx]), idx[1:]
        E = np.float32(s[idx] / gain[(g,) + px])
        out[idx] = {"adu": E * gain[(0,) + px], "kev": E, "photons": E / np.float32(photon_kev)}[units]
    return out, good


def make_case(rng, model, shape, with_config):
    n = model.n_gains
    ped = rng.uniform(1000, 3000, (n,) + shape[1:]).round().astype(np.float32)
    gain = rng.uniform(0.5, 20, (n,) + shape[1:]).astype(np.float32)
    raw = rng.integers(0, 0x3FFF, shape).astype(np.uint16) | (rng.integers(0, 4, shape).astype(np.uint16) << 14)
    mask = rng.random(shape[1:]) > 0.1
    cfg = rng.integers(0, 32, shape[1:]).astype(np.uint8) if with_config else None
    return ped, gain, raw, mask, cfg


@pytest.mark.parametrize("units", ["adu", "kev", "photons"])
@pytest.mark.parametrize("model,with_config", [(EPIX, True), (EPIX, False), (JF, False)])
def test_calibration_matches_spec(backend, rng, model, with_config, units):
    shape = (3, 2, 4, 6)
    ped, gain, raw, mask, cfg = make_case(rng, model, shape, with_config)
    consts = Constants(pedestal=ped, gain=gain, config_bits=cfg)
    cal = Calibrator(model, consts, mask, backend, units=units, photon_energy_kev=9.5)
    frames = cal(backend.to_device(raw))
    want, want_good = spec_calibrate(model, raw, ped, gain, mask, cfg, units, 9.5)
    np.testing.assert_array_equal(backend.to_host(frames.good), want_good)
    np.testing.assert_allclose(backend.to_host(frames.data), want, rtol=1e-5, atol=1e-5)
    if model is JF:  # bits 14-15 == 2 is invalid: the pixel is bad
        assert not backend.to_host(frames.good)[((raw >> 14) & 3) == 2].any()


def test_unit_scale():
    gain = np.array([[[[2.0]]], [[[4.0]]]], np.float32)
    np.testing.assert_allclose(unit_scale(gain, "adu")[:, 0, 0, 0], [1.0, 0.5])
    np.testing.assert_allclose(unit_scale(gain, "kev")[:, 0, 0, 0], [0.5, 0.25])
    np.testing.assert_allclose(unit_scale(gain, "photons", 2.0)[:, 0, 0, 0], [0.25, 0.125])


@pytest.mark.parametrize("units", ["adu", "kev"])
@pytest.mark.parametrize("with_config", [True, False])
def test_calibration_with_median_common_mode(backend, rng, units, with_config):
    """pedestal -> median rows+cols (high ranges) -> gain, on full ePix10ka panels; CuPy uses the kernels."""
    shape = (2, 2, 352, 384)
    n = EPIX.n_gains
    ped = rng.uniform(2000, 3000, (n,) + shape[1:]).round().astype(np.float32)
    gain = rng.uniform(0.2, 20, (n,) + shape[1:]).astype(np.float32)
    signal = rng.normal(0, 3, shape) + rng.normal(0, 20, shape[:3] + (1,))
    gsel = rng.choice([3, 5], size=shape, p=[0.95, 0.05]) if not with_config else rng.integers(0, 7, shape)
    cfg = rng.integers(0, 32, shape[1:]).astype(np.uint8) if with_config else None
    d = (gsel == 5).astype(np.uint16) if not with_config else rng.integers(0, 2, shape).astype(np.uint16)
    base = ped[3][None]  # near the AHL-H pedestal, so most pixels sit close to zero after subtraction
    raw = (np.clip(np.rint(base + 50 + signal), 0, 0x3FFF).astype(np.uint16)) | (d << 14)
    mask = rng.random(shape[1:]) > 0.05
    consts = Constants(pedestal=ped, gain=gain, config_bits=cfg)
    cm = MedianCommonMode(EPIX, (352, 384), ["rows", "cols"], backend=backend)
    cal = Calibrator(EPIX, consts, mask, backend, units=units, common_mode=cm)
    got = cal(backend.to_device(raw))
    cm_np = MedianCommonMode(EPIX, (352, 384), ["rows", "cols"])
    want = Calibrator(EPIX, consts, mask, Backend("numpy"), units=units, common_mode=cm_np)(raw)
    np.testing.assert_array_equal(backend.to_host(got.good), want.good)
    np.testing.assert_allclose(backend.to_host(got.data), want.data, rtol=1e-5, atol=1e-3)
    # and the NumPy path is the SPEC: oracle on one panel of one event
    sub = (slice(0, 1), slice(0, 1))
    ref, _ = calib_with_slow_cm(raw[sub], ped[:, :1], gain[:, :1], mask[:1], None if cfg is None else cfg[:1], units)
    np.testing.assert_allclose(want.data[sub], ref, rtol=1e-5, atol=1e-3)


def calib_with_slow_cm(raw, ped, gain, mask, cfg, units):
    from test_common_mode import slow_median

    def cm(s, good, g):
        return slow_median(s, good, g, EPIX.bank_shape, ["rows", "cols"], 100, 10, EPIX.high_gain_ranges)

    # spec_calibrate loops per pixel: use the vectorised pieces for s, then the slow common mode
    g = EPIX.gain_index(raw, cfg)
    v = (raw & 0x3FFF).astype(np.float32)
    s = v - np.take_along_axis(ped[None], np.clip(g, 0, 6)[:, None].astype(np.intp), 1)[:, 0]
    good = mask[None] & (g >= 0)
    s = cm(s, good, g)
    gi = np.clip(g, 0, 6)[:, None].astype(np.intp)
    gg = np.take_along_axis(gain[None], gi, 1)[:, 0]
    E = s / gg
    out = E * gain[0][None] if units == "adu" else E
    return np.where(good, out, 0).astype(np.float32), good


def test_run_with_default_common_mode(tmp_path):
    """A run without a common_mode key uses the ePix10ka default (median rows+cols, high ranges)."""
    import h5py
    import yaml

    from gpusmall.cli import main

    base = {
        "source": {"type": "sim", "events": 4, "seed": 2},
        "batch_size": 2,
        "backend": "numpy",
        "detectors": {
            "e": {"type": "epix10ka", "shape": [1, 352, 384], "mask": {"edges": 1}, "sums": ["calib", "square"]}
        },
    }
    results = {}
    for name, cm in (("default", None), ("none", {"type": "none"})):
        cfg = yaml.safe_load(yaml.safe_dump(base))
        if cm:
            cfg["detectors"]["e"]["common_mode"] = cm
        cfg["output"] = str(tmp_path / f"{name}.h5")
        p = tmp_path / f"{name}.yaml"
        p.write_text(yaml.safe_dump(cfg))
        assert main(["run", str(p), "--quiet"]) == 0
        with h5py.File(cfg["output"]) as f:
            n = f.attrs["events"]
            mean = f["Sums/e_calib"][()] / n
            results[name] = np.sqrt(np.median(f["Sums/e_calib_square"][()] / n - mean**2))
    assert results["default"] < 0.6 * results["none"]  # bank and row offsets removed


# -- the fast NumPy path: per-range lookups, chunks of events, raw dtypes --------------------------------


@pytest.mark.parametrize("dist", ["one range", "mostly one", "uniform", "invalid", "no events"])
def test_range_lookup_equals_full_gather(backend, rng, dist):
    """RangeLookup.apply gives op(x, table[clip(g)]) bit for bit whatever the ranges present."""
    from gpusmall.calib.calibrate import RangeLookup

    xp = backend.xp
    n_gains, shape = 7, (3, 2, 5, 6)
    if dist == "no events":
        shape = (0,) + shape[1:]
    g = {
        "one range": np.full(shape, 4),
        "mostly one": np.where(rng.random(shape) < 0.9, 3, rng.integers(0, 7, shape)),
        "uniform": rng.integers(0, 7, shape),
        "invalid": rng.integers(-1, 7, shape),
        "no events": np.zeros(shape),
    }[dist].astype(np.int8)
    x = rng.integers(0, 0x3FFF, shape).astype(np.uint16)
    table = rng.normal(100, 30, (n_gains,) + shape[1:]).astype(np.float32)
    full = np.take_along_axis(table[None], np.clip(g, 0, n_gains - 1)[:, None].astype(np.intp), 1)[:, 0]
    lookup = RangeLookup(xp, xp.asarray(g), n_gains)
    for op in (np.subtract, np.multiply):
        got = lookup.apply(getattr(xp, op.__name__), xp.asarray(x), xp.asarray(table), xp.empty(shape, xp.float32))
        want = op(x.astype(np.float32), full)
        np.testing.assert_array_equal(backend.to_host(got).view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("chunk", [1, 2, 3, 64])
def test_chunked_calibration_is_independent_of_chunk_size(monkeypatch, rng, chunk):
    """The NumPy path calibrates CHUNK_EVENTS events at a time: the result is the whole-batch one."""
    from gpusmall.calib import calibrate

    shape = (5, 2, 352, 384)  # 5 events: chunks of 2 and 3 leave a short last chunk
    n = EPIX.n_gains
    ped = rng.uniform(2000, 3000, (n,) + shape[1:]).round().astype(np.float32)
    gain = rng.uniform(0.2, 20, (n,) + shape[1:]).astype(np.float32)
    raw = np.clip(
        np.rint(ped[3][None] + rng.normal(0, 20, shape[:3] + (1,)) + rng.normal(0, 3, shape)), 0, 0x3FFF
    ).astype(np.uint16) | ((rng.random(shape) < 0.05).astype(np.uint16) << 14)
    mask = rng.random(shape[1:]) > 0.05
    cfg = np.where(rng.random(shape[1:]) < 0.8, 0b10000, rng.integers(0, 32, shape[1:])).astype(np.uint8)
    scale = unit_scale(gain, "adu")
    cm = MedianCommonMode(EPIX, (352, 384), ["rows", "cols"])
    whole = []
    for c in (None, cfg):
        monkeypatch.setattr(calibrate, "CHUNK_EVENTS", 64)
        ref = calibrate.calibrate_reference(np, EPIX, raw, ped, scale, mask, c, cm)
        monkeypatch.setattr(calibrate, "CHUNK_EVENTS", chunk)
        got = calibrate.calibrate_reference(np, EPIX, raw, ped, scale, mask, c, cm)
        np.testing.assert_array_equal(got[1], ref[1])
        np.testing.assert_array_equal(got[0].view(np.uint32), ref[0].view(np.uint32))
        whole.append(ref)
    # and the whole-batch result is pedestal -> common mode -> scale written out with full gathers
    g = EPIX.gain_index(raw, None)
    gi = np.clip(g, 0, n - 1)[:, None].astype(np.intp)
    s = (raw & 0x3FFF).astype(np.float32) - np.take_along_axis(ped[None], gi, 1)[:, 0]
    good = mask[None] & (g >= 0)
    s = cm(s, good, g)
    want = np.where(good, s * np.take_along_axis(scale[None], gi, 1)[:, 0], np.float32(0))
    np.testing.assert_array_equal(whole[0][0].view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize(
    "dtype,high", [(np.uint8, 255), (np.int16, 30000), (np.int32, 2**26), (np.uint32, 2**31), (np.int64, 2**40)]
)
def test_camera_raw_dtypes_calibrate_in_float32(backend, rng, dtype, high):
    """Any integer raw dtype (SPEC 1; floats are refused, tests/test_constants_validation.py) is converted
    to float32 before the pedestal (large integers round as astype does)."""
    model = get_model("camera")
    raw = (rng.random((3, 1, 20, 30)) * high).astype(dtype)
    ped = (rng.random((1, 1, 20, 30)) * 100 + 0.3).astype(np.float32)
    gain = (rng.random((1, 1, 20, 30)) + 0.5).astype(np.float32)
    mask = rng.random((1, 20, 30)) > 0.1
    cal = Calibrator(model, Constants(pedestal=ped, gain=gain), mask, backend, units="kev")
    got = backend.to_host(cal(backend.to_device(raw)).data)
    want = np.where(mask[None], (raw.astype(np.float32) - ped[0]) * unit_scale(gain, "kev")[0], np.float32(0))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kernels", ["numpy", "compiled"])
@pytest.mark.parametrize("with_cm", [False, True])
def test_config_bits_beyond_5_bits_are_masked_on_every_path(rng, kernels, with_cm):
    """Control bits c are 5 bits (SPEC 1): a configuration byte's bits 5-7 change nothing, in the NumPy
    decoder, the fused kernel (calibrate_u16) and pedestal_u16 (with a common mode) alike."""
    from test_kernel_launches import FakeGpu

    shape = (2, 1, 176, 48)  # one common-mode bank
    ped, gain, raw, mask, _ = make_case(rng, EPIX, shape, with_config=False)
    byte = rng.integers(0, 256, shape[1:]).astype(np.uint8)
    backend = Backend("numpy") if kernels == "numpy" else FakeGpu(kernels)
    cm = MedianCommonMode(EPIX, (176, 48), ["banks"], 1e6, gain_ranges="all", backend=backend) if with_cm else None
    cal = Calibrator(
        EPIX, Constants(pedestal=ped, gain=gain, config_bits=byte), mask, backend, units="kev", common_mode=cm
    )
    got = cal(backend.to_device(raw))
    if kernels != "numpy":
        assert backend.launches[0][0] == ("pedestal_u16" if with_cm else "calibrate_u16")
    cm_np = MedianCommonMode(EPIX, (176, 48), ["banks"], 1e6, gain_ranges="all") if with_cm else None
    want, good = spec_calibrate(EPIX, raw, ped, gain, mask, byte & 0x1F, "kev", cm=cm_np)
    np.testing.assert_array_equal(backend.to_host(got.good), good)
    np.testing.assert_allclose(backend.to_host(got.data), want, rtol=1e-5, atol=1e-4)
