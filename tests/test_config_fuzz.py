"""The config loader under generated input: every config validates or fails with a ConfigError whose one
line names a key path; no other exception, ever (issue 13)."""

import copy
import re

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpusmall.errors import ConfigError
from gpusmall.producer.config import read_config_file, validate_config

BASE = {
    "source": {"type": "sim", "events": 8, "seed": 1},
    "batch_size": 4,
    "output": "out.h5",
    "detectors": {
        "epix": {
            "type": "epix10ka",
            "shape": [1, 352, 384],
            "units": "adu",
            "mask": {"status": True, "edges": 1, "central": 1},
            "common_mode": {"type": "median", "axes": ["rows", "cols"], "max_correction": 100.0},
            "functions": [
                {
                    "type": "roi",
                    "name": "roi0",
                    "bounds": [[0, 1], [10, 60], [20, 120]],
                    "thres_adu": 5.0,
                    "children": [{"type": "projection", "axis": 0}, {"type": "droplet", "threshold": 5.0}],
                },
                {"type": "azav", "center_um": [0.0, 0.0], "distance_mm": 100.0, "energy_kev": 9.5, "bins": 50},
                {
                    "type": "droplet",
                    "threshold": 5.0,
                    "threshold_low": 3.0,
                    "children": [{"type": "photons", "adu_per_photon": 160.0}],
                },
            ],
            "sums": ["calib", "square", "nhits_thresADU10"],
        }
    },
}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "sim",
            "hdf5",
            "psana",
            "roi",
            "azav",
            "droplet",
            "photons",
            "median",
            "rows",
            "banks",
            "all",
            "high",
            "kev",
            "nan",
            "Sums",
            "a/b",
            "..",
            "",
        ]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)


def paths(obj, prefix=()):
    """Every key path into a nested dict/list config."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from paths(v, prefix + (i,))


ALL_PATHS = [p for p in paths(BASE) if p]


def get(obj, path):
    for k in path:
        obj = obj[k]
    return obj


@st.composite
def mutated(draw):
    """BASE with a few key paths replaced by arbitrary values, deleted, or given an extra key."""
    cfg = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 4))):
        live = [p for p in paths(cfg) if p]
        path = draw(st.sampled_from(live or ALL_PATHS))
        try:
            parent = get(cfg, path[:-1])
        except (KeyError, IndexError, TypeError):
            continue
        action = draw(st.sampled_from(["set", "set", "delete", "extra"]))
        key = path[-1]
        if not isinstance(parent, (dict, list)):
            continue
        if action == "set":
            parent[key] = draw(values)
        elif action == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(values)
    return cfg


KEY_PATH = re.compile(r"^config: .+?: .+", re.S)  # config: <key path or file>: <what is wrong>


def assert_named(exc: ConfigError):
    msg = str(exc)
    assert KEY_PATH.match(msg), msg


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_every_generated_config_validates_or_names_a_key(tmp_path_factory, cfg):
    try:
        validate_config(cfg)
    except ConfigError as exc:
        assert_named(exc)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200).map(str.encode),
        mutated().map(lambda c: yaml.safe_dump(c).encode()),
    ),
    st.sampled_from([".yaml", ".toml", ".yml"]),
)
def test_every_file_loads_or_exits_2(tmp_path, data, suffix):
    path = tmp_path / f"c{suffix}"
    path.write_bytes(data)
    try:
        validate_config(read_config_file(path), base_dir=tmp_path)
    except ConfigError as exc:
        assert_named(exc)


def test_the_base_config_is_valid():
    validate_config(copy.deepcopy(BASE))


@pytest.mark.parametrize(
    "text",
    [
        "a: &a [*a]",
        "x: !!python/object/apply:os.system ['true']",
        "date: 2001-13-45",
        "[" * 5000,
        "a: 1\n" * 3 + "\t- b",
    ],
)
def test_hostile_yaml_is_a_config_error(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"^config: "):
        validate_config(read_config_file(path), base_dir=tmp_path)
