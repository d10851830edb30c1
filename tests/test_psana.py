"""The psana source against psana itself, on the two real XTC2 files (ePix10ka quad, JUNGFRAU 0.5M).

psana is the reference: raw frames, gain decoding and calibration (with constants we inject through
``det.raw._calibconst``) must equal what psana gives. Skipped without psana or without the files.
"""

from __future__ import annotations

import datetime
import functools

import h5py
import numpy as np
import pytest
import yaml

psana = pytest.importorskip("psana")

from gpusmall.backend import Backend  # noqa: E402
from gpusmall.calib import Calibrator  # noqa: E402
from gpusmall.calib.calibrate import calibrate_reference, unit_scale  # noqa: E402
from gpusmall.detectors import get_model  # noqa: E402
from gpusmall.detectors.constants import Constants  # noqa: E402
from gpusmall.errors import ConstantsError, InputError  # noqa: E402
from gpusmall.producer.config import validate_config  # noqa: E402
from gpusmall.sources import open_source  # noqa: E402

FILES = {
    "epixquad": ("test_epix_calib.xtc2", "epix10ka", 7),
    "jungfrau": ("test_jungfrau05M_calib.xtc2", "jungfrau", 3),
}
DETS = list(FILES)


def xtc(data_dir, det):
    path = data_dir / FILES[det][0]
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


def psana_run(path, det):
    """A fresh psana run and det.raw (constants are cached per Detector, so tests make their own)."""
    ds = psana.DataSource(files=str(path), skip_calib_load="all")
    run = next(ds.runs())
    return run, run.Detector(det).raw


#: psana's time origin (``psana.event.epoch``, 1990-01-01) in seconds since the Unix epoch
PSANA_EPOCH_UNIX_S = int((psana.event.epoch - datetime.datetime(1970, 1, 1)).total_seconds())


def psana_frames(path, det):
    """(timestamps, frames) of every event: the timestamps as gpusmall's ``/timestamp`` means them, ns since
    the Unix epoch, from psana's own seconds (since its epoch) and nanoseconds. psana reads each (file,
    detector) once per session (the reference the tests compare with; the files do not change); every call
    gets its own copies."""
    ts, frames = _psana_frames(str(path), det)
    return ts.copy(), frames.copy()


@functools.cache
def _psana_frames(path: str, det: str):
    run, raw = psana_run(path, det)
    ts, frames = [], []
    for evt in run.events():
        ts.append((int(evt._seconds) + PSANA_EPOCH_UNIX_S) * 10**9 + int(evt._nanoseconds))
        frames.append(raw.raw(evt))
    return np.array(ts, np.uint64), np.stack(frames)


def source_cfg(path, det, **det_extra):
    d = {"type": FILES[det][1], "constants": "unused.h5", **det_extra}
    return validate_config(
        {"source": {"type": "psana", "files": [str(path)], "psana": {"skip_calib_load": "all"}}, "detectors": {det: d}}
    )


def read_all(path, det, batch_size=1):
    with open_source(source_cfg(path, det)) as src:
        batches = list(src.batches(batch_size, 0, None))
        info = src.detectors[det]
    return info, batches


def inject(raw, run, det, peds, gain, status=None):
    """Give psana our constants (psana's pixel_gain is ADU/keV, as ours)."""

    def meta(ctype):
        return {"experiment": run.expt, "run": run.runnum, "detector": det, "ctype": ctype}

    status = np.zeros(peds.shape, np.uint64) if status is None else status
    raw._calibconst = {
        "pedestals": (peds.astype(np.float32), meta("pedestals")),
        "pixel_gain": (gain.astype(np.float32), meta("pixel_gain")),
        "pixel_rms": (np.ones(peds.shape, np.float32), meta("pixel_rms")),
        "pixel_status": (status, meta("pixel_status")),
    }


def psana_calib(raw, evt, det):
    """A copy: psana's JUNGFRAU calib (C++ cversion 3) returns its own buffer, overwritten by the next call."""
    if FILES[det][1] == "epix10ka":
        return np.array(raw.calib(evt, cmpars=(7, 0, 100)))  # mode 0: no common mode
    return np.array(raw.calib(evt))  # JUNGFRAU: no common mode unless cmpars are given


