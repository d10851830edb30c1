"""The run config (SPEC section 7): YAML or TOML, validated before any event is read, never executed.

:func:`load_config` returns a :class:`RunConfig`; every error is a :class:`~gpusmall.errors.ConfigError`
whose one-line message names the key path, e.g. ``detectors.epix10k2m.functions[1].bins``.
Relative paths in a config file are taken relative to the folder of that file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from ..detectors import MODELS
from ..errors import ConfigError

try:  # Python >= 3.11
    import tomllib  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover
    import tomli as tomllib


class Strict(BaseModel):
    """A config block: unknown keys are errors, numbers are finite (no NaN or inf)."""

    model_config = ConfigDict(extra="forbid", validate_default=True, strict=True, allow_inf_nan=False)


class SimScanConfig(Strict):
    """A simulated step scan: ``scan/<variable>`` = ``start + step * (event // events_per_step)``."""

    variable: str = "delay"
    start: float = 0.0
    step: float = 1.0
    events_per_step: PositiveInt = 100


class SimulateConfig(Strict):
    """What a simulated run's events carry besides frames (SPEC 10): a step scan, a laser pattern, dropped
    X-ray shots and a beam intensity I0 (``ipm/sum``) that scales the signal. Event ``i``'s values depend only on
    ``(seed, i)``. Pump-probe signal: laser-on events at a positive delay have ``1 + pump`` times the photons."""

    scan: SimScanConfig | None = None
    laser_off_every: int = Field(0, ge=0)  # every N-th event (index % N == 0) the laser is off; 0: always on
    xray_off_every: int = Field(0, ge=0)  # every N-th event (index % N == N - 1) has no X-rays (dropped shot)
    i0: bool = True  # write ipm/sum, the shot's intensity (mean 1), scaling the photons
    pump: float = Field(0.3, ge=0.0)


class SourceConfig(Strict):
    type: Literal["sim", "hdf5", "psana"]
    events: PositiveInt | None = None
    seed: int = 0
    damage_every: int = Field(0, ge=0)  # sim only: every N-th event (index % N == N - 1) is damaged
    threads: PositiveInt | None = None  # sim only: threads making events (default: half the cores, at most 8)
    simulate: SimulateConfig | None = None  # sim only: event context (scan, laser, dropped shots, I0)
    path: str | None = None
    timestamp: str | None = "/timestamp"  # hdf5: (events,) integer timestamps; null: use the event index
    files: list[str] | None = None
    exp: str | None = None
    run: int | None = None
    psana: dict[str, Any] = Field(default_factory=dict)
    follow: bool = False  # hdf5: wait for events still being written; psana: live mode
    follow_timeout_s: PositiveFloat = 60.0  # hdf5 + follow: the run has ended after this long without new events

    #: the keys each source type reads (besides type and events); any other key set is an error
    KEYS: ClassVar[dict[str, tuple[str, ...]]] = {
        "sim": ("seed", "damage_every", "threads", "simulate"),
        "hdf5": ("path", "timestamp", "follow", "follow_timeout_s"),
        "psana": ("files", "exp", "run", "psana", "follow"),
    }

    @model_validator(mode="after")
    def _needs(self):
        if self.follow and self.type == "sim":
            raise ValueError("follow: a simulated run is complete from the start; follow an hdf5 or psana source")
        unused = sorted(self.model_fields_set - {"type", "events", *self.KEYS[self.type]})
        if unused:
            raise ValueError(
                f"{', '.join(unused)}: not used by a {self.type} source "
                f"(a {self.type} source takes {', '.join(('events',) + self.KEYS[self.type])})"
            )
        if self.type == "sim" and self.events is None:
            self.events = 1000
        if self.type == "hdf5" and not self.path:
            raise ValueError("an hdf5 source needs 'path'")
        if self.type == "psana" and not self.files and not (self.exp and self.run is not None):
            raise ValueError("a psana source needs 'files' or 'exp' and 'run'")
        return self


class MaskConfig(Strict):
    status: bool = True
    edges: int = Field(0, ge=0)
    central: int = Field(0, ge=0)
    unbonded: bool = True
    neighbours: Literal[0, 4, 8] = 0
    user: str | None = None
    calib: bool = True


class CommonModeConfig(Strict):
    """``common_mode`` (SPEC section 4; gpusmall.calib.common_mode). Keys a config does not give take the
    detector's default common mode when it is of the same type (CsPad: ``zero_peak`` with ``method:
    psana``), then the type's defaults below."""

    type: Literal["median", "epix100", "zero_peak", "unbonded", "none", "raw"]
    axes: list[Literal["banks", "rows", "cols"]] = Field(default_factory=lambda: ["rows", "cols"], min_length=1)  # type: ignore[arg-type]
    # ADU; default 100 (median, zero_peak fullest, unbonded), 25 (zero_peak psana) or 30 (epix100)
    max_correction: PositiveFloat | None = None
    min_pixels: int = Field(10, ge=0)
    gain_ranges: Literal["all", "high"] | None = None  # default: high for gain-switching detectors
    norm_all: bool = False
    # epix100: |s| <= histo_range (ADU); zero_peak: the histogram range, r = [-r, r] or [low, high]
    # (default: +-max_correction for fullest, [-1000, 2000] for psana)
    histo_range: PositiveFloat | list[float] = 30.0
    min_fraction: float = Field(0.25, ge=0.0, le=1.0)
    # zero_peak only: fullest (default) or psana (default for cspad, cs140k); min_count: a peak bin holds more
    # values (default 0, psana 100); max_sigma: psana's peak-width limit (ADU, default 40)
    method: Literal["fullest", "psana"] | None = None
    min_count: int | None = Field(None, ge=0)
    max_sigma: PositiveFloat | None = None

    @model_validator(mode="after")
    def _keys_of_the_type(self):
        given = self.model_fields_set
        only = [k for k in ("method", "min_count", "max_sigma") if k in given]
        if only and self.type != "zero_peak":
            raise ValueError(f"{', '.join(only)}: only for type zero_peak")
        if isinstance(self.histo_range, list):
            if self.type != "zero_peak":
                raise ValueError("histo_range: a [low, high] range is for zero_peak; epix100 takes one number (ADU)")
            if len(self.histo_range) != 2 or not self.histo_range[0] < self.histo_range[1]:
                raise ValueError(f"histo_range: [low, high] with low < high, not {self.histo_range}")
        if "max_sigma" in given and self.method == "fullest":
            raise ValueError("max_sigma: only with method: psana (the fullest bin has no width)")
        return self


class DetectorConfig(Strict):
    type: Literal[tuple(MODELS)]  # type: ignore[valid-type]
    shape: list[PositiveInt] | None = Field(None, min_length=2, max_length=3)
    pixel_um: PositiveFloat | None = None
    saturation: float | None = None
    dataset: str | None = None
    source_name: str | None = None  # psana: the detector's name in the run, when it differs
    constants: str | None = None
    units: Literal["adu", "kev", "photons"] = "adu"
    photon_energy_kev: PositiveFloat | None = None
    mask: MaskConfig = Field(default_factory=MaskConfig)  # type: ignore[arg-type]
    mask_value: Literal["zero", "nan"] = "zero"
    common_mode: CommonModeConfig | None = None
    functions: list[dict[str, Any]] = Field(default_factory=list)
    sums: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self):
        if self.units == "photons" and self.photon_energy_kev is None:
            raise ValueError("units: photons needs photon_energy_kev")
        from ..funcs.sums import parse_sums

        parse_sums(self.sums)  # an unknown name, two names of one sum: ValueError
        return self

    @model_validator(mode="after")
    def _shape_of_the_model(self):
        model = MODELS[self.type]
        if self.shape is not None and model.panel_shape is not None:
            panel = tuple(self.shape[-2:])
            if panel != tuple(model.panel_shape):
                raise ValueError(
                    f"shape: a {self.type} panel is {model.panel_shape[0]} x {model.panel_shape[1]} "
                    f"pixels, not {panel[0]} x {panel[1]}"
                )
        return self

    def panel_shape(self) -> tuple[int, int, int] | None:
        """(panels, rows, cols) from ``shape`` (a 2-D shape is one panel), or the model's default."""
        if self.shape is not None:
            return (1, *self.shape) if len(self.shape) == 2 else tuple(self.shape)  # type: ignore[return-value]
        model = MODELS[self.type]
        if model.panel_shape is None:
            return None
        return (model.default_panels, *model.panel_shape)


