"""Command line (SPEC section 9): ``gpusmall demo|run|darks|merge|inspect|avimage|plot|cube ...``.

``run`` and ``demo`` also work under ``mpiexec -n K`` / ``srun`` (one rank per GPU); only rank 0 prints.

Exit status 0 on success, 2 for a bad config or input, 1 for anything else, with one line on stderr
naming the problem.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import resources
from pathlib import Path

import yaml

from . import __version__
from .errors import GpusmallError

log = logging.getLogger("gpusmall")


def _positive(text: str) -> int:
    v = int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return v


def demo_config_dict() -> dict:
    """The embedded default config of ``gpusmall demo``."""
    return yaml.safe_load(resources.files("gpusmall.producer").joinpath("demo.yaml").read_text())


def _run_config(cfg, args) -> int:
    from .backend import cpu_threads, get_backend, resolve_choice
    from .producer.allocator import keep_freed_memory
    from .producer.mpi import get_comm, gpu_for_rank
    from .producer.run import reduce_run

    keep_freed_memory()  # batches reuse the previous batch's host memory (see allocator.py)
    if args.events is not None and cfg.source.type == "sim":
        cfg.source.events = args.events  # a simulated run has no end of its own: --events N makes N events
    comm = get_comm()
    device = gpu_for_rank(comm, resolve_choice(args.backend, cfg.backend))
    threads = args.threads or cpu_threads(comm.local_size)  # NumPy: the node's cores shared by its ranks
    backend = get_backend(args.backend, cfg.backend, device_id=device, threads=threads)
    who = f"rank {comm.rank}/{comm.size}: " if comm.size > 1 else ""
    if comm.rank == 0 or args.verbose:
        print(f"gpusmall: {who}backend {backend.description}", file=sys.stderr)
    summary = reduce_run(cfg, backend, events=args.events, output=args.out, quiet=args.quiet, comm=comm)
    if comm.rank != 0:
        return 1 if summary.interrupted else 0
    bad = {k: v for k, v in summary.damaged.items() if v}
    if bad:
        print("gpusmall: damaged events: " + ", ".join(f"{k} {v}" for k, v in bad.items()), file=sys.stderr)
    if summary.truncated_events:  # also in the file: root attributes truncated_events, truncated (JSON)
        by = ", ".join(f"{k} {v}" for k, v in summary.truncated.items() if v)
        print(
            f"gpusmall: {summary.truncated_events} of {summary.events} events truncated by a bounded output ({by}): "
            f"raise max_droplets / max_photons to keep every item",
            file=sys.stderr,
        )
    if summary.interrupted:
        print(
            f"gpusmall: interrupted ({summary.reason or 'stopped'}): {summary.events} events written to "
            f"{summary.output}",
            file=sys.stderr,
        )
        return 1
    ranks = f" on {summary.ranks} ranks" if summary.ranks > 1 else ""
    print(
        f"gpusmall: {summary.events} events -> {summary.output}{ranks} in {summary.seconds:.1f} s "
        f"({summary.events_per_s:.1f} events/s)",
        file=sys.stderr,
    )
    if summary.cube is not None:
        i = summary.cube_info
        mine = (
            f" (rank 0: {i.get('used', 0)} of its {i.get('events', 0)} events)"
            if summary.ranks > 1
            else (f" ({i.get('used', 0)} of {i.get('events', 0)} events in its bins)")
        )
        print(f"gpusmall: cube -> {summary.cube}{mine}", file=sys.stderr)
    t = summary.device_times
    if backend.is_gpu and t.batches:
        print(
            f"gpusmall: rank 0 GPU time: reduce {t.compute_s:.2f} s, host->device {t.h2d_s:.2f} s "
            f"({t.h2d_gb_per_s:.1f} GB/s), results device->host {t.d2h_s:.2f} s ({t.d2h_bytes / 1e9:.2f} GB); "
            f"the copies overlap the reductions",
            file=sys.stderr,
        )
    return 0


def cmd_demo(args) -> int:
    from .producer.config import validate_config

    data = demo_config_dict()
    cfg = validate_config(data, base_dir=Path.cwd())
    return _run_config(cfg, args)


def cmd_run(args) -> int:
    from .producer.config import load_config

    cfg = load_config(args.config)
    if getattr(args, "follow", False):
        from .errors import ConfigError

        if cfg.source.type == "sim":
            raise ConfigError("--follow: a simulated run is complete from the start; follow an hdf5 or psana source")
        cfg.source.follow = True
    return _run_config(cfg, args)


def cmd_merge(args) -> int:
    from .io.master import build_master, find_parts
    from .producer.lock import OutputLock
    from .producer.paths import check_output

    parts = find_parts(args.file)
    if not parts:
        stem = Path(args.file)
        print(f"gpusmall: error: no part files {stem.stem}.part*.h5 in {stem.parent}", file=sys.stderr)
        return 2
    # FILE is overwritten only when it is an earlier gpusmall result (a master), never one of its parts
    check_output(args.file, "merge", {f"its part {p.name}": p for p in parts}, results_only=True)
    with OutputLock(args.file, "merge"):  # not while a run writes this master
        info = build_master(args.file, parts)
    extra = f", {len(info['skipped'])} unreadable parts skipped" if info["skipped"] else ""
    print(f"gpusmall: {info['events']} events from {len(info['parts'])} parts -> {args.file}{extra}", file=sys.stderr)
    return 0


def cmd_darks(args) -> int:
    """Pedestal, noise and status from one or more dark runs -> one constants file (SPEC section 2).

    Each config names one dark run (a gain-switching detector's gain modes are taken one run each:
    ePix10ka FH, FM, FL, AHL, AML; JUNGFRAU G0, G1, G2); per gain range and pixel the file takes the
    run with the most events in that range (``gpusmall.calib.darks``). Every config must hold the
    detector (``--det``, or its only one) with the same type and shape.
    """
    import numpy as np

    from .backend import get_backend
    from .calib.darks import combine_dark_runs, dark_constants, measure_dark, measured_ranges
    from .detectors import get_model
    from .errors import InputError
    from .producer.allocator import keep_freed_memory
    from .producer.config import load_config
    from .producer.paths import check_output, input_files
    from .sources import open_source

    keep_freed_memory()
    configs = [load_config(p) for p in args.config]
    det, dtype, backend, acc, shape = args.det, None, None, None, None
    for path, cfg in zip(args.config, configs):
        names = list(cfg.detectors)
        name = det or (names[0] if len(names) == 1 else None)
        if name not in cfg.detectors:
            where = f" in {path}" if len(configs) > 1 else ""
            raise InputError(f"darks: name one detector with --det ({', '.join(names)}){where}")
        if det is not None and name != det:
            raise InputError(f"darks: {path} has detector {name!r}, the first config {det!r}; name it with --det")
        det = name
        d = cfg.detectors[det]
        if dtype is not None and d.type != dtype:
            raise InputError(f"darks: detector {det} is a {d.type} in {path}, a {dtype} in {args.config[0]}")
        dtype = d.type
    for cfg in configs:  # before any event: the output must not be an input of any run
        check_output(args.out, "--out", input_files(cfg), results_only=True, kind="constants")
    model = get_model(dtype)  # type: ignore[arg-type]
    for k, (path, cfg) in enumerate(zip(args.config, configs)):
        if backend is None:
            backend = get_backend(args.backend, cfg.backend)
        if cfg.source.type == "sim":  # a simulated dark run: no photons
            from .sources.sim import SimSource

            d = cfg.detectors[det]
            source = SimSource(
                cfg.source.events,  # type: ignore[arg-type]
                {
                    det: {
                        "type": d.type,
                        "shape": d.panel_shape(),
                        "pixel_um": d.pixel_um,
                    }
                },
                seed=cfg.source.seed,
                photons=False,
                threads=cfg.source.threads,
            )
        else:
            if cfg.source.type == "psana" and not cfg.detectors[det].constants:
                # a dark run needs no constants: without this, a psana source asks psana for them (and
                # refuses a gain-switching detector offline); nothing reads this name
                cfg.detectors[det].constants = "(darks: no constants needed)"
            source = open_source(cfg)  # type: ignore[assignment]
        with source:
            got = tuple(source.detectors[det].shape)
            if shape is not None and got != shape:
                raise InputError(
                    f"darks: detector {det} has shape {list(got)} in {path}, {list(shape)} in {args.config[0]}"
                )
            shape = got
            run = measure_dark(source, det, model, backend, events=args.events, batch_size=cfg.batch_size)
        if len(configs) > 1:
            seen = [model.gain_names[r] for r in np.flatnonzero(measured_ranges(run.count))]
            print(
                f"gpusmall: darks of {det}: run {k + 1} ({path}): {run.events} events, gain ranges "
                f"{', '.join(seen) or 'none'}",
                file=sys.stderr,
            )
        acc = run if acc is None else combine_dark_runs([acc, run], det)
    res = dark_constants(acc, model, args.n_sigma)  # type: ignore[arg-type]
    res.constants.save(args.out)
    ranges = ""
    if model.n_gains > 1:
        m = res.measured
        held = [model.gain_names[r] + (" (derived)" if m[r] == 2 else "") for r in range(model.n_gains) if m[r]]  # type: ignore[index]
        ranges = f", gain ranges {', '.join(held) or 'none'}"
    runs = f" from {len(configs)} runs" if len(configs) > 1 else ""
    print(
        f"gpusmall: darks of {det}: {res.events} events{runs}{ranges}, {res.bad_pixels} bad pixels -> {args.out}",
        file=sys.stderr,
    )
    return 0


def cmd_inspect(args) -> int:
    from .analysis.inspect import describe

    print(describe(args.file))
    return 0


def _one_detector(cfg, det, command: str) -> str:
    from .errors import InputError

    names = list(cfg.detectors)
    det = det or (names[0] if len(names) == 1 else None)
    if det not in cfg.detectors:
        raise InputError(f"{command}: name one detector with --det ({', '.join(names)})")
    return det


def cmd_avimage(args) -> int:
    """Average calibrated image of the first N events, assembled with the geometry -> PNG (and HDF5)."""
    from .analysis.avimage import average_image, plot_average, write_average
    from .backend import get_backend
    from .producer.allocator import keep_freed_memory
    from .producer.config import load_config
    from .producer.paths import check_output, input_files

    keep_freed_memory()
    cfg = load_config(args.config)
    det = _one_detector(cfg, args.det, "avimage")
    inputs = input_files(cfg)
    check_output(args.png, "--png", inputs, results_only=True, kind="plot")
    if args.out:
        check_output(args.out, "--out", inputs, results_only=True, kind="average")
    backend = get_backend(args.backend, cfg.backend)
    print(f"gpusmall: backend {backend.description}", file=sys.stderr)
    av = average_image(cfg, det, backend, events=args.events)
    title = f"{det} ({cfg.detectors[det].type}): mean of {av.events} events, {Path(args.config).name}"
    plot_average(av, args.png, title=title)
    done = [str(args.png)]
    if args.out:
        write_average(av, args.out, attrs={"config": str(Path(args.config).resolve()), "backend": backend.description})
        done.append(str(args.out))
    extra = f", {av.damaged} damaged left out" if av.damaged else ""
    print(
        f"gpusmall: {det}: mean of {av.events} events{extra}, {int(av.bad.sum())} bad pixels -> {', '.join(done)}",
        file=sys.stderr,
    )
    return 0


def cmd_plot(args) -> int:
    from .analysis.plot import plot_key
    from .producer.paths import check_output

    check_output(args.png, "plot: --png", {"the input file": Path(args.file)}, results_only=True, kind="plot")
    from .analysis.plot_vs import is_cube_file, plot_cube, plot_vs

    if args.vs:
        what = plot_vs(args.file, args.key, args.vs, args.png, bins=args.bins)
    elif is_cube_file(args.file):
        what = plot_cube(args.file, args.key, args.png)
    else:
        what = plot_key(args.file, args.key, args.png)
    print(f"gpusmall: {what} -> {args.png}", file=sys.stderr)
    return 0


def cmd_cube(args) -> int:
    from .analysis.cube import make_cube, write_cube
    from .producer.paths import check_output

    out = Path(args.out) if args.out else Path(args.file).with_name(Path(args.file).stem + "_cube.h5")
    check_output(out, "cube: --out", {"the input file": Path(args.file)}, results_only=True, kind="cube")
    cube = make_cube(
        args.file,
        args.by,
        args.bins,
        keys=args.keys,
        value_range=args.range,
        edges=args.edges,
        width=args.width,
        steps=args.steps,
        selection=args.selection,
        split=args.split,
        select=args.select,
    )
    write_cube(cube, out, source=str(Path(args.file).resolve()))
    i = cube.info
    left = ", ".join(f"{i[k]} {k}" for k in ("damaged", "nonfinite", "unselected", "outside", "unsplit") if i.get(k))
    where = (
        f"{cube.nbins} steps of {cube.by}"
        if cube.edges is None
        else f"{cube.nbins} bins of {cube.by} [{cube.edges[0]:g}, {cube.edges[-1]:g}]"
    )
    print(
        f"gpusmall: {i['used']} of {i['events']} events in {where}"
        + (f" (left out: {left})" if left else "")
        + (f", split by {' '.join(cube.split)}" if cube.split else "")
        + f", {len(cube.sums)} datasets -> {out}",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpusmall", description="GPU-batched small-data reduction for X-ray area detectors"
    )
    p.add_argument("--version", action="version", version=f"gpusmall {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log what is done")
    sub = p.add_subparsers(dest="command", required=True)

    def run_options(sp, default_events=None):
        sp.add_argument(
            "--events",
            type=_positive,
            default=default_events,
            help="a simulated run: make N events; other sources: reduce at most N",
        )
        sp.add_argument("--out", help="output HDF5 file (default: the config's output)")
        sp.add_argument(
            "--backend",
            choices=("auto", "numpy", "cupy"),
            help="array backend (default: $GPUSMALL_BACKEND, then the config's, then auto)",
        )
        sp.add_argument("--quiet", action="store_true", help="no progress bar")
        sp.add_argument(
            "--threads",
            type=_positive,
            help="NumPy backend: CPU threads per rank (default: the cores shared by the ranks on the node)",
        )

    d = sub.add_parser("demo", help="simulated ePix10k2M run with the default function set (no input needed)")
    run_options(d)
    d.set_defaults(func=cmd_demo)
    r = sub.add_parser("run", help="reduce the run a config file describes")
    r.add_argument("config", help="YAML or TOML config")
    r.add_argument(
        "--follow",
        action="store_true",
        help="reduce a run that is still being written (hdf5: until it stops growing for "
        "source.follow_timeout_s; psana: live mode)",
    )
    run_options(r)
    r.set_defaults(func=cmd_run)
    m = sub.add_parser("merge", help="master file from the <stem>.part*.h5 of an interrupted MPI run")
    m.add_argument("file", help="the master file to write (its parts are <stem>.part<rank>.h5 beside it)")
    m.set_defaults(func=cmd_merge)
    k = sub.add_parser("darks", help="pedestal, noise and status from dark runs (one per gain mode) -> constants file")
    k.add_argument(
        "config",
        nargs="+",
        help="YAML or TOML config naming a dark run; several: one per gain mode "
        "(per gain range and pixel, the run with most events in it)",
    )
    k.add_argument("--out", required=True, help="constants HDF5 file to write")
    k.add_argument("--events", type=_positive, help="use at most N events of each run")
    k.add_argument("--backend", choices=("auto", "numpy", "cupy"), help="array backend")
    k.add_argument("--det", help="detector (needed when the config has several)")
    k.add_argument("--n-sigma", type=_positive_float, default=6.0, help="status threshold in robust sigmas (default 6)")
    k.set_defaults(func=cmd_darks)
    i = sub.add_parser("inspect", help="what a result file holds")
    i.add_argument("file")
    i.set_defaults(func=cmd_inspect)
    a = sub.add_parser("avimage", help="average calibrated image of the first N events, assembled -> PNG")
    a.add_argument("config", help="YAML or TOML config naming the run")
    a.add_argument("--events", type=_positive, default=100, help="average the first N events (default 100)")
    a.add_argument("--png", required=True, help="PNG file to write")
    a.add_argument(
        "--out", help="also write the average (panels, rows, cols) and the assembled image to this HDF5 file"
    )
    a.add_argument("--backend", choices=("auto", "numpy", "cupy"), help="array backend")
    a.add_argument("--det", help="detector (needed when the config has several)")
    a.set_defaults(func=cmd_avimage)
    pl = sub.add_parser("plot", help="plot one dataset of a result file -> PNG")
    pl.add_argument("file", help="result HDF5 file")
    pl.add_argument("key", help="dataset path, e.g. epix/roi0_sum or Sums/epix_calib")
    pl.add_argument("--png", required=True, help="PNG file to write")
    pl.add_argument(
        "--vs",
        metavar="KEY2",
        help="per-event scalar for the x axis (e.g. ipm/sum, scan/delay): every "
        "event's KEY against it, with the mean of KEY per bin",
    )
    pl.add_argument("--bins", type=int, default=20, help="--vs: bins of KEY2 (one per value when it takes <= 50)")
    pl.set_defaults(func=cmd_plot)
    c = sub.add_parser("cube", help="bin events by a per-event scalar: count, sum and mean per bin")
    c.add_argument("file", help="result HDF5 file")
    c.add_argument("--by", required=True, help="per-event scalar to bin by, e.g. epix/roi0_sum or scan/varStep")
    how = c.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--bins", type=_positive, help="number of equal-width bins (over --range or the key's finite range)"
    )
    how.add_argument("--edges", nargs="+", type=float, metavar="E", help="explicit, strictly increasing bin edges")
    how.add_argument(
        "--width",
        type=_positive_float,
        metavar="W",
        help="bins of width W over --range, or from floor(min/W)*W over the key's finite range",
    )
    how.add_argument(
        "--steps", action="store_true", help="one bin per distinct value of --by (scan steps: --by scan/varStep)"
    )
    c.add_argument(
        "--range",
        nargs=2,
        type=float,
        metavar=("LO", "HI"),
        help="bin range for --bins or --width (default: the key's finite range)",
    )
    c.add_argument(
        "--keys",
        nargs="+",
        help="per-event datasets to bin (default: all of --by's detector group, "
        "or all non-scalar per-event datasets, and every per-event scalar)",
    )
    c.add_argument(
        "--selection",
        metavar="NAME",
        help="only the events of this selection of the run's config (or built-in: dropped, laser_on, laser_off)",
    )
    c.add_argument(
        "--split",
        nargs="+",
        metavar="NAME",
        help="split each bin by each of these selections (a leading split axis on every count and sum)",
    )
    c.add_argument(
        "--select",
        action="append",
        metavar="KEY=V|KEY=LO:HI",
        help="only events with KEY == V or LO <= KEY <= HI (repeatable: all must hold)",
    )
    c.add_argument("--out", help="output HDF5 file (default: <file stem>_cube.h5 beside FILE)")
    c.set_defaults(func=cmd_cube)
    return p


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that Python's flush at exit does not raise BrokenPipeError again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="gpusmall: %(message)s")
    try:
        return args.func(args)
    except GpusmallError as exc:
        print(f"gpusmall: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("gpusmall: interrupted", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader of our output went away (`gpusmall inspect f | head`): not an error
        _silence_stdout()
        return 0
    except Exception as exc:  # one line, not a traceback; -v shows it
        if args.verbose:
            log.exception("failed")
        print(f"gpusmall: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
