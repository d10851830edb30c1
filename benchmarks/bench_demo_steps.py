"""Per-step split of the demo function set on the NumPy backend: where a CPU core's time goes.

    taskset -c 0 python benchmarks/bench_demo_steps.py [--events 32] [--batch 16] [--rounds 3] [--config C]

Batches of the demo's simulated detector are read into host memory once; then, per batch and round, the
detector pipeline's steps are timed one after the other on one thread (``threads: 1``, NUMBA_NUM_THREADS=1):
calibration (pedestal, gain, mask and the common mode; with the common mode timed apart as the
difference from the same calibration without it), each top-level function with its children, and the
run sums. Prints ms/event and the share of the total per step (median over rounds).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NUMBA_NUM_THREADS", "1")
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpusmall.backend import get_backend  # noqa: E402
from gpusmall.calib import Calibrator  # noqa: E402
from gpusmall.cli import demo_config_dict  # noqa: E402
from gpusmall.producer.allocator import keep_freed_memory  # noqa: E402
from gpusmall.producer.config import read_config_file, validate_config  # noqa: E402
from gpusmall.producer.pipeline import make_pipelines  # noqa: E402
from gpusmall.sources import open_source  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="config file (default: the embedded demo config)")
    ap.add_argument("--events", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    keep_freed_memory()
    d = read_config_file(Path(a.config)) if a.config else demo_config_dict()
    d = dict(d, batch_size=a.batch)
    d["source"] = dict(d.get("source") or {}, events=a.events)
    cfg = validate_config(d, base_dir=Path(a.config).resolve().parent if a.config else ".")
    backend = get_backend("numpy", threads=1)
    with open_source(cfg) as src:
        pls = make_pipelines(cfg, src, backend)
        batches = [src.read(b, min(b + a.batch, a.events)) for b in range(0, a.events, a.batch)]
    for name, pl in pls.items():
        plain = Calibrator(pl.model, pl.constants, pl.mask, backend, units=pl.cfg.units,
                           photon_energy_kev=pl.cfg.photon_energy_kev)
        steps: dict[str, list[float]] = {}
        for _ in range(a.rounds):
            t = dict.fromkeys(["calibration without common mode", "calibration"] +
                              [f.name for f in pl.functions] + ["run sums"], 0.0)
            for b in batches:
                raw = b.raw[name]
                t0 = time.perf_counter()
                plain(raw)
                t1 = time.perf_counter()
                frames = pl.calibrator(raw)
                t2 = time.perf_counter()
                t["calibration without common mode"] += t1 - t0
                t["calibration"] += t2 - t1
                for f in pl.functions:
                    t0 = time.perf_counter()
                    f(frames)
                    t[f.name] += time.perf_counter() - t0
                t0 = time.perf_counter()
                pl.sums.update(frames.data, None, b.context)
                t["run sums"] += time.perf_counter() - t0
            for k, v in t.items():
                steps.setdefault(k, []).append(v / a.events * 1e3)
        med = {k: float(np.median(v)) for k, v in steps.items()}
        med["common mode (calibration - without)"] = med["calibration"] - med["calibration without common mode"]
        total = sum(v for k, v in med.items() if k not in ("calibration without common mode",
                                                          "common mode (calibration - without)"))
        print(f"{name}: {pl.shape} {pl.cfg.type}, {a.events} events in batches of {a.batch}, one thread, "
              f"median of {a.rounds} rounds; total {total:.1f} ms/event = {1e3 / total:.1f} events/s")
        print("| step | ms/event | share |\n| --- | --- | --- |")
        for k, v in med.items():
            print(f"| {k} | {v:.1f} | {100 * v / total:.0f}% |")


if __name__ == "__main__":
    main()