class EventFunctionConfig(Strict):
    """A user function over several detectors' batches of the same events (SPEC section 11)."""

    type: Literal["python"]
    name: str
    function: str
    detectors: list[str] = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)


class LightStatusConfig(Strict):
    """psana: how ``lightStatus/xray`` and ``lightStatus/laser`` are read from the timing detector (SPEC 10).

    ``xray``: 1 when the event's beam destination is ``xray_destination`` (None: when the timing system reports
    any destination with beam). ``laser``: from ``laser_codes``, smalldata_tools' convention: a positive code
    present marks the laser off (a dropped laser shot); a negative code ``-c`` means the laser is on only when code
    ``c`` is present."""

    timing: str = "timing"
    xray_destination: int | None = None
    laser_codes: list[int] = Field(default_factory=lambda: [-272])


class ContextConfig(Strict):
    """The event context a run writes at the root of the result (SPEC 10), besides what the sim makes.

    ``values``: output name (``ipm/sum``, ``lightStatus/laser``, ``scan/delay``, ``epics/<pv>``) -> where the source
    has it: for an hdf5 source a per-event dataset of the raw file (``/evr/laser``); for psana
    ``<detector>.<attribute>...`` called with the event (``gmd.raw.milliJoulesPerPulse``). ``epics``: psana PVs
    written per event as ``epics/<pv>`` (run-constant ones in ``/epicsOnce/<pv>``). ``scan``: psana step scans
    (``scan/<variable>``, ``scan/varStep``; None: when the run has scan variables). ``light_status``: psana's
    ``lightStatus`` (None: when the run has the timing detector; false: never)."""

    values: dict[str, str] = Field(default_factory=dict)
    epics: list[str] = Field(default_factory=list)
    scan: bool | None = None
    light_status: LightStatusConfig | bool | None = None


