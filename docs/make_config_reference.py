"""Write docs/CONFIG.md, the config reference, from the pydantic models of gpusmall.producer.config.

    python docs/make_config_reference.py            # (re)write docs/CONFIG.md
    python docs/make_config_reference.py --check    # exit 1 when docs/CONFIG.md is not current

Every key of the run config (:class:`gpusmall.producer.config.RunConfig` and the blocks under it) and every
parameter of the reduction functions (the ``Params`` model of each class of ``gpusmall.funcs.FUNCTIONS``) gets
one row: its key path, type (with the model's bounds), default and description. A description is taken, in
this order, from the field's ``description``, a docstring under the field, the comment on the field's line(s)
or the comment lines just above it in the source, and else from :data:`DESCRIPTIONS` below (for fields the
source leaves uncommented). A block's text is its model's docstring. tests/test_config_reference.py runs this
and fails when docs/CONFIG.md is stale or a key is missing or undescribed.
"""
from __future__ import annotations

import ast
import inspect
import io
import json
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

HERE = Path(__file__).resolve().parent
OUT = HERE / "CONFIG.md"

#: descriptions of fields that have no description, docstring or comment in the source: "Model.field" -> text
DESCRIPTIONS: dict[str, str] = {
    # SimScanConfig
    "SimScanConfig.variable": "name of the scanned variable: the run writes `scan/<variable>` (float64) and `scan/varStep` (int64).",
    "SimScanConfig.start": "value of the variable in the first step.",
    "SimScanConfig.step": "change of the variable from one step to the next.",
    "SimScanConfig.events_per_step": "events per scan step.",
    # SimulateConfig
    "SimulateConfig.scan": "a simulated step scan (null: no `scan/` datasets).",
    "SimulateConfig.pump": "pump-probe signal: laser-on shots at a delay > 0 have `1 + pump` times the photons.",
    # SourceConfig
    "SourceConfig.type": "where events come from: `sim` (the simulator, no input), `hdf5` (a file of raw frames), "
                         "`psana` (LCLS-II XTC2).",
    "SourceConfig.events": "sim: how many events to make (default 1000); hdf5 / psana: read at most this many.",
    "SourceConfig.seed": "sim only: random seed; event `i` depends only on `(seed, i)`.",
    "SourceConfig.path": "hdf5 only: the raw file (relative to the config's folder); each detector names its `dataset`.",
    "SourceConfig.files": "psana only: XTC2 files of the run (relative to the config's folder).",
    "SourceConfig.exp": "psana only: the experiment name (with `run`), e.g. `xpptut15`.",
    "SourceConfig.run": "psana only: the run number (with `exp`).",
    "SourceConfig.psana": "psana only: keywords passed to psana's `DataSource` (e.g. `dir`, `skip_calib_load`).",
    # MaskConfig (SPEC 5)
    "MaskConfig.status": "mask the pixels whose constants `status` is not 0.",
    "MaskConfig.edges": "mask the outer n rows and columns of every panel.",
    "MaskConfig.central": "mask n rows / columns on each side of the boundaries between ASICs inside a panel.",
    "MaskConfig.unbonded": "mask the pixels whose sensor is not bonded (constants `unbonded`, or psana).",
    "MaskConfig.neighbours": "also mask the 4 or 8 neighbours of unbonded pixels (0: none).",
    "MaskConfig.user": "a user mask, HDF5 dataset or `.npy` of the detector shape, 1 = keep (relative to the config's folder).",
    "MaskConfig.calib": "apply the `mask` dataset of the constants file.",
    # CommonModeConfig (SPEC 4)
    "CommonModeConfig.type": "the algorithm: `median` (psana's 7), `epix100`, `zero_peak` (CsPad), `unbonded` (CsPad), "
                             "`none`, or `raw` (no calibration at all: the output is the raw data value).",
    "CommonModeConfig.axes": "median: which medians, applied in this order: per bank, per row within a bank, per column "
                             "within a half-panel.",
    "CommonModeConfig.min_pixels": "median: a group is corrected only when more good pixels than this entered its median.",
    "CommonModeConfig.norm_all": "epix100: subtract the mean of the included pixels from the whole frame first.",
    "CommonModeConfig.min_count": "zero_peak only: a peak bin holds more values than this (default 0, psana 100).",
    "CommonModeConfig.max_sigma": "zero_peak with `method: psana` only: the peak-width limit, ADU (default 40).",
    "CommonModeConfig.min_fraction": "epix100: a group is corrected only when at least this fraction of its pixels is included.",
    # DetectorConfig
    "DetectorConfig.type": "the detector model (SPEC section 1): panel shape, raw data bits, gain ranges, pixel size, "
                           "default common mode.",
    "DetectorConfig.shape": "`[panels, rows, cols]` or `[rows, cols]` (one panel); required for sim and hdf5 sources "
                            "(a camera always), else the model's.",
    "DetectorConfig.pixel_um": "pixel pitch in um, for the default geometry (a camera's default: 1, i.e. pixel units).",
    "DetectorConfig.saturation": "raw value at which a pixel counts as saturated (roi `nsat`); default: the model's.",
    "DetectorConfig.dataset": "hdf5 source only: the raw dataset `(events, [panels,] rows, cols)` in the source file.",
    "DetectorConfig.constants": "constants file (SPEC section 2: pedestal, gain, noise, status, x, y, z); a sim source "
                                "brings its own.",
    "DetectorConfig.units": "unit of the calibrated values: `adu` (of the first gain range), `kev`, or `photons` "
                            "(needs `photon_energy_kev`).",
    "DetectorConfig.photon_energy_kev": "photon energy in keV, for `units: photons`.",
    "DetectorConfig.mask": "the static mask (SPEC section 5).",
    "DetectorConfig.mask_value": "what bad pixels are in stored images (roi `area`, avimage): `zero` or `nan`.",
    "DetectorConfig.common_mode": "the common-mode correction (SPEC section 4); null: the detector type's default.",
    "DetectorConfig.functions": "reduction functions, each `{type: ..., name: ..., children: [...]}` with the "
                                "parameters of its type (below).",
    "DetectorConfig.sums": "run sums (`calib`, `calib_square`, `calib_max`, `nhits`, `_thresADU<t>`, "
                           "`<sum>:<selection>`, `calib_dropped`), written `/Sums/<det>_<sum>`.",
    # EventFunctionConfig
    "EventFunctionConfig.type": "always `python`.",
    "EventFunctionConfig.name": "name of the outputs: `/<name>_<key>` at the root of the result.",
    "EventFunctionConfig.function": "`module:function` (importable) or `file.py:function` (relative to the config's folder).",
    "EventFunctionConfig.detectors": "the detectors whose batches the function gets (`batches[det]`).",
    "EventFunctionConfig.params": "keyword arguments of the function.",
    # LightStatusConfig
    "LightStatusConfig.timing": "psana name of the timing detector.",
    "LightStatusConfig.xray_destination": "beam destination meaning X-rays on (null: any destination with beam).",
    "LightStatusConfig.laser_codes": "event codes of the laser: a positive code marks the laser off, `-c` means on "
                                     "only when code `c` is present.",
    # ContextConfig
    "ContextConfig.values": "output name -> where the source has it (hdf5: a dataset of the raw file; psana: "
                            "`detector.field...`).",
    "ContextConfig.epics": "psana: EPICS PVs written per event as `epics/<pv>`.",
    "ContextConfig.scan": "psana: read step scans (null: when the run has scan variables).",
    "ContextConfig.light_status": "psana: `lightStatus/xray`, `lightStatus/laser` from the timing detector (null: when "
                                  "the run has one; false: never).",
    # CubeBinsConfig
    "CubeBinsConfig.edges": "explicit increasing bin edges.",
    "CubeBinsConfig.n": "number of equal bins over `range`.",
    "CubeBinsConfig.width": "bin width over `range`.",
    "CubeBinsConfig.range": "`[lo, hi]` for `n` or `width`.",
    "CubeBinsConfig.steps": "one bin per distinct value of `by` (scan steps).",
    # CubeDetectorConfig
    "CubeDetectorConfig.frame": "sum the calibrated frame per bin (`/<det>/frame_sum`).",
    "CubeDetectorConfig.square": "also sum its square (`/<det>/frame_square_sum`).",
    # CubeConfig
    "CubeConfig.by": "the context value to bin by (`scan/varStep`, `scan/delay`, `ipm/sum`...).",
    "CubeConfig.bins": "how `by` is binned.",
    "CubeConfig.selection": "only the events of this selection (null: all that are not damaged).",
    "CubeConfig.split": "each bin split by each of these selections (a leading split axis).",
    "CubeConfig.norm": "a context scalar also summed per bin (`/<norm>_sum`), to normalise by.",
    "CubeConfig.detectors": "what to sum per detector (null: every detector's frame).",
    # RunConfig
    "RunConfig.source": "where the events come from.",
    "RunConfig.batch_size": "events reduced together (on the GPU: one batch at a time); clamped to the run's events.",
    "RunConfig.backend": "`auto` (the GPU when usable, else NumPy), `numpy` or `cupy`; `--backend` and "
                         "`$GPUSMALL_BACKEND` take precedence.",
    "RunConfig.output": "the result file (relative to the config's folder); `--out` takes precedence.",
    "RunConfig.detectors": "detector name (an identifier: the group in the result) -> its config.",
    "RunConfig.event_functions": "user functions over several detectors' batches of the same events (SPEC section 11).",
    "RunConfig.context": "the event context read from the source (hdf5, psana).",
    "RunConfig.selections": "named event filters: `{key: value | [lo, hi], selection: true | false, any: [...]}` "
                            "(SPEC section 10).",
    "RunConfig.cube": "bin full calibrated frames per bin of a context value during the run (SPEC section 10).",
    # function parameters (SPEC section 6)
    "FunctionParams.name": "the function's name: its outputs are `/<det>/<name>_<key>` (default: the type's).",
    "RoiParams.bounds": "`[[p0, p1], [r0, r1], [c0, c1]]` half-open, or `[[r0, r1], [c0, c1]]` for one panel; null: "
                        "the whole detector.",
    "RoiParams.thres_adu": "a number: pixels below it count 0; `[lo, hi]`: pixels outside count 0.",
    "RoiParams.write_area": "also write the ROI image per event (`<name>_area`).",
    "RoiParams.calc_pars": "write sum, mean, max, com, nsat.",
    "RoiParams.user_mask": "a mask of the ROI's shape (file), 1 = keep.",
    "ProjectionParams.axis": "-1: the total of the image (one number per event); 0 / 1: along rows / columns.",
    "ProjectionParams.mean": "the mean instead of the sum.",
    "ProjectionParams.thres_adu": "pixels below this count 0 (ADU).",
    "ProjectionParams.thres_rms": "pixels below `thres_rms * noise` count 0.",
    "ProjectionParams.single_photon": "pixels above the threshold count 1.",
    "RebinParams.shape": "target 2-D shape; each input dimension must be a multiple of it; output = block means.",
    "AzavParams.center_um": "beam centre `[cx, cy]` in the pixels' x, y (um); with `distance_mm`.",
    "AzavParams.distance_mm": "sample-detector distance in mm; with `center_um`.",
    "AzavParams.poni": "a pyFAI PONI file instead of `center_um` / `distance_mm` (rotations included).",
    "AzavParams.energy_kev": "photon energy in keV (or the PONI wavelength).",
    "AzavParams.unit": "radial unit: q in 1/Angstrom or 1/nm, 2theta in degrees, radius in mm.",
    "AzavParams.bins": "number of radial bins (or `bin_width`).",
    "AzavParams.range": "`[low, high]` of the radial bins, in `unit` (default: the pixels' range).",
    "AzavParams.bin_width": "radial bin width in `unit` (instead of `bins`).",
    "AzavParams.phi_bins": "number of azimuthal bins.",
    "AzavParams.solid_angle": "divide by the solid-angle factor `cos^3(2theta)`.",
    "AzavParams.thres_adu": "pixels below this are left out (ADU).",
    "AzavParams.thres_adu_high": "pixels above this are left out (ADU).",
    "AzavParams.engine": "`csr` (a sparse matrix product) or `histogram`; same numbers.",
    "AzavParams.ty": "degrees: detector tilt against the beam about y (smalldata_tools' ty).",
    "DropletParams.threshold": "seed threshold: pixels with `s >= threshold` start a droplet.",
    "DropletParams.threshold_low": "join threshold: droplets grow by 4-neighbours with `s >= threshold_low` (default: threshold).",
    "DropletParams.use_rms": "thresholds in units of the pixel noise.",
    "DropletParams.thres_adu": "veto droplets whose total is below this (ADU).",
    "DropletParams.max_droplets": "droplets per event stored at most (ragged: a memory bound; padded: the width).",
    "DropletParams.layout": "`ragged` (flat over the run's droplets, with `_len`, `_offset`) or `padded` (events, max_droplets).",
    "PhotonsParams.adu_per_photon": "ADU of one photon; a droplet of total A holds `floor(A / adu_per_photon + 0.5)` photons.",
    "PhotonsParams.max_photons": "photons per event stored at most.",
    "PhotonsParams.layout": "`ragged` or `padded`, as droplet's.",
    "PhotonCountParams.adu_per_photon": "ADU of one photon.",
    "PhotonCountParams.thr_fraction": "per good pixel `n = floor(s / adu_per_photon + (1 - thr_fraction))` photons.",
    "PhotonCountParams.hist_max": "K: also write `hist` (events, K + 1), the good pixels holding 0, 1, ..., K photons "
                                  "(null: none).",
    "AcfParams.window": "side of the central crop written (`acf` (events, window, window)), pixels of lag.",
    "AcfParams.resolution": "ring width of the radial `profile`, pixels of lag radius.",
    "PythonParams.function": "`module:function` (importable) or `file.py:function` (relative to the config's folder).",
    "PythonParams.params": "keyword arguments of the function.",
}


