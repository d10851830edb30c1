"""The median common mode's rows and cols steps on one cache-resident block: compiled vs numba + NumPy sort.

    taskset -c 0 python benchmarks/bench_median_steps.py [--rounds 3] [--repeat 50]

One ePix10ka block (two events of a panel's 176 bank rows x 384 columns, gain_ranges high, min_pixels 10),
the step in place after a copy of the input (the copy timed apart), the compiled step
(gpusmall/calib/simd_median.py) and the numba passes around np.sort alternating in one process. Prints
ms per ePix10k2M event (32 such blocks per two events).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NUMBA_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from gpusmall.backend import Backend  # noqa: E402
from gpusmall.calib import cpu_median, simd_median  # noqa: E402
from gpusmall.calib.common_mode import MedianCommonMode  # noqa: E402
from gpusmall.detectors import get_model  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=50)
    a = ap.parse_args(argv)
    cm = MedianCommonMode(get_model("epix10ka"), (352, 384), axes=("rows", "cols"), gain_ranges="high",
                          min_pixels=10, backend=Backend("numpy"))
    rng = np.random.default_rng(0)
    e, br, c = 2, 176, 384
    s0 = rng.normal(0, 20, (e, br, c)).astype(np.float32)
    good = rng.random((e, br, c)) > 0.05
    g = np.zeros((e, br, c), np.int8)
    s = s0.copy()
    v, vt = np.empty((e, br, c), np.float32), np.empty((e, c, br), np.float32)
    n_r, m_r = np.empty((e * br, c // 48), np.int64), np.empty((e * br, c // 48), np.float32)
    n_c, m_c = np.empty((e, c), np.int64), np.empty((e, c), np.float32)
    flat = (e * br, c)
    steps = {"rows": lambda: cpu_median._rows(cm, s.reshape(flat), good.reshape(flat), g.reshape(flat),
                                              v.reshape(flat), n_r, m_r),
             "cols": lambda: cpu_median._cols(cm, s, good, g, v, vt, n_c, m_c)}
    per_event = 32 / e * 1e3  # seconds per block -> ms per ePix10k2M event
    compiled = simd_median.available
    print(f"compiled steps available: rows {compiled('rows', 48)}, cols {compiled('cols', br)}")
    for _ in range(a.rounds):
        out = []
        for native in (True, False):
            simd_median.available = compiled if native else (lambda *args: False)
            for name, step in steps.items():
                step()
                t = time.perf_counter()
                for _ in range(a.repeat):
                    np.copyto(s, s0)
                    step()
                out.append(f"{name} {'compiled' if native else 'numba + np.sort'} "
                           f"{(time.perf_counter() - t) / a.repeat * per_event:.2f}")
        simd_median.available = compiled
        t = time.perf_counter()
        for _ in range(a.repeat):
            np.copyto(s, s0)
        out.append(f"(copy {(time.perf_counter() - t) / a.repeat * per_event:.2f})")
        print("ms/event: " + "; ".join(out))


if __name__ == "__main__":
    main()
