"""Event context from psana runs (SPEC 10): light status, step scans, EPICS PVs, configured values.

The run is built here with psana's own tools: ``xtcwriter -t`` writes a run with 3 steps of 4 events, scan
variables (``motor1`` float32, ``motor2`` float64), two EPICS PVs updated by SlowUpdates and a small ``cspad``;
psana's ``DgramEdit`` then adds a timing detector (``ts`` ``raw`` 2.1.0, the class psana gives LCLS-II timing:
``eventcodes``, ``destination``, ``ebeamPresent``) to every event but one, and the step and PV values are
rewritten in place so that they change from step to step (xtcwriter writes the same ones everywhere).
psana's own step loop is the reference; the builder's numbers are checked too. Skipped without psana.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

psana = pytest.importorskip("psana")

from gpusmall.errors import InputError  # noqa: E402
from gpusmall.producer.config import validate_config  # noqa: E402
from gpusmall.sources.context import MISSING_STATUS  # noqa: E402
from gpusmall.sources.psana import PsanaSource  # noqa: E402
from gpusmall.sources.psana_context import light_status  # noqa: E402

N_STEPS, PER_STEP, SLOW_EVERY = 3, 4, 3
N_EVENTS = N_STEPS * PER_STEP
NO_TIMING = 5  # the event without timing data
PV_CHANGING, PV_STRING = "HX2_DVD_GCC_01_PMON", "HX2_DVD_GPI_01_PMON"  # xtcwriter's PVs, ':' made '_'


def tool(name) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    cand = Path(psana.__file__).resolve().parents[1] / "bin" / name
    return str(cand) if cand.is_file() else None


def timing_of(i):
    """What the builder writes for event i: (event code, destination, beam present, pulse id)."""
    return 272 + i % 3, i % 4, i % 2, 1000 + i


def build_run(path: Path) -> None:
    """The test run (module docstring) at ``path``."""
    from psana import dgram
    from psana.dgram import Dgram
    from psana.dgramedit import AlgDef, DetectorDef, DgramEdit
    from psana.psexp import TransitionId

    src = path.with_suffix(".in.xtc2")
    subprocess.run(
        [
            tool("xtcwriter"),
            "-f",
            str(src),
            "-t",
            "-n",
            str(PER_STEP),
            "-s",
            "0",
            "-e",
            str(SLOW_EVERY),
            "-m",
            str(N_STEPS),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    bufsize = 1 << 22
    fd = os.open(src, os.O_RDONLY)
    size, config = os.path.getsize(src), Dgram(file_descriptor=fd)
    off = memoryview(config).nbytes
    cbuf = bytearray(bufsize)
    cbuf[: config._size] = config
    cfg_edit = DgramEdit(dgram.Dgram(view=memoryview(cbuf), offset=0), bufsize=bufsize)
    timing = cfg_edit.Detector(
        DetectorDef("timing", "ts", "ts0"),
        AlgDef("raw", 2, 1, 0),
        {
            "pulseId": (np.uint64, 0),
            "timeStamp": (np.uint64, 0),
            "ebeamPresent": (np.uint8, 0),
            "ebeamDestn": (np.uint8, 0),
            "sequenceValues": (np.uint16, 1),
        },
    )
    out, ebuf = bytearray(bufsize), bytearray(bufsize)
    cfg_edit.save(out)
    blob = bytes(out[: cfg_edit.size])
    for pv in (b"HX2:DVD:GCC:01:PMON", b"HX2:DVD:GPI:01:PMON"):  # aliases as gpusmall's config names take them
        blob = blob.replace(pv, pv.replace(b":", b"_"))

    def patched(d, fmt, old, new):
        b = bytes(memoryview(d))
        pat = struct.pack(fmt, old)
        assert b.count(pat) == 1
        return b.replace(pat, struct.pack(fmt, new))

    n_step = n_evt = n_slow = 0
    with open(path, "wb") as f:
        f.write(blob)
        while off < size:
            d = Dgram(config=config)
            off += memoryview(d).nbytes
            svc = d.service()
            if svc == TransitionId.BeginStep:  # motor1 (float32) = 10 + step, motor2 (float64) = -2.5 step
                b = patched(d, "<f", 41.0, 10.0 + n_step)
                pat = struct.pack("<d", 42.0)
                f.write(b.replace(pat, struct.pack("<d", -2.5 * n_step)))
                n_step += 1
            elif svc == TransitionId.SlowUpdate:  # the changing PV: 100, 101, ...
                f.write(patched(d, "<d", 41.0, 100.0 + n_slow))
                n_slow += 1
            elif svc == TransitionId.L1Accept:
                ebuf[: d._size] = d
                ed = DgramEdit(
                    Dgram(config=config, view=memoryview(ebuf), offset=0), config_dgramedit=cfg_edit, bufsize=bufsize
                )
                if n_evt != NO_TIMING:
                    code, dest, present, pid = timing_of(n_evt)
                    seq = np.zeros(18, np.uint16)
                    seq[code >> 4] |= 1 << (code & 15)
                    timing.raw.pulseId, timing.raw.timeStamp = np.uint64(pid), np.uint64(0)
                    timing.raw.ebeamPresent, timing.raw.ebeamDestn = np.uint8(present), np.uint8(dest)
                    timing.raw.sequenceValues = seq
                    ed.adddata(timing.raw)
                ed.save(out)
                f.write(out[: ed.size])
                n_evt += 1
            else:
                f.write(memoryview(d))
    os.close(fd)
    assert (n_step, n_evt) == (N_STEPS, N_EVENTS)


@pytest.fixture(scope="module")
def run_file(tmp_path_factory):
    if tool("xtcwriter") is None:
        pytest.skip("psana's xtcwriter is not installed")
    path = tmp_path_factory.mktemp("psana_context") / "steps.xtc2"
    build_run(path)
    return path


def open_psana(path, context=None, **source):
    """PsanaSource on ``path`` with the config's ``context`` block (the cspad read as a camera)."""
    cfg = validate_config(
        {
            "source": {"type": "psana", "files": [str(path)], "psana": {"skip_calib_load": "all"}, **source},
            "detectors": {"xppcspad": {"type": "camera"}},
            **({"context": context} if context else {}),
        }
    )
    dets = {
        n: {"type": d.type, "shape": None, "shape_given": False, "constants": None, "source_name": None}
        for n, d in cfg.detectors.items()
    }
    return PsanaSource(cfg.source, dets, context=cfg.context)


