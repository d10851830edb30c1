"""Device-memory traffic of one batch on the CuPy code paths, counted on the CPU.

The demo function set runs on the strict CuPy stand-in (``fake_cupy.strict_cupy`` with a
:class:`fake_cupy.TrafficLog`): every array operation is logged with the bytes it must read and write
in device memory at least (each input array once, each output once, views free), and every RawKernel
launch with the bytes its access pattern touches (:data:`KERNEL_TRAFFIC`, from the kernel sources).
On a GPU each logged operation is (at least) one kernel launch, so the log gives two floors for a batch:
device time >= bytes / HBM bandwidth, host time >= operations x launch cost. Not a measurement: caches
can do better (inputs read twice in one kernel) and sorts, atomics and label propagation do worse (they
are counted as one pass). ``benchmarks/device_traffic.py`` prints the table; ``tests/test_device_traffic.py``
checks the accounting and keeps the figures from growing by accident.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from fake_cupy import TrafficLog, install_fake_cupyx
from test_fake_gpu_pipeline import FakeGpuStrict

from gpusmall.cli import demo_config_dict
from gpusmall.kernel_specs import file_signatures
from gpusmall.producer.config import validate_config
from gpusmall.producer.pipeline import make_pipelines
from gpusmall.producer.process import BatchProcessor
from gpusmall.sources.sim import SimSource

HBM_H100_SXM = 3.35e12  # bytes/s, NVIDIA's figure for the H100 SXM (80 GB HBM3)


def _calib_consts(grid, npix, *per_pixel_bytes):
    """Bytes of per-pixel constants a calib.cu kernel reads: once per pixel and event chunk (grid.y)."""
    return grid[1] * npix * sum(per_pixel_bytes)


def _calibrate_u16(
    grid,
    raw,
    pedestal,
    scale,
    mask,
    config_bits,
    out,
    good,
    n_events,
    npix,
    n_gains,
    gain_table,
    gain_shift,
    gain_bits,
    has_config,
    data_mask,
):
    # per pixel and chunk: mask, config bits, pedestal and scale of (mostly) one gain range
    # (the gain table once: a few kB that the read-only cache serves to every block)
    consts = _calib_consts(grid, int(npix), 1, 1 if has_config else 0, 4, 4) + gain_table.nbytes
    return raw.nbytes + consts, out.nbytes + good.nbytes


def _pedestal_u16(
    grid,
    raw,
    pedestal,
    mask,
    config_bits,
    s,
    gain_index,
    good,
    n_events,
    npix,
    n_gains,
    gain_table,
    gain_shift,
    gain_bits,
    has_config,
    data_mask,
):
    consts = _calib_consts(grid, int(npix), 1, 1 if has_config else 0, 4) + gain_table.nbytes
    return raw.nbytes + consts, s.nbytes + gain_index.nbytes + good.nbytes


def _scale_apply(grid, s, gain_index, good, scale, out, n_events, npix):
    return s.nbytes + gain_index.nbytes + good.nbytes + _calib_consts(grid, int(npix), 4), out.nbytes


def _cm_median_step(grid, s, good, g, n_groups, n, **rest):
    touched = int(n_groups) * int(n)  # every pixel of every group: s, good and gain range read, s written
    return touched * (4 + 1 + 1), touched * 4


def _cm_median_rows_warp(grid, s, good, g, n_groups, n, **rest):
    return _cm_median_step(grid, s, good, g, n_groups, n)


def _cm_median_cols_warp(
    grid,
    s,
    good,
    g,
    n_outer,
    n,
    n_inner,
    outer_stride,
    range_mask,
    min_pixels,
    max_correction,
    scale,
    npix,
    apply_scale,
):
    touched = int(n_outer) * int(n_inner) * int(n)
    read, written = _cm_median_step(grid, s, good, g, int(n_outer) * int(n_inner), n)
    if apply_scale:  # scale_apply's write-back too: every pixel written, its range's scale read per event
        read, written = read + 4 * touched, 4 * touched
    return read, written


def _azav_histogram(grid, data, good, bin, c, events, pixels, nbins, num, den, cnt):
    # per (event, pixel): value and good flag; the bin map and correction once per event (cached at best);
    # the atomics land in the (events, nbins) sums
    return data.nbytes + good.nbytes + int(events) * (bin.nbytes + c.nbytes), num.nbytes + den.nbytes + cnt.nbytes


def _run_sums(grid, data, keep, events, npix, n_sums, kinds, thres, acc):
    return data.nbytes + keep.nbytes + acc.nbytes, acc.nbytes  # the batch once, the sums read and written


def _droplet_mask(grid, data, good, noise, threshold, threshold_low, use_rms, n, rows, cols, npix, grow, mask):
    # value and flag once (the neighbours' reads hit the cache), the noise once per event at best
    return data.nbytes + good.nbytes + (int(n) // int(npix)) * (noise.nbytes if use_rms else 0), mask.nbytes


def _label_union(grid, idx, parent, m, rows, cols):
    # the index list (its neighbours and the binary searches hit the cache), parents read and linked
    return idx.nbytes + parent.nbytes, parent.nbytes


def _label_flatten(grid, parent, m):
    return parent.nbytes, parent.nbytes


KERNEL_TRAFFIC = {
    "calibrate_u16": _calibrate_u16,
    "pedestal_u16": _pedestal_u16,
    "scale_apply": _scale_apply,
    "cm_median_step": _cm_median_step,
    "cm_median_rows_warp": _cm_median_rows_warp,
    "cm_median_cols_warp": _cm_median_cols_warp,
    "azav_histogram": _azav_histogram,
    "run_sums": _run_sums,
    "droplet_mask": _droplet_mask,
    "label_union": _label_union,
    "label_flatten": _label_flatten,
}


class TrafficGpu(FakeGpuStrict):
    """The backend under CuPy's rules of ``test_fake_gpu_pipeline`` with a :class:`TrafficLog` as its
    ``transfers``; kernel launches run the kernels compiled for the CPU and are logged with
    :data:`KERNEL_TRAFFIC` (called with the launch's arguments by parameter name)."""

    def __init__(self):
        super().__init__("compiled", transfers=TrafficLog())

    def kernel(self, filename, name, options=()):
        launch = super().kernel(filename, name, options)
        ops = self.transfers.ops

        def logged(grid, block, args, shared_mem=0):
            host = {p.name: getattr(a, "a", a) for p, a in zip(file_signatures(filename)[name], args, strict=True)}
            read, written = KERNEL_TRAFFIC[name](tuple(grid) + (1,) * (3 - len(grid)), **host)
            ops.append(("kernel", name, read, written))
            return launch(grid, block, args, shared_mem=shared_mem)

        return logged


@dataclass
class Traffic:
    """What one batch of ``events`` moves: ``ops`` as logged, and their sums."""

    events: int
    ops: list

    @property
    def launches(self) -> int:
        return len(self.ops)

    @property
    def bytes(self) -> int:
        return sum(r + w for _, _, r, w in self.ops)

    def by_name(self) -> list[tuple[str, int, int]]:
        """(name, count, bytes) per operation name, most bytes first."""
        count, total = defaultdict(int), defaultdict(int)
        for kind, name, r, w in self.ops:
            key = f"{name} (kernel)" if kind == "kernel" else name
            count[key] += 1
            total[key] += r + w
        return sorted(((k, count[k], total[k]) for k in count), key=lambda t: -t[2])


def demo_traffic(monkeypatch, events: int = 8, shape=(16, 352, 384), seed: int = 0) -> Traffic:
    """The traffic of the second of two batches of ``events`` (the steady state: set-up done) of the
    demo function set (``gpusmall demo``'s config) on the CuPy code paths."""
    data = demo_config_dict()
    det = data["detectors"]["epix10k2m"]
    det["shape"] = list(shape)
    for f in det["functions"]:  # fewer panels than the ePix10k2M: the ROIs' panels wrap around
        if f["type"] == "roi" and len(f["bounds"]) == 3:
            p0 = f["bounds"][0][0] % shape[0]
            f["bounds"] = [[p0, p0 + 1]] + f["bounds"][1:]
    data["source"]["events"] = 2 * events
    cfg = validate_config(data)
    gpu = TrafficGpu()
    install_fake_cupyx(monkeypatch, transfers=gpu.transfers)
    src = SimSource(
        2 * events, {"epix10k2m": {"type": "epix10ka", "shape": tuple(shape)}}, seed=seed, simulate=cfg.source.simulate
    )
    pl = make_pipelines(cfg, src, gpu)["epix10k2m"]
    proc = BatchProcessor({"epix10k2m": pl}, gpu, events)
    with np.errstate(all="ignore"):
        proc.process(proc.stage(src.read(0, events)))
        gpu.transfers.ops.clear()
        proc.process(proc.stage(src.read(events, 2 * events)))
    return Traffic(events, list(gpu.transfers.ops))
