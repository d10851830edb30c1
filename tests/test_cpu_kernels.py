"""The numba kernels of the NumPy backend (gpusmall/calib/cpu_kernels.py) against the pure NumPy path:
bit for bit (float32 bits compared, so -0.0 and NaN count), for every detector type, gain range, mask,
unit and common mode. Skipped without numba (the NumPy path is then the only one)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")

from test_calibration import make_case  # noqa: E402

from gpusmall.backend import Backend  # noqa: E402
from gpusmall.calib import Calibrator, cpu_kernels, cpu_median  # noqa: E402
from gpusmall.calib.calibrate import calibrate_reference  # noqa: E402
from gpusmall.calib.common_mode import MedianCommonMode, make_common_mode  # noqa: E402
from gpusmall.detectors import get_model  # noqa: E402
from gpusmall.detectors.base import DetectorModel  # noqa: E402
from gpusmall.detectors.constants import Constants  # noqa: E402
from gpusmall.funcs.sums import RunSums, parse_sums, run_sums_numpy  # noqa: E402

SHAPES = {
    "epix10ka": (3, 2, 40, 56),
    "jungfrau": (3, 1, 64, 80),
    "epix100": (3, 1, 704, 768),
    "camera": (3, 1, 37, 53),
    "cspad": (3, 2, 185, 388),
}
DTYPES = {"epix10ka": np.uint16, "jungfrau": np.uint16, "epix100": np.uint16, "camera": np.uint16, "cspad": np.int16}


def bits(a):
    return np.asarray(a).view(np.uint32)


def bits_any_zero(a):
    """bits, with -0.0 read as +0.0: where a median's middle values are a -0/+0 tie, np.sort's order of them
    (its algorithm's, which differs between machines) decides the sign of a zero; the compiled medians
    (gpusmall/calib/simd_median.py) order -0 first. Everything else, NaN payloads too, bit for bit."""
    b = bits(a).copy()
    b[b == 0x80000000] = 0
    return b


def reference(cal, raw, cm=None):
    """What Calibrator gave before the kernels: calibrate_reference with the calibrator's own constants."""
    return calibrate_reference(np, cal.model, raw, cal.pedestal, cal.scale, cal.mask, cal.config_bits, cm)


def case(rng, det, with_config=False):
    model = get_model(det)
    shape = SHAPES[det]
    ped, gain, raw, mask, cfg = make_case(rng, model, shape, with_config)
    if DTYPES[det] == np.int16:
        raw = rng.integers(-2000, 6000, shape).astype(np.int16)
    elif model.n_gains == 1:
        raw = rng.integers(0, 0xFFFF, shape, endpoint=True).astype(np.uint16)  # all 16 bits are data
    return model, ped, gain, raw, mask, cfg


def assert_same(got, want):
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(bits(got[0]), bits(want[0]))


@pytest.mark.parametrize("units", ["adu", "kev", "photons"])
@pytest.mark.parametrize(
    "det,with_config",
    [
        ("epix10ka", True),
        ("epix10ka", False),
        ("jungfrau", False),
        ("epix100", False),
        ("camera", False),
        ("cspad", False),
    ],
)
def test_calibration_bit_identical(rng, det, with_config, units):
    model, ped, gain, raw, mask, cfg = case(rng, det, with_config)
    cal = Calibrator(
        model,
        Constants(pedestal=ped, gain=gain, config_bits=cfg),
        mask,
        Backend("numpy"),
        units=units,
        photon_energy_kev=9.5,
    )
    assert cal.cpu is not None and cal.cpu.supports(raw)
    got = cal(raw)
    assert_same((got.data, got.good), reference(cal, raw))
    if model.n_gains > 1:  # every range (and invalid bits) took part, and masked pixels
        g = model.gain_index(raw, cfg)
        met = {3, 5} if cfg is None and det == "epix10ka" else set(range(model.n_gains)) | {-1}
        assert set(np.unique(g).tolist()) == met
    assert not got.good[:, ~mask].any() and (got.data[:, ~mask] == 0).all()


def test_every_epix10ka_config_byte_and_data_bit(rng):
    """All 256 configuration bytes (bits 5-7 are not control bits) x both data bits x any upper bit 15."""
    model = get_model("epix10ka")
    cfg = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    raw = rng.integers(0, 1 << 16, (6, 1, 16, 16)).astype(np.uint16)
    ped = rng.uniform(0, 3000, (7, 1, 16, 16)).astype(np.float32)
    gain = rng.uniform(0.1, 40, (7, 1, 16, 16)).astype(np.float32)
    mask = rng.random((1, 16, 16)) > 0.2
    cal = Calibrator(model, Constants(pedestal=ped, gain=gain, config_bits=cfg), mask, Backend("numpy"), units="kev")
    got = cal(raw)
    assert_same((got.data, got.good), reference(cal, raw))


@pytest.mark.parametrize("det", ["epix10ka", "jungfrau"])
def test_invalid_ranges(rng, det):
    """Ranges without constants decode as invalid (bad pixels), as the model's gain_index says."""
    model = get_model(det).with_invalid_ranges([1])
    _, ped, gain, raw, mask, cfg = case(rng, det, det == "epix10ka")
    cal = Calibrator(model, Constants(pedestal=ped, gain=gain, config_bits=cfg), mask, Backend("numpy"))
    assert cal.cpu is not None
    got = cal(raw)
    assert_same((got.data, got.good), reference(cal, raw))
    assert not got.good[model.gain_index(raw, cfg) == -1].any()


def test_special_values(rng):
    """NaN / inf / tiny constants, pedestals equal to the value (0) or above it (negative): same bits."""
    model, ped, gain, raw, mask, cfg = case(rng, "jungfrau")
    ped.reshape(-1)[::7] = np.nan
    ped.reshape(-1)[3::11] = np.inf
    ped[0, :, :8] = (raw[0, :, :8] & 0x3FFF).astype(np.float32)
    gain.reshape(-1)[::17] = np.float32(1e-30)
    for units in ("adu", "kev"):
        cal = Calibrator(model, Constants(pedestal=ped, gain=gain), mask, Backend("numpy"), units=units)
        got = cal(raw)
        assert_same((got.data, got.good), reference(cal, raw))
        assert np.isnan(got.data).any() and np.isinf(got.data).any()


@pytest.mark.parametrize(
    "dtype,high",
    [
        (np.uint8, 255),
        (np.int8, 127),
        (np.int16, 30000),
        (np.int32, 2**26),
        (np.uint32, 2**32 - 1),
        (np.int64, 2**40),
        (np.uint64, 2**63 + 2**62),
    ],
)
def test_camera_raw_dtypes(rng, dtype, high):
    """Any integer raw dtype; large integers round to float32 as astype does."""
    model = get_model("camera")
    raw = (rng.random((3, 1, 20, 30)) * high).astype(dtype)
    ped = (rng.random((1, 1, 20, 30)) * 100 + 0.3).astype(np.float32)
    gain = (rng.random((1, 1, 20, 30)) + 0.5).astype(np.float32)
    mask = rng.random((1, 20, 30)) > 0.1
    cal = Calibrator(model, Constants(pedestal=ped, gain=gain), mask, Backend("numpy"), units="kev")
    assert cal.cpu.supports(raw)
    got = cal(raw)
    assert_same((got.data, got.good), reference(cal, raw))


@pytest.mark.parametrize("det", ["epix10ka", "jungfrau", "epix100", "cspad"])
def test_with_default_common_mode(rng, det):
    """pedestal kernel -> the model's default common mode -> scale kernel equals the NumPy path."""
    model = get_model(det)
    shape = {"epix10ka": (2, 2, 352, 384), "jungfrau": (2, 1, 512, 1024)}.get(det, (2,) + SHAPES[det][1:])
    n = model.n_gains
    ped = rng.uniform(2000, 3000, (n,) + shape[1:]).round().astype(np.float32)
    gain = rng.uniform(0.2, 20, (n,) + shape[1:]).astype(np.float32)
    noise = np.full(shape[1:], 3, np.float32)
    signal = rng.normal(0, 3, shape) + rng.normal(0, 20, shape[:3] + (1,))
    base = np.clip(np.rint(ped[0][None] + 50 + signal), 0, 0x3FFF)
    if DTYPES[det] == np.int16:
        raw = (base - 2000).astype(np.int16)
    else:
        raw = base.astype(np.uint16) | (
            ((rng.random(shape) < 0.05) * rng.integers(1, 4, shape)).astype(np.uint16) << 14 if n > 1 else np.uint16(0)
        )
    mask = rng.random(shape[1:]) > 0.05
    consts = Constants(pedestal=ped, gain=gain, noise=noise)
    if det == "jungfrau":  # no default common mode: take the median one
        cm = MedianCommonMode(model, shape[-2:], ["banks", "rows"], gain_ranges="all")
    else:
        cm = make_common_mode(det, None, model, consts, Backend("numpy"))
        assert callable(cm)
    cal = Calibrator(model, consts, mask, Backend("numpy"), common_mode=cm)
    assert cal.cpu is not None
    got = cal(raw)
    assert_same((got.data, got.good), reference(cal, raw, cm))
    s, g, good = cal.cpu.pedestal_subtract(raw)
    from gpusmall.calib.calibrate import pedestal_subtract

    s_ref, g_ref = pedestal_subtract(np, model, raw, cal.pedestal, cal.config_bits)
    np.testing.assert_array_equal(bits(s), bits(s_ref))
    np.testing.assert_array_equal(g, g_ref)
    np.testing.assert_array_equal(good, mask[None] & (g_ref >= 0))


def test_off_switch_and_fallbacks(rng, monkeypatch):
    model, ped, gain, raw, mask, cfg = case(rng, "jungfrau")
    consts = Constants(pedestal=ped, gain=gain)
    monkeypatch.setenv(cpu_kernels.ENV_VAR, "0")
    assert Calibrator(model, consts, mask, Backend("numpy")).cpu is None
    monkeypatch.delenv(cpu_kernels.ENV_VAR)
    cal = Calibrator(model, consts, mask, Backend("numpy"))
    assert cal.cpu is not None
    assert not cal.cpu.supports(raw.astype(np.int32))  # gain bits of other dtypes: the NumPy path
    got = cal(raw.astype(np.int32))
    assert_same((got.data, got.good), reference(cal, raw.astype(np.int32)))
    assert Calibrator(model, consts, mask, Backend("numpy"), common_mode="raw").cpu is None


def test_threads_and_batch_sizes(rng):
    """More numba threads, odd batch sizes, one event, no events: the same bits."""
    model, ped, gain, raw, mask, cfg = case(rng, "epix10ka", True)
    for threads in (1, 2):
        cal = Calibrator(
            model, Constants(pedestal=ped, gain=gain, config_bits=cfg), mask, Backend("numpy", threads=threads)
        )
        for sub in (raw, raw[:1], raw[:0], np.concatenate([raw] * 3)[:7]):
            got = cal(sub)
            assert_same((got.data, got.good), reference(cal, sub))


@pytest.mark.parametrize("det", ["epix10ka", "jungfrau", "epix100"])
def test_block_sizes_give_the_same_bits(rng, monkeypatch, det):
    """The one-pass calibration in work items of 4096 pixels up to a whole frame, the frame not a multiple of
    the block: the same bits as the NumPy path."""
    model = get_model(det)
    shape = (3, 1, 520, 1024) if det == "jungfrau" else (3, 2, 352, 384) if det == "epix10ka" else (3, 1, 704, 768)
    ped, gain, raw, mask, cfg = make_case(rng, model, shape, det == "epix10ka")
    if model.n_gains == 1:
        raw = rng.integers(0, 0xFFFF, shape, endpoint=True).astype(np.uint16)
    cal = Calibrator(model, Constants(pedestal=ped, gain=gain, config_bits=cfg), mask, Backend("numpy"))
    want = reference(cal, raw)
    calib_block = cpu_kernels.calib_block
    for block in (4096, 3 * 4096, 65536, cpu_kernels.CALIB_BLOCK_MAX):
        monkeypatch.setattr(cpu_kernels, "calib_block", lambda npix, threads, nbytes, b=block: b)
        got = cal(raw)
        assert_same((got.data, got.good), want)
    monkeypatch.setattr(cpu_kernels, "l3_bytes", lambda: 32 << 20)
    assert calib_block(540672, 1, 25) == cpu_kernels.CALIB_BLOCK_MAX
    assert calib_block(540672, 2, 25) == 65536  # four work items per thread, whole 4096s
    assert calib_block(1000, 64, 25) == 4096
    monkeypatch.setattr(cpu_kernels, "l3_bytes", lambda: 8 << 20)  # the constants within a quarter of the L3
    assert calib_block(540672, 1, 25) == 81920 and calib_block(540672, 1, 17) == 122880
    assert calib_block(540672, 1, 1 << 20) == 4096


def test_l3_size_read_or_assumed(monkeypatch, tmp_path):
    assert cpu_kernels.l3_bytes() >= 1 << 20
    monkeypatch.setattr(cpu_kernels, "Path", lambda *_: tmp_path / "none")
    cpu_kernels.l3_bytes.cache_clear()
    try:
        assert cpu_kernels.l3_bytes() == 8 << 20
    finally:
        cpu_kernels.l3_bytes.cache_clear()


def test_threads_for_call():
    import threading

    n = cpu_kernels.threads_for_call(8)
    assert 1 <= n <= cpu_kernels.numba.config.NUMBA_NUM_THREADS
    got = []
    t = threading.Thread(target=lambda: got.append(cpu_kernels.threads_for_call(8)))
    t.start()
    t.join()
    assert got == [1]  # inside the pipeline's worker threads: one numba thread each


# -- run sums ----------------------------------------------------------------------------------------------

SUMS = [
    "calib",
    "square",
    "max",
    "nhits",
    "calib_thresADU5",
    "square_thresADU5",
    "max_thresADU5",
    "nhits_thresADU10",
    "nhits_thresADU-3",
]


@pytest.mark.parametrize("keep", ["all", "some", "none"])
def test_run_sums_equal_numpy_path(rng, keep, monkeypatch):
    data = rng.normal(3, 10, (7, 3000)).astype(np.float32)
    data[:, ::5] = 0
    data[2, 7] = np.float32(-0.0)
    k = {"all": None, "some": rng.random(7) > 0.4, "none": np.zeros(7, bool)}[keep]
    specs = parse_sums(SUMS)
    start = np.array([s.start() for s in specs])[:, None]
    got = np.repeat(start, 3000, 1) + rng.normal(0, 1, (len(specs), 3000)) * (start == 0)
    want = got.copy()
    run_sums_numpy(data, k, specs, got)
    monkeypatch.setenv(cpu_kernels.ENV_VAR, "0")
    run_sums_numpy(data, k, specs, want)
    # sums in float64 of float32 values: the same up to the order of the additions
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-9)
    for i, s in enumerate(specs):  # max and the counts are exact
        if s.kind in ("max", "nhits"):
            np.testing.assert_array_equal(got[i], want[i])