class CubeBinsConfig(Strict):
    """How a cube bins ``by``: ``edges`` (explicit, increasing), ``n`` bins over ``range``, a ``width`` over
    ``range``, or (none of them: ``steps: true``) one bin per distinct value (scan steps)."""

    edges: list[float] | None = Field(None, min_length=2)
    n: PositiveInt | None = None
    width: PositiveFloat | None = None
    range: list[float] | None = Field(None, min_length=2, max_length=2)
    steps: bool = False
    max_bins: PositiveInt = 1000  # steps: bins the device holds at most (checked at set-up)

    @model_validator(mode="after")
    def _one_way(self):
        ways = [k for k in ("edges", "n", "width", "steps") if getattr(self, k) not in (None, False)]
        if len(ways) != 1:
            raise ValueError(
                f"give one of edges, n (with range), width (with range), steps: true; got {', '.join(ways) or 'none'}"
            )
        if self.edges is not None:
            if self.range is not None:
                raise ValueError("range: not used with edges")
            if any(b <= a for a, b in zip(self.edges, self.edges[1:])):
                raise ValueError(f"edges: must increase, not {self.edges}")
        if (self.n is not None or self.width is not None) and (self.range is None or not self.range[0] < self.range[1]):
            raise ValueError(
                f"range: [lo, hi] with lo < hi is needed with {'n' if self.n else 'width'}"
                + (f", not {self.range}" if self.range else "")
            )
        if self.steps and self.range is not None:
            raise ValueError("range: not used with steps")
        return self


