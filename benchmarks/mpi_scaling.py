"""CPU scaling of ``gpusmall run``: events/s with 1, 2, ... MPI ranks on the same config, side by side.

    python benchmarks/mpi_scaling.py [--ranks 1 2] [--events 800] [--source hdf5|sim|both] [--repeat 3]
                                     [--config CONFIG] [--backend numpy]

The default config is the demo's function set trimmed to a 512 x 512 camera (ROI + projection, rebin,
sums), so that a run takes seconds on a laptop. Two sources:

* ``hdf5`` (default): raw events written once beforehand to an HDF5 file (the production shape: a
  producer reads recorded data). Reading costs little, so each rank's reduction is what scales.
* ``sim``: the simulator generates the events on the fly in each rank's reader thread (about half
  a millisecond per 512 x 512 frame, a fraction of its reduction), so the ranks scale nearly as with
  recorded data.

Reported per run: wall time (start-up, imports, MPI, set-up and master file included) and the
events/s of the reduction loop (what ``gpusmall run`` prints: events over the slowest rank's loop
time). The ratio is against one rank in the same invocation; with ``--repeat`` the median is taken.
Needs mpiexec and mpi4py for more than one rank.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]

DETECTOR = {"type": "camera", "shape": [512, 512],
            "functions": [{"type": "roi", "name": "roi0", "bounds": [[0, 1], [100, 300], [100, 400]],
                           "thres_adu": 5, "children": [{"type": "projection", "axis": -1}]},
                          {"type": "rebin", "shape": [64, 64]}],
            "sums": ["calib", "max"]}


def sim_config(events: int) -> dict:
    return {"source": {"type": "sim", "events": events, "seed": 0}, "batch_size": 16, "backend": "numpy",
            "output": "scaling.h5", "detectors": {"cam": dict(DETECTOR)}}


def write_raw_file(path: Path, events: int) -> None:
    """Simulated camera events written to ``path`` as /cam/raw (events, 512, 512) uint16 + /timestamp."""
    from gpusmall.sources.sim import SimSource

    src = SimSource(events, {"cam": {"type": "camera", "shape": (1, 512, 512)}}, seed=0)
    with h5py.File(path, "w") as f:
        raw = f.create_dataset("cam/raw", (events, 512, 512), np.uint16, chunks=(16, 512, 512))
        ts = f.create_dataset("timestamp", (events,), np.uint64)
        for b in range(0, events, 64):
            batch = src.read(b, min(events, b + 64))
            raw[b: b + len(batch)] = batch.raw["cam"].reshape(-1, 512, 512)
            ts[b: b + len(batch)] = batch.timestamp


def hdf5_config(raw_path: Path, events: int) -> dict:
    cfg = sim_config(events)
    cfg["source"] = {"type": "hdf5", "path": str(raw_path)}
    cfg["detectors"]["cam"]["dataset"] = "cam/raw"
    return cfg


def run_once(cfg: Path, n: int, events: int, out: Path, backend: str, env: dict,
             threads: int | None = None) -> tuple[float, float]:
    """(wall s, loop events/s) of one ``gpusmall run`` with ``n`` ranks (``--threads`` per rank if given)."""
    cmd = [sys.executable, "-m", "gpusmall", "run", str(cfg), "--events", str(events),
           "--out", str(out), "--backend", backend, "--quiet"] + (["--threads", str(threads)] if threads else [])
    if n > 1:
        cmd = ["mpiexec", "-n", str(n)] + cmd
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{n} ranks failed: {p.stderr.strip().splitlines()[-1:]}")
    with h5py.File(out) as f:
        done = int(f.attrs["events"])
    if done != events:
        raise RuntimeError(f"{n} ranks reduced {done} events, not {events}")
    m = re.search(r"\(([\d.]+) events/s\)", p.stderr)
    return wall, float(m.group(1)) if m else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--events", type=int, default=800)
    ap.add_argument("--source", choices=["hdf5", "sim", "both"], default="hdf5")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--config", help="your own config instead (its source is used as is)")
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--threads", type=int, help="NumPy threads per rank (default: gpusmall's, the cores "
                                                "shared by the ranks; 1 measures the ranks alone)")
    args = ap.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", HDF5_USE_FILE_LOCKING="FALSE")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        configs = {}
        if args.config:
            configs["config"] = Path(args.config)
        for kind in (["hdf5", "sim"] if args.source == "both" else [args.source]) if not args.config else []:
            if kind == "hdf5":
                write_raw_file(tmp / "raw.h5", args.events)
                data = hdf5_config(tmp / "raw.h5", args.events)
            else:
                data = sim_config(args.events)
            configs[kind] = tmp / f"{kind}.yaml"
            configs[kind].write_text(yaml.safe_dump(data))
        print(f"{'source':>6} {'ranks':>5} {'events':>7} {'wall s':>8} {'ev/s wall':>10} {'ev/s loop':>10} "
              f"{'x 1 rank':>8}")
        for kind, cfg in configs.items():
            loops: dict[int, list[float]] = {n: [] for n in args.ranks}
            walls: dict[int, list[float]] = {n: [] for n in args.ranks}
            for _ in range(args.repeat):  # interleave rank counts so drifts hit both alike
                for n in args.ranks:
                    wall, loop = run_once(cfg, n, args.events, tmp / f"{kind}{n}.h5", args.backend, env,
                                          args.threads)
                    walls[n].append(wall)
                    loops[n].append(loop)
            base = statistics.median(loops[args.ranks[0]])
            for n in args.ranks:
                wall, loop = statistics.median(walls[n]), statistics.median(loops[n])
                print(f"{kind:>6} {n:>5} {args.events:>7} {wall:>8.2f} {args.events / wall:>10.1f} "
                      f"{loop:>10.1f} {loop / base:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