@pytest.mark.parametrize("mask_value", ["zero", "nan"])
def test_run_sums_results_with_mask_value(rng, mask_value, monkeypatch):
    shape = (2, 10, 12)
    mask = rng.random(shape) > 0.2
    data = rng.normal(3, 10, (5, *shape)).astype(np.float32)
    res = []
    for env in ("1", "0"):
        monkeypatch.setenv(cpu_kernels.ENV_VAR, env)
        rs = RunSums(SUMS, shape, Backend("numpy"), mask=mask, mask_value=mask_value)
        rs.update(data)
        rs.update(data[:2], keep=np.array([True, False]))
        res.append(rs.results())
    for name in res[0]:
        np.testing.assert_allclose(res[0][name], res[1][name], rtol=1e-12, atol=1e-9, equal_nan=True)
        assert np.array_equal(np.isnan(res[0][name]), np.isnan(res[1][name]))


class _TwoStage(DetectorModel):
    """A detector the kernels were never written for: range = bit 14 of the raw word, with range 1
    meaning range 2 on pixels whose config byte is odd (decoding declared only here)."""

    def decode_gain(self, raw, config_bits=None, xp=np):
        g = ((raw >> 14) & 1).astype(xp.int8)
        if config_bits is not None:
            g = xp.where((g == 1) & ((config_bits[None] & 1) == 1), xp.int8(2), g).astype(xp.int8)
        return g