class CubeDetectorConfig(Strict):
    """What a cube sums of one detector per bin: the calibrated frame, its square, per-event outputs."""

    frame: bool = True
    square: bool = False
    outputs: list[str] = Field(default_factory=list)  # the detector's per-event outputs, e.g. azav_azav, roi0_sum


class CubeConfig(Strict):
    """Binned data during the run (SPEC 10): events binned by ``by`` (a context name, e.g. ``scan/varStep``), only
    those of ``selection`` (None: all that are not damaged), split by each selection of ``split``."""

    by: str
    bins: CubeBinsConfig = Field(default_factory=lambda: CubeBinsConfig(steps=True))  # type: ignore[call-arg]
    selection: str | None = None
    split: list[str] = Field(default_factory=list)
    norm: str | None = None
    detectors: dict[str, CubeDetectorConfig] | None = None  # None: every detector's frame
    output: str | None = None  # None: <output stem>_cube.h5 beside the result

    @field_validator("by", "norm")
    @classmethod
    def _current_name(cls, v):  # a context name of an earlier release (scan/step) -> today's (scan/varStep)
        from ..sources.context import current_name

        return v if v is None else current_name(v)


class RunConfig(Strict):
    source: SourceConfig
    batch_size: PositiveInt = 64
    backend: Literal["auto", "numpy", "cupy"] = "auto"
    output: str = "run.h5"
    detectors: dict[str, DetectorConfig] = Field(min_length=1)
    event_functions: list[EventFunctionConfig] = Field(default_factory=list)
    context: ContextConfig = Field(default_factory=ContextConfig)
    selections: dict[str, dict[str, Any]] = Field(default_factory=dict)
    cube: CubeConfig | None = None
    # filled by validate_config, not by the user
    _base_dir: str = PrivateAttr(".")
    _specs: dict = PrivateAttr(default_factory=dict)

    def function_specs(self, det: str) -> list[FunctionSpec]:
        return self._specs[det]


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_\[\]'/]+")  # printed as it is in a key path; anything else as repr()


