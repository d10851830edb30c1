"""CPU scaling of ``gpusmall run``: events/s with 1, 2, ... MPI ranks on the same config.

    python benchmarks/mpi_scaling.py [--ranks 1 2] [--events 400] [--config CONFIG] [--backend numpy]

The default config is the demo's function set on a 512 x 512 camera (simulated source), so that a
run takes seconds on a laptop. Wall time includes start-up (imports, MPI, pipeline set-up) and the
master file; the events/s the run itself reports (reduction loop only) are printed beside it.
Needs mpiexec and mpi4py for more than one rank.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import yaml

ROOT = Path(__file__).resolve().parents[1]

DEFAULT = {
    "source": {"type": "sim", "events": 1000000, "seed": 0},
    "batch_size": 16, "backend": "numpy", "output": "scaling.h5",
    "detectors": {"cam": {"type": "camera", "shape": [512, 512],
                          "functions": [{"type": "roi", "name": "roi0", "bounds": [[0, 1], [100, 300], [100, 400]],
                                         "thres_adu": 5, "children": [{"type": "projection", "axis": -1}]},
                                        {"type": "rebin", "shape": [64, 64]}],
                          "sums": ["calib", "max"]}},
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--events", type=int, default=400)
    ap.add_argument("--config")
    ap.add_argument("--backend", default="numpy")
    args = ap.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", HDF5_USE_FILE_LOCKING="FALSE")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = args.config
        if cfg is None:
            cfg = Path(tmp) / "scaling.yaml"
            cfg.write_text(yaml.safe_dump(DEFAULT))
        print(f"{'ranks':>5} {'events':>7} {'wall s':>8} {'events/s (wall)':>16} {'events/s (loop)':>16}")
        for n in args.ranks:
            out = Path(tmp) / f"r{n}.h5"
            cmd = [sys.executable, "-m", "gpusmall", "run", str(cfg), "--events", str(args.events),
                   "--out", str(out), "--backend", args.backend, "--quiet"]
            if n > 1:
                cmd = ["mpiexec", "-n", str(n)] + cmd
            t0 = time.perf_counter()
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if p.returncode != 0:
                print(f"{n:>5} failed: {p.stderr.strip().splitlines()[-1:]}")
                continue
            with h5py.File(out) as f:
                events = int(f.attrs["events"])
            m = re.search(r"\(([\d.]+) events/s\)", p.stderr)
            loop = m.group(1) if m else "?"
            print(f"{n:>5} {events:>7} {wall:>8.2f} {events / wall:>16.1f} {loop:>16}")


if __name__ == "__main__":
    main()