@pytest.mark.parametrize("with_config", [False, True])
def test_a_new_detectors_gain_bits_need_nothing_in_the_kernels(rng, with_config):
    """The tables come from the model's own gain_index: a new model with gain_bits=1 is calibrated by the
    kernels, bit-identical to the NumPy path; bits the kernels cannot read fall back to NumPy."""
    import dataclasses

    model = _TwoStage(
        type="twostage",
        panel_shape=(16, 24),
        default_panels=2,
        data_mask=0x3FFF,
        gain_names=("H", "M", "L"),
        pixel_um=100.0,
        saturation=None,
        bank_shape=None,
        gain_bits=1,
    )
    shape = (4, 2, 16, 24)
    ped = rng.normal(1000, 30, (3, *shape[1:])).astype(np.float32)
    gain = rng.uniform(0.5, 2.0, (3, *shape[1:])).astype(np.float32)
    raw = (rng.integers(800, 1300, shape) | (rng.integers(0, 2, shape) << 14)).astype(np.uint16)
    cfg = rng.integers(0, 256, shape[1:]).astype(np.uint8) if with_config else None
    mask = rng.random(shape[1:]) > 0.1
    cal = Calibrator(model, Constants(pedestal=ped, gain=gain, config_bits=cfg), mask, Backend("numpy"))
    assert cal.cpu is not None and cal.cpu.supports(raw)
    got = cal(raw)
    want = reference(cal, raw)
    assert_same((got.data, got.good), want)
    g = model.gain_index(raw, cfg)
    assert (g == 2).any() == with_config and (g == 1).any()
    moved = dataclasses.replace(model, gain_shift=13)  # bits the kernels do not read: the NumPy path
    assert not cpu_kernels.supports(moved, np.uint16, 3)


