"""docs/CONFIG.md is current and complete: regenerated from the config models, it equals the file, and every key of
every config block and every function parameter has a row with a type, a default and a description."""

from __future__ import annotations

import importlib.util
import re
import typing
from pathlib import Path

from pydantic import BaseModel

from gpusmall.funcs import FUNCTIONS
from gpusmall.producer.config import RunConfig

DOCS = Path(__file__).resolve().parent.parent / "docs"


def generator():
    spec = importlib.util.spec_from_file_location("make_config_reference", DOCS / "make_config_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sections(text: str) -> dict[str, str]:
    """'### heading' -> the text up to the next heading."""
    parts = re.split(r"^### (.*)$", text, flags=re.MULTILINE)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def rows(section: str) -> dict[str, list[str]]:
    """Key (the last part of its path) -> [type, default, description] of each table row."""
    out = {}
    for line in section.splitlines():
        m = re.match(r"^\| `([^`]+)` \| (.*) \| (.*) \| (.*) \|$", line)
        if m:
            out[re.split(r"\.", m.group(1).replace(".<name>", "").replace("[]", ""))[-1]] = list(m.groups()[1:])
    return out


def blocks(model, seen=None) -> list[type[BaseModel]]:
    """Every pydantic model reachable from ``model`` through its fields' types."""
    seen = [] if seen is None else seen
    if model in seen:
        return seen
    seen.append(model)

    def walk(tp):
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            blocks(tp, seen)
        for a in typing.get_args(tp):
            walk(a)

    for f in model.model_fields.values():
        walk(f.annotation)
    return seen


def test_config_md_is_current():
    gen = generator()
    text = (DOCS / "CONFIG.md").read_text()
    assert gen.render() == text, "docs/CONFIG.md is stale: run python docs/make_config_reference.py"
    assert gen.main(["--check"]) == 0


def test_every_config_key_and_function_parameter_is_documented():
    text = (DOCS / "CONFIG.md").read_text()
    secs = sections(text)
    models = blocks(RunConfig)
    assert len(models) >= 12  # RunConfig, source, simulate, scan, detector, mask, common mode, cube...
    for model in models:
        found = [h for h in secs if h.endswith(f"({model.__name__})")]
        assert len(found) == 1, f"no section for {model.__name__}"
        r = rows(secs[found[0]])
        for name in model.model_fields:
            assert name in r, f"{model.__name__}.{name} is not in docs/CONFIG.md"
            typ, default, desc = r[name]
            assert typ and default and desc.strip(), f"{model.__name__}.{name}: type, default or description missing"
    for ftype, cls in FUNCTIONS.items():
        found = [h for h in secs if h.startswith(f"`{ftype}` ") and cls.Params.__name__ in h]
        assert len(found) == 1, f"no section for function {ftype}"
        r = rows(secs[found[0]])
        assert set(r) == set(cls.Params.model_fields), ftype
        for name, (typ, default, desc) in r.items():
            assert typ and default and desc.strip(), f"{ftype}.{name}: type, default or description missing"
    # full key paths of nested blocks, and a few values
    for path in (
        "source.simulate.scan.events_per_step",
        "detectors.<name>.common_mode.max_correction",
        "cube.bins.steps",
        "cube.detectors.<name>.outputs",
        "event_functions[].detectors",
        "context.light_status.laser_codes",
    ):
        assert f"| `{path}` |" in text, path
    assert "| `batch_size` | int > 0 | `64` |" in text
    assert "| `max_droplets` | int >= 1 <= 4194304 | `1000` |" in text
