"""gpusmall's CPU calibration (its CPU kernels and the pure NumPy path) against psana's own ``det.raw.calib``,
on one core, on the real XTC2 files (../shared/data: JUNGFRAU 0.5M, ePix10ka quad) with the same constants.

Run (one core; the script pins itself to --core and sets NUMBA_NUM_THREADS=1 unless already set):

    taskset -c 0 python benchmarks/bench_cpu_vs_psana.py [--batch 64] [--rounds 7] [--compile-time]

Four cases, each in a process of its own (psana keeps the first call's kwargs per detector): JUNGFRAU 0.5M and
ePix10ka quad without common mode, and with the median rows + cols (psana ``cmpars`` (7, 3, 100) for ePix10ka;
(7, 3, 100, 10) with ``cversion=0`` for JUNGFRAU, whose default C++ calibration ignores ``cmpars``).
psana gets our constants through ``det.raw._calibconst`` (as tests/test_psana.py does: random pedestals and
gains per range, keV out) and calibrates each event of the file in turn, ``--batch`` events per round; gpusmall
calibrates the same events as one batch of ``--batch`` (the file's events repeated), with glibc keeping freed
memory as ``gpusmall run`` does (``producer/allocator.py``: each output reuses the previous batch's pages).
Each round times psana, the CPU kernels (``calib/simd_calib.py`` where a C++ compiler built it, numba's
otherwise; with the common mode numba's halves around ``calib/simd_median.py``'s steps), the NumPy path
(``cpu = None``) and ``np.copyto`` of the same bytes (raw uint16 in + float32 out: (raw + out) / 2 bytes copied,
i.e. that much read and written), one after the other in this one process; the table gives the median over
rounds and the range. GB/s counts raw in + float32 out. ``--compile-time`` also times the first calibration
in two fresh processes with empty numba and C++ caches (compile, then load the caches).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NUMBA_NUM_THREADS", "1")
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FILES = {"jungfrau": ("test_jungfrau05M_calib.xtc2", "jungfrau", 3),
         "epixquad": ("test_epix_calib.xtc2", "epix10ka", 7)}


def psana_setup(path, det, peds, gain):
    """(det.raw, events) with our constants injected (tests/test_psana.py inject)."""
    import psana

    ds = psana.DataSource(files=str(path), skip_calib_load="all")
    run = next(ds.runs())
    raw = run.Detector(det).raw

    def meta(ctype):
        return {"experiment": run.expt, "run": run.runnum, "detector": det, "ctype": ctype}

    raw._calibconst = {
        "pedestals": (peds.astype(np.float32), meta("pedestals")),
        "pixel_gain": (gain.astype(np.float32), meta("pixel_gain")),
        "pixel_rms": (np.ones(peds.shape, np.float32), meta("pixel_rms")),
        "pixel_status": (np.zeros(peds.shape, np.uint64), meta("pixel_status")),
    }
    events = list(run.events())
    frames = np.stack([raw.raw(e) for e in events])
    cfg = np.asarray(raw._cbits_config_detector()) & 0x1F if FILES[det][1] == "epix10ka" else None
    return raw, events, frames, cfg


def one_case(det, cm, batch, rounds, data_dir):
    from gpusmall.backend import Backend
    from gpusmall.calib import Calibrator
    from gpusmall.calib.common_mode import MedianCommonMode
    from gpusmall.detectors import get_model
    from gpusmall.detectors.constants import Constants

    fname, mtype, n = FILES[det]
    model = get_model(mtype)
    path = data_dir / fname
    rng = np.random.default_rng(7)
    # constants as tests/test_psana.py make_constants("random")
    shape = {"jungfrau": (1, 512, 1024), "epixquad": (4, 352, 384)}[det]
    peds = rng.uniform(0, 3000, (n, *shape)).astype(np.float32)
    gain = rng.uniform(0.1, 40, (n, *shape)).astype(np.float32)
    praw, events, frames, cfg = psana_setup(path, det, peds, gain)
    if mtype == "epix10ka":
        kw = {"cmpars": (7, 3, 100) if cm else (7, 0, 100)}  # psana: mode 3 = rows + cols, 0 = none
    else:  # psana's JUNGFRAU: mode bits 1 rows of a bank (64), 2 columns of a half (256), gain range 0 only;
        # its default (C++, cversion 3) ignores cmpars: the common mode is in its Python path, cversion 0
        kw = {"cmpars": (7, 3, 100, 10), "cversion": 0} if cm else {}
    praw.calib(events[0], **kw)  # psana loads and prepares its constants on the first call

    consts = Constants(pedestal=peds, gain=gain, config_bits=None if cfg is None else cfg.astype(np.uint8))
    mask = np.ones(shape, bool)
    cmode = (MedianCommonMode(model, shape[-2:], ["rows", "cols"], max_correction=100, min_pixels=10,
                              gain_ranges="high") if cm else None)
    cal = Calibrator(model, consts, mask, Backend("numpy"), units="kev", common_mode=cmode)
    ref = Calibrator(model, consts, mask, Backend("numpy"), units="kev", common_mode=cmode)
    ref.cpu = None  # the pure NumPy path
    assert cal.cpu is not None, "CPU kernels not in use"
    raw_b = np.ascontiguousarray(frames[np.arange(batch) % len(frames)])
    got, want = cal(raw_b), ref(raw_b)  # also the first call (compile or cache load)
    identical = (np.array_equal(got.data.view(np.uint32), want.data.view(np.uint32))
                 and np.array_equal(got.good, want.good))
    if not cm:
        theirs = np.stack([np.array(praw.calib(e, **kw)) for e in events])
        np.testing.assert_allclose(got.data[: len(events)], theirs, rtol=2e-6, atol=2e-6 * np.abs(theirs).max())
    nbytes = raw_b.nbytes + raw_b.size * 4
    src = np.random.default_rng(1).integers(0, 255, nbytes // 2, dtype=np.uint8)
    dst = np.empty_like(src)
    times = {"psana": [], "cpu": [], "numpy": [], "copy": []}
    for _ in range(rounds + 1):  # round 0 warms up (first touch of the output pages): not counted
        t = time.perf_counter()
        for i in range(batch):
            praw.calib(events[i % len(events)], **kw)
        times["psana"].append(time.perf_counter() - t)
        t = time.perf_counter()
        cal(raw_b)
        times["cpu"].append(time.perf_counter() - t)
        t = time.perf_counter()
        ref(raw_b)
        times["numpy"].append(time.perf_counter() - t)
        t = time.perf_counter()
        np.copyto(dst, src)
        times["copy"].append(time.perf_counter() - t)
    t = {k: np.array(v[1:]) for k, v in times.items()}
    return {"det": det, "cm": cm, "batch": batch, "nbytes": nbytes, "identical": identical, "times": t}


def fmt(res):
    b, nb, t = res["batch"], res["nbytes"], res["times"]
    eps = {k: b / v for k, v in t.items()}
    gbs = {k: nb / v / 1e9 for k, v in t.items()}
    ratio = t["psana"] / t["cpu"]  # per round, same round
    ratio_np = t["psana"] / t["numpy"]
    frac = t["copy"] / t["cpu"]

    def rng(a, f="{:.0f}"):
        return f"{f.format(np.median(a))} ({f.format(a.min())}-{f.format(a.max())})"

    name = {"jungfrau": "JUNGFRAU 0.5M", "epixquad": "ePix10ka quad"}[res["det"]]
    name += ", median rows+cols" if res["cm"] else ", no common mode"
    return (f"| {name} | {rng(eps['psana'])} | {rng(eps['numpy'])} | {rng(eps['cpu'])} | "
            f"{rng(ratio, '{:.2f}')}x (NumPy {np.median(ratio_np):.2f}x) | {rng(gbs['cpu'], '{:.2f}')} | "
            f"{rng(gbs['copy'], '{:.1f}')} | {100 * np.median(frac):.0f}% | "
            f"{'yes' if res['identical'] else 'NO'} |")


HEADER = ("| case | psana events/s | gpusmall NumPy events/s | gpusmall CPU kernels events/s | CPU / psana | "
          "CPU GB/s | np.copyto GB/s | CPU / copy | CPU == NumPy bits |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")

COMPILE_SNIPPET = """
import time, numpy as np
t0 = time.perf_counter()
from gpusmall.backend import Backend
from gpusmall.calib import Calibrator
from gpusmall.detectors import get_model
from gpusmall.detectors.constants import Constants
from gpusmall.funcs.sums import RunSums
t1 = time.perf_counter()
out = []
for det, shape in (("jungfrau", (1, 512, 1024)), ("epix10ka", (4, 352, 384))):
    m = get_model(det)
    ped = np.zeros((m.n_gains, *shape), np.float32); gain = np.ones_like(ped)
    cfg = np.full(shape, 8, np.uint8) if det == "epix10ka" else None
    cal = Calibrator(m, Constants(pedestal=ped, gain=gain, config_bits=cfg), np.ones(shape, bool), Backend("numpy"))
    raw = np.zeros((2, *shape), np.uint16)
    t = time.perf_counter(); cal(raw); out.append(time.perf_counter() - t)
    t = time.perf_counter(); cal(raw); out.append(time.perf_counter() - t)