# ---- reading the source ------------------------------------------------------------------------------------


def source_descriptions(cls: type) -> dict[str, str]:
    """field -> the docstring under it, the comment on its line(s), or the comment lines just above it."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    tree = ast.parse(src)
    body = tree.body[0].body
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if not text.startswith(("type:", "noqa", "pragma")):  # tool directives are no descriptions
                comments[tok.start[0]] = text
    lines = src.splitlines()
    out: dict[str, str] = {}
    for i, node in enumerate(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        name = node.target.id
        nxt = body[i + 1] if i + 1 < len(body) else None
        if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant) \
                and isinstance(nxt.value.value, str):
            out[name] = " ".join(nxt.value.value.split())
            continue
        inline = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        if inline:
            out[name] = " ".join(inline)
            continue
        above, n = [], node.lineno - 1
        while n >= 1 and lines[n - 1].strip().startswith("#"):
            above.insert(0, comments.get(n, ""))
            n -= 1
        if any(above):
            out[name] = " ".join(a for a in above if a)
    return out


def doc_of(cls: type) -> str:
    """A class's own docstring (not inherited), on one paragraph per blank line."""
    d = cls.__dict__.get("__doc__")
    if not d:
        return ""
    paras = [" ".join(p.split()) for p in inspect.cleandoc(d).split("\n\n")]
    return "\n\n".join(p.replace("``", "`") for p in paras if p)


