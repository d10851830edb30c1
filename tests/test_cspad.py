"""CsPad and cs140k (SPEC section 1) and their common modes: smalldata_tools' mode 1 (``zero_peak``,
``method: psana``) and mode 5 (``unbonded``), against direct NumPy transcriptions of psana's algorithms."""

from __future__ import annotations

import math
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import yaml

from gpusmall.calib.common_mode import UnbondedCommonMode, ZeroPeakCommonMode, make_common_mode
from gpusmall.cli import main
from gpusmall.detectors import get_model
from gpusmall.detectors.constants import Constants
from gpusmall.detectors.cspad import UNBONDED_PIXELS
from gpusmall.errors import ConfigError, InputError
from gpusmall.producer.config import validate_config

CSPAD, CS140K = get_model("cspad"), get_model("cs140k")
SECTION = (185, 388)


def ns(**kw):
    return SimpleNamespace(model_dump=lambda: kw)


# ---- psana's algorithms, transcribed one section at a time -------------------------------------------


def psana_mode1(vals, mean_max=25.0, sigma_max=40.0, thresh=100, low=-1000, high=2000):
    """psana's ``findCommonMode`` (ImgAlgos CommonMode.h) on the good pixels' values of one section:
    the correction, or None where psana applies none. (sqrt of a rounding-negative variance: 0.)"""
    hsize = high - low
    d = np.asarray(vals, np.float64)
    val = np.where(d < 0, np.trunc(d - 0.5), np.trunc(d + 0.5)).astype(np.int64)  # C's int(dval -+ 0.5)
    b = val - low
    hist = np.bincount(b[(b >= 0) & (b < hsize)], minlength=hsize).tolist()
    peak_pos, peak_count, hm_right = -1, -1, hsize
    for i in range(hsize):
        if hist[i] > peak_count and hist[i] > thresh:
            peak_pos, peak_count = i, hist[i]
        elif peak_count > 0 and hist[i] <= peak_count // 2:
            hm_right = i
            break
    if peak_pos < 0:
        return None
    hm_left, i = -1, peak_pos
    while hm_left < 0 and i >= 0:
        if hist[i] <= peak_count // 2:
            hm_left = i
        i -= 1
    sigma = (hm_right - hm_left) / 2.36
    mean = float(peak_pos)
    for _ in range(2):
        s0, s1, s2 = 0, 0.0, 0.0
        dd = int(sigma * 2 + 0.5)
        for i in range(max(0, peak_pos - dd), min(hsize, peak_pos + dd + 1)):
            s0 += hist[i]
            s1 += (i - mean) * hist[i]
            s2 += (i - mean) * (i - mean) * hist[i]
        mean = mean + s1 / s0
        sigma = math.sqrt(max(s2 / s0 - (s1 / s0) ** 2, 0.0))
    mean += low
    if abs(mean) > mean_max or sigma > sigma_max:
        return None
    return mean


def slow_mode1(s, good, **kw):
    """Per event and section: psana_mode1 over the good pixels, subtracted from the good pixels."""
    out = s.copy()
    cms = np.full(s.shape[:2], np.nan)
    for e in range(s.shape[0]):
        for p in range(s.shape[1]):
            cm = psana_mode1(s[e, p][good[e, p]], **kw)
            if cm is not None:
                cms[e, p] = cm
                out[e, p][good[e, p]] -= np.float32(cm)
    return out, cms


def slow_mode5(s, max_correction=100.0):
    """psana's ``applyCModeUnbond``: the mean of the 36 unbonded pixels of a section, subtracted from it."""
    out = s.copy()
    for e in range(s.shape[0]):
        for p in range(s.shape[1]):
            vals = [float(s[e, p, r, r]) + float(s[e, p, r, r + 194]) for r in range(10, 185, 10)]
            mean = sum(vals) / 36
            if abs(mean) <= max_correction:
                out[e, p] -= np.float32(mean)
    return out


def run(backend, cm, s, good, g=None):
    xp = backend.xp
    g = np.zeros(s.shape, np.int8) if g is None else g
    return backend.to_host(cm(xp.asarray(s), xp.asarray(good), xp.asarray(g)))


