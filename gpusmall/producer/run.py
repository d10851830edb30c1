"""The event loop of one run: source -> batches -> device -> calibrate -> reduce -> HDF5.

:func:`reduce_run` validates everything it can (constants, masks, function set-up) before it
creates the output file, so a bad config or input leaves no file behind.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..backend import Backend
from ..io.writer import ResultWriter
from ..sources import open_source
from .pipeline import DetectorPipeline

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    output: Path
    events: int
    seconds: float
    backend: str

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("inf")


def progress_bar(total: int | None, quiet: bool):
    """A tqdm bar on stderr with events/s; off with ``quiet`` or when stderr is not a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, unit="ev", desc="gpusmall", file=sys.stderr, dynamic_ncols=True,
                disable=quiet or not sys.stderr.isatty())


def reduce_run(cfg, backend: Backend, *, events: int | None = None, output: str | Path | None = None,
               quiet: bool = False) -> RunSummary:
    """Reduce the run a validated config describes; returns what was done."""
    out_path = Path(output or cfg.output)
    t0 = time.perf_counter()
    with open_source(cfg) as source:
        n = source.n_events
        if events is not None:
            n = events if n is None else min(n, events)
        pipelines = {name: DetectorPipeline(name, dcfg, source.detectors[name], cfg.function_specs(name), backend)
                     for name, dcfg in cfg.detectors.items()}
        done = 0
        with ResultWriter(out_path, chunk_events=cfg.batch_size) as writer, progress_bar(n, quiet) as bar:
            writer.set_attrs("/", {"gpusmall_version": __version__, "backend": backend.description,
                                   "config": cfg.model_dump_json()})
            for name, pl in pipelines.items():
                writer.write_static(f"UserDataCfg/{name}", pl.user_data_cfg())
            for batch in source.batches(cfg.batch_size, 0, n):
                columns = {"timestamp": batch.timestamp, "event_index": batch.event_index}
                for name, pl in pipelines.items():
                    results = pl.process(backend.to_device(batch.raw[name]))
                    for key, value in results.items():
                        columns[f"{name}/{key}"] = backend.to_host(value)
                    columns[f"{name}/damaged"] = batch.damaged[name].astype("uint8")
                writer.append(columns)
                done += len(batch)
                bar.update(len(batch))
            for name, pl in pipelines.items():
                writer.write_static("Sums", pl.sum_results())
            writer.set_attrs("/", {"events": done})
    dt = time.perf_counter() - t0
    return RunSummary(out_path, done, dt, backend.name)


def config_json(cfg) -> str:
    return json.dumps(json.loads(cfg.model_dump_json()), indent=1)
