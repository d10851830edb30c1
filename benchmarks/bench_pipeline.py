"""Whole-pipeline throughput on the demo config (gpusmall/producer/demo.yaml).

    python benchmarks/bench_pipeline.py [--events 64] [--batch 16] [--backend auto|numpy|cupy]
                                        [--config CONFIG] [--out /tmp/bench.h5] [--json RESULTS.json]
                                        [--reference-events 16]

Prints:
  end to end     reduce_run (simulated source in the reader thread, compute, HDF5): events/s, raw GB/s
  pinned->file   batches already in pinned host memory -> upload, reduce, results appended to an HDF5
                 file (the issue-7 whole-pipeline measure, without the source)
  compute only   the same batches already in (pinned) host memory: events/s and raw GB/s of
                 upload + calibrate + reduce + results to host; on CuPy the transfer (host->device)
                 and device time are measured separately with CUDA events
  pinned copy    host->device bandwidth reference (CuPy only): pinned vs pageable
  reference      the straightforward per-event NumPy pipeline (benchmarks/reference_pipeline.py) on
                 min(--reference-events, --events) events of the same batches in host memory, and the
                 ratio pinned->file / reference (the benchmark rules' whole-pipeline figure)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpusmall.backend import get_backend  # noqa: E402
from gpusmall.cli import demo_config_dict  # noqa: E402
from gpusmall.producer.config import load_config, validate_config  # noqa: E402
from gpusmall.producer.mpi import Comm  # noqa: E402
from gpusmall.producer.pipeline import make_pipelines  # noqa: E402
from gpusmall.io.writer import BackgroundAppender, ResultWriter  # noqa: E402
from gpusmall.producer.process import BatchProcessor, DeviceTimes  # noqa: E402
from gpusmall.producer.run import reduce_run, setup_cube  # noqa: E402
from gpusmall.sources import open_source  # noqa: E402
from reference_pipeline import PerEventReference  # noqa: E402  (benchmarks/, the script's directory)


def raw_bytes_per_event(source) -> int:
    return sum(int(np.prod(d.shape)) * np.dtype(d.dtype).itemsize for d in source.detectors.values())


def end_to_end(cfg, backend, events, out):
    s = reduce_run(cfg, backend, events=events, output=out, quiet=True, comm=Comm())
    with open_source(cfg) as src:
        nbytes = raw_bytes_per_event(src)
    return s.events / s.seconds, s.events * nbytes / s.seconds / 1e9


def pipelines(cfg, src, backend):
    """{det: DetectorPipeline} of the config, for an open source, on ``backend``."""
    return make_pipelines(cfg, src, backend)


def read_pinned(cfg, src, backend, events):
    """The run's first ``events`` events, batch by batch, read into pinned host memory (page-locked on CuPy,
    plain NumPy arrays on the NumPy backend): a list of RawBatch."""
    batches = []
    for b in range(0, events, cfg.batch_size):
        stop = min(b + cfg.batch_size, events)
        bufs = {n: backend.pinned_empty((stop - b, *d.shape), d.dtype) for n, d in src.detectors.items()}
        batches.append(src.read(b, stop, out=bufs))
    return batches


def compute_only(cfg, backend, events, repeat=3, overlap=True, out=None, cube=False):
    """Batches already in (pinned) host memory through BatchProcessor, as reduce_run drives it.

    ``overlap``: stage (upload) batch k+1 before reducing batch k and collect batch k's results a batch
    later (by a writer thread when there is a file), as the run loop does; False: one batch at a time
    (upload, reduce, results, write), to show what the overlap gains. ``out``: also append every batch's
    results to this HDF5 file (flushed per batch), i.e. "pinned host memory to a written file", the
    issue-7 measure without the source. ``cube``: with the config's ``cube:`` (its frame sums on the device).
    """
    with open_source(cfg) as src:
        nbytes = raw_bytes_per_event(src)
        pls = pipelines(cfg, src, backend)
        batches = read_pinned(cfg, src, backend, events)
    proc = BatchProcessor(pls, backend, cfg.batch_size, cube=setup_cube(cfg, pls, backend) if cube else None)
    proc.process(batches[0])  # warm-up: kernel compilation, memory pool
    backend.synchronize()
    proc.times = DeviceTimes()
    writer = ResultWriter(out, chunk_events=cfg.batch_size) if out else None
    # as the run loop: results collected a batch later (by the writer thread when there is a file)
    appender = BackgroundAppender(writer) if writer and overlap else None
    late = []

    def emit(pending):
        if appender is not None:
            appender.append(pending)
        elif writer is not None and not overlap:
            writer.append(pending.result())
        else:
            late.append(pending)
            while len(late) > 1:
                late.pop(0).result()

    t0 = time.perf_counter()
    for _ in range(repeat):
        pending = None
        for batch in batches:
            staged = proc.stage(batch)
            if not overlap:
                emit(proc.process_async(staged))
                continue
            if pending is not None:
                emit(proc.process_async(pending))
            pending = staged
        if pending is not None:
            emit(proc.process_async(pending))
    for p in late:
        p.result()
    if appender is not None:
        appender.close()
    backend.synchronize()
    if writer:
        writer.close()
    dt = (time.perf_counter() - t0) / repeat
    result = {"events_per_s": events / dt, "gb_per_s": events * nbytes / dt / 1e9, "wall_s": dt}
    if backend.is_gpu:
        t = proc.times
        result.update(h2d_s=t.h2d_s / repeat, device_s=t.compute_s / repeat, h2d_gb_per_s=t.h2d_gb_per_s,
                      d2h_s=t.d2h_s / repeat, d2h_bytes_per_event=t.d2h_bytes / (events * repeat),
                      device_events_per_s=events * repeat / t.compute_s)
    return result


def pinned_bandwidth(backend, nbytes=256 << 20):
    cp = backend.xp
    pinned = backend.pinned_empty((nbytes,), np.uint8)
    pinned[:] = 1
    pageable = np.ones(nbytes, np.uint8)
    d = cp.empty(nbytes, cp.uint8)
    out = {}
    for label, host in (("pinned", pinned), ("pageable", pageable)):
        d.set(host)
        cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            d.set(host)
        cp.cuda.Device().synchronize()
        out[label] = 5 * nbytes / (time.perf_counter() - t0) / 1e9
    return out


def reference(cfg, backend, events):
    """Events/s of :class:`PerEventReference` (one event at a time, NumPy + SciPy, every detector) on the
    first ``events`` events of the same pinned batches as :func:`compute_only`; one untimed warm-up event.

    The reference is built from NumPy-backend DetectorPipelines of the same config (constants, mask, azav
    bin map). It keeps its results in memory and writes no file, so if anything the ratio understates gpusmall.
    """
    with open_source(cfg) as src:
        refs = {n: PerEventReference(pl) for n, pl in pipelines(cfg, src, get_backend("numpy")).items()}
        batches = read_pinned(cfg, src, backend, events)
    raws = [{n: a[e] for n, a in batch.raw.items()} for batch in batches  # one event: det -> (panels, rows, cols)
            for e in range(len(batch))]
    for n, ref in refs.items():
        ref.process_event(raws[0][n])  # warm-up
    t0 = time.perf_counter()
    for raw in raws:
        for n, ref in refs.items():
            ref.process_event(raw[n])
    dt = time.perf_counter() - t0
    return {"events_per_s": len(raws) / dt, "events": len(raws), "wall_s": dt}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="config file (default: the embedded demo config)")
    ap.add_argument("--events", type=int, default=64)
    ap.add_argument("--batch", type=int, help="batch size (default: the config's)")
    ap.add_argument("--backend", default=None, choices=("auto", "numpy", "cupy"))
    ap.add_argument("--out", help="output file (default: a temporary file)")
    ap.add_argument("--json", help="append this run's figures to a JSON list in this file (benchmarks/bench_to_md.py)")
    ap.add_argument("--reference-events", type=int, default=16,
                    help="events for the per-event NumPy reference, at most --events (0: skip it)")
    args = ap.parse_args(argv)
    data = demo_config_dict() if not args.config else None
    cfg = load_config(args.config) if args.config else validate_config(data, base_dir=Path.cwd())
    if args.batch:
        cfg.batch_size = args.batch
    backend = get_backend(args.backend, cfg.backend)
    print(f"backend: {backend.description}; batch {cfg.batch_size}; {args.events} events")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or str(Path(tmp) / "bench.h5")
        ev, gb = end_to_end(cfg, backend, args.events, out)
        print(f"end to end   : {ev:9.1f} events/s  {gb:7.3f} GB/s raw (source + compute + HDF5)")
        to_file = compute_only(cfg, backend, args.events, out=str(Path(tmp) / "pinned_to_file.h5"))
        print(f"pinned->file : {to_file['events_per_s']:9.1f} events/s  {to_file['gb_per_s']:7.3f} GB/s raw "
              f"(batches in pinned host memory -> upload, reduce, results -> HDF5; overlapped)")
    results = {}
    if cfg.cube is not None:  # the cube's cost: compute only without it, then with it
        plain, cubed = (compute_only(cfg, backend, args.events, cube=c) for c in (False, True))
        extra = 1 / cubed["events_per_s"] - 1 / plain["events_per_s"]
        print(f"cube         : {cubed['events_per_s']:9.1f} events/s with the config's cube vs {plain['events_per_s']:.1f} "
              f"without: {1e3 * extra:+.2f} ms per event ({100 * extra * plain['events_per_s']:+.1f}%)")
        results["cube"] = {"with_events_per_s": cubed["events_per_s"], "without_events_per_s": plain["events_per_s"]}
    for overlap in (True, False) if backend.is_gpu else (True,):
        r = results["overlapped" if overlap else "serial"] = compute_only(cfg, backend, args.events, overlap=overlap)
        how = "overlapped" if overlap else "serial    "
        print(f"compute only ({how}): {r['events_per_s']:9.1f} events/s  {r['gb_per_s']:7.3f} GB/s raw "
              f"(batches in host memory; wall {r['wall_s'] * 1e3:.1f} ms)")
        if backend.is_gpu:
            print(f"  host->device: {r['h2d_s'] * 1e3:8.1f} ms  ({r['h2d_gb_per_s']:.2f} GB/s)")
            print(f"  device      : {r['device_s'] * 1e3:8.1f} ms  ({r['device_events_per_s']:.1f} events/s)")
            print(f"  device->host: {r['d2h_s'] * 1e3:8.1f} ms  (results, {r['d2h_bytes_per_event'] / 1e3:.0f} kB/event)")
    if backend.is_gpu:
        bw = pinned_bandwidth(backend)
        print(f"pinned copy  : {bw['pinned']:.2f} GB/s pinned, {bw['pageable']:.2f} GB/s pageable (host->device)")
        r = results["overlapped"]
        r["pinned_gb_per_s"], r["pageable_gb_per_s"] = bw["pinned"], bw["pageable"]
        if "serial" in results:
            r["serial_events_per_s"] = results["serial"]["events_per_s"]
    results["overlapped"]["to_file_events_per_s"] = to_file["events_per_s"]
    results["overlapped"]["to_file_gb_per_s"] = to_file["gb_per_s"]
    n_ref = min(args.reference_events, args.events)
    if n_ref > 0:
        ref = reference(cfg, backend, n_ref)
        ratio = to_file["events_per_s"] / ref["events_per_s"]
        print(f"per-event NumPy reference: {ref['events_per_s']:9.2f} events/s ({ref['events']} events, "
              f"{ref['wall_s']:.1f} s; benchmarks/reference_pipeline.py)")
        print(f"batched {backend.name} pinned->file / reference: {ratio:.1f} x")
        results["overlapped"]["reference_events_per_s"] = ref["events_per_s"]
        results["overlapped"]["reference_events"] = ref["events"]
    if args.json:
        path = Path(args.json)
        runs = json.loads(path.read_text()) if path.is_file() else []
        runs.append({"backend": backend.name, "device": backend.description, "batch": cfg.batch_size,
                     "events": args.events, "config": args.config or "demo",
                     "end_to_end": {"events_per_s": ev, "gb_per_s": gb}, "compute_only": results["overlapped"],
                     "cube": results.get("cube")})
        path.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