def key_path(loc) -> str:
    """('detectors', 'e', 'functions', 1, 'bins') -> 'detectors.e.functions[1].bins'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            part = str(part)
            out += ("." if out else "") + (part if _PLAIN_KEY.fullmatch(part) else repr(part))
    return out


_UNION_TAG = re.compile(r"^(function-after.*|float|int|str|bool|none|list\[.*\]|dict\[.*\]|tuple\[.*\])$")
"""Parts of a pydantic error location that name a validator or a member of a union, not a key."""


def _did_you_mean(key) -> str:
    """`` (did you mean 'thres_adu'?)`` for a misspelt key: the closest key of any config block or function."""
    import difflib

    from ..funcs import FUNCTIONS

    models = [
        RunConfig,
        SourceConfig,
        DetectorConfig,
        MaskConfig,
        CommonModeConfig,
        EventFunctionConfig,
        *(f.Params for f in FUNCTIONS.values()),
    ]
    known = sorted({k for m in models for k in m.model_fields} | {"children"})  # type: ignore[attr-defined]
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _first_error(exc: ValidationError, prefix=()) -> ConfigError:
    err = exc.errors()[0]
    loc = tuple(prefix) + tuple(p for p in err["loc"] if not (isinstance(p, str) and _UNION_TAG.match(p)))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key" + _did_you_mean(loc[-1] if loc else "")
    elif err["type"] == "missing":
        msg = "required key missing"
    n = len(exc.errors())
    more = f" (and {n - 1} more error{'s' if n > 2 else ''})" if n > 1 else ""
    return ConfigError(f"config: {key_path(loc) or '(top level)'}: {msg}{more}")


class FunctionSpec:
    """A validated reduction function entry: its type, parameters and children."""

    def __init__(self, type: str, params: BaseModel, children: list[FunctionSpec], path: str):
        self.type, self.params, self.children, self.path = type, params, children, path

    def __repr__(self):
        return f"FunctionSpec({self.type}, {self.params!r}, children={self.children})"


def parse_functions(
    entries: list[dict], prefix: tuple, given: str | tuple[str, ...] = "image", parent: str | None = None
) -> list[FunctionSpec]:
    """Validate function entries against each function's own parameter model (recursively).

    ``given`` is what the entries receive, one kind or a tuple of kinds (the detector's frames are an
    ``"image"``; a parent passes what its class's ``passes`` says: droplet passes ``droplets`` and the droplet
    ``image``), checked against each function's ``takes`` (it must take one of them); ``parent`` names it in
    messages."""
    from ..funcs import FUNCTIONS
    from ..funcs.base import kinds

    given = kinds(given)

    specs = []
    for i, entry in enumerate(entries):
        loc = prefix + (i,)
        if not isinstance(entry, dict):
            raise ConfigError(f"config: {key_path(loc)}: a function must be a mapping with a 'type'")
        entry = dict(entry)
        ftype = entry.pop("type", None)
        if ftype is None:
            raise ConfigError(f"config: {key_path(loc + ('type',))}: required key missing")
        if not isinstance(ftype, str) or ftype not in FUNCTIONS:
            raise ConfigError(
                f"config: {key_path(loc + ('type',))}: unknown function {ftype!r}; known: {', '.join(sorted(FUNCTIONS))}"
            )
        cls = FUNCTIONS[ftype]
        if not any(k in cls.takes for k in given):
            where = (
                f"under {parent}, which passes on {' and '.join(given)}"
                if parent
                else "at the top level (on the detector's frames)"
            )
            hint = (
                f"; {ftype} must be a child of a function that passes on {' or '.join(cls.takes)} ("
                f"{', '.join(sorted(t for t, f in FUNCTIONS.items() if set(kinds(f.passes)) & set(cls.takes)))})"
            )
            raise ConfigError(f"config: {key_path(loc + ('type',))}: {ftype} cannot work {where}{hint}")
        children = entry.pop("children", []) or []
        if not isinstance(children, list):
            raise ConfigError(f"config: {key_path(loc + ('children',))}: must be a list of functions")
        if children and cls.passes is None:
            raise ConfigError(f"config: {key_path(loc + ('children',))}: {ftype} takes no children")
        try:
            params = cls.Params.model_validate(entry)
        except ValidationError as exc:
            raise _first_error(exc, loc) from None
        specs.append(
            FunctionSpec(
                ftype,
                params,
                parse_functions(children, loc + ("children",), cls.passes, ftype),  # type: ignore[arg-type]
                key_path(loc),
            )
        )
    return specs


NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
"""Detector and function names are identifiers: they become HDF5 group and dataset names."""
RESERVED = frozenset(
    {
        "timestamp",
        "event_index",
        "Sums",
        "UserDataCfg",
        "lightStatus",
        "scan",
        "epics",
        "epicsOnce",
        "fiducials",
        "event_time",
        "damaged",
        "damage",
    }
)
"""Names the result file uses at its root (SPEC 8, 10): no detector may take them."""


def check_name(name, loc: tuple, what: str) -> None:
    """ConfigError unless ``name`` is an identifier (and, for a detector, not a reserved root name)."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ConfigError(
            f"config: {key_path(loc)}: {what} name {name!r} is not an identifier (a letter or '_', "
            f"then letters, digits, '_'): it names groups and datasets in the result file"
        )
    if what == "detector" and name in RESERVED:
        raise ConfigError(
            f"config: {key_path(loc)}: detector name {name!r} is reserved: the result file uses "
            f"/{name} itself ({', '.join(sorted(RESERVED))})"
        )


