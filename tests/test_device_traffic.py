"""The device-traffic count (tests/device_traffic.py) and a budget for the demo set's traffic per event.

Bytes, not time: each operation on the CuPy code paths is logged with the device memory it must read and
write at least. The budget keeps the demo set's traffic from growing unnoticed (a float64 copy of a whole
batch, a second pass where one does): raise it only for a reason, and say so in BENCHMARKS.md.
"""

from __future__ import annotations

import numpy as np
from device_traffic import demo_traffic
from fake_cupy import TrafficLog, strict_cupy

PIXELS = 2 * 352 * 384
BYTES_PER_PIXEL_BUDGET = 150  # per event, batches of 4 on 2 panels (133 on 2026-11-25; the demo's
# whole-panel ROI weighs 8x more than on 16 panels)
OPERATIONS_BUDGET = 240  # per batch (222)


def test_traffic_log_counts_what_an_operation_must_move():
    log = TrafficLog()
    xp = strict_cupy(log)
    a = xp.asarray(np.ones(1000, np.float32))
    b = xp.asarray(np.arange(1000, dtype=np.float32))
    log.ops.clear()
    c = a + b  # reads both, writes one
    v = c.reshape(10, 100)[2:4]  # views: free
    d = c.astype(xp.float64)  # reads 4 B, writes 8 B per element
    s = d.sum()  # reads the array (a scalar result counts 0)
    g = c[xp.asarray(np.array([1, 5, 7]))]  # a gather: the index, 3 values read and written
    e = xp.empty(1000, xp.float32)  # allocation: free
    assert v.shape == (2, 100) and float(s) == float(np.arange(1, 1001).sum()) and g.shape == (3,) and e.size
    assert log.ops == [
        ("op", "add", 8000, 4000),
        ("op", "astype", 4000, 8000),
        ("op", "sum", 8000, 0),
        ("op", "getitem", 3 * 8, 2 * 3 * 4),
    ]


def test_demo_set_device_traffic_within_budget(monkeypatch):
    t = demo_traffic(monkeypatch, events=4, shape=(2, 352, 384))
    per_pixel = t.bytes / t.events / PIXELS
    names = {name for name, _, _ in t.by_name()}
    assert {
        "pedestal_u16 (kernel)",
        "cm_median_rows_warp (kernel)",
        "cm_median_cols_warp (kernel)",
        "run_sums (kernel)",
        "droplet_mask (kernel)",
        "label_union (kernel)",
        "csr matmul",
    } <= names
    assert "scale_apply (kernel)" not in names  # the column step applies the gain scale
    assert per_pixel <= BYTES_PER_PIXEL_BUDGET, (per_pixel, t.by_name()[:10])
    assert t.launches <= OPERATIONS_BUDGET, t.launches
    # no operation outside the kernels moves more than 3 float32 passes over the batch
    for name, count, nbytes in t.by_name():
        if "kernel" not in name and name != "csr matmul":
            assert nbytes / t.events / PIXELS <= 3 * 4 * 2, (name, count, nbytes)