def mode1_frames(rng, events=3):
    """(s, good, offsets) of a cs140k: sections with known offsets, photons, ties, and sections psana leaves."""
    shape = (events, 2) + SECTION
    s = rng.normal(0, 3, shape).astype(np.float32)
    good = rng.random(shape) > 0.05
    offsets = rng.uniform(-20, 20, shape[:2])
    offsets[0, 1] = 30.0  # |mean| > 25: not corrected
    s += offsets[..., None, None].astype(np.float32)
    photons = rng.random(shape) < 0.03
    s[photons] += np.float32(160.0)
    s[1, 0] = np.round(s[1, 0]) + np.float32(0.5)  # every value a half: rounding halves away from zero
    s[1, 0, :60] = -np.float32(2.5)  # a crowd of negative halves
    s[1, 1] = rng.normal(0, 60, SECTION).astype(np.float32)  # sigma > 40: not corrected
    if events > 2:
        # two peaks: the first (lower) one is the zero-photon peak, though the second is higher
        s[2, 0] = np.where(
            rng.random(SECTION) < 0.4, rng.normal(-8, 1.5, SECTION), rng.normal(15, 1.5, SECTION)
        ).astype(np.float32)
        good[2, 1] = False
        good[2, 1, :1, :90] = True  # 90 good pixels: no bin holds more than 100
    return s, good, offsets