def read_context(path, context=None, batch_size=5, **source):
    with open_psana(path, context, **source) as src:
        names = dict(src.context)
        batches = list(src.batches(batch_size))
        once = src.context_once()
    for b in batches:
        assert set(b.context) == set(names)
        assert all(v.dtype == names[k] and v.shape == (len(b),) for k, v in b.context.items())
    ctx = {k: np.concatenate([b.context[k] for b in batches]) for k in names}
    return names, ctx, np.concatenate([b.timestamp for b in batches]), once


def psana_reference(path):
    """Per event, from psana's own step loop: step index, motor1, motor2 (read with the step), the changing PV,
    the event codes present, destination, ebeamPresent and pulse id (None without timing data)."""
    run = next(psana.DataSource(files=str(path), skip_calib_load="all").runs())
    m1, m2, pv, t = (run.Detector(n) for n in ("motor1", "motor2", PV_CHANGING, "timing"))
    rows = []
    for i, step in enumerate(run.steps()):
        s1, s2 = m1(step), m2(step)
        for evt in step.events():
            info = t.raw._info(evt)
            timing = (
                None
                if info is None
                else (
                    set(np.flatnonzero(t.raw.eventcodes(evt)).tolist()),
                    t.raw.destination(evt),
                    info.ebeamPresent,
                    t.raw.pulseId(evt),
                )
            )
            rows.append((i, s1, s2, pv(evt), timing))
    return rows


# -- the decoding ---------------------------------------------------------------------------------
def codes_with(*present):
    c = [0] * 288
    for k in present:
        c[k] = 1
    return c