# ---- types and defaults ------------------------------------------------------------------------------------


def _bounds(metadata) -> list[str]:
    out = []
    for m in metadata:
        for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="),
                         ("min_length", "length >="), ("max_length", "length <=")):
            v = getattr(m, attr, None)
            if v is not None:
                out.append(f"{op} {v}")
    return out


def type_name(tp) -> str:
    """A readable type: `int > 0 | null`, `"sim" | "hdf5"`, `list[float]`, `MaskConfig` (a block)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin is typing.Annotated:
        base, *meta = args
        return " ".join([type_name(base), *_bounds(meta)])
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) if isinstance(a, str) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin in (list, tuple, set):
        return f"list[{', '.join(type_name(a) for a in args)}]"
    if origin is dict:
        return f"map[{type_name(args[0])}: {type_name(args[1])}]"
    if tp is typing.Any:
        return "any"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return f"block ({tp.__name__})"
    return {str: "str", int: "int", float: "float", bool: "bool"}.get(tp, getattr(tp, "__name__", str(tp)))


def default_text(field) -> str:
    if field.default_factory is not None:
        v = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        v = field.default
    if isinstance(v, BaseModel):
        v = v.model_dump(mode="json", exclude_defaults=True)
        return f"`{json.dumps(v)}`" if v else "(block defaults)"
    return f"`{json.dumps(v)}`"


def models_in(tp) -> list[type[BaseModel]]:
    """The config blocks (pydantic models) a field's type holds (through unions, lists, maps)."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    out = []
    for a in typing.get_args(tp):
        for m in models_in(a):
            if m not in out:
                out.append(m)
    return out