def test_mode1_equals_psana_transcription(backend, rng):
    s, good, offsets = mode1_frames(rng)
    cm = make_common_mode("cs", None, CS140K, None, backend, panel_shape=SECTION)
    assert isinstance(cm, ZeroPeakCommonMode) and cm.method == "psana"
    assert (cm.lo, cm.hi, cm.min_count, cm.max_correction, cm.max_sigma) == (-1000, 2000, 100, 25, 40)
    want, cms = slow_mode1(s, good)
    got = run(backend, cm, s, good)
    np.testing.assert_allclose(got[good], want[good], rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(got[~good], s[~good])
    # the cases the frames were made for
    assert np.isnan(cms[0, 1]) and np.isnan(cms[1, 1]) and np.isnan(cms[2, 1])
    assert abs(cms[2, 0] + 8) < 0.5  # the first peak
    corrected = ~np.isnan(cms)
    corrected[1, 0] = corrected[2, 0] = False
    np.testing.assert_allclose(cms[corrected], offsets[corrected], atol=0.2)  # the offsets it was made with


def test_mode1_parameters(backend, rng):
    """min_count, max_correction, max_sigma and the histogram range are psana's parameters."""
    s, good, _ = mode1_frames(rng, events=2)
    cm = ZeroPeakCommonMode(
        CS140K, SECTION, 35.0, "all", backend, method="psana", histo_range=[-50, 60], min_count=300, max_sigma=70.0
    )
    want, _ = slow_mode1(s, good, mean_max=35.0, sigma_max=70.0, thresh=300, low=-50, high=60)
    np.testing.assert_allclose(run(backend, cm, s, good)[good], want[good], rtol=1e-6, atol=1e-4)


def test_unbonded_mode5_equals_psana_transcription(backend, rng):
    shape = (4, 2) + SECTION
    s = rng.normal(0, 3, shape).astype(np.float32)
    offsets = np.array([[5.5, -40.0], [99.0, 101.0], [-150.0, 0.3], [12.0, -99.9]])
    s += offsets[..., None, None].astype(np.float32)
    s[:, :, 50:60, 100:120] += 400  # photons (not on an unbonded pixel)
    good = rng.random(shape) > 0.1
    cm = make_common_mode("cs", ns(type="unbonded"), CS140K, None, backend, panel_shape=SECTION)
    assert isinstance(cm, UnbondedCommonMode) and cm.max_correction == 100
    got = run(backend, cm, s, good)
    np.testing.assert_allclose(got, slow_mode5(s), rtol=1e-6, atol=1e-4)
    # sections beyond max_correction are left; the others lose their offset
    np.testing.assert_array_equal(got[1, 1], s[1, 1])
    np.testing.assert_array_equal(got[2, 0], s[2, 0])
    assert abs(np.median(got[0, 0])) < 1.0 and abs(np.median(got[3, 1])) < 1.0
    cm = make_common_mode("cs", ns(type="unbonded", max_correction=200.0), CS140K, None, backend, panel_shape=SECTION)
    np.testing.assert_allclose(run(backend, cm, s, good), slow_mode5(s, 200.0), rtol=1e-6, atol=1e-4)


def test_unbonded_pixels_and_mask():
    assert len(UNBONDED_PIXELS) == 36
    assert UNBONDED_PIXELS[:2] == ((10, 10), (10, 204)) and UNBONDED_PIXELS[-1] == (180, 374)
    from gpusmall.detectors.masks import static_mask

    shape = (2, 185, 388)
    c = Constants(pedestal=np.zeros((1, *shape), np.float32), gain=np.ones((1, *shape), np.float32))
    m, _ = static_mask("cs", CS140K, shape, c)
    assert (~m).sum() == 72 and not m[1, 30, 30] and not m[0, 30, 224] and m[0, 30, 31]
    m, _ = static_mask("cs", CS140K, shape, c, neighbours=4)
    assert (~m).sum() == 72 * 5
    assert static_mask("cs", CS140K, shape, c, unbonded=False)[0].all()
    c.unbonded = np.zeros(shape, np.uint8)
    c.unbonded[0, 0, 0] = 1  # the constants file's unbonded pixels win
    m, _ = static_mask("cs", CS140K, shape, c)
    assert (~m).sum() == 1


def test_common_mode_choices(numpy_backend):
    cm = make_common_mode("cs", None, CSPAD, None, numpy_backend, panel_shape=SECTION)
    assert cm.method == "psana" and cm.bank == SECTION  # a bank is the 2x1 section
    cfg = validate_config(
        {
            "source": {"type": "sim"},
            "detectors": {
                "cs": {
                    "type": "cspad",
                    "shape": [32, 185, 388],
                    "common_mode": {"type": "zero_peak", "max_correction": 30},
                }
            },
        }
    )
    cm = make_common_mode("cs", cfg.detectors["cs"].common_mode, CSPAD, None, numpy_backend, panel_shape=SECTION)
    assert cm.method == "psana" and cm.max_correction == 30 and cm.max_sigma == 40  # the CsPad's defaults fill in
    cm = make_common_mode("cs", ns(type="zero_peak", method="fullest"), CSPAD, None, numpy_backend, panel_shape=SECTION)
    assert cm.method == "fullest" and (cm.lo, cm.hi) == (-100, 100)
    cm = make_common_mode("e", ns(type="zero_peak"), get_model("epix10ka"), None, numpy_backend)
    assert cm.method == "fullest" and cm.max_correction == 100  # other detectors: as before
    with pytest.raises(InputError, match="unbonded reference pixels"):
        make_common_mode("e", ns(type="unbonded"), get_model("epix10ka"), None, numpy_backend)
    with pytest.raises(InputError, match="whole ADU"):
        make_common_mode("cs", ns(type="zero_peak", histo_range=[-10.5, 20]), CSPAD, None, numpy_backend)
    with pytest.raises(InputError, match="max_sigma"):
        make_common_mode("cs", ns(type="zero_peak", method="fullest", max_sigma=3.0), CSPAD, None, numpy_backend)


@pytest.mark.parametrize(
    "cm, key",
    [
        ({"type": "median", "method": "psana"}, "only for type zero_peak"),
        ({"type": "epix100", "histo_range": [-3, 3]}, "epix100 takes one number"),
        ({"type": "zero_peak", "histo_range": [5, 2]}, "low < high"),
        ({"type": "zero_peak", "method": "mode1"}, "method"),
        ({"type": "unbonded", "min_count": 3}, "only for type zero_peak"),
    ],
)
def test_common_mode_config_is_validated(cm, key):
    with pytest.raises(ConfigError, match=key):
        validate_config(
            {
                "source": {"type": "sim"},
                "detectors": {"cs": {"type": "cspad", "shape": [32, 185, 388], "common_mode": cm}},
            }
        )


def test_shapes_and_config():
    assert (CSPAD.default_panels, CSPAD.panel_shape, CSPAD.pixel_um, CSPAD.n_gains) == (32, SECTION, 109.92, 1)
    assert (CS140K.default_panels, CS140K.panel_shape, CS140K.pixel_um) == (2, SECTION, 109.92)
    cfg = validate_config(
        {"source": {"type": "hdf5", "path": "x.h5"}, "detectors": {"cs": {"type": "cs140k", "dataset": "/cs"}}}
    )
    assert cfg.detectors["cs"].panel_shape() == (2, 185, 388)
    with pytest.raises(ConfigError, match="185 x 388"):
        validate_config(
            {
                "source": {"type": "hdf5", "path": "x.h5"},
                "detectors": {"cs": {"type": "cs140k", "dataset": "/cs", "shape": [2, 185, 384]}},
            }
        )
    CS140K.check_raw_dtype("cs", np.int16)
    with pytest.raises(InputError):
        CS140K.check_raw_dtype("cs", np.float32)


def test_cs140k_hdf5_run_end_to_end(tmp_path):
    """A cs140k from an HDF5 file of int16 raw data: darks, then a run with mode 1, then with mode 5."""
    rng = np.random.default_rng(5)
    shape = (2, 185, 388)
    ped = rng.normal(1200, 30, shape).astype(np.float32)
    dark = (ped + rng.normal(0, 3, (40, *shape))).round().astype(np.int16)
    offsets = rng.uniform(-15, 15, (12, 2, 1, 1))
    light = ped + rng.normal(0, 3, (12, *shape)) + offsets
    light[:, :, 100:110, 40:60] += 300
    with h5py.File(tmp_path / "dark.h5", "w") as f:
        f["cs"] = dark
    with h5py.File(tmp_path / "run.h5", "w") as f:
        f["cs"] = light.round().astype(np.int16)
    base = {"batch_size": 5, "detectors": {"cs": {"type": "cs140k", "dataset": "/cs"}}}
    (tmp_path / "dark.yaml").write_text(yaml.safe_dump({**base, "source": {"type": "hdf5", "path": "dark.h5"}}))
    assert main(["darks", str(tmp_path / "dark.yaml"), "--out", str(tmp_path / "c.h5"), "--backend", "numpy"]) == 0
    with h5py.File(tmp_path / "c.h5") as f:
        assert f["pedestal"].shape == (1, *shape) and f["gain_ranges_measured"][()].tolist() == [1]
        np.testing.assert_allclose(f["pedestal"][0], dark.mean(axis=0), atol=1e-3)
    for cm in ({"type": "zero_peak"}, {"type": "unbonded"}):
        det = {
            "type": "cs140k",
            "dataset": "/cs",
            "constants": "c.h5",
            "common_mode": cm,
            "sums": ["calib"],
            "functions": [{"type": "roi", "name": "r", "bounds": [[0, 1], [0, 185], [0, 388]]}],
        }
        cfg = {
            "source": {"type": "hdf5", "path": "run.h5", "timestamp": None},
            "batch_size": 5,
            "output": f"out_{cm['type']}.h5",
            "detectors": {"cs": det},
        }
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
        assert main(["run", str(tmp_path / "run.yaml"), "--backend", "numpy", "--quiet"]) == 0
        with h5py.File(tmp_path / f"out_{cm['type']}.h5") as f:
            assert f["Sums/cs_calib"].shape == shape
            mask = f["UserDataCfg/cs/mask"][()]
            assert mask.shape == shape and not mask[0, 10, 10] and not mask[1, 180, 374]
            mean = f["cs/r_mean"][()]
        # the offsets (up to 15 ADU) are gone: the ROI mean is the photons' share, whatever the event's offset
        # (mode 5 to the precision of a mean of 36 noisy pixels)
        photons = 300 * 200 / (185 * 388)
        assert np.abs(mean - photons).max() < (0.3 if cm["type"] == "zero_peak" else 2.5), (cm, mean)


def test_fake_gpu_runs_the_cspad_common_modes(monkeypatch):
    """mode 1 and mode 5 through the CuPy code paths under CuPy's rules (the strict stand-in) equal NumPy."""
    from fake_cupy import install_fake_cupyx
    from test_fake_gpu_pipeline import FakeGpuStrict, _compare

    from gpusmall.backend import Backend
    from gpusmall.producer.pipeline import DetectorPipeline
    from gpusmall.producer.process import BatchProcessor
    from gpusmall.sources.base import DetectorSource, RawBatch

    rng = np.random.default_rng(8)
    shape = (2, 185, 388)
    ped = rng.normal(1000, 20, (1, *shape)).astype(np.float32)
    raw = (ped + rng.normal(0, 3, (6, *shape)) + rng.uniform(-15, 15, (6, 2, 1, 1))).round().astype(np.int16)
    raw[:, :, 20:30, 200:220] += 500

    def outputs(backend, cm):
        cfg = validate_config(
            {
                "source": {"type": "sim"},
                "batch_size": 3,
                "detectors": {
                    "cs": {
                        "type": "cs140k",
                        "shape": list(shape),
                        "common_mode": cm,
                        "sums": ["calib"],
                        "functions": [{"type": "roi", "name": "r", "bounds": [[0, 2], [0, 185], [0, 388]]}],
                    }
                },
            }
        )
        src = DetectorSource(
            "cs", "cs140k", shape, np.dtype(np.int16), constants=Constants(pedestal=ped, gain=np.ones_like(ped))
        )
        pl = DetectorPipeline("cs", cfg.detectors["cs"], src, cfg.function_specs("cs"), backend)
        proc = BatchProcessor({"cs": pl}, backend, 3)
        got = []
        for b in (0, 3):
            batch = RawBatch(np.arange(b, b + 3, dtype=np.uint64), np.arange(b, b + 3), {"cs": raw[b : b + 3].copy()})
            got.append(proc.process(proc.stage(batch)))
        cols = {k: np.concatenate([np.asarray(o[k]) for o in got]) for k in got[0]}
        return cols, {k: np.asarray(v) for k, v in pl.sum_results().items()}

    for cm in ({"type": "zero_peak"}, {"type": "unbonded"}):
        gpu = FakeGpuStrict()
        install_fake_cupyx(monkeypatch, transfers=gpu.transfers)
        got, got_sums = outputs(gpu, cm)
        want, want_sums = outputs(Backend("numpy"), cm)
        _compare(got, want, got_sums, want_sums)


@pytest.mark.parametrize("seed", range(6))
def test_mode1_edge_cases_against_transcription(numpy_backend, seed):
    """Small sections and a narrow histogram: peaks at the histogram's ends (no half-maximum bin on a side,
    windows cut at the ends), ties, empty sections; the vectorised search equals psana's loops."""
    rng = np.random.default_rng(seed)
    cam = get_model("camera")
    shape = (40, 2, 6, 40)
    s = rng.normal(0, rng.uniform(0.3, 4, (40, 2, 1, 1)), shape) + rng.uniform(-7, 7, (40, 2, 1, 1))
    s = np.where(rng.random(shape) < 0.3, np.round(s * 2) / 2, s).astype(np.float32)  # halves
    good = rng.random(shape) > rng.uniform(0, 0.9, (40, 2, 1, 1))
    kw = dict(mean_max=4.0, sigma_max=2.5, thresh=int(rng.integers(0, 8)), low=-5, high=6)
    cm = ZeroPeakCommonMode(
        cam,
        (6, 40),
        kw["mean_max"],
        "all",
        numpy_backend,
        method="psana",
        histo_range=[kw["low"], kw["high"]],
        min_count=kw["thresh"],
        max_sigma=kw["sigma_max"],
    )
    want, cms = slow_mode1(s, good, **kw)
    got = run(numpy_backend, cm, s, good)
    np.testing.assert_allclose(got[good], want[good], rtol=1e-6, atol=1e-5)
    assert 0 < np.isnan(cms).sum() < cms.size  # some sections corrected, some not