# -- the source ---------------------------------------------------------------------------------
@pytest.mark.parametrize("det", DETS)
@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_raw_equals_psana(data_dir, det, batch_size):
    path = xtc(data_dir, det)
    ts, frames = psana_frames(path, det)
    info, batches = read_all(path, det, batch_size)
    assert info.type == FILES[det][1]
    assert info.shape == frames.shape[1:] and info.dtype == frames.dtype
    raw = np.concatenate([b.raw[det] for b in batches])
    np.testing.assert_array_equal(raw, frames)
    np.testing.assert_array_equal(np.concatenate([b.timestamp for b in batches]), ts)
    np.testing.assert_array_equal(np.concatenate([b.event_index for b in batches]), np.arange(len(ts)))
    assert not np.concatenate([b.damaged[det] for b in batches]).any()
    assert all(b.timestamp.dtype == np.uint64 for b in batches)


@pytest.mark.parametrize("det", DETS)
def test_geometry_is_psana_pixel_coords(data_dir, det):
    path = xtc(data_dir, det)
    _, raw = psana_run(path, det)
    x, y, z = raw._pixel_coords()
    info, _ = read_all(path, det)
    for ours, theirs in zip((info.x, info.y, info.z), (x, y, z)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=0.01)


def test_epix10ka_config_bits(data_dir):
    path = xtc(data_dir, "epixquad")
    _, raw = psana_run(path, "epixquad")
    info, _ = read_all(path, "epixquad")
    cb = np.asarray(raw._cbits_config_detector())
    assert info.config_bits.shape == (4, 352, 384) and info.config_bits.dtype == np.uint8
    np.testing.assert_array_equal(info.config_bits, cb & 0x1F)
    assert (info.config_bits == 8).all()  # fixed low gain everywhere in this file
    assert get_model("jungfrau") and read_all(xtc(data_dir, "jungfrau"), "jungfrau")[0].config_bits is None


def test_events_limit_and_source_name(data_dir):
    path = xtc(data_dir, "jungfrau")
    cfg = validate_config(
        {
            "source": {"type": "psana", "files": [str(path)], "events": 1, "psana": {"skip_calib_load": "all"}},
            "detectors": {"jf": {"type": "jungfrau", "source_name": "jungfrau", "constants": "c.h5"}},
        }
    )
    with open_source(cfg) as src:
        assert src.n_events is None
        batches = list(src.batches(4))
    assert sum(len(b) for b in batches) == 1 and batches[0].raw["jf"].shape == (1, 1, 512, 1024)


def test_errors(data_dir):
    path = xtc(data_dir, "jungfrau")
    with pytest.raises(InputError, match="no detector 'nothere'"):
        open_source(source_cfg(path, "jungfrau", source_name="nothere"))
    cfg = validate_config(
        {
            "source": {"type": "psana", "files": [str(path)], "psana": {"skip_calib_load": "all"}},
            "detectors": {"jungfrau": {"type": "epix10ka", "constants": "c.h5"}},
        }
    )
    with pytest.raises(InputError, match="psana says"):
        open_source(cfg)
    cfg = validate_config(
        {
            "source": {"type": "psana", "files": [str(path)], "psana": {"skip_calib_load": "all"}},
            "detectors": {"jungfrau": {"type": "jungfrau"}},
        }
    )
    with pytest.raises(ConstantsError, match="detector jungfrau.*constants:"):
        open_source(cfg)


# -- gain decoding --------------------------------------------------------------------------------
def test_jungfrau_gain_stages_equal_psana(data_dir):
    """psana's decoding per pixel: its calib with pedestal -(g+1)*STEP and unit gain gives v + (g+1)*STEP."""
    from psana.detector import UtilsJungfrau as uj

    path = xtc(data_dir, "jungfrau")
    _, frames = psana_frames(path, "jungfrau")
    run, raw = psana_run(path, "jungfrau")
    step = 20000.0  # > 2**14, exact in float32 up to 3 * step + 2**14
    peds = np.stack([np.full((1, 512, 1024), -(g + 1) * step, np.float32) for g in range(3)])
    inject(raw, run, "jungfrau", peds, np.ones_like(peds))
    model = get_model("jungfrau")
    for i, evt in enumerate(run.events()):
        c = psana_calib(raw, evt, "jungfrau")
        theirs = np.where(c == 0, -1, np.floor(c / step) - 1).astype(np.int8)
        ours = model.gain_index(frames[i][None])[0]
        np.testing.assert_array_equal(ours, theirs)
        n0, n1, n2, nbad = uj.gainrange_statistics(frames[i])
        assert [(ours == g).sum() for g in (0, 1, 2, -1)] == [n0, n1, n2, nbad]
        if i == 0:
            assert {0, 1, 2} <= set(np.unique(ours).tolist())