def check_function_names(specs: list[FunctionSpec], prefix: tuple) -> None:
    """ConfigError when two sibling functions share an output name (the second would overwrite the
    first's datasets and parameters) or a name cannot be part of a dataset name."""
    from ..funcs import build_function

    seen: dict[str, int] = {}
    for i, spec in enumerate(specs):
        name = build_function(spec).name if spec.params.name is None else spec.params.name  # type: ignore[attr-defined]
        loc = prefix + (i,)
        check_name(name, loc + ("name",), "function")
        if name in seen:
            given = "" if spec.params.name else " (the default name of this function: give each a 'name')"  # type: ignore[attr-defined]
            raise ConfigError(
                f"config: {key_path(loc + ('name',))}: duplicate name {name!r}, also "
                f"{key_path(prefix + (seen[name],))}{given}; their outputs would overwrite each other"
            )
        seen[name] = i
        check_function_names(spec.children, loc + ("children",))


def split_file_spec(p: str) -> tuple[str, str, str]:
    """``FILE.h5:/dataset`` -> ("FILE.h5", ":", "/dataset"); a plain path -> (path, "", "") (a Windows
    drive letter is no dataset separator)."""
    return p.partition(":") if not re.match(r"^[A-Za-z]:[\\/]", p) else (p, "", "")


def _resolve(base: Path, p: str | None) -> str | None:
    if p is None:
        return None
    head, sep, tail = split_file_spec(p)
    q = Path(head).expanduser()
    return str(q if q.is_absolute() else base / q) + sep + tail


FILE_PARAMS = ("poni", "user_mask")
"""Function parameters that name files: relative ones follow the config file, like every other path."""


def _resolve_function_paths(base: Path, specs: list[FunctionSpec]) -> None:
    for spec in specs:
        for key in FILE_PARAMS:
            value = getattr(spec.params, key, None)
            if isinstance(value, str):
                setattr(spec.params, key, _resolve(base, value))
        if spec.type == "python":
            spec.params.function = _resolve_callable(base, spec.params.function)  # type: ignore[attr-defined]
        _resolve_function_paths(base, spec.children)


def _resolve_callable(base: Path, function: str) -> str:
    """A user function's ``file.py:function`` with the file relative to the config; ``module:function`` as it is."""
    where, _, name = function.rpartition(":")
    if where.endswith(".py") and not Path(where).expanduser().is_absolute():
        return f"{base / Path(where).expanduser()}:{name}"
    return function


def validate_config(data: Any, base_dir: str | Path = ".") -> RunConfig:
    """Validate a config mapping; relative paths are resolved against ``base_dir``."""
    if not isinstance(data, dict):
        raise ConfigError("config: (top level): must be a mapping (source, detectors, ...)")
    if isinstance(data.get("detectors"), dict):
        for name in data["detectors"]:
            check_name(name, ("detectors", name), "detector")
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise _first_error(exc) from None
    base = Path(base_dir)
    cfg._base_dir = str(base)
    if cfg.source.path:
        cfg.source.path = _resolve(base, cfg.source.path)
    if cfg.source.files:
        cfg.source.files = [_resolve(base, f) for f in cfg.source.files]  # type: ignore[misc]
    if isinstance(cfg.source.psana.get("dir"), str):  # psana's experiment folder (exp/run mode)
        cfg.source.psana["dir"] = _resolve(base, cfg.source.psana["dir"])
    cfg.output = _resolve(base, cfg.output)  # type: ignore[assignment]
    specs = {}
    for name, det in cfg.detectors.items():
        det.constants = _resolve(base, det.constants)
        det.mask.user = _resolve(base, det.mask.user)
        if cfg.source.type in ("sim", "hdf5") and det.panel_shape() is None:
            raise ConfigError(
                f"config: detectors.{name}.shape: required for a {det.type} in a {cfg.source.type} source"
            )
        if cfg.source.type == "hdf5" and not det.dataset:
            raise ConfigError(f"config: detectors.{name}.dataset: required for an hdf5 source")
        specs[name] = parse_functions(det.functions, ("detectors", name, "functions"))
        check_function_names(specs[name], ("detectors", name, "functions"))
        _resolve_function_paths(base, specs[name])
    cfg._specs = specs
    _check_event_functions(cfg, base)
    _check_context(cfg)
    _check_selections_and_cube(cfg, base)
    return cfg