def container_suffix(tp) -> str:
    """How a block sits in its parent: `[]` in a list, `.<name>` in a map (of names), '' as a value."""
    for a in [tp, *typing.get_args(tp)]:
        o = typing.get_origin(a)
        if o in (list, tuple):
            return "[]"
        if o is dict:
            return ".<name>"
    return ""


# ---- the document ------------------------------------------------------------------------------------------


def rows(model: type[BaseModel], prefix: str) -> tuple[list[str], list[tuple[str, type[BaseModel]]]]:
    """Table rows of a model's fields under key path ``prefix``, and the blocks below it (path, model)."""
    src: dict[str, str] = {}
    for klass in reversed(model.__mro__):
        if isinstance(klass, type) and issubclass(klass, BaseModel) and klass is not BaseModel:
            src.update(source_descriptions(klass))
    out, below = [], []
    for name, field in model.model_fields.items():
        owner = next(k for k in model.__mro__ if name in getattr(k, "__annotations__", {}))
        desc = (field.description or src.get(name) or DESCRIPTIONS.get(f"{model.__name__}.{name}")
                or DESCRIPTIONS.get(f"{owner.__name__}.{name}") or "")
        key = f"{prefix}{name}"
        tname = " ".join([type_name(field.annotation), *_bounds(field.metadata)])
        out.append(f"| `{key}` | {tname.replace('|', '&#124;')} | {default_text(field)} | {desc.replace('|', '&#124;')} |")
        for m in models_in(field.annotation):
            below.append((key + container_suffix(field.annotation), m))
    return out, below