def test_epix10ka_gain_ranges_equal_psana(data_dir):
    from psana.detector import UtilsEpix10ka as ue

    path = xtc(data_dir, "epixquad")
    info, batches = read_all(path, "epixquad")
    _, raw = psana_run(path, "epixquad")
    cbits = raw._cbits_config_detector()
    model = get_model("epix10ka")
    for b in batches:
        frame = b.raw["epixquad"][0]
        b_all = ue.cbits_config_and_data_detector_alg(frame, cbits, raw._data_gain_bit, raw._gain_bit_shift)
        gmaps = ue.gain_maps_epix10ka_any_alg(b_all)
        theirs = np.select(gmaps, range(7), default=-1)
        ours = model.gain_index(frame[None], info.config_bits)[0]
        np.testing.assert_array_equal(ours, theirs)
        assert (ours == 2).all()


# -- calibration --------------------------------------------------------------------------------
def make_constants(det, frames, kind):
    _, mtype, n = FILES[det]
    shape = frames.shape[1:]
    if kind == "mean":  # pedestal = mean of the events (same for every range), unit gains
        peds = np.broadcast_to((frames & 0x3FFF).mean(axis=0, dtype=np.float64), (n, *shape)).astype(np.float32)
        gain = np.ones((n, *shape), np.float32)
    else:
        rng = np.random.default_rng(7)
        peds = rng.uniform(0, 3000, (n, *shape)).astype(np.float32)
        gain = rng.uniform(0.1, 40, (n, *shape)).astype(np.float32)
    return peds, gain


@pytest.mark.parametrize("det", DETS)
@pytest.mark.parametrize("kind", ["mean", "random"])
def test_calib_equals_psana(data_dir, det, kind):
    path = xtc(data_dir, det)
    _, frames = psana_frames(path, det)
    info, _ = read_all(path, det)
    peds, gain = make_constants(det, frames, kind)
    model = get_model(FILES[det][1])
    mask = np.ones(info.shape, bool)
    ours, good = calibrate_reference(np, model, frames, peds, unit_scale(gain, "kev"), mask, info.config_bits)
    c = Constants(pedestal=peds.copy(), gain=gain.copy(), config_bits=info.config_bits)
    frames_obj = Calibrator(model, c, mask, Backend("numpy"), units="kev", common_mode=None)(frames)
    np.testing.assert_array_equal(frames_obj.data, ours)

    run, raw = psana_run(path, det)
    inject(raw, run, det, peds, gain)
    theirs = np.stack([psana_calib(raw, evt, det) for evt in run.events()])
    assert theirs.shape == ours.shape
    scale = np.abs(theirs).max()
    np.testing.assert_allclose(ours, theirs, rtol=2e-6, atol=2e-6 * scale)