rs = RunSums(["calib", "square", "max", "nhits_thresADU10"], (1, 512, 1024), Backend("numpy"))
t = time.perf_counter(); rs.update(np.zeros((2, 1, 512, 1024), np.float32)); out.append(time.perf_counter() - t)
print(" ".join(f"{v:.3f}" for v in out))
"""


def compile_times():
    """(first-call seconds with an empty cache, with the cache) per kernel group, in fresh processes."""
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, NUMBA_CACHE_DIR=d, GPUSMALL_CACHE_DIR=d)  # numba's and the C++ kernels' caches
        runs = []
        for _ in range(2):
            r = subprocess.run([sys.executable, "-c", COMPILE_SNIPPET], env=env, capture_output=True, text=True,
                               check=True, cwd=Path(__file__).resolve().parents[1])
            runs.append([float(x) for x in r.stdout.split()])
    return runs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--core", type=int, default=None, help="pin to this core (default: as started, e.g. taskset)")
    ap.add_argument("--no-cm", action="store_true", help="skip the common-mode cases")
    ap.add_argument("--compile-time", action="store_true")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("GPUSMALL_TEST_DATA", DATA)))
    ap.add_argument("--case", help=argparse.SUPPRESS)  # det:cm, one case in this process (see below)
    a = ap.parse_args(argv)
    if a.core is not None:
        os.sched_setaffinity(0, {a.core})
    from gpusmall.producer.allocator import keep_freed_memory

    keep_freed_memory()  # as `gpusmall run` does: a batch's output reuses the previous one's pages
    print(f"cores: {sorted(os.sched_getaffinity(0))}, NUMBA_NUM_THREADS={os.environ['NUMBA_NUM_THREADS']}, "
          f"batch {a.batch}, {a.rounds} rounds")
    if a.case:
        det, cm = a.case.split(":")
        print(fmt(one_case(det, cm == "1", a.batch, a.rounds, a.data)), flush=True)
        return
    # each case in a process of its own: psana keeps the first call's calib kwargs (cmpars) per detector
    # for the whole process, so a second case with other cmpars would silently run the first one's
    rows = []
    cases = [("jungfrau", False), ("epixquad", False)] + ([] if a.no_cm else [("jungfrau", True), ("epixquad", True)])
    for det, cm in cases:
        r = subprocess.run([sys.executable, __file__, "--case", f"{det}:{int(cm)}", "--batch", str(a.batch),
                            "--rounds", str(a.rounds), "--data", str(a.data)], capture_output=True, text=True,
                           check=True)
        rows.append([line for line in r.stdout.splitlines() if line.startswith("| ")][-1])
        print(rows[-1], flush=True)
    print()
    print(HEADER)
    print("\n".join(rows))
    if a.compile_time:
        (c_jf, w_jf, c_ep, w_ep, c_sum), (l_jf, _, l_ep, _, l_sum) = compile_times()
        print(f"\nfirst call, empty caches (compile): JUNGFRAU {c_jf:.2f} s, ePix10ka {c_ep:.2f} s, "
              f"run sums {c_sum:.2f} s; from the cache (next process): {l_jf:.2f} s, {l_ep:.2f} s, {l_sum:.2f} s; "
              f"second call {w_jf * 1e3:.1f} ms, {w_ep * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
