"""Constants and inputs checked before any event (SPEC sections 1, 2 and 5): config bits, noise
shape, user masks, raw dtypes; and which pixel configuration a run uses."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from gpusmall.backend import Backend
from gpusmall.calib import Calibrator, unit_scale
from gpusmall.calib.darks import compute_darks
from gpusmall.detectors import get_model
from gpusmall.detectors.constants import Constants, default_constants, select_config_bits, validate_constants
from gpusmall.detectors.masks import read_user_mask, static_mask
from gpusmall.errors import ConstantsError, InputError
from gpusmall.producer.config import DetectorConfig
from gpusmall.producer.pipeline import DetectorPipeline
from gpusmall.sources.base import DetectorSource

EPIX = get_model("epix10ka")
JF = get_model("jungfrau")
CAM = get_model("camera")
E100 = get_model("epix100")


def epix_constants(shape, **kw):
    return Constants(pedestal=np.zeros((7, *shape), np.float32), gain=np.ones((7, *shape), np.float32), **kw)


# -- config_bits: 5 bits, integer (SPEC sections 1 and 2) ---------------------------------------------------


def test_config_bits_in_range_are_accepted_as_uint8():
    shape = (2, 2, 8)
    bits = np.arange(32, dtype=np.int64).reshape(shape)
    c = validate_constants("e", EPIX, shape, epix_constants(shape, config_bits=bits))
    assert c.config_bits.dtype == np.uint8
    np.testing.assert_array_equal(c.config_bits, bits)


@pytest.mark.parametrize(
    "value,dtype,what",
    [
        (200, np.uint8, "is 200 at (panel, row, col) (0, 1, 2)"),
        (32, np.uint16, "is 32 at (panel, row, col) (0, 1, 2)"),
        (-1, np.int16, "is -1 at (panel, row, col) (0, 1, 2)"),
        (3.7, np.float32, "dtype float32"),
        (16.0, np.float64, "dtype float64"),  # integral values in a float dataset: still not an integer dtype
    ],
)
def test_bad_config_bits_name_the_dataset_and_first_bad_pixel(value, dtype, what):
    shape = (1, 3, 4)
    bits = np.full(shape, 16, dtype)
    bits[0, 1, 2] = value
    bits[0, 2, 3] = value  # a later bad pixel: the message names the first
    with pytest.raises(ConstantsError) as exc:
        validate_constants("e", EPIX, shape, epix_constants(shape, config_bits=bits))
    msg = str(exc.value)
    assert "detector e" in msg and "'config_bits'" in msg and what in msg
    if value == 3.7:
        assert "(0, 1, 2)" in msg  # the first non-integer value's pixel


def test_decoder_uses_the_5_control_bits_only():
    """gain_index(raw, c) == the SPEC table with c & 0x1F for every byte value c and data bit d."""
    c = np.arange(256, dtype=np.uint8)
    raw = np.stack([np.full(256, 1234, np.uint16), np.full(256, (1 << 14) | 1234, np.uint16)])[:, None, None, :]
    got = EPIX.gain_index(raw, c[None, None, :])
    conds = ((0, 28, 28), (1, 28, 12), (2, 12, 8), (3, 60, 16), (4, 60, 0), (5, 60, 48), (6, 60, 32))

    def spec(ci, d):
        b = (ci & 0x1F) | (d << 5)
        return next((i for i, m, v in conds if b & m == v), -1)

    want = np.array([[spec(int(ci), d) for ci in c] for d in (0, 1)])
    np.testing.assert_array_equal(got[:, 0, 0], want)
    np.testing.assert_array_equal(got[:, 0, 0], got[:, 0, 0, np.arange(256) % 32])  # bits 5-7 change nothing


# -- the run's own configuration decides (SPEC section 1) ------------------------------------------------


def make_pipeline(tmp_path, shape, file_bits, source_bits, dtype=np.uint16):
    ped = (1000 + 100 * np.arange(7, dtype=np.float32))[:, None, None, None] * np.ones((7, *shape), np.float32)
    gain = (1 + np.arange(7, dtype=np.float32))[:, None, None, None] * np.ones((7, *shape), np.float32)
    Constants(pedestal=ped, gain=gain, config_bits=file_bits).save(tmp_path / "c.h5")
    src = DetectorSource("e", "epix10ka", shape, np.dtype(dtype), config_bits=source_bits)
    cfg = DetectorConfig(
        type="epix10ka", shape=list(shape), constants=str(tmp_path / "c.h5"), common_mode={"type": "none"}
    )
    return DetectorPipeline("e", cfg, src, [], Backend("numpy")), ped, gain


PANEL = (1, 352, 384)  # one ePix10ka panel (a config's shape must be the detector's)


def test_run_config_bits_win_over_the_constants_file(tmp_path, caplog):
    shape = PANEL
    run_bits = np.full(shape, 16, np.uint8)  # auto high->low (trbit)
    file_bits = np.full(shape, 28, np.uint8)  # a fixed-high dark run
    file_bits[0, 0, :2] = 16  # two pixels agree
    with caplog.at_level(logging.WARNING):
        p, ped, gain = make_pipeline(tmp_path, shape, file_bits, run_bits)
    np.testing.assert_array_equal(p.calibrator.config_bits, run_bits)
    np.testing.assert_array_equal(p.constants.config_bits, run_bits)
    n = 352 * 384
    assert any(f"{n - 2} of {n} pixels" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    # data bit 14 set: b = 16 | 32 = 48 -> AHL-L (5); with the file's 28 it would be FH (0)
    raw = np.full((1, *shape), (1 << 14) | 1500, np.uint16)
    out = p.calibrator(raw).data
    want = (1500 - ped[5]) / gain[5] * gain[0]  # SPEC 3, units adu, range 5
    np.testing.assert_allclose(out[0], want, rtol=1e-6)


def test_constants_file_bits_are_the_fallback(tmp_path, caplog):
    shape = PANEL
    file_bits = np.full(shape, 28, np.uint8)
    with caplog.at_level(logging.WARNING):
        p, ped, gain = make_pipeline(tmp_path, shape, file_bits, None)
    assert not [r for r in caplog.records if "config_bits" in r.getMessage()]
    np.testing.assert_array_equal(p.calibrator.config_bits, file_bits)
    raw = np.full((1, *shape), (1 << 14) | 1500, np.uint16)
    np.testing.assert_allclose(p.calibrator(raw).data[0], (1500 - ped[0]) / gain[0] * gain[0], rtol=1e-6)


def test_select_config_bits():
    shape = (1, 2, 3)
    a, b = np.full(shape, 16, np.uint8), np.full(shape, 28, np.uint8)
    assert select_config_bits("e", shape, None, None) is None
    assert select_config_bits("e", shape, b, None) is b
    np.testing.assert_array_equal(select_config_bits("e", shape, b, a), a)
    np.testing.assert_array_equal(select_config_bits("e", shape, None, a | 0xE0), a)  # higher bits dropped
    with pytest.raises(ConstantsError, match="shape"):
        select_config_bits("e", shape, None, np.zeros((1, 3, 2), np.uint8))
    with pytest.raises(ConstantsError, match="dtype float32"):
        select_config_bits("e", shape, None, a.astype(np.float32))


# -- noise shape message -------------------------------------------------------------------------------------


def test_noise_shape_error_names_both_shapes():
    shape = (1, 2, 2)
    c = Constants(
        pedestal=np.zeros((3, *shape), np.float32),
        gain=np.ones(shape, np.float32),
        noise=np.zeros((2, *shape), np.float32),
    )
    with pytest.raises(ConstantsError, match=r"expected \(1, 2, 2\) or \(3, 1, 2, 2\)"):
        validate_constants("jf", JF, shape, c)
    for noise_shape in (shape, (3, *shape)):  # both accepted
        c = Constants(
            pedestal=np.zeros((3, *shape), np.float32),
            gain=np.ones(shape, np.float32),
            noise=np.ones(noise_shape, np.float32),
        )
        assert validate_constants("jf", JF, shape, c).noise.shape == noise_shape


# -- user masks (SPEC section 5) ----------------------------------------------------------------------------


@pytest.mark.parametrize("model,shape", [(CAM, (1, 6, 8)), (E100, (1, 704, 768))])
@pytest.mark.parametrize("kind", ["npy", "h5"])
def test_2d_user_mask_for_a_single_panel_detector(tmp_path, rng, model, shape, kind):
    user = (rng.random(shape[1:]) > 0.3).astype(np.uint8)
    if kind == "npy":
        path = str(tmp_path / "m.npy")
        np.save(path, user)
    else:
        with h5py.File(tmp_path / "m.h5", "w") as f:
            f["grp/mask"] = user
        path = f"{tmp_path / 'm.h5'}:/grp/mask"
    status = (rng.random(shape) > 0.1).astype(np.uint8)
    c = default_constants(model, shape)
    c.status = status
    mask, cmask = static_mask("d", model, shape, c, user=path)
    want = (status == 0) & (user[None] != 0)  # SPEC 5: status_ok & user (no edges / central here)
    assert mask.shape == shape
    np.testing.assert_array_equal(mask, want)
    np.testing.assert_array_equal(cmask, want)
    np.testing.assert_array_equal(read_user_mask(path, "d", shape), user[None] != 0)


def test_2d_user_mask_rejected_for_several_panels(tmp_path):
    np.save(tmp_path / "m.npy", np.ones((352, 384), np.uint8))
    with pytest.raises(InputError, match=r"has shape \(352, 384\), expected \(2, 352, 384\)"):
        read_user_mask(str(tmp_path / "m.npy"), "e", (2, 352, 384))


def test_user_mask_path_to_a_group(tmp_path):
    with h5py.File(tmp_path / "m.h5", "w") as f:
        f.create_group("grp")
    path = f"{tmp_path / 'm.h5'}:/grp"
    with pytest.raises(InputError) as exc:
        read_user_mask(path, "cam", (1, 6, 8))
    assert str(exc.value) == f"detector cam: mask.user {path!r} is not a dataset"


# -- raw dtypes (SPEC section 1) ----------------------------------------------------------------------------


@pytest.mark.parametrize("model", [JF, EPIX, CAM, E100])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_raw_is_rejected_by_the_calibrator(model, dtype):
    shape = (1, 4, 4)
    c = Constants(
        pedestal=np.zeros((model.n_gains, *shape), np.float32), gain=np.ones((model.n_gains, *shape), np.float32)
    )
    cal = Calibrator(model, c, np.ones(shape, bool), Backend("numpy"), det="d0")
    with pytest.raises(InputError, match=f"detector d0: raw data of dtype {np.dtype(dtype)}"):
        cal(np.full((1, *shape), 1000, dtype))


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32, np.uint32])
def test_integer_raw_is_accepted(dtype):
    shape = (1, 2, 3)
    ped = np.full((1, *shape), 5, np.float32)
    gain = np.full((1, *shape), 2, np.float32)
    cal = Calibrator(CAM, Constants(pedestal=ped, gain=gain), np.ones(shape, bool), Backend("numpy"), units="kev")
    raw = np.full((1, *shape), 25, dtype)
    np.testing.assert_allclose(cal(raw).data, (25 - ped) * unit_scale(gain, "kev"))  # (v - ped) / gain


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_raw_is_rejected_before_any_event(tmp_path, dtype):
    with pytest.raises(InputError, match=f"detector e: raw data of dtype {np.dtype(dtype)}"):
        make_pipeline(tmp_path, PANEL, None, None, dtype=dtype)
    src = SimpleNamespace(
        detectors={"e": DetectorSource("e", "jungfrau", (1, 4, 6), np.dtype(dtype))},
        n_events=2,
        batches=lambda *a: pytest.fail("darks read events of a float detector"),
    )
    with pytest.raises(InputError, match=f"detector e: raw data of dtype {np.dtype(dtype)}"):
        compute_darks(src, "e", JF, Backend("numpy"))
