"""Darks from several dark runs, one per gain mode (SPEC section 2), and runs that need every gain range
they can meet: refused when the constants lack one, or its pixels bad when the run's mode is not known."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import yaml

from gpusmall.calib.darks import STATUS_RANGE_MISSING, combine_dark_runs, compute_darks, dark_constants, measure_dark
from gpusmall.cli import main
from gpusmall.detectors import get_model
from gpusmall.detectors.constants import Constants, check_measured_ranges, load_constants
from gpusmall.errors import ConstantsError
from gpusmall.producer.config import validate_config
from gpusmall.producer.pipeline import DetectorPipeline
from gpusmall.sources.base import DetectorSource, RawBatch
from gpusmall.sources.sim import SimSource

JF, EPIX = get_model("jungfrau"), get_model("epix10ka")
JF_SHAPE, EPIX_SHAPE = (1, 512, 1024), (1, 352, 384)


def write_run(path, name, raw):
    with h5py.File(path, "w") as f:
        f[name] = raw


def config(tmp_path, name, path, det_type, **det):
    shape = list(JF_SHAPE if det_type == "jungfrau" else EPIX_SHAPE)
    cfg = {
        "source": {"type": "hdf5", "path": str(path), "timestamp": None},
        "batch_size": 8,
        "output": str(tmp_path / "out.h5"),
        "detectors": {name: {"type": det_type, "dataset": f"/{name}", "shape": shape, **det}},
    }
    p = tmp_path / f"{path.stem}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def jungfrau_run(rng, events, stage_bits, ped, sigma):
    """JUNGFRAU raw in a forced gain stage: ADU = ped + noise, gain bits 14-15 = ``stage_bits``."""
    v = np.clip(np.round(ped + rng.normal(0, sigma, (events, *JF_SHAPE))), 0, 0x3FFF).astype(np.uint16)
    return v | np.uint16(stage_bits << 14), v


def fake_source(name, shape, raw, config_bits=None):
    """A source of one batch holding ``raw`` (the test_darks way of giving ePix10ka configuration bits)."""
    batch = RawBatch(np.arange(len(raw), dtype=np.uint64), np.arange(len(raw), dtype=np.int64), {name: raw})
    info = DetectorSource(name, "x", shape, raw.dtype, config_bits=config_bits)
    return SimpleNamespace(detectors={name: info}, n_events=len(raw), batches=lambda *a: iter([batch]))


def test_two_jungfrau_dark_runs_fill_g1_and_g2(tmp_path, rng, capsys):
    """Forced G1 and forced G2 dark runs (HDF5 with the gain bits set) -> one file whose G1 is run 1's own
    pedestal and noise, G2 run 2's, G0 not measured; each equals that run's own darks in its range."""
    raw1, v1 = jungfrau_run(rng, 12, 1, rng.normal(8000, 100, JF_SHAPE), 4.0)
    raw2, v2 = jungfrau_run(rng, 10, 3, rng.normal(9000, 100, JF_SHAPE), 2.0)
    write_run(tmp_path / "g1.h5", "jf", raw1)
    write_run(tmp_path / "g2.h5", "jf", raw2)
    c1, c2 = (config(tmp_path, "jf", tmp_path / f, "jungfrau") for f in ("g1.h5", "g2.h5"))
    out = tmp_path / "c.h5"
    assert main(["darks", str(c1), str(c2), "--out", str(out), "--backend", "numpy"]) == 0
    err = capsys.readouterr().err
    assert "run 1" in err and "gain ranges G1" in err and "gain ranges G2" in err and "22 events from 2 runs" in err
    c = load_constants(out, "jf", JF, JF_SHAPE)
    assert c.gain_ranges_measured.tolist() == [0, 1, 1]
    np.testing.assert_allclose(c.pedestal[1], v1.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(c.pedestal[2], v2.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(c.noise[1], v1.std(axis=0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(c.noise[2], v2.std(axis=0), rtol=1e-4, atol=1e-4)
    assert (c.pedestal[0] == 0).all()
    for k, cfgp in ((1, c1), (2, c2)):  # the same as each run's own darks in its range
        alone = tmp_path / f"alone{k}.h5"
        assert main(["darks", str(cfgp), "--out", str(alone), "--backend", "numpy"]) == 0
        a = load_constants(alone, "jf", JF, JF_SHAPE)
        np.testing.assert_array_equal(c.pedestal[k], a.pedestal[k])
        np.testing.assert_array_equal(c.noise[k], a.noise[k])
        assert a.gain_ranges_measured.tolist() == [0, 1 if k == 1 else 0, 1 if k == 2 else 0]


def test_three_runs_and_the_run_with_most_events_wins(numpy_backend, rng):
    """G0 from a (simulated) dynamic-gain dark run plus G1 and G2 runs: every range measured. Where two
    runs hold a range for a pixel, the one with more events in it for that pixel (a tie: the first)."""
    sim = SimSource(30, {"jf": {"type": "jungfrau", "shape": JF_SHAPE}}, seed=2, photons=False)
    g0 = measure_dark(sim, "jf", JF, numpy_backend, batch_size=16)
    r1, _ = jungfrau_run(rng, 8, 1, 8000.0, 3.0)
    r2, _ = jungfrau_run(rng, 8, 3, 9000.0, 3.0)
    runs = [g0] + [measure_dark(fake_source("jf", JF_SHAPE, r), "jf", JF, numpy_backend) for r in (r1, r2)]
    res = dark_constants(combine_dark_runs(runs, "jf"), JF)
    assert res.measured.tolist() == [1, 1, 1] and res.events == 46
    np.testing.assert_array_equal(res.constants.pedestal[0], g0.pedestal[0])
    np.testing.assert_array_equal(res.constants.pedestal[1], runs[1].pedestal[1])
    # overlap: run B holds G0 for some pixels with more events than run A (10): it wins there only
    shape = (1, 4, 5)
    a = np.full((10, *shape), 1000, np.uint16) + rng.integers(0, 3, (10, *shape)).astype(np.uint16)
    b = np.full((20, *shape), 2000, np.uint16) | np.uint16(1 << 14)  # G1 ...
    b[:, 0, 0, :3] = 2000  # ... except 3 pixels in G0 for all 20 events
    b[:10, 0, 1, 0] = 3000  # and one pixel in G0 in 10 events only (a tie with A: A's)
    b[10:, 0, 1, 0] = 3000 | (1 << 14)
    ra, rb = (measure_dark(fake_source("j", shape, x), "j", JF, numpy_backend) for x in (a, b))
    m = combine_dark_runs([ra, rb], "j")
    np.testing.assert_array_equal(m.pedestal[0, 0, 0, :3], 2000)
    np.testing.assert_allclose(m.pedestal[0, 0, 0, 3:], ra.pedestal[0, 0, 0, 3:])
    assert m.pedestal[0, 0, 1, 0] == ra.pedestal[0, 0, 1, 0] and m.count[0, 0, 1, 0] == 10
    np.testing.assert_array_equal(m.pedestal[1], rb.pedestal[1])
    assert m.count[0, 0, 0, 0] == 20 and m.count[1, 0, 0, 0] == 0


def test_epix10ka_fixed_gain_runs_and_derived_low_ranges(numpy_backend, rng, caplog):
    """FH and FL dark runs (their pixel configuration: 28 and 8): FH from the first, FL from the second,
    AHL-L and AML-L derived from FL (2); the configurations differ, so none is written."""
    shape = (1, 6, 8)
    fh = rng.integers(2700, 2720, (15, *shape)).astype(np.uint16)
    fl = (rng.integers(3000, 3004, (12, *shape)) | (1 << 14)).astype(np.uint16)  # data bit 14 set, as in FL
    runs = [
        measure_dark(fake_source("e", shape, raw, np.full(shape, bits, np.uint8)), "e", EPIX, numpy_backend)
        for raw, bits in ((fh, 28), (fl, 8))
    ]
    with caplog.at_level(logging.WARNING):
        res = dark_constants(combine_dark_runs(runs, "e"), EPIX)
    c = res.constants
    assert c.gain_ranges_measured.tolist() == [1, 0, 1, 0, 0, 2, 2]
    np.testing.assert_allclose(c.pedestal[0], fh.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(c.pedestal[2], (fl & 0x3FFF).mean(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(c.pedestal[5], c.pedestal[2])
    np.testing.assert_array_equal(c.noise[6], c.noise[2])
    assert (
        (c.pedestal[[1, 3, 4]] == 0).all() and c.config_bits is None and "different pixel configurations" in caplog.text
    )
    # one FL run: its configuration is kept; without FL nothing is derived
    one = compute_darks(fake_source("e", shape, fl, np.full(shape, 8, np.uint8)), "e", EPIX, numpy_backend)
    assert one.measured.tolist() == [0, 0, 1, 0, 0, 2, 2] and (one.constants.config_bits == 8).all()
    ahl = compute_darks(fake_source("e", shape, fh, np.full(shape, 16, np.uint8)), "e", EPIX, numpy_backend)
    assert ahl.measured.tolist() == [0, 0, 0, 1, 0, 0, 0] and (ahl.constants.pedestal[5] == 0).all()


def test_pixel_missing_in_a_measured_range_is_flagged(numpy_backend, rng):
    shape = (1, 4, 5)
    raw = rng.integers(1000, 1010, (20, *shape)).astype(np.uint16)
    raw[:, 0, 2, 2] |= np.uint16(2 << 14)  # JUNGFRAU gain bits 2: invalid in every event
    res = compute_darks(fake_source("j", shape, raw), "j", JF, numpy_backend)
    assert res.measured.tolist() == [1, 0, 0]
    assert res.constants.status[0, 2, 2] & STATUS_RANGE_MISSING
    assert (res.constants.status & STATUS_RANGE_MISSING).sum() == STATUS_RANGE_MISSING


def epix_constants(measured, config_bits=None, shape=EPIX_SHAPE):
    return Constants(
        pedestal=np.full((7, *shape), 1000, np.float32),
        gain=np.ones((7, *shape), np.float32),
        config_bits=config_bits,
        gain_ranges_measured=np.asarray(measured, np.uint8),
    )


def test_refused_when_the_configuration_can_meet_a_missing_range():
    shape = (1, 4, 4)
    fh = np.full(shape, 28, np.uint8)
    # FM only measured: an FH run is refused, naming FH; an FM run is not
    with pytest.raises(ConstantsError, match=r"detector e: constants file 'c\.h5' lacks gain range\(s\) FH \(0\)"):
        check_measured_ranges("e", EPIX, "'c.h5'", epix_constants([0, 1, 0, 0, 0, 0, 0], fh, shape))
    assert check_measured_ranges("e", EPIX, "'c.h5'", epix_constants([0, 1, 0, 0, 0, 0, 0], fh - 16, shape)) is EPIX
    # one FH pixel, masked out: it cannot put a wrong number anywhere
    cb = np.full(shape, 12, np.uint8)
    cb[0, 1, 1] = 28
    mask = np.ones(shape, bool)
    with pytest.raises(ConstantsError, match="FH"):
        check_measured_ranges("e", EPIX, "'c.h5'", epix_constants([0, 1, 0, 0, 0, 0, 0], cb, shape), mask)
    mask[0, 1, 1] = False
    check_measured_ranges("e", EPIX, "'c.h5'", epix_constants([0, 1, 0, 0, 0, 0, 0], cb, shape), mask)
    # auto-ranging AHL meets AHL-H and AHL-L: derived AHL-L is accepted, missing AHL-L is not
    ahl = np.full(shape, 16, np.uint8)
    check_measured_ranges("e", EPIX, "'c.h5'", epix_constants([0, 0, 1, 1, 0, 2, 2], ahl, shape))
    with pytest.raises(ConstantsError, match=r"AHL-L \(5\).*add an FL dark run"):
        check_measured_ranges("e", EPIX, "'c.h5'", epix_constants([0, 0, 0, 1, 0, 0, 0], ahl, shape))
    # a file without the record: as before
    old = epix_constants([0] * 7, fh, shape)
    old.gain_ranges_measured = None
    assert check_measured_ranges("e", EPIX, "'c.h5'", old) is EPIX


def test_gpusmall_run_refuses_constants_lacking_a_range(tmp_path, rng, capsys, caplog):
    """An AHL dark run alone (no FL run: AHL-L cannot be derived) -> `gpusmall run` of an auto-ranging
    ePix10ka exits 2 naming the detector, the file and AHL-L; with an FL run added, it runs."""
    dark = rng.integers(2790, 2810, (8, *EPIX_SHAPE)).astype(np.uint16)  # bit 14 = 0: AHL-H without config bits
    write_run(tmp_path / "ahl.h5", "epix", dark)
    out = tmp_path / "c.h5"
    assert (
        main(
            [
                "darks",
                str(config(tmp_path, "epix", tmp_path / "ahl.h5", "epix10ka")),
                "--out",
                str(out),
                "--backend",
                "numpy",
            ]
        )
        == 0
    )
    assert "gain ranges AHL-H," in capsys.readouterr().err
    light = (rng.integers(2790, 2810, (6, *EPIX_SHAPE))).astype(np.uint16)
    light[:, 0, 100, 100] |= np.uint16(1 << 14)  # a pixel switched to low
    write_run(tmp_path / "light.h5", "epix", light)
    run_cfg = config(tmp_path, "epix", tmp_path / "light.h5", "epix10ka", constants=str(out))
    assert main(["run", str(run_cfg), "--backend", "numpy", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "detector epix" in err and str(out) in err and "AHL-L (5)" in err and "lacks gain range" in err
    c = load_constants(out, "epix", EPIX, EPIX_SHAPE)
    assert c.gain_ranges_measured.tolist() == [0, 0, 0, 1, 0, 0, 0]
    # with FL measured too (AHL-L and AML-L derived from it, as darks with an FL run make them): it runs
    merged = epix_constants([0, 0, 1, 1, 0, 2, 2])
    merged.pedestal[3] = c.pedestal[3]
    merged.save(tmp_path / "c2.h5")
    run_cfg = config(tmp_path, "epix", tmp_path / "light.h5", "epix10ka", constants=str(tmp_path / "c2.h5"))
    with caplog.at_level(logging.WARNING):
        assert main(["run", str(run_cfg), "--backend", "numpy", "--quiet"]) == 0
    assert "derived (AHL-L from FL)" in caplog.text


def test_unknown_gain_mode_warns_and_marks_unmeasured_ranges_bad(tmp_path, numpy_backend, caplog):
    """JUNGFRAU (its gain mode is not in the source) with only G0 measured: a warning names G1 and G2, and a
    pixel that switches to G1 or G2 is bad in that event (not calibrated with pedestal 0); the rest as before."""
    sim = SimSource(3, {"jf": {"type": "jungfrau", "shape": JF_SHAPE}}, seed=1)
    dark = SimSource(20, {"jf": {"type": "jungfrau", "shape": JF_SHAPE}}, seed=1, photons=False)
    res = compute_darks(dark, "jf", JF, numpy_backend, batch_size=10)
    assert res.measured.tolist() == [1, 0, 0]
    res.constants.gain = np.ones((3, *JF_SHAPE), np.float32)
    res.constants.save(tmp_path / "c.h5")
    cfg = validate_config(
        {
            "source": {"type": "sim", "events": 3},
            "detectors": {
                "jf": {
                    "type": "jungfrau",
                    "shape": list(JF_SHAPE),
                    "constants": str(tmp_path / "c.h5"),
                    "mask": {"status": False},
                }
            },
        }
    )
    with caplog.at_level(logging.WARNING):
        pl = DetectorPipeline("jf", cfg.detectors["jf"], sim.detectors["jf"], [], numpy_backend)
    assert "no pedestals for gain ranges G1 (1), G2 (2)" in caplog.text and str(tmp_path / "c.h5") in caplog.text
    assert pl.model.invalid_ranges == (1, 2) and not pl.calibrator.use_kernel
    raw = sim.read(0, 3).raw["jf"]
    stage = JF.gain_index(raw)
    assert ((stage == 1) | (stage == 2)).any()  # the simulator's Bragg spot switches gain
    frames = pl.calibrator(raw)
    np.testing.assert_array_equal(frames.good, (stage == 0))
    assert (frames.data[stage > 0] == 0).all()
    # the same file without the record: as before (the switched pixels calibrated, with pedestal 0)
    with h5py.File(tmp_path / "c.h5", "a") as f:
        del f["gain_ranges_measured"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        pl = DetectorPipeline("jf", cfg.detectors["jf"], sim.detectors["jf"], [], numpy_backend)
    assert "no pedestals" not in caplog.text and pl.model is JF
    assert pl.calibrator(raw).good[stage > 0].all()


@pytest.mark.parametrize(
    "value, match",
    [
        (np.array([1, 0], np.uint8), "shape"),
        (np.array([1, 0, 3], np.uint8), "expected integers 0"),
        (np.array([1.0, 0.0, 1.0]), "expected integers 0"),
    ],
)
def test_measured_record_is_validated(tmp_path, value, match):
    c = Constants(
        pedestal=np.zeros((3, 1, 2, 2), np.float32), gain=np.ones((3, 1, 2, 2), np.float32), gain_ranges_measured=value
    )
    c.save(tmp_path / "c.h5")
    with pytest.raises(ConstantsError, match=match):
        load_constants(tmp_path / "c.h5", "j", JF, (1, 2, 2))


def test_darks_cli_checks_the_runs_agree(tmp_path, capsys):
    a = tmp_path / "a.yaml"
    a.write_text(
        yaml.safe_dump(
            {"source": {"type": "sim", "events": 4}, "detectors": {"d": {"type": "jungfrau", "shape": [1, 512, 1024]}}}
        )
    )
    b = tmp_path / "b.yaml"
    b.write_text(
        yaml.safe_dump(
            {"source": {"type": "sim", "events": 4}, "detectors": {"d": {"type": "epix10ka", "shape": [1, 352, 384]}}}
        )
    )
    assert main(["darks", str(a), str(b), "--out", str(tmp_path / "c.h5"), "--backend", "numpy"]) == 2
    assert "a epix10ka in" in capsys.readouterr().err and not (tmp_path / "c.h5").exists()
    b.write_text(
        yaml.safe_dump(
            {"source": {"type": "sim", "events": 4}, "detectors": {"d": {"type": "jungfrau", "shape": [2, 512, 1024]}}}
        )
    )
    assert main(["darks", str(a), str(b), "--out", str(tmp_path / "c.h5"), "--backend", "numpy"]) == 2
    assert "shape" in capsys.readouterr().err


def test_real_epix10ka_dark_and_refusal_by_its_configuration(tmp_path, data_dir, capsys):
    """The real ePix10ka quad file (psana, fixed low gain: config bits 8): darks need no constants from psana,
    measure FL and derive AHL-L and AML-L from it; a run of it is refused by a file that lacks FL."""
    pytest.importorskip("psana")
    xtc = data_dir / "test_epix_calib.xtc2"
    if not xtc.is_file():
        pytest.skip(f"no {xtc}")
    src = {"type": "psana", "files": [str(xtc)], "psana": {"skip_calib_load": "all"}}
    dark = tmp_path / "dark.yaml"
    dark.write_text(yaml.safe_dump({"source": src, "detectors": {"epixquad": {"type": "epix10ka"}}}))
    out = tmp_path / "c.h5"
    assert main(["darks", str(dark), "--out", str(out), "--backend", "numpy"]) == 0
    assert "gain ranges FL, AHL-L (derived), AML-L (derived)" in capsys.readouterr().err
    with h5py.File(out, "a") as f:
        assert f["gain_ranges_measured"][()].tolist() == [0, 0, 1, 0, 0, 2, 2] and (f["config_bits"][()] == 8).all()
        f["gain_ranges_measured"][...] = [1, 0, 0, 0, 0, 0, 0]  # as if only FH had been measured
    run = tmp_path / "run.yaml"
    run.write_text(
        yaml.safe_dump(
            {
                "source": src,
                "output": str(tmp_path / "o.h5"),
                "detectors": {"epixquad": {"type": "epix10ka", "constants": str(out)}},
            }
        )
    )
    assert main(["run", str(run), "--backend", "numpy", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "FL (2)" in err and "pixel configuration" in err and "epixquad" in err