@pytest.mark.parametrize("det,panel", [("epix10ka", (352, 384)), ("jungfrau", (512, 1024))])
@pytest.mark.parametrize("gain_ranges", ["high", "all"])
@pytest.mark.parametrize("axes", [("rows", "cols"), ("banks", "rows", "cols"), ("rows",), ("cols",)])
def test_median_common_mode_kernels_bit_identical(rng, det, panel, gain_ranges, axes):
    """The median's rows/cols steps in gpusmall/calib/cpu_median.py against the reference, bit for bit, with
    NaN and +-inf values, whole excluded columns, invalid and other gain ranges, and groups at min_pixels."""
    model = get_model(det)
    shape = (2, 2, *panel)
    s = rng.normal(0, 20, shape).astype(np.float32) + rng.normal(0, 30, (2, 2, panel[0], 1)).astype(np.float32)
    s[0, 0, 0, :10] = np.nan
    s[1, 1, 5, 3] = np.inf
    s[0, 1, :, 9] = -np.inf
    s[1, 0, :100, 7] = np.nan
    s[1, 0, 4, :] = np.round(s[1, 0, 4, :] / 50)  # ties
    good = rng.random(shape) > 0.05
    good[1, 0, :, :40] = False
    g = rng.integers(-1, model.n_gains, shape).astype(np.int8)
    g[rng.random(shape) < 0.8] = 0
    bank = model.banks(panel)
    for min_pixels in (0, 10, bank[1] - 1):
        cm = MedianCommonMode(
            model, panel, axes=axes, gain_ranges=gain_ranges, min_pixels=min_pixels, backend=Backend("numpy")
        )
        want = cm.reference(s, good, g)
        assert cpu_median.supports(s)  # so cm(...) below runs the numba steps, not the reference
        got = cm(s, good, g)
        np.testing.assert_array_equal(bits_any_zero(got), bits_any_zero(want))
        if min_pixels == 0:
            assert not np.array_equal(bits(got), bits(s))  # something was corrected


