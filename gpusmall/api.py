"""The Python API for ipython and Jupyter: a run from its config, a result file, a cube file.

Everything the command line does at a beamtime, from a notebook (docs/API.md is the reference)::

    import gpusmall
    run = gpusmall.open_run("config.yaml")        # or a dict; validated as `gpusmall run` does
    run.show_config()                              # the validated config as YAML
    av = run.avimage(events=100, det="epix")       # average calibrated image (AverageImage)
    fig = run.plot_avimage(events=100, det="epix") # matplotlib Figure
    path = run.run(events=1000, backend="numpy")   # reduce -> Path of the result file

    res = gpusmall.open_result(path)
    df = res.to_dataframe()                        # pandas: events x per-event scalars, a `time` column
    ds = res.to_xarray()                           # xarray: every per-event array
    cube = res.cube("scan/varStep", steps=True, split=["laser_on", "laser_off"])   # xarray Dataset
    cube = gpusmall.open_cube("run.cube.h5")       # the cube a run wrote (or `gpusmall cube`'s)

Nothing heavy is imported with ``gpusmall`` (no h5py, matplotlib, pandas, xarray, pydantic): each is
imported by the function that needs it. Every error about the user's input is a
:class:`~gpusmall.errors.InputError` (a :class:`~gpusmall.errors.ConfigError` for a config) whose message
names the key, detector or file, as on the command line.
"""

from __future__ import annotations

import builtins
import json
import sys
from pathlib import Path
from typing import Any

from .errors import InputError

__all__ = ["Result", "Run", "interactive", "open_cube", "open_result", "open_run"]

#: root per-event datasets that :meth:`Result.to_dataframe` and :meth:`Result.to_xarray` leave out of their
#: default keys: ``timestamp`` becomes the ``time`` column / coordinate, ``event_index`` the index
BOOKKEEPING = ("timestamp", "event_index", "event_time", "fiducials")


def interactive() -> bool:
    """True in an interactive session: IPython or Jupyter (``builtins.__IPYTHON__``), ``python -i``
    (``sys.flags.interactive``) or the plain REPL (``sys.ps1``)."""
    return bool(hasattr(builtins, "__IPYTHON__") or sys.flags.interactive or hasattr(sys, "ps1"))


def _text(v):
    """HDF5 scalars as Python values: bytes -> str, 0-d arrays -> Python numbers."""
    import numpy as np

    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray) and v.dtype.kind == "S":
        return v.astype(str)
    if isinstance(v, np.generic):
        return v.item()
    return v


# ---- a run: config, average image, reduction ------------------------------------------------------------