def test_light_status_decoding():
    """smalldata_tools' lcls2 rules, on hand-made event codes, destinations and beam-present flags."""
    # x-ray: the destination given, or (None) the beam-present flag
    assert light_status(codes_with(), 4, 0, xray_destination=4, laser_codes=[])[0] == 1
    assert light_status(codes_with(), 3, 1, xray_destination=4, laser_codes=[])[0] == 0
    assert light_status(codes_with(), 3, 1, xray_destination=None, laser_codes=[])[0] == 1
    assert light_status(codes_with(), 4, 0, xray_destination=None, laser_codes=[])[0] == 0
    assert light_status(codes_with(), None, None, 4, [])[0] == MISSING_STATUS
    assert light_status(codes_with(), 4, None, None, [])[0] == MISSING_STATUS
    # laser: a positive code present = off (dropped shot)
    assert light_status(codes_with(), 0, 1, None, [273])[1] == 1
    assert light_status(codes_with(273), 0, 1, None, [273])[1] == 0
    assert light_status(codes_with(272), 0, 1, None, [273])[1] == 1
    assert light_status(codes_with(91), 0, 1, None, [90, 91])[1] == 0  # any drop code, not only the last
    # a negative code -c: on only when c is present (the config's default: -272)
    assert light_status(codes_with(272), 0, 1, None, [-272])[1] == 1
    assert light_status(codes_with(273), 0, 1, None, [-272])[1] == 0
    assert light_status(codes_with(280), 0, 1, None, [-272, -280])[1] == 1
    # both kinds: a requested code present and no drop code
    assert light_status(codes_with(272), 0, 1, None, [-272, 274])[1] == 1
    assert light_status(codes_with(272, 274), 0, 1, None, [-272, 274])[1] == 0
    assert light_status(codes_with(274), 0, 1, None, [-272, 274])[1] == 0
    # no code configured: on; no codes in the event: missing
    assert light_status(codes_with(), 0, 1, None, [])[1] == 1
    assert light_status(None, 0, 1, None, [-272]) == (1, MISSING_STATUS)


# -- against psana's step loop --------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [1, 3, 5, 64])
def test_scan_steps_equal_psana_step_loop(run_file, batch_size):
    ref = psana_reference(run_file)
    names, ctx, ts, _ = read_context(run_file, batch_size=batch_size)
    assert {"scan/varStep": np.int64, "scan/motor1": np.float64, "scan/motor2": np.float64}.items() <= names.items()
    assert len(ts) == N_EVENTS and np.all(np.diff(ts.astype(np.int64)) > 0)
    np.testing.assert_array_equal(ctx["scan/varStep"], [r[0] for r in ref])
    np.testing.assert_array_equal(ctx["scan/motor1"], [r[1] for r in ref])
    np.testing.assert_array_equal(ctx["scan/motor2"], [r[2] for r in ref])
    step = np.repeat(np.arange(N_STEPS), PER_STEP)  # what the builder wrote
    np.testing.assert_array_equal(ctx["scan/varStep"], step)
    np.testing.assert_array_equal(ctx["scan/motor1"], 10.0 + step)
    np.testing.assert_array_equal(ctx["scan/motor2"], -2.5 * step)


