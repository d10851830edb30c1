"""HDF5 appends of the demo function set's results (pytest-benchmark; not part of the test suite).

    pytest benchmarks/bench_writer.py --benchmark-only
    GPUSMALL_BENCH_OUT=/path/on/the/target/filesystem pytest benchmarks/bench_writer.py --benchmark-only

One batch of 64 events with the columns ``gpusmall demo`` wrote for an ePix10k2M with droplets padded
(30 datasets, ~300 kB per event, mostly the droplet and photon arrays padded to 6000 / 12000), appended and
flushed per batch as the producer does. The writer is one of the limits of the whole pipeline: at 6,000
events/s the demo set writes ~1.8 GB/s. Side by side: ``ResultWriter.append`` (whole chunks written
directly), the same droplets and photons stored ragged (``gpusmall-ragged``: 4500 and 7200 an event, as the
padded arrays are filled; ``layout: ragged``, the default since 2026-12-02: flat per-item datasets, per-event
``len``, the ``offset`` the writer adds, hard links under smalldata_tools' names) and the plain h5py way
(resize + slice assignment), in the same run. Default target folder: /dev/shm when it exists (the
writer's own cost), else the temporary folder.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from gpusmall.io.writer import BackgroundAppender, ResultWriter

BATCH = 64


def demo_columns(rng, n=BATCH):
    """Columns shaped like the demo set's output: (name, per-event shape, dtype, filled fraction)."""
    spec = [("azav_azav", (1, 500), np.float32, 1.0), ("azav_count", (1, 500), np.int32, 1.0),
            ("rebin_data", (16, 22, 24), np.float32, 1.0), ("roi0_pj_ax_1_data", (100,), np.float32, 1.0),
            ("roi1_pj_ax_0_data", (384,), np.float32, 1.0), ("roi0_com", (2,), np.float64, 1.0),
            ("roi1_com", (2,), np.float64, 1.0)]
    spec += [(f"droplet_{k}", (6000,), t, 0.75) for k, t in (("data", np.float32), ("row", np.float32),
                                                              ("col", np.float32), ("npix", np.int32),
                                                              ("tile", np.int32))]
    spec += [(f"droplet_photons_{k}", (12000,), np.int32, 0.6) for k in ("row", "col", "tile")]
    spec += [("droplet_photons_data", (12000,), np.uint8, 0.6)]
    cols = {}
    for name, shape, dtype, filled in spec:
        a = np.zeros((n, *shape), dtype)
        m = int(shape[-1] * filled)
        a[..., :m] = rng.integers(1, 300, (n, *shape[:-1], m)).astype(dtype)
        cols[f"epix10k2m/{name}"] = a
    for name in ("droplet_nDroplets", "droplet_nDroplets_all", "droplet_nDroplets_truncated",
                 "droplet_photons_nPhotons", "roi0_nsat", "roi1_nsat"):
        cols[f"epix10k2m/{name}"] = rng.integers(0, 5000, n).astype(np.int32)
    for name in ("roi0_sum", "roi0_mean", "roi1_sum", "roi1_mean"):
        cols[f"epix10k2m/{name}"] = rng.random(n)
    for name in ("roi0_max", "roi1_max"):
        cols[f"epix10k2m/{name}"] = rng.random(n).astype(np.float32)
    cols["epix10k2m/damaged"] = np.zeros(n, np.uint8)
    cols["timestamp"] = np.arange(n, dtype=np.uint64)
    cols["event_index"] = np.arange(n, dtype=np.int64)
    return cols


DROPLETS, PHOTONS = 4500, 7200  # per event, as demo_columns fills the padded arrays


def demo_columns_ragged(rng, n=BATCH):
    """demo_columns with the droplet and photon arrays ragged: the same items, flat, with per-event counts."""
    from gpusmall.io.writer import Columns

    cols = Columns({k: v for k, v in demo_columns(rng, n).items()
                    if not k.startswith(("epix10k2m/droplet_data", "epix10k2m/droplet_row", "epix10k2m/droplet_col",
                                         "epix10k2m/droplet_npix", "epix10k2m/droplet_tile",
                                         "epix10k2m/droplet_photons_row", "epix10k2m/droplet_photons_col",
                                         "epix10k2m/droplet_photons_tile"))})
    for prefix, keys, per_event in (("droplet", (("data", np.float32), ("row", np.float32), ("col", np.float32),
                                                  ("npix", np.int32), ("tile", np.int32)), DROPLETS),
                                    ("droplet_photons", (("row", np.int32), ("col", np.int32), ("tile", np.int32)),
                                     PHOTONS)):
        cols[f"epix10k2m/{prefix}_len"] = np.full(n, per_event, np.int32)
        for k, t in keys:
            cols[f"epix10k2m/{prefix}_{k}"] = rng.integers(1, 300, n * per_event).astype(t)
            cols.ragged[f"epix10k2m/{prefix}_{k}"] = (f"epix10k2m/{prefix}_len", f"epix10k2m/{prefix}_offset")
            cols.links[f"epix10k2m/var_{prefix}_sparse/{k}"] = f"epix10k2m/{prefix}_{k}"
    return cols