class Run:
    """A run described by a config: look at its average image, reduce it.

    Args:
        config: a config file (YAML or TOML; ``str`` or ``Path``; relative paths in it are taken from its
            folder), a config mapping (relative paths from ``base_dir``), or a validated
            :class:`~gpusmall.producer.config.RunConfig`.
        base_dir: folder for the relative paths of a mapping (default: the current folder).

    Raises:
        ConfigError: the config does not validate; the message names the key path
            (``detectors.cam.functions[0].bounds``).

    Attributes:
        config: the validated :class:`~gpusmall.producer.config.RunConfig` (pydantic model;
            ``run.config.detectors["cam"].shape``, ``run.config.source.events``...).
        path: the config file, or None for a mapping.
        last_summary: the :class:`~gpusmall.producer.run.RunSummary` of the latest :meth:`run` (None before).
    """

    def __init__(self, config, base_dir: str | Path | None = None):
        from .producer.config import RunConfig, load_config, validate_config

        self.path: Path | None = None
        if isinstance(config, RunConfig):
            self.config = config
        elif isinstance(config, (str, Path)):
            self.path = Path(config)
            self.config = load_config(self.path)
        elif isinstance(config, dict):
            self.config = validate_config(config, base_dir=Path(base_dir) if base_dir is not None else Path.cwd())
        else:
            raise InputError(
                f"open_run: config must be a file path, a mapping or a RunConfig, not {type(config).__name__}"
            )
        self.last_summary: Any = None  # a RunSummary after run()

    # -- the config ---------------------------------------------------------------------------------------

    @property
    def detectors(self) -> list[str]:
        """Detector names of the config, in its order."""
        return list(self.config.detectors)

    def config_dict(self, defaults: bool = True) -> dict:
        """The validated config as a plain mapping (paths resolved); ``defaults=False``: only the keys the
        config gave (and what validation filled in, such as resolved paths)."""
        return self.config.model_dump(mode="json", exclude_unset=not defaults)

    def config_text(self, defaults: bool = False) -> str:
        """The validated config as YAML text (see :meth:`config_dict`)."""
        import yaml

        return yaml.safe_dump(self.config_dict(defaults), sort_keys=False, default_flow_style=None, width=110)

    def show_config(self, defaults: bool = False) -> None:
        """Print the validated config as YAML (``defaults=True``: every key with its default too)."""
        print(self.config_text(defaults), end="")

    def __repr__(self) -> str:
        s = self.config.source
        dets = ", ".join(
            f"{n} ({d.type}{' ' + 'x'.join(map(str, d.shape)) if d.shape else ''})"
            for n, d in self.config.detectors.items()
        )
        where = f"{self.path}" if self.path else "a config mapping"
        events = f", {s.events} events" if s.events else ""
        return f"<gpusmall.Run {where}: {s.type} source{events}; detectors {dets}; output {self.config.output}>"

    # -- detectors ----------------------------------------------------------------------------------------

    def choose_detector(self, det: str | None = None, what: str = "avimage") -> str:
        """The detector ``det``, or the only one; with several and no ``det``: asked for (``input()``) in an
        interactive session (:func:`interactive`), an :class:`InputError` naming them in a script."""
        names = self.detectors
        if det is not None:
            if det not in self.config.detectors:
                raise InputError(f"{what}: no detector {det!r} in the config (detectors: {', '.join(names)})")
            return det
        if len(names) == 1:
            return names[0]
        if not interactive():
            raise InputError(
                f"{what}: the config has {len(names)} detectors ({', '.join(names)}): "
                f"name one with det=, e.g. det={names[0]!r}"
            )
        menu = ", ".join(f"{i}: {n}" for i, n in enumerate(names))
        while True:
            answer = input(f"{what}: which detector? ({menu}) ").strip()
            if answer in names:
                return answer
            if answer.isdigit() and int(answer) < len(names):
                return names[int(answer)]
            if not answer:
                raise InputError(f"{what}: no detector chosen (detectors: {', '.join(names)})")
            print(f"no detector {answer!r}; give a name or a number")

    def _backend(self, backend: str | None):
        from .backend import cpu_threads, get_backend

        return get_backend(backend, self.config.backend, threads=cpu_threads())

    # -- the average image --------------------------------------------------------------------------------

    def avimage(self, events: int | None = 100, det: str | None = None, backend: str | None = None):
        """Average calibrated image of the first ``events`` events of detector ``det`` (``gpusmall avimage``).

        Calibration, mask and common mode are those of :meth:`run` (the functions and sums are not run);
        per pixel the mean over the events in which it is good; damaged events are left out
        (:func:`gpusmall.analysis.avimage.average_image`).

        Args:
            events: number of events from the start of the run (None: all).
            det: detector name; None: the only one (several: asked for interactively, else an error).
            backend: ``numpy``, ``cupy`` or ``auto``; None: ``$GPUSMALL_BACKEND``, then the config's.

        Returns:
            :class:`~gpusmall.analysis.avimage.AverageImage`: ``mean`` (panels, rows, cols) float32 in the
            detector's units (NaN where the pixel was never good), ``count`` (panels, rows, cols) int32,
            ``events``, ``damaged``, ``x_um``, ``y_um``, ``pixel_um``; ``image()`` the (H, W) assembled image.
        """
        from .analysis.avimage import average_image

        det = self.choose_detector(det, "avimage")
        return average_image(self.config, det, self._backend(backend), events=events)

    def plot_avimage(
        self,
        events: int | None = 100,
        det: str | None = None,
        backend: str | None = None,
        *,
        av=None,
        title: str | None = None,
    ):
        """The average image drawn as ``gpusmall avimage --png`` draws it, as a matplotlib Figure.

        Assembled with the geometry as psana's ``det.raw.image()`` (rows along x, columns along y; axes
        ``y``, ``x`` in mm, pixels for a camera in pixel units), colour scale from the 1st to the 99th
        percentile, bad pixels grey, gaps blank, row 0 (the smallest x) at the top, colour bar
        ``<det> calib mean [<units>]`` (SPEC section 9, "Plots"). ``av``: an
        :class:`~gpusmall.analysis.avimage.AverageImage` already computed (then ``events``, ``det`` and
        ``backend`` are not used). Returns a :class:`matplotlib.figure.Figure` (not registered with pyplot:
        Jupyter shows it as a cell's value; ``fig.savefig("avg.png")`` writes it).
        """
        if av is None:
            det = self.choose_detector(det, "plot_avimage")
            av = self.avimage(events, det, backend)
        if title is None:
            title = f"{av.det} ({self.config.detectors[av.det].type}): mean of {av.events} events"
            if self.path is not None:
                title += f", {self.path.name}"
        return average_figure(av, title)

    # -- the reduction ------------------------------------------------------------------------------------

    def run(
        self, events: int | None = None, out: str | Path | None = None, backend: str | None = None, quiet: bool = True
    ) -> Path:
        """Reduce the run (``gpusmall run``) and return the path of the result file.

        Args:
            events: reduce the first ``events`` events only (a sim source makes exactly that many); None: all.
            out: the result file (relative to the current folder); None: the config's ``output``.
            backend: ``numpy``, ``cupy`` or ``auto``; None: ``$GPUSMALL_BACKEND``, then the config's.
            quiet: no progress bar.

        Returns:
            The result file's path (open it with :func:`open_result`). The run's summary (events, seconds,
            damaged events, the cube file) is :attr:`last_summary`.

        Raises:
            InputError: a bad input or output (e.g. an output that is someone else's file), as ``gpusmall run``
                exits 2; a run interrupted by Ctrl-C raises ``KeyboardInterrupt`` after the file is closed with
                the events reduced so far.
        """
        from .producer.run import reduce_run

        cfg = self.config
        if events is not None and cfg.source.type == "sim":
            cfg = cfg.model_copy(deep=True)
            cfg.source.events = int(events)  # a simulated run has no end of its own
        summary = reduce_run(cfg, self._backend(backend), events=events, output=out, quiet=quiet)
        self.last_summary = summary
        if summary.interrupted and "SIGINT" in (summary.reason or ""):
            raise KeyboardInterrupt(f"run interrupted: {summary.events} events written to {summary.output}")
        return Path(summary.output)