# -- the whole producer -----------------------------------------------------------------------
@pytest.mark.parametrize("det", DETS)
def test_gpusmall_run_on_psana(data_dir, tmp_path, det):
    from gpusmall.cli import main

    path = xtc(data_dir, det)
    ts, frames = psana_frames(path, det)
    peds, gain = make_constants(det, frames, "mean")
    Constants(pedestal=peds, gain=gain).save(tmp_path / "const.h5")
    bounds = [[0, 1], [10, 60], [20, 120]]
    cfg = {
        "source": {"type": "psana", "files": [str(path)], "psana": {"skip_calib_load": "all"}},
        "batch_size": 1,
        "backend": "numpy",
        "output": "out.h5",
        "detectors": {
            det: {
                "type": FILES[det][1],
                "constants": "const.h5",
                "common_mode": {"type": "none"},
                "functions": [{"type": "roi", "name": "roi0", "bounds": bounds}],
                "sums": ["calib"],
            }
        },
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "run.yaml"), "--quiet", "--backend", "numpy"]) == 0
    _, raw = psana_run(path, det)
    x, y, z = raw._pixel_coords()
    with h5py.File(tmp_path / "out.h5", "r") as f:
        np.testing.assert_array_equal(f["timestamp"][()], ts)
        np.testing.assert_array_equal(f["event_index"][()], np.arange(len(ts)))
        # LCLS-I's event_time: POSIX seconds << 32 | ns, the time psana's evt.datetime() gives; fiducials: the index
        et = f["event_time"][()]
        assert et.dtype == np.uint64 and f["fiducials"].dtype == np.int64
        np.testing.assert_array_equal(et >> np.uint64(32), ts // np.uint64(10**9))
        np.testing.assert_array_equal(et & np.uint64(0xFFFFFFFF), ts % np.uint64(10**9))
        np.testing.assert_array_equal(f["fiducials"][()], np.arange(len(ts)))
        run, _ = psana_run(path, det)
        when = [evt.datetime() for evt in run.events()]
        got = [
            datetime.datetime(1970, 1, 1) + datetime.timedelta(seconds=int(s), microseconds=int(ns) / 1000)
            for s, ns in zip(et >> np.uint64(32), et & np.uint64(0xFFFFFFFF))
        ]
        assert got == when
        assert f[f"{det}/damaged"].shape == (len(ts),) and not f[f"{det}/damaged"][()].any()
        assert f[f"{det}/roi0_sum"].shape[0] == len(ts)
        for k, a in zip("xyz", (x, y, z)):
            np.testing.assert_allclose(f[f"UserDataCfg/{det}/{k}"][()], a, rtol=1e-6, atol=0.01)
        np.testing.assert_array_equal(f[f"UserDataCfg/{det}/segments"][()], raw._segment_numbers)
        assert f[f"Sums/{det}_calib"].shape == frames.shape[1:]
        assert f.attrs["events"] == len(ts)


def test_constants_from_psana(data_dir):
    """Without a constants file the source takes psana's own constants (here: ones we inject)."""
    from gpusmall.sources.psana import PsanaSource

    path = xtc(data_dir, "jungfrau")
    run, raw = psana_run(path, "jungfrau")
    peds, gain = make_constants("jungfrau", psana_frames(path, "jungfrau")[1], "random")
    status = np.zeros(peds.shape, np.uint64)
    status[1, 0, 5, 7] = 4
    inject(raw, run, "jungfrau", peds, gain, status)
    c = PsanaSource._psana_constants(None, "jungfrau", raw, get_model("jungfrau"), (1, 512, 1024))
    np.testing.assert_array_equal(c.pedestal, peds)
    np.testing.assert_array_equal(c.gain, gain)
    assert c.status.shape == (1, 512, 1024) and c.status.sum() == 1 and c.status[0, 5, 7] == 1


def test_example_config_runs(data_dir, tmp_path):
    """producers/psana_jungfrau.yaml validates and reduces the JUNGFRAU file (with constants we make)."""
    from pathlib import Path

    from gpusmall.backend import Backend
    from gpusmall.producer.config import load_config
    from gpusmall.producer.run import reduce_run

    cfg = load_config(Path(__file__).resolve().parents[1] / "producers" / "psana_jungfrau.yaml")
    path = xtc(data_dir, "jungfrau")
    if not Path(cfg.source.files[0]).is_file():
        cfg.source.files = [str(path)]
    peds, gain = make_constants("jungfrau", psana_frames(path, "jungfrau")[1], "mean")
    Constants(pedestal=peds, gain=gain).save(tmp_path / "c.h5")
    cfg.detectors["jungfrau"].constants = str(tmp_path / "c.h5")
    summary = reduce_run(cfg, Backend("numpy"), output=tmp_path / "out.h5", quiet=True)
    assert summary.events == 2
    with h5py.File(tmp_path / "out.h5", "r") as f:
        assert f["jungfrau/roi0_sum"].shape == (2,) and f["jungfrau/roi0_pj_ax_1_data"].shape[0] == 2


def test_missing_or_bad_frames_are_damaged(data_dir):
    path = xtc(data_dir, "jungfrau")
    with open_source(source_cfg(path, "jungfrau")) as src:
        real = src.dets["jungfrau"]

        class Flaky:  # event 0: no data; event 1: data of the wrong shape
            calls = 0

            def raw(self, evt):
                Flaky.calls += 1
                return None if Flaky.calls == 1 else real.raw(evt)[:, :256]

        src.dets["jungfrau"] = Flaky()
        (batch,) = list(src.batches(8))
    assert batch.damaged["jungfrau"].tolist() == [True, True]
    assert not batch.raw["jungfrau"].any() and len(batch) == 2


def test_read_fills_the_runs_host_buffers(data_dir):
    """The producer's (pinned) buffers are filled in place; a damaged row in them is zeroed."""
    path = xtc(data_dir, "jungfrau")
    _, frames = psana_frames(path, "jungfrau")
    buf = {"jungfrau": np.full((4, *frames.shape[1:]), 7, np.uint16)}
    with open_source(source_cfg(path, "jungfrau")) as src:
        batch = src.read(0, 4, out=buf)
    assert len(batch) == 2 and np.shares_memory(batch.raw["jungfrau"], buf["jungfrau"])
    np.testing.assert_array_equal(buf["jungfrau"][:2], frames)
    with open_source(source_cfg(path, "jungfrau")) as src:
        src.dets["jungfrau"] = type("NoData", (), {"raw": lambda self, evt: None})()
        batch = src.read(0, 4, out=buf)
    assert batch.damaged["jungfrau"].all() and not buf["jungfrau"][:2].any()