EPICS_PV = re.compile(r"^[A-Za-z_][A-Za-z0-9_:.\-]*$")
"""An EPICS PV name or alias (``epics/<pv>``): letters, digits and ``_ : . -``."""
CONTEXT_ROOTS = ("lightStatus", "scan", "epics")
"""Root names of the result that hold event context (SPEC 10); ``epicsOnce`` is written by the run."""


def check_context_name(name, loc: tuple, cfg: RunConfig) -> None:
    """ConfigError unless ``name`` can name a context value: identifiers joined by ``/`` (``ipm/sum``), under
    neither a detector nor an event function; under a reserved root name only ``lightStatus/xray``,
    ``lightStatus/laser``, ``scan/<variable>`` and ``epics/<pv>``."""
    parts = name.split("/") if isinstance(name, str) else [name]
    for i, p in enumerate(parts):
        if i == 1 and parts[0] == "epics" and isinstance(p, str) and EPICS_PV.fullmatch(p):
            continue  # a PV name as EPICS spells it (HX2:DVD:GCC:01:PMON)
        if not isinstance(p, str) or not NAME.fullmatch(p):
            raise ConfigError(
                f"config: {key_path(loc)}: context name {name!r} must be identifiers joined by '/' "
                f"(e.g. ipm/sum): it names a dataset at the root of the result"
            )
    root = parts[0]
    if root in cfg.detectors or root in {ef.name for ef in cfg.event_functions}:
        raise ConfigError(
            f"config: {key_path(loc)}: context name {name!r} is under /{root}, which the detector "
            f"or event function {root!r} writes"
        )
    if root in RESERVED:
        ok = root in CONTEXT_ROOTS and len(parts) == 2 and (root != "lightStatus" or parts[1] in ("xray", "laser"))
        if not ok:
            raise ConfigError(
                f"config: {key_path(loc)}: context name {name!r}: under /{root} only "
                + (
                    "lightStatus/xray and lightStatus/laser"
                    if root == "lightStatus"
                    else f"{root}/<name>"
                    if root in CONTEXT_ROOTS
                    else "what gpusmall writes itself"
                )
            )


def _check_context(cfg: RunConfig) -> None:
    """The ``context`` block against the source type: ``values`` for hdf5 and psana, the rest psana's."""
    ctx, kind = cfg.context, cfg.source.type
    for name, where in ctx.values.items():
        loc = ("context", "values", name)
        check_context_name(name, loc, cfg)
        if kind == "sim":
            raise ConfigError(f"config: {key_path(loc)}: a sim source makes its own context (source.simulate)")
        if kind == "hdf5" and not where.startswith("/"):
            raise ConfigError(
                f"config: {key_path(loc)}: {where!r}: a dataset of the raw file, from its root (e.g. /ipm2/sum)"
            )
        if kind == "psana" and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+", where):
            raise ConfigError(
                f"config: {key_path(loc)}: {where!r}: a psana detector and its field, e.g. gmd.raw.milliJoulesPerPulse"
            )
    psana_only = [k for k in ("epics", "scan", "light_status") if k in ctx.model_fields_set]
    if psana_only and kind != "psana":
        raise ConfigError(
            f"config: context.{psana_only[0]}: read from psana runs only (this source is {kind}"
            + (
                "; its context comes from source.simulate)"
                if kind == "sim"
                else "; map its datasets with context.values)"
            )
        )
    for i, pv in enumerate(ctx.epics):
        check_context_name(f"epics/{pv}", ("context", "epics", i), cfg)