def open_run(config, base_dir: str | Path | None = None) -> Run:
    """A :class:`Run` from a config file, a config mapping or a RunConfig (see :class:`Run`)."""
    return Run(config, base_dir=base_dir)


def average_figure(av, title: str):
    """A matplotlib Figure of an :class:`~gpusmall.analysis.avimage.AverageImage`: the Figure
    :func:`gpusmall.analysis.avimage.plot_average` writes as its PNG (row 0 at the top, colour bar in the
    run's units)."""
    from .analysis.avimage import average_figure as _figure

    return _figure(av, title)


# ---- a result file -------------------------------------------------------------------------------------


class Result:
    """A result file of ``gpusmall run`` (SPEC section 8), read with h5py.

    Every method opens the file for its own read (HDF5 SWMR: also while the run still writes it, each call
    sees the events flushed so far) and closes it again, so the object holds no file handle. MPI master files
    (virtual datasets over the ranks' parts) read the same; a master whose parts are missing is an
    :class:`InputError` naming them.

    Args:
        path: the result file.

    Attributes:
        path: the result file (Path).
    """

    def __init__(self, path: str | Path):
        from .io.writer import open_result as _open

        self.path = Path(path)
        with _open(self.path) as f:  # exists and is HDF5 (UnreadableResult, an InputError, otherwise)
            from .analysis.results import n_events

            n_events(f)  # a gpusmall result (has /timestamp)

    def _open(self):
        from .io.writer import open_result as _open

        return _open(self.path)

    def __repr__(self) -> str:
        return f"<gpusmall.Result {self.path}: {self.n_events} events, detectors {', '.join(self.detectors)}>"

    def __len__(self) -> int:
        return self.n_events

    @property
    def n_events(self) -> int:
        """Number of events in the file (the length of ``/timestamp``)."""
        from .analysis.results import n_events

        with self._open() as f:
            return n_events(f)

    @property
    def detectors(self) -> list[str]:
        """Detector names (the groups of ``/UserDataCfg``)."""
        from .analysis.results import detectors

        with self._open() as f:
            return detectors(f)

    @property
    def attrs(self) -> dict:
        """The file's root attributes (``events``, ``backend``, ``complete``, ``context``...; text as str)."""
        with self._open() as f:
            return {k: _text(v) for k, v in f.attrs.items()}

    @property
    def config(self) -> dict | None:
        """The run's config as the file records it (root attribute ``config``, JSON), or None."""
        a = self.attrs.get("config")
        return json.loads(a) if a else None

    def keys(self, group: str | None = None) -> list[str]:
        """Paths of the per-event datasets (first axis = events; not ``/UserDataCfg``, ``/Sums``, nor the ragged
        per-droplet datasets and their offsets), e.g. ``cam/roi0_sum``, ``ipm/sum``, ``timestamp``;
        ``group``: only those under it (``"cam"``)."""
        from .analysis.results import per_event_datasets

        with self._open() as f:
            return per_event_datasets(f, group)

    def scalar_keys(self) -> list[str]:
        """The per-event *scalar* keys: datasets of shape (events,) holding numbers."""
        with self._open() as f:
            return _scalar_keys(f)

    def __getitem__(self, key: str):
        """The whole dataset ``key`` as a NumPy array (any dataset of the file, e.g. ``"cam/roi0_sum"``,
        ``"UserDataCfg/cam/mask"``); a KeyError-free InputError with close matches when it is not there."""
        from .analysis.results import normalize_key, require_dataset
        from .io.master import require_sources

        with self._open() as f:
            d = require_dataset(f, key)
            require_sources(f, [normalize_key(key)], "result")
            return _text(d[()])

    def _checked_keys(self, f, keys, default, what: str, scalar: bool) -> list[str]:
        from .analysis.results import (
            is_per_event,
            n_events,
            normalize_key,
            require_dataset,
        )
        from .io.master import require_sources

        n = n_events(f)
        if keys is None:
            keys = default
        else:
            keys = [normalize_key(k) for k in ([keys] if isinstance(keys, str) else keys)]
            for k in keys:
                d = require_dataset(f, k, f"{what}: key")
                if not is_per_event(f, k, n):
                    raise InputError(f"{what}: {k!r} is not a per-event dataset ({d.shape}; the file has {n} events)")
                if d.dtype.kind not in "biuf":
                    raise InputError(f"{what}: {k!r} holds {d.dtype} values, not numbers")
                if scalar and d.ndim != 1:
                    raise InputError(
                        f"{what}: {k!r} has {d.shape[1:]} values per event, not one: "
                        f"to_xarray() takes per-event arrays of any shape"
                    )
        require_sources(f, keys, what)
        return keys

    def _index(self, f):
        """(event index (events,) int64, time (events,) datetime64[ns] UTC) of an open file."""
        import numpy as np

        from .analysis.results import n_events

        n = n_events(f)
        event = f["event_index"][()].astype(np.int64) if "event_index" in f else np.arange(n, dtype=np.int64)
        ts = f["timestamp"][()]
        time = ts.astype(np.int64).astype("datetime64[ns]")  # ns since the Unix epoch (< 2262) -> UTC datetimes
        return event, time

    def to_dataframe(self, keys: list[str] | str | None = None):
        """A pandas DataFrame: one row per event, one column per per-event scalar.

        Args:
            keys: per-event scalar keys (``cam/roi0_sum``, ``ipm/sum``...); None: every per-event dataset of
                shape (events,) holding numbers (the detectors' scalars and ``damaged``, the context such as
                ``lightStatus/laser``, ``lightStatus/xray``, ``scan/varStep``, ``scan/<variable>``, ``ipm/sum``,
                ``epics/<pv>``), but not ``timestamp``, ``event_index``, ``event_time``, ``fiducials``.

        Returns:
            DataFrame with index ``event`` (``/event_index``), a first column ``time`` (``/timestamp``, uint64
            ns since the Unix epoch, as ``datetime64[ns]`` in UTC, timezone-naive), then one column per key,
            named by the key, with the dataset's dtype (uint8 light status, float64 sums, int64 steps...).

        Raises:
            InputError: a key that is not in the file (close matches named), not per event, or not a scalar.
        """
        import pandas as pd

        with self._open() as f:
            default = [k for k in _scalar_keys(f) if k not in BOOKKEEPING]
            keys = self._checked_keys(f, keys, default, "to_dataframe", scalar=True)
            event, time = self._index(f)
            columns = {"time": time}
            for k in keys:
                columns[k] = f[k][()]
        return pd.DataFrame(columns, index=pd.Index(event, name="event"))

    def to_xarray(self, keys: list[str] | str | None = None):
        """An xarray Dataset of per-event arrays of any shape.

        Args:
            keys: per-event keys; None: every per-event numeric dataset (images such as a ROI ``area``
                included: they are read into memory), but not ``timestamp``, ``event_index``,
                ``event_time``, ``fiducials``.

        Returns:
            Dataset with one variable per key, named by the key, dims ``("event", "<key>_dim1", ...)``
            (e.g. ``cam/azav_azav``: ``("event", "cam/azav_azav_dim1", "cam/azav_azav_dim2")`` = events, phi
            bins, q bins), the dataset's dtype; coordinates ``event`` (``/event_index``) and ``time``
            (``/timestamp`` as datetime64[ns] UTC) on ``event``; for an azav output also ``<det>/<name>_q``
            (bin centres, in the function's ``unit``) and ``<det>/<name>_phi`` on its bin dims, from
            ``/UserDataCfg``. Root attributes that are numbers or text are the Dataset's ``attrs``.
        """
        import xarray as xr

        from .analysis.results import per_event_datasets

        with self._open() as f:
            default = [k for k in per_event_datasets(f) if k not in BOOKKEEPING and f[k].dtype.kind in "biuf"]
            keys = self._checked_keys(f, keys, default, "to_xarray", scalar=False)
            event, time = self._index(f)
            data, coords = {}, {"event": ("event", event), "time": ("event", time)}
            for k in keys:
                a = f[k][()]
                dims = ("event",) + tuple(f"{k}_dim{i}" for i in range(1, a.ndim))
                data[k] = (dims, a)
                coords.update(_azav_coords(f, k, a.shape, dims))
            attrs = {}
            for name, v in f.attrs.items():
                v = _text(v)
                if isinstance(v, (str, int, float, bool)):
                    attrs[name] = v
        ds = xr.Dataset(data, coords=coords, attrs=attrs)
        ds["time"].attrs["description"] = "/timestamp: ns since the Unix epoch, UTC"
        return ds

    def sums(self) -> dict:
        """The run sums: ``{"<det>_<sum>": array}`` from ``/Sums`` (detector shape, (rows, cols) for a
        camera; e.g. ``cam_calib``, ``cam_calib_max``, ``cam_calib_laser_on``)."""
        with self._open() as f:
            if "Sums" not in f:
                return {}
            out: dict = {}
            f["Sums"].visititems(lambda n, o: out.__setitem__(n, o[()]) if hasattr(o, "shape") else None)
            return out

    def user_data_cfg(self, det: str | None = None) -> dict:
        """What ``/UserDataCfg/<det>`` holds: constants (``ped``, ``gain``, ``noise``, ``status``), geometry
        (``x``, ``y``, ``z`` um, ``ix``, ``iy``), ``mask``, ``cmask`` and every parameter (``roi0__bounds``,
        ``azav__q``...), as NumPy arrays, numbers and str (text). ``det``: None for the only detector."""
        names = self.detectors
        if det is None:
            if len(names) != 1:
                raise InputError(
                    f"user_data_cfg: the file has {len(names)} detectors ({', '.join(names)}): "
                    f"name one, e.g. user_data_cfg({names[0]!r})"
                    if names
                    else f"user_data_cfg: {self.path} has no /UserDataCfg"
                )
            det = names[0]
        if det not in names:
            raise InputError(f"user_data_cfg: no detector {det!r} in {self.path} (detectors: {', '.join(names)})")
        with self._open() as f:
            out: dict = {}
            f[f"UserDataCfg/{det}"].visititems(
                lambda n, o: out.__setitem__(n, _text(o[()])) if hasattr(o, "shape") else None
            )
            return out

    def cube(
        self,
        by: str,
        bins: int | None = None,
        keys: list[str] | None = None,
        range=None,
        *,
        edges=None,
        width: float | None = None,
        steps: bool = False,
        selection: str | None = None,
        split: list[str] | None = None,
        select: list[str] | None = None,
        out: str | Path | None = None,
    ):
        """Bin the events by a per-event scalar (``gpusmall cube``; :func:`gpusmall.analysis.cube.make_cube`).

        Args:
            by: the binning key, a per-event scalar (``scan/varStep``, ``cam/roi0_sum``, ``scan/delay``).
            bins: N equal-width bins over ``range`` (or the key's finite range); or exactly one of
            edges: explicit increasing bin edges (bin k: ``edges[k] <= v < edges[k+1]``, the last also ``v ==
                edges[-1]``), width: bins of this width (over ``range`` if given), steps: one bin per distinct
                value.
            keys: per-event datasets to sum per bin; None: the detector's datasets and every per-event scalar.
            range: ``(lo, hi)`` for ``bins`` or ``width``, in the unit of ``by``.
            selection: keep only the events of this selection (the file's config's, or the built-in
                ``dropped``, ``laser_on``, ``laser_off``).
            split: a leading ``split`` axis, one entry per selection (e.g. ``["laser_on", "laser_off"]``).
            select: ad-hoc conditions ``"KEY=V"`` / ``"KEY=LO:HI"`` that must all hold.
            out: also write the cube file here (as ``gpusmall cube --out``; refused when the path is another
                kind of file).

        Returns:
            xarray Dataset (:func:`cube_dataset`): ``count`` (["split",] "bin") int64, ``<key>_sum`` and
            ``<key>_mean`` (["split",] "bin", "<key>_dim1", ...) float64; coordinates ``bin`` = the bin centres
            (the distinct values with ``steps``), ``bin_lo`` / ``bin_hi`` the edges of each bin (not with
            steps), ``split`` the selection names; attrs ``by``, ``binning``, ``selection`` and the event counts
            ``events``, ``events_used``, ``events_damaged``...
        """
        from .analysis.cube import make_cube, write_cube

        if out is not None:
            from .producer.paths import check_output

            check_output(out, "cube: out", {"the input file": self.path}, results_only=True, kind="cube")
        cube = make_cube(
            self.path,
            by,
            bins,
            keys=keys,
            value_range=range,
            edges=edges,
            width=width,
            steps=steps,
            selection=selection,
            split=split,
            select=select,
        )
        if out is not None:
            write_cube(cube, out, source=str(self.path.resolve()))
        split = list(cube.split)
        attrs = {
            "by": cube.by,
            "binning": "steps" if cube.edges is None else "edges",
            "option": f"--{cube.binning}",
            "selection": cube.selection or "",
            "select": json.dumps(list(cube.select)),
            "source": str(self.path.resolve()),
        }
        attrs.update({("events" if k == "events" else f"events_{k}"): int(v) for k, v in cube.info.items()})  # type: ignore[misc]
        variables = {}
        for k in cube.sums:
            variables[f"{k}_sum"] = (k, cube.sums[k])
            variables[f"{k}_mean"] = (k, cube.means[k])
        return cube_dataset(cube.centers, cube.edges, cube.count, split, variables, attrs)


