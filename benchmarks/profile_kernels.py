"""GPU time of the main kernels on one ePix10k2M batch, with ``cupyx.profiler.benchmark``.

    python benchmarks/profile_kernels.py [--events 64] [--repeat 20] [--out profile.txt]
    python benchmarks/profile_kernels.py --backend numpy --events 1 --panels 2   # plumbing check, host clock

Per case: median GPU time (CUDA events, after warm-up), the fewest bytes the case must move through device
memory (each input read once, each output written once) over that time, and that rate as a fraction of a
device-to-device copy measured here (the bandwidth ceiling). Then each RawKernel's registers, shared and local
(spill/stack) memory. Inputs are random (not zeros): pedestal + noise + row offsets, 1% switched gain.
"""
from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpusmall.backend import get_backend  # noqa: E402
from gpusmall.calib import Calibrator  # noqa: E402
from gpusmall.calib.common_mode import MedianCommonMode, launch_median_step  # noqa: E402
from gpusmall.detectors import get_model  # noqa: E402
from gpusmall.detectors.constants import Constants  # noqa: E402
from gpusmall.funcs import Frames  # noqa: E402
from gpusmall.funcs.azav import Azav  # noqa: E402
from gpusmall.funcs.droplet import Droplet  # noqa: E402
from gpusmall.funcs.sums import RunSums  # noqa: E402
from gpusmall.sources.sim import panel_layout  # noqa: E402