def _check_selections_and_cube(cfg: RunConfig, base: Path) -> None:
    """Selections parse (names, conditions, no cycles); the cube names existing selections. Whether their keys
    are in the event context is checked when the source is open (:func:`gpusmall.producer.context.check_run_context`)."""
    from ..selections import SelectionError, Selections

    for name in cfg.selections:
        check_name(name, ("selections", name), "selection")
    try:
        sel = Selections(cfg.selections, builtin=True)
    except SelectionError as exc:
        raise ConfigError(f"config: {exc}") from None
    from ..funcs.sums import parse_sums

    for name, det in cfg.detectors.items():
        for i, spec in enumerate(parse_sums(det.sums)):
            if spec.selection is not None:
                try:
                    sel.require(spec.selection, f"detectors.{name}.sums[{i}]")
                except SelectionError as exc:
                    raise ConfigError(f"config: {exc}") from None
    cube = cfg.cube
    if cube is None:
        return
    try:
        if cube.selection is not None:
            sel.require(cube.selection, "cube.selection")
        for i, s in enumerate(cube.split):
            sel.require(s, f"cube.split[{i}]")
    except SelectionError as exc:
        raise ConfigError(f"config: {exc}") from None
    for det in cube.detectors or {}:  # type: ignore[assignment]
        if det not in cfg.detectors:
            raise ConfigError(
                f"config: cube.detectors.{det}: no detector {det!r} (detectors: {', '.join(cfg.detectors)})"
            )
    if cube.output is not None:
        cube.output = _resolve(base, cube.output)


def _check_event_functions(cfg: RunConfig, base: Path) -> None:
    """Names, detectors and the function string of ``event_functions``; relative ``file.py`` follow the config."""
    from ..funcs.python import PythonParams

    seen: dict[str, int] = {}
    for i, ef in enumerate(cfg.event_functions):
        loc = ("event_functions", i)
        check_name(ef.name, loc + ("name",), "event function")
        if ef.name in RESERVED or ef.name in cfg.detectors:
            raise ConfigError(
                f"config: {key_path(loc + ('name',))}: {ef.name!r} is taken (a detector or a name the "
                f"result file uses at its root)"
            )
        if ef.name in seen:
            raise ConfigError(
                f"config: {key_path(loc + ('name',))}: duplicate name {ef.name!r}, also "
                f"{key_path(('event_functions', seen[ef.name]))}"
            )
        seen[ef.name] = i
        for j, det in enumerate(ef.detectors):
            if det not in cfg.detectors:
                raise ConfigError(
                    f"config: {key_path(loc + ('detectors', j))}: no detector {det!r} "
                    f"(detectors: {', '.join(cfg.detectors)})"
                )
        try:
            PythonParams.model_validate({"function": ef.function})
        except ValidationError as exc:
            raise _first_error(exc, loc) from None
        ef.function = _resolve_callable(base, ef.function)


def read_config_file(path) -> dict:
    """Parse a YAML (.yaml/.yml) or TOML (.toml) file into a mapping; ConfigError when unreadable."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: file {str(path)!r} does not exist")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        text = None
    except OSError as exc:
        raise ConfigError(f"config: cannot read {str(path)!r}: {exc.strerror or exc}") from None
    if text is None or "\x00" in text:
        raise ConfigError(f"config: {path}: not a YAML/TOML text file (UTF-8 text expected)")
    try:
        if path.suffix.lower() == ".toml":
            return tomllib.loads(text)
        return yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError, ValueError, TypeError, RecursionError) as exc:
        line = str(exc).splitlines()
        raise ConfigError(
            f"config: {path}: not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {' '.join(line)[:200]}"
        ) from None


def load_config(path) -> RunConfig:
    """Read and validate a config file (YAML or TOML)."""
    path = Path(path)
    return validate_config(read_config_file(path), base_dir=path.resolve().parent)