def _scalar_keys(f) -> list[str]:
    from .analysis.results import per_event_datasets

    return [k for k in per_event_datasets(f) if f[k].ndim == 1 and f[k].dtype.kind in "biuf"]


def _azav_coords(f, key: str, shape: tuple, dims: tuple) -> dict:
    """``<det>/<name>_q`` and ``_phi`` coordinates for an azav output ``<det>/<name>_azav`` (events, phi, q)."""
    parts = key.split("/")
    if len(parts) != 2 or not parts[1].endswith("_azav") or len(shape) != 3:
        return {}
    det, name = parts[0], parts[1][: -len("_azav")]
    g = f.get(f"UserDataCfg/{det}")
    out: dict = {}
    if g is None:
        return out
    for suffix, dim, n in (("q", dims[2], shape[2]), ("phi", dims[1], shape[1])):
        d = g.get(f"{name}__{suffix}")
        if d is not None and d.shape == (n,):
            out[f"{det}/{name}_{suffix}"] = (dim, d[()])
    return out


def open_result(path: str | Path) -> Result:
    """A :class:`Result` for a result file of ``gpusmall run`` (also an MPI master file, or a file still
    being written). InputError when the file does not exist, is not HDF5 or not a gpusmall result."""
    return Result(path)


# ---- cubes ----------------------------------------------------------------------------------------------


