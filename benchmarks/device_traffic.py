"""Device-memory traffic and kernel launches of the demo function set per batch, counted on the CPU.

    python benchmarks/device_traffic.py [--batch 64] [--panels 16] [--launch-us 10] [--md]

Runs the demo config (ePix10k2M, median rows+cols common mode, 2 ROIs + projections, rebin, azav 500 bins,
droplets + photons, 4 run sums) through the CuPy code paths on the strict CuPy stand-in of the tests
(``tests/device_traffic.py``), twice (batches of 4 and 8 events), logs every device operation with the bytes
it must read and write at least, and fits bytes = per-batch + per-event x events per operation, which gives
the figures for a batch of ``--batch`` events. Two floors follow for an H100 SXM: device time >= bytes /
3.35 TB/s (HBM3), host time >= launches x ``--launch-us`` (CuPy's Python + launch cost per operation).
They are models, not measurements: a GPU run (``benchmarks/gpu_session.sh``) measures the real thing.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from device_traffic import HBM_H100_SXM, demo_traffic  # noqa: E402

RAW_BYTES_PER_PIXEL = 2


def per_name(traffic):
    count, total = defaultdict(int), defaultdict(int)
    for name, n, b in traffic.by_name():
        count[name] += n
        total[name] += b
    return count, total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64, help="events per batch to report (default 64)")
    ap.add_argument("--panels", type=int, default=16, help="ePix10ka panels (default 16 = ePix10k2M)")
    ap.add_argument("--launch-us", type=float, default=10.0, help="host cost per device operation, us (default 10)")
    ap.add_argument("--md", action="store_true", help="markdown table rows")
    a = ap.parse_args(argv)
    shape = (a.panels, 352, 384)
    npix = a.panels * 352 * 384
    runs = {}
    t0 = time.perf_counter()
    for events in (4, 8):
        with pytest.MonkeyPatch.context() as mp:
            runs[events] = demo_traffic(mp, events=events, shape=shape)
    (c4, b4), (c8, b8) = per_name(runs[4]), per_name(runs[8])
    rows, total, launches = [], 0.0, 0
    for name in sorted(set(b4) | set(b8)):
        slope = (b8.get(name, 0) - b4.get(name, 0)) / 4  # bytes per event
        fixed = b4.get(name, 0) - 4 * slope  # bytes per batch
        at = (fixed + slope * a.batch) / a.batch  # per event at --batch
        n = max(c4.get(name, 0), c8.get(name, 0))
        rows.append((name, n, at))
        total += at
        launches += n
    rows.sort(key=lambda r: -r[2])
    raw = npix * RAW_BYTES_PER_PIXEL
    hbm_s = total / HBM_H100_SXM  # per event
    host_s = launches * a.launch_us * 1e-6 / a.batch
    print(f"# demo set, ePix10ka x {a.panels} panels ({raw / 1e6:.2f} MB raw per event), batch {a.batch}; "
          f"counted in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(f"device memory traffic: {total / 1e6:.1f} MB per event = {total / raw:.1f} x the raw event; "
          f"{launches} device operations per batch")
    print(f"HBM floor (3.35 TB/s): {hbm_s * 1e6:.1f} us per event -> at most {1 / hbm_s:,.0f} events/s")
    print(f"host floor ({a.launch_us:g} us per operation): {launches * a.launch_us / 1e3:.2f} ms per batch "
          f"-> at most {1 / host_s:,.0f} events/s")
    if a.md:
        print("\n| operation | per batch | MB per event | share |\n| --- | --- | --- | --- |")
        for name, n, at in rows:
            if at / total >= 0.005:
                print(f"| {name} | {n} | {at / 1e6:.2f} | {100 * at / total:.1f}% |")
        rest = [r for r in rows if r[2] / total < 0.005]
        print(f"| {len(rest)} others | {sum(r[1] for r in rest)} | {sum(r[2] for r in rest) / 1e6:.2f} | "
              f"{100 * sum(r[2] for r in rest) / total:.1f}% |")
    else:
        for name, n, at in rows:
            print(f"  {name:28s} {n:4d} x  {at / 1e6:8.2f} MB/event  {100 * at / total:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