def test_events_limit_keeps_step_values(run_file):
    _, ctx, ts, _ = read_context(run_file, batch_size=4, events=6)
    assert len(ts) == 6
    np.testing.assert_array_equal(ctx["scan/varStep"], [0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(ctx["scan/motor1"], [10, 10, 10, 10, 11, 11])


def test_light_status_defaults(run_file):
    """No config: on (the run has 'timing'); x-ray = beam present, laser on only with code 272."""
    ref = psana_reference(run_file)
    names, ctx, _, _ = read_context(run_file)
    assert names["lightStatus/xray"] == np.uint8 and names["lightStatus/laser"] == np.uint8
    want_x = [MISSING_STATUS if r[4] is None else int(r[4][2]) for r in ref]
    want_l = [MISSING_STATUS if r[4] is None else int(272 in r[4][0]) for r in ref]
    np.testing.assert_array_equal(ctx["lightStatus/xray"], want_x)
    np.testing.assert_array_equal(ctx["lightStatus/laser"], want_l)
    built = [timing_of(i) for i in range(N_EVENTS)]
    np.testing.assert_array_equal(
        ctx["lightStatus/xray"], [MISSING_STATUS if i == NO_TIMING else b[2] for i, b in enumerate(built)]
    )
    np.testing.assert_array_equal(
        ctx["lightStatus/laser"], [MISSING_STATUS if i == NO_TIMING else int(b[0] == 272) for i, b in enumerate(built)]
    )


def test_light_status_configured(run_file):
    ref = psana_reference(run_file)
    _, ctx, _, _ = read_context(run_file, {"light_status": {"xray_destination": 2, "laser_codes": [-272, 274]}})
    want_x = [MISSING_STATUS if r[4] is None else int(r[4][1] == 2) for r in ref]
    want_l = [MISSING_STATUS if r[4] is None else int(272 in r[4][0] and 274 not in r[4][0]) for r in ref]
    np.testing.assert_array_equal(ctx["lightStatus/xray"], want_x)
    np.testing.assert_array_equal(ctx["lightStatus/laser"], want_l)
    assert ctx["lightStatus/xray"].tolist() == [0, 0, 1, 0, 0, 255, 1, 0, 0, 0, 1, 0]
    _, ctx, _, _ = read_context(run_file, {"light_status": {"laser_codes": [273]}})
    assert ctx["lightStatus/laser"].tolist() == [1, 0, 1, 1, 0, 255, 1, 0, 1, 1, 0, 1]


def test_epics_per_event_and_once(run_file):
    ref = psana_reference(run_file)
    names, ctx, _, once = read_context(run_file, {"epics": [PV_CHANGING, PV_STRING]})
    assert names[f"epics/{PV_CHANGING}"] == np.float64
    want = np.array([np.nan if r[3] is None else r[3] for r in ref])
    np.testing.assert_array_equal(ctx[f"epics/{PV_CHANGING}"], want)
    # the builder: a SlowUpdate after the 3rd event of each step sets 100, 101, 102; none before the first
    np.testing.assert_array_equal(ctx[f"epics/{PV_CHANGING}"], [np.nan] * 3 + [100] * 4 + [101] * 4 + [102])
    assert np.isnan(ctx[f"epics/{PV_STRING}"]).all()  # a string PV is no number
    assert once == {f"epicsOnce/{PV_STRING}": "Test String"}  # the changing one is not run-constant


def test_values_call_psana_with_the_event(run_file):
    names, ctx, _, _ = read_context(
        run_file, {"values": {"timing/pulse": "timing.raw.pulseId", "scan/delay": "timing.raw.destination"}}
    )
    assert names["timing/pulse"] == np.float64
    want = [np.nan if i == NO_TIMING else timing_of(i)[3] for i in range(N_EVENTS)]
    np.testing.assert_array_equal(ctx["timing/pulse"], want)
    np.testing.assert_array_equal(
        ctx["scan/delay"], [np.nan if i == NO_TIMING else timing_of(i)[1] for i in range(N_EVENTS)]
    )


def test_off_and_no_context(run_file, data_dir):
    """false turns each off (the run is then read with run.events(), all events); a run without timing and scans
    carries no context."""
    names, ctx, ts, _ = read_context(run_file, {"light_status": False, "scan": False})
    assert names == {} and ctx == {} and len(ts) == N_EVENTS
    names, _, _, _ = read_context(run_file, {"scan": False})
    assert set(names) == {"lightStatus/xray", "lightStatus/laser"}
    path = data_dir / "test_jungfrau05M_calib.xtc2"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    cfg = validate_config(
        {
            "source": {"type": "psana", "files": [str(path)], "psana": {"skip_calib_load": "all"}},
            "detectors": {"jungfrau": {"type": "jungfrau", "constants": "c.h5"}},
        }
    )
    dets = {"jungfrau": {"type": "jungfrau", "shape": None, "shape_given": False, "constants": "c.h5"}}
    with PsanaSource(cfg.source, dets, context=cfg.context) as src:
        assert src.context == {} and src.context_once() == {}
        (batch,) = list(src.batches(8))
    assert batch.context == {} and len(batch) == 2
    with pytest.raises(InputError, match=r"context\.light_status\.timing: .*'timing'.*jungfrau"):
        PsanaSource(cfg.source, dets, context=cfg.context.model_copy(update={"light_status": True}))
    with pytest.raises(InputError, match=r"context\.scan: true"):
        PsanaSource(cfg.source, dets, context=cfg.context.model_copy(update={"scan": True}))


def test_errors_name_the_config_key(run_file):
    with pytest.raises(InputError, match=rf"context\.epics\[1\]: 'NOPE'.*{PV_CHANGING}, {PV_STRING}"):
        open_psana(run_file, {"epics": [PV_CHANGING, "NOPE"]})
    with pytest.raises(InputError, match=r"context\.values\.ipm/sum: .*no detector 'gmd'.*timing"):
        open_psana(run_file, {"values": {"ipm/sum": "gmd.raw.milliJoulesPerPulse"}})
    with pytest.raises(InputError, match=r"context\.values\.ipm/sum: .*timing\.raw has no 'nothing'.*eventcodes"):
        open_psana(run_file, {"values": {"ipm/sum": "timing.raw.nothing"}})
    with pytest.raises(InputError, match=r"context\.light_status\.timing: .*'evr'"):
        open_psana(run_file, {"light_status": {"timing": "evr"}})
    with pytest.raises(InputError, match=r"context\.light_status\.laser_codes: \[300\]"):
        open_psana(run_file, {"light_status": {"laser_codes": [-272, 300]}})


def test_one_bad_event_is_missing_not_fatal(run_file):
    """A value psana fails on (here: pulseId without timing data raises) is missing for that event only."""
    with open_psana(run_file, {"values": {"timing/pulse": "timing.raw.pulseId"}}) as src:
        real = src.ctx.values["timing/pulse"]
        calls = []

        def flaky(evt):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("psana hiccup")
            return real(evt)

        src.ctx.values["timing/pulse"] = flaky
        ctx = np.concatenate([b.context["timing/pulse"] for b in src.batches(4)])
    assert np.isnan(ctx[[1, NO_TIMING]]).all() and np.isfinite(np.delete(ctx, [1, NO_TIMING])).all()
    np.testing.assert_array_equal(ctx[0], 1000)


def test_open_source_passes_the_context_block(run_file):
    """The run's ``context`` block reaches PsanaSource through open_source."""
    from gpusmall.sources import open_source

    cfg = validate_config(
        {
            "source": {"type": "psana", "files": [str(run_file)], "psana": {"skip_calib_load": "all"}},
            "detectors": {"xppcspad": {"type": "camera"}},
            "context": {"epics": [PV_CHANGING]},
        }
    )
    with open_source(cfg) as src:
        assert f"epics/{PV_CHANGING}" in src.context


MPI_SCRIPT = """
import json, sys
from mpi4py import MPI
from gpusmall.producer.config import validate_config
from gpusmall.sources.psana import PsanaSource
cfg = validate_config({"source": {"type": "psana", "exp": "xpptut15", "run": 14,
                                  "psana": {"skip_calib_load": "all", "dir": sys.argv[1], "batch_size": 1}},
                       "detectors": {"xppcspad": {"type": "camera", "shape": [2, 3, 6]}}})
dets = {"xppcspad": {"type": "camera", "shape": (2, 3, 6), "shape_given": True, "constants": None}}
src = PsanaSource(cfg.source, dets, context=cfg.context)
rows = [[int(b.timestamp[i]), int(b.context["scan/varStep"][i]), float(b.context["scan/motor1"][i])]
        for b in src.batches(2) for i in range(len(b))]
rows = MPI.COMM_WORLD.gather(rows, root=0)
if MPI.COMM_WORLD.Get_rank() == 0:
    print("ROWS", json.dumps(rows))
"""


def test_steps_under_psana_mpi_distribution(run_file, tmp_path):
    """mpiexec -n 4, one event per psana batch: the two reducing ranks walk every step, so each event carries
    its step index and values as in one process."""
    import json
    import sys

    from test_mpi import env, have_mpi

    why = have_mpi()
    if why or tool("smdwriter") is None:
        pytest.skip(why or "psana's smdwriter is not installed")
    xtc = tmp_path / "xtc"
    (xtc / "smalldata").mkdir(parents=True)
    big = xtc / "xpptut15-r0014-s000-c000.xtc2"
    shutil.copyfile(run_file, big)
    subprocess.run(
        [tool("smdwriter"), "-f", str(big), "-o", str(xtc / "smalldata" / "xpptut15-r0014-s000-c000.smd.xtc2")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    (tmp_path / "check.py").write_text(MPI_SCRIPT)
    p = subprocess.run(
        ["mpiexec", "-n", "4", sys.executable, str(tmp_path / "check.py"), str(xtc)],
        check=False,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    per_rank = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("ROWS ")][-1][5:])
    assert per_rank[0] == [] and per_rank[1] == [] and sum(len(r) > 0 for r in per_rank[2:]) == 2
    got = sorted(row for rows in per_rank for row in rows)
    _, ctx, ts, _ = read_context(run_file)
    assert [r[0] for r in got] == ts.tolist()
    assert [r[1] for r in got] == ctx["scan/varStep"].tolist()
    assert [r[2] for r in got] == ctx["scan/motor1"].tolist()