def cube_dataset(centers, edges, count, split: list[str], variables: dict, attrs: dict | None = None):
    """An xarray Dataset of a cube (SPEC section 10), from its arrays.

    Args:
        centers: (N,) bin centres (steps: the distinct values).
        edges: (N + 1,) edges, or None (steps).
        count: (N,) or (S, N) int64 events per bin.
        split: the S split selection names (empty: no split axis).
        variables: name -> (key, array (N, ...) or (S, N, ...)); the trailing axes get dims
            ``"<key>_dim1"``, ... (a key's ``_sum`` and ``_mean`` share them).
        attrs: the Dataset's attributes.
    """
    import numpy as np
    import xarray as xr

    lead = ("split", "bin") if split else ("bin",)
    coords: dict[str, Any] = {"bin": ("bin", np.asarray(centers))}
    if edges is not None:
        edges = np.asarray(edges, np.float64)
        coords["bin_lo"] = ("bin", edges[:-1])
        coords["bin_hi"] = ("bin", edges[1:])
    if split:
        coords["split"] = ("split", list(split))
    data = {"count": (lead, np.asarray(count))}
    for name, (key, a) in variables.items():
        a = np.asarray(a)
        data[name] = (lead + tuple(f"{key}_dim{i}" for i in range(1, a.ndim - len(lead) + 1)), a)  # type: ignore[assignment]
    ds = xr.Dataset(data, coords=coords, attrs=dict(attrs or {}))
    ds["bin"].attrs["description"] = f"bin centres of {ds.attrs.get('by', 'the binning key')}"
    return ds


