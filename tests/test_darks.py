"""Darks (SPEC section 2): pedestal, noise and status from a simulated dark run."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from gpusmall.calib.darks import (
    STATUS_CONSTANT,
    STATUS_NO_RANGE,
    STATUS_NOISE,
    STATUS_PEDESTAL,
    DarkAccumulator,
    compute_darks,
    dark_status,
)
from gpusmall.cli import main
from gpusmall.detectors import get_model
from gpusmall.detectors.constants import load_constants
from gpusmall.sources.sim import SimSource


@pytest.mark.parametrize("dtype_name", ["epix10ka", "jungfrau"])
def test_darks_recover_simulated_pedestal_and_noise(backend, dtype_name):
    shape = (1, 352, 384) if dtype_name == "epix10ka" else (1, 512, 1024)
    n = 120
    src = SimSource(n, {"d": {"type": dtype_name, "shape": shape}}, seed=3, photons=False)
    sim = src.sims["d"]
    res = compute_darks(src, "d", get_model(dtype_name), backend, batch_size=32)
    c = res.constants
    assert res.events == n
    r0 = sim.ranges[0]  # the range a dark run sits in (AHL-H for ePix10ka without config bits, G0)
    # the simulator's common-mode offsets per event (per bank, per row in a bank) add to the pixel noise
    total = np.sqrt(sim.noise**2 + sim.cm_sigma[0] ** 2 + sim.cm_sigma[1] ** 2)
    good = sim.status == 0
    err = (c.pedestal[r0] - sim.pedestal[r0])[good]
    assert np.abs(err).max() < 6 * total[good].max() / np.sqrt(n)
    assert abs(np.median(err)) < 1.0
    ratio = (c.noise[r0] / total)[good]
    assert abs(np.median(ratio) - 1) < 0.1
    assert np.mean(np.abs(ratio - 1) < 0.3) > 0.97
    # pixels the simulator made bad (+5000 ADU) are flagged; few others are
    assert (c.status[sim.status != 0] & STATUS_PEDESTAL).all()
    assert (c.status[good] != 0).mean() < 1e-3
    # ranges never seen: 0
    others = [r for r in range(sim.model.n_gains) if r != r0]
    assert (c.pedestal[others] == 0).all() and res.events_per_range[r0] == n


def test_darks_split_events_by_gain_range(numpy_backend, rng):
    """Per range, only the events where the pixel was in that range enter its mean and rms."""
    model = get_model("jungfrau")
    e, shape = 40, (1, 2, 3)
    stage_bits = rng.choice([0, 1, 3], size=(e, *shape))
    v = rng.integers(100, 200, (e, *shape))
    raw = (v | (stage_bits << 14)).astype(np.uint16)
    acc = DarkAccumulator(model, shape, numpy_backend)
    acc.update(raw[:25])
    acc.update(raw[25:])
    ped, noise, count, constant = acc.result()
    for k, bits in enumerate((0, 1, 3)):
        for idx in np.ndindex(shape):
            sel = v[(slice(None),) + idx][stage_bits[(slice(None),) + idx] == bits].astype(np.float64)
            assert count[(k,) + idx] == sel.size
            if sel.size:
                assert ped[(k,) + idx] == pytest.approx(sel.mean(), rel=1e-6)
                assert noise[(k,) + idx] == pytest.approx(sel.std(), rel=1e-5, abs=1e-5)


def test_darks_config_bits_are_5_bits_and_loadable(numpy_backend, rng, tmp_path):
    """A source's configuration bytes may carry bits above the 5 control bits: the ranges are decoded from
    c & 0x1F, and the constants file gets c & 0x1F (which load_constants accepts)."""
    from types import SimpleNamespace

    from gpusmall.sources.base import DetectorSource, RawBatch

    model = get_model("epix10ka")
    e, shape = 12, (1, 2, 3)
    c = np.array([[[16, 28, 12], [0, 16 | 0xE0, 28 | 0x20]]], np.uint8)  # AHL / FH / FM / AML, higher bits set
    v = rng.integers(100, 200, (e, *shape))
    raw = v.astype(np.uint16)  # data bit 14 = 0: ranges 3, 0, 1, 4, 3, 0
    batch = RawBatch(np.arange(e, dtype=np.uint64), np.arange(e, dtype=np.int64), {"e": raw})
    src = SimpleNamespace(
        detectors={"e": DetectorSource("e", "epix10ka", shape, np.dtype(np.uint16), config_bits=c)},
        n_events=e,
        batches=lambda *a: iter([batch]),
    )
    res = compute_darks(src, "e", model, numpy_backend)
    np.testing.assert_array_equal(res.constants.config_bits, c & 0x1F)
    want_range = np.array([[[3, 0, 1], [4, 3, 0]]])
    for idx in np.ndindex(shape):
        r = want_range[idx]
        assert res.constants.pedestal[(r,) + idx] == pytest.approx(v[(slice(None),) + idx].mean(), rel=1e-6)
    res.constants.gain = np.ones((7, *shape), np.float32)
    res.constants.save(tmp_path / "c.h5")
    np.testing.assert_array_equal(load_constants(tmp_path / "c.h5", "e", model, shape).config_bits, c & 0x1F)


def test_dark_status_flags(rng):
    shape = (2, 20, 20)
    ped = rng.normal(1000, 10, (1, *shape)).astype(np.float32)
    noise = rng.normal(3, 0.2, (1, *shape)).astype(np.float32)
    ped[0, 0, 1, 1] += 200
    noise[0, 1, 2, 2] = 30
    constant = np.zeros(shape, bool)
    constant[1, 5, 5] = True
    st = dark_status(ped, noise, np.ones((1, *shape), int), constant, 6.0)
    assert st[0, 1, 1] == STATUS_PEDESTAL and st[1, 2, 2] == STATUS_NOISE and st[1, 5, 5] & STATUS_CONSTANT
    assert (st != 0).sum() == 3


def test_cli_darks(tmp_path):
    cfg = {
        "source": {"type": "sim", "events": 40, "seed": 1},
        "batch_size": 16,
        "output": "x.h5",
        "detectors": {"cam": {"type": "jungfrau", "shape": [1, 512, 1024]}},
    }
    p = tmp_path / "dark.yaml"
    p.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "c.h5"
    assert main(["darks", str(p), "--out", str(out), "--backend", "numpy", "--events", "32"]) == 0
    c = load_constants(out, "cam", get_model("jungfrau"), (1, 512, 1024))
    assert c.pedestal.shape == (3, 1, 512, 1024) and c.status.shape == (1, 512, 1024)
    assert (c.gain == 1).all()


def test_pixel_in_no_valid_range_is_flagged(numpy_backend, rng):
    """A JUNGFRAU pixel whose gain bits are 2 (invalid) in every event has no pedestal: status bit 8."""
    model = get_model("jungfrau")
    shape = (1, 2, 3)
    v = rng.integers(100, 200, (30, *shape))
    bits = np.zeros((30, *shape), np.int64)
    bits[:, 0, 1, 2] = 2  # always invalid
    bits[::2, 0, 0, 0] = 2  # invalid in half the events: still has a pedestal
    acc = DarkAccumulator(model, shape, numpy_backend)
    acc.update((v | (bits << 14)).astype(np.uint16))
    ped, noise, count, constant = acc.result()
    status = dark_status(ped, noise, count, constant)
    assert status[0, 1, 2] & STATUS_NO_RANGE
    assert (status & STATUS_NO_RANGE).sum() == STATUS_NO_RANGE
    assert count[0, 0, 0, 0] == 15


def test_n_sigma_must_be_positive(tmp_path, capsys):
    p = tmp_path / "d.yaml"
    p.write_text(
        yaml.safe_dump(
            {"source": {"type": "sim", "events": 4}, "detectors": {"cam": {"type": "camera", "shape": [8, 8]}}}
        )
    )
    with pytest.raises(SystemExit) as e:
        main(["darks", str(p), "--out", str(tmp_path / "k.h5"), "--n-sigma", "0"])
    assert e.value.code == 2 and "--n-sigma" in capsys.readouterr().err