TABLE_HEAD = ["| key | type | default | description |", "| --- | --- | --- | --- |"]


def config_sections() -> list[str]:
    from gpusmall.producer.config import RunConfig

    lines: list[str] = []
    queue: list[tuple[str, type[BaseModel]]] = [("", RunConfig)]
    seen: set[str] = set()
    while queue:
        path, model = queue.pop(0)
        if path in seen:
            continue
        seen.add(path)
        title = f"`{path}`" if path else "top level"
        lines += ["", f"### {title} ({model.__name__})", ""]
        d = doc_of(model)
        if d:
            lines += [d, ""]
        r, below = rows(model, f"{path}." if path else "")
        lines += TABLE_HEAD + r
        queue += below
    return lines


def function_sections() -> list[str]:
    from gpusmall.funcs import FUNCTIONS

    lines: list[str] = []
    for ftype, cls in FUNCTIONS.items():
        lines += ["", f"### `{ftype}` ({cls.__name__}, parameters {cls.Params.__name__})", ""]
        module = sys.modules[cls.__module__].__doc__ or ""
        summary = " ".join(inspect.cleandoc(module).split("\n\n")[0].split()).replace("``", "`")
        for d in (summary, doc_of(cls.Params)):
            if d:
                lines += [d, ""]
        takes = " or ".join(cls.takes)
        if cls.passes is None:
            lines += [f"Takes {takes}; no `children`.", ""]
        else:
            passes = cls.passes if isinstance(cls.passes, str) else " and ".join(cls.passes)
            lines += [f"Takes {takes}; passes {passes} to its `children`.", ""]
        r, _ = rows(cls.Params, "")
        lines += TABLE_HEAD + r
    return lines


def render() -> str:
    lines = [
        "# Config reference",
        "",
        "<!-- Generated by docs/make_config_reference.py from gpusmall/producer/config.py and the function",
        "     parameter models (gpusmall.funcs.FUNCTIONS); do not edit: run `python docs/make_config_reference.py`. -->",
        "",
        "Every key of a run config (YAML or TOML; SPEC section 7) with its type, default and meaning. Unknown",
        "keys, wrong types and NaN / inf numbers are errors naming the key path (`detectors.cam.functions[1].bins`).",
        "Key paths: `a.b` a key inside a block, `<name>` a name you choose (a detector, a selection), `[]` an entry",
        "of a list. Relative paths in a config file are taken from the file's folder. Units: ADU, keV, um for",
        "pixel coordinates, mm for distances (SPEC). `null` is YAML's none.",
        "",
        "## Run config",
    ]
    lines += config_sections()
    lines += [
        "",
        "## Reduction functions",
        "",
        "Each entry of `detectors.<name>.functions` (and of a function's `children`) is `{type: <type>, ...}` with",
        "the parameters of its type, and optionally `children: [...]` (functions fed by this one). Outputs are",
        "`/<det>/<name>_<key>`, a child's `/<det>/<parent>_<child>_<key>` (SPEC section 6).",
    ]
    lines += function_sections()
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if "--check" in argv:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is not current: run python docs/make_config_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    raise SystemExit(main())