def open_cube(path: str | Path):
    """A cube file (``gpusmall cube``'s, or the one a run with ``cube:`` writes) as an xarray Dataset.

    The layout (SPEC section 10): ``/bins/centers`` (N,), ``/bins/edges`` (N + 1,; not with steps),
    ``/bins/count`` (N,) or (S, N) with ``/bins/split`` (S,) the split selection names, ``/<key>_sum`` and
    optionally ``/<key>_mean`` (N, ...) or (S, N, ...). Returns the Dataset of :func:`cube_dataset`: ``count``,
    one variable per ``<key>_sum`` / ``<key>_mean`` dataset named by its path (``cam/frame_sum``,
    ``ipm/sum_sum``, ``cam/roi0_sum_mean``), coordinates ``bin`` (centres), ``bin_lo``, ``bin_hi``, ``split``;
    the file's root attributes as ``attrs``. A run's cube has no means: ``ds["cam/frame_sum"] / ds["count"]``
    (xarray matches the dims by name).
    """
    import numpy as np

    from .io.writer import open_result as _open

    with _open(path) as f:
        if "bins" not in f or "count" not in f["bins"] or "centers" not in f["bins"]:
            raise InputError(f"open_cube: {path} is not a cube file (no /bins/centers, /bins/count)")
        g = f["bins"]
        centers = g["centers"][()]
        edges = g["edges"][()] if "edges" in g else None
        count = g["count"][()]
        split = [s.decode() if isinstance(s, bytes) else str(s) for s in g["split"][()]] if "split" in g else []
        names: list[str] = []
        f.visititems(lambda n, o: names.append(n) if hasattr(o, "shape") and not n.startswith("bins/") else None)
        variables = {}
        for n in names:
            for suffix in ("_sum", "_mean"):
                if n.endswith(suffix):
                    variables[n] = (n[: -len(suffix)], f[n][()])
                    break
        attrs = {}
        for k, v in f.attrs.items():
            v = _text(v)
            if isinstance(v, (str, int, float, bool, np.bool_)):
                attrs[k] = bool(v) if isinstance(v, np.bool_) else v
    return cube_dataset(centers, edges, count, split, variables, attrs)