def _folder() -> Path:
    env = os.environ.get("GPUSMALL_BENCH_OUT")
    if env:
        return Path(env)
    return Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


class PlainWriter:
    """h5py the plain way: resize and assign a slice per dataset, flush per batch."""

    def __init__(self, path):
        self.file = h5py.File(path, "w", libver="latest")
        self.n = 0

    def append(self, cols):
        for k, v in cols.items():
            if k not in self.file:
                per = max(1, v[0].nbytes)
                c = max(1, min(BATCH, (1 << 20) // per))
                self.file.create_dataset(k, shape=(0, *v.shape[1:]), maxshape=(None, *v.shape[1:]), dtype=v.dtype,
                                         chunks=(c, *v.shape[1:]) if v.ndim > 1 else (max(c, 1024),))
            d = self.file[k]
            d.resize(self.n + len(v), axis=0)
            d[self.n:] = v
        self.n += BATCH
        self.file.flush()

    def close(self):
        self.file.close()


@pytest.mark.parametrize("how", ["gpusmall", "gpusmall-ragged", "plain-h5py"])
def test_append_demo_batch(benchmark, how):
    rng = np.random.default_rng(0)
    cols = demo_columns_ragged(rng) if how == "gpusmall-ragged" else demo_columns(rng)
    nbytes = sum(v.nbytes for v in cols.values())
    folder = Path(tempfile.mkdtemp(dir=_folder(), prefix="gpusmall-bench-"))
    path = folder / f"{how}.h5"
    w = ResultWriter(path, chunk_events=BATCH) if how.startswith("gpusmall") else PlainWriter(path)
    try:
        w.append(cols)  # creates the datasets
        benchmark.pedantic(w.append, args=(cols,), rounds=15, iterations=1, warmup_rounds=1)
    finally:
        w.close()
        path.unlink(missing_ok=True)
        folder.rmdir()
    t = benchmark.stats.stats.median
    benchmark.extra_info.update(events_per_s=BATCH / t, gb_per_s=nbytes / t / 1e9, bytes_per_event=nbytes / BATCH,
                                folder=str(_folder()))
    if how.startswith("gpusmall"):
        print(f"\n{how}: {t * 1e3:.2f} ms / batch of {BATCH}, {BATCH / t:,.0f} events/s, "
              f"{nbytes / BATCH / 1e3:.0f} kB / event")


def _busy_python(seconds):
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(200):
            pass


@pytest.mark.parametrize("main_ms", [0, 3, 9, "9-switch-5ms"])
def test_writer_thread_beside_busy_main_thread(benchmark, main_ms):
    """The producer's shape: the main thread spends ``main_ms`` of pure Python per batch (launching the demo
    set's ~225 CuPy operations holds the GIL for ~2-3 ms) and hands the batch to the writer thread
    (BackgroundAppender). Ideal: max(main, writer alone) per batch; what it costs beyond that is the GIL,
    which both threads' Python needs (the HDF5 calls themselves let it go). "9-switch-5ms": the same with
    Python's default thread switch interval instead of BackgroundAppender's 0.1 ms. 6 batches per round."""
    switch = 1e-4
    if isinstance(main_ms, str):
        main_ms, switch = 9, None
    cols = demo_columns(np.random.default_rng(0))
    nbytes = sum(v.nbytes for v in cols.values())
    folder = Path(tempfile.mkdtemp(dir=_folder(), prefix="gpusmall-bench-"))
    path = folder / f"busy-{main_ms}.h5"
    w = ResultWriter(path, chunk_events=BATCH)
    batches = 6

    def run():
        with BackgroundAppender(w, switch_interval_s=switch) as app:
            for _ in range(batches):
                _busy_python(main_ms / 1e3)
                app.append(cols)
            app.drain()

    try:
        w.append(cols)  # creates the datasets
        benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    finally:
        w.close()
        path.unlink(missing_ok=True)
        folder.rmdir()
    t = benchmark.stats.stats.median / batches
    benchmark.extra_info.update(events_per_s=BATCH / t, gb_per_s=nbytes / t / 1e9, ms_per_batch=t * 1e3,
                                main_thread_python_ms=main_ms, switch_interval_s=switch or sys.getswitchinterval())