@pytest.mark.parametrize("det,panel", [("epix10ka", (352, 384)), ("jungfrau", (512, 1024))])
@pytest.mark.parametrize("gain_ranges", ["high", "all"])
@pytest.mark.parametrize("axes", [("rows", "cols"), ("rows",), ("cols",)])
def test_blocked_median_calibration_bit_identical(rng, monkeypatch, det, panel, gain_ranges, axes):
    """Calibration with a rows/cols median, one block of bank rows at a time (cpu_median.calibrate_blocked),
    against calibrate_reference on the whole batch, bit for bit: raw in every gain range, invalid keys,
    a masked column, a NaN pedestal, ties."""
    model = get_model(det)
    shape = (2, 2, *panel)
    n = model.n_gains
    ped = rng.uniform(2000, 3000, (n,) + shape[1:]).round().astype(np.float32)
    ped[0, 1, 7, 11] = np.nan
    gain = rng.uniform(0.2, 20, (n,) + shape[1:]).astype(np.float32)
    signal = rng.normal(0, 3, shape) + rng.normal(0, 20, shape[:3] + (1,))
    base = np.clip(np.rint(ped[0][None] + 50 + np.nan_to_num(signal)), 0, 0x3FFF)
    keys = ((rng.random(shape) < 0.1) * rng.integers(1, 4, shape)).astype(np.uint16)
    raw = np.nan_to_num(base).astype(np.uint16) | (keys << 14)
    raw[1, 0, 9, :] = raw[1, 0, 9, 0]  # ties in a row
    mask = rng.random(shape[1:]) > 0.05
    mask[0, :, 17] = False
    cm = MedianCommonMode(model, panel, axes=axes, gain_ranges=gain_ranges, backend=Backend("numpy"))
    cal = Calibrator(model, Constants(pedestal=ped, gain=gain), mask, Backend("numpy"), common_mode=cm)
    calls = []
    blocked = cpu_median.calibrate_blocked
    monkeypatch.setattr(cpu_median, "calibrate_blocked", lambda *a, **k: calls.append(1) or blocked(*a, **k))
    got = cal(raw)
    assert calls  # the blocked path ran
    want = reference(cal, raw, cm)
    np.testing.assert_array_equal(got.good, want[1])
    np.testing.assert_array_equal(bits_any_zero(got.data), bits_any_zero(want[0]))
    plain = reference(cal, raw)
    assert not np.array_equal(bits(want[0]), bits(plain[0]))  # the common mode corrected something