EPIX = get_model("epix10ka")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=64)
    ap.add_argument("--panels", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--out", help="also write the report here")
    ap.add_argument("--backend", default="cupy", choices=("cupy", "numpy"))
    args = ap.parse_args(argv)
    backend = get_backend(args.backend)
    xp = backend.xp
    if backend.is_gpu:
        from cupyx.profiler import benchmark
    else:
        def benchmark(fn, n_repeat, n_warmup):
            fn()
            times = []
            for _ in range(n_repeat):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return types.SimpleNamespace(gpu_times=np.array([times]))

    lines = [f"# profile_kernels: {backend.description}, {xp.__name__} {xp.__version__}, "
             f"batch {args.events} x ({args.panels}, 352, 384)"]

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    E, shape = args.events, (args.panels, 352, 384)
    N = int(np.prod(shape))
    rng = np.random.default_rng(0)
    n = EPIX.n_gains
    ped = rng.normal(2800, 100, (n, *shape)).round().astype(np.float32)
    gain = rng.normal(16.4, 0.3, (n, *shape)).astype(np.float32)
    raw_h = np.empty((E, *shape), np.uint16)
    for e in range(E):  # per event, to keep host memory small
        v = ped[3] + rng.normal(0, 3, shape).astype(np.float32) + rng.normal(0, 8, (shape[0], shape[1], 1)).astype(np.float32)
        raw_h[e] = np.clip(np.rint(v), 0, 0x3FFF).astype(np.uint16)
        raw_h[e][rng.random(shape) < 0.01] |= np.uint16(1 << 14)
    mask = rng.random(shape) > 0.001
    consts = Constants(pedestal=ped, gain=gain)
    raw = backend.to_device(raw_h)

    # bandwidth ceiling: device-to-device copy of 1 GiB (bytes read + written)
    src = xp.zeros(1 << (30 if backend.is_gpu else 26), xp.uint8)
    dst = xp.empty_like(src)
    r = benchmark(lambda: dst.__setitem__(Ellipsis, src), n_repeat=args.repeat, n_warmup=3)
    ceiling = 2 * src.nbytes / np.median(r.gpu_times) / 1e9
    src = dst = None  # free the 2 GiB
    say(f"device-to-device copy: {ceiling:.0f} GB/s (bytes read + written)")
    say()
    say("| case | GPU ms (median) | min bytes (MB) | GB/s | of copy |")
    say("| --- | --- | --- | --- | --- |")

    def case(name, fn, nbytes):
        res = benchmark(fn, n_repeat=args.repeat, n_warmup=3)
        t = float(np.median(res.gpu_times))
        say(f"| {name} | {t * 1e3:.3f} | {nbytes / 1e6:.0f} | {nbytes / t / 1e9:.0f} | {nbytes / t / 1e9 / ceiling:.0%} |")
        return t

    cal = Calibrator(EPIX, consts, mask, backend)
    case("calibrate_u16 (fused, no common mode)", lambda: cal(raw), E * N * (2 + 4 + 1) + N * 8)
    cm = MedianCommonMode(EPIX, shape[1:], ["rows", "cols"], backend=backend)
    cal_cm = Calibrator(EPIX, consts, mask, backend, common_mode=cm)
    case("pedestal_u16 + median rows + cols (the cols step applies the gain scale)", lambda: cal_cm(raw),
         E * N * (2 + 4 + 1) + N * 8)
    s = backend.to_device(rng.standard_normal((E, *shape), dtype=np.float32) * 5)
    good = backend.to_device(rng.random((E, *shape)) > 0.01)
    g = backend.to_device(np.where(rng.random((E, *shape)) < 0.01, 5, 3).astype(np.int8))
    br, bc = cm.bank
    p, rr, cc = shape
    case("median rows + cols (MedianCommonMode, all steps)", lambda: cm(s, good, g), E * N * (4 + 1 + 1 + 4) * 2)
    if backend.is_gpu:  # one kernel launch each
        case("median rows (groups of 48: cm_median_rows_warp, a warp per group)",
             lambda: launch_median_step(backend, s, good, g, bc, E * p * rr, cc, cc // bc, bc, 1, cm.range_mask, 10,
                                        100.0),
             E * N * (4 + 1 + 1 + 4))
        case("median cols (groups of 176: cm_median_cols_warp, tiles of 32 columns)",
             lambda: launch_median_step(backend, s, good, g, br, E * p * (rr // br), br * cc, cc, 1, cc, cm.range_mask,
                                        10, 100.0),
             E * N * (4 + 1 + 1 + 4))

    from gpusmall.funcs import FrameContext

    x, y, z = panel_layout(shape, 100.0)
    d = backend.to_device
    ctx = FrameContext(det="p", model=EPIX, backend=backend, shape=shape, mask=d(np.ones(shape, bool)),
                       noise=d(np.full(shape, 3.0, np.float32)), x=d(x), y=d(y), z=d(z), pixel_um=100.0)
    data = xp.abs(s)
    frames = Frames(data, good)
    for engine in ("csr", "histogram"):
        f = Azav(Azav.Params(center_um=[0, 0], distance_mm=100, energy_kev=9.5, bins=500, engine=engine))
        f.setup(ctx)
        case(f"azav {engine} (whole function)", lambda f=f: f.compute(frames), E * N * (4 + 1))
        if engine == "csr":
            flat = data.reshape(E, -1)
            case("azav csr: cuSPARSE M @ data.T alone", lambda f=f, flat=flat: f.M @ flat.T, E * N * 4)
    sums = RunSums(["calib", "square", "max", "nhits_thresADU80"], shape, backend)
    case("run_sums (the demo's 4 sums, one read of the batch)", lambda: sums.update(data), E * N * 4 + 2 * 4 * N * 8)
    drop = Droplet(Droplet.Params(threshold=10, threshold_low=3, use_rms=True, max_droplets=6000))
    drop.setup(ctx)
    case("droplet_mask (seeds + growth, one kernel)", lambda: drop.mask(data, good), E * N * (4 + 1 + 1))
    case("droplet (whole function: mask, label, per-droplet sums, padding)", lambda: drop.compute(frames),
         E * N * (4 + 1 + 1))
    say()
    if backend.is_gpu:
        say("| kernel | registers | shared (static) B | local B | max threads/block |")
        say("| --- | --- | --- | --- | --- |")
        for (file, name, _), k in sorted(backend._kernels.items()):
            a = k.attributes
            say(f"| {file}:{name} | {a.get('num_regs')} | {a.get('shared_size_bytes')} | {a.get('local_size_bytes')} "
                f"| {a.get('max_threads_per_block')} |")
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
