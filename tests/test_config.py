"""Config validation (SPEC section 7) and the command line's exit codes for bad configs (section 9)."""

import textwrap
from pathlib import Path

import pytest
import yaml

from gpusmall.cli import demo_config_dict, main
from gpusmall.errors import ConfigError
from gpusmall.producer.config import load_config, validate_config

BASE = {
    "source": {"type": "sim", "events": 4},
    "batch_size": 2,
    "output": "out.h5",
    "detectors": {
        "cam": {
            "type": "camera",
            "shape": [32, 48],
            "functions": [{"type": "roi", "bounds": [[0, 8], [0, 8]]}, {"type": "rebin", "shape": [8, 8]}],
        }
    },
}


def with_(path, value):
    import copy

    d = copy.deepcopy(BASE)
    node = d
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return d


def test_demo_config_validates():
    cfg = validate_config(demo_config_dict())
    assert "epix10k2m" in cfg.detectors
    assert cfg.detectors["epix10k2m"].panel_shape() == (16, 352, 384)


@pytest.mark.parametrize(
    "path,value,message",
    [
        (("detectors", "cam", "colour"), 3, "detectors.cam.colour: unknown key"),
        (("batch_size",), -4, "batch_size"),
        (("batch_size",), "many", "batch_size"),
        (("source", "type"), "xtc9", "source.type"),
        (
            ("detectors", "cam", "functions"),
            [{"type": "roi", "bounds": [[0, 8], [0, 8]]}, {"type": "rebin", "shape": [8, 8], "bins": 4}],
            "detectors.cam.functions[1].bins: unknown key",
        ),
        (
            ("detectors", "cam", "functions"),
            [{"type": "roi", "bounds": [[0, 8], [0, 8]], "children": [{"type": "projection", "axis": "x"}]}],
            "detectors.cam.functions[0].children[0].axis",
        ),
        (("detectors", "cam", "functions"), [{"type": "fft9"}], "detectors.cam.functions[0].type: unknown function"),
        (("detectors", "cam", "sums"), ["calib", "mean"], "detectors.cam"),
        (("detectors", "cam", "units"), "photons", "photon_energy_kev"),
    ],
)
def test_errors_name_the_key_path(path, value, message):
    with pytest.raises(ConfigError) as e:
        validate_config(with_(path, value))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_top_level_key():
    d = dict(BASE, extra=1)
    with pytest.raises(ConfigError, match="extra: unknown key"):
        validate_config(d)


def test_relative_paths_follow_the_config_file(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(with_(("detectors", "cam", "constants"), "k.h5")))
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.detectors["cam"].constants == str(tmp_path / "k.h5")
    assert cfg.output == str(tmp_path / "out.h5")


def test_toml_config(tmp_path):
    (tmp_path / "c.toml").write_text(
        textwrap.dedent("""
        batch_size = 2
        output = "o.h5"
        [source]
        type = "sim"
        events = 4
        [detectors.cam]
        type = "camera"
        shape = [16, 16]
        sums = ["calib"]
    """)
    )
    cfg = load_config(tmp_path / "c.toml")
    assert cfg.batch_size == 2 and cfg.detectors["cam"].sums == ["calib"]


@pytest.mark.parametrize(
    "path,value,needle",
    [
        (("detectors", "cam", "colour"), 3, "detectors.cam.colour"),
        (("batch_size",), -1, "batch_size"),
        (("batch_size",), "x", "batch_size"),
        (("detectors", "cam", "constants"), "missing_constants.h5", "missing_constants.h5"),
        (("detectors", "cam", "functions"), [{"type": "roi", "bounds": [[0, 800], [0, 8]]}], "bounds"),
    ],
)
def test_run_bad_config_exits_2_and_writes_nothing(tmp_path, capsys, path, value, needle):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(with_(path, value)))
    assert main(["run", str(cfg), "--backend", "numpy"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "out.h5").exists()


def test_missing_config_file_exits_2(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_invalid_yaml_exits_2(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("source: [unclosed\n")
    assert main(["run", str(tmp_path / "c.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_function_file_parameters_follow_the_config_file(tmp_path):
    d = with_(
        ("detectors", "cam", "functions"),
        [
            {"type": "roi", "bounds": [[0, 8], [0, 8]], "user_mask": "m.npy"},
            {"type": "azav", "poni": "geo.poni", "bins": 10},
        ],
    )
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    specs = load_config(tmp_path / "c.yaml").function_specs("cam")
    assert specs[0].params.user_mask == str(tmp_path / "m.npy")
    assert specs[1].params.poni == str(tmp_path / "geo.poni")


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parents[1] / "producers").glob("*.yaml")), ids=lambda p: p.name
)
def test_example_configs_validate(path):
    """Every example config in producers/ passes validation (paths resolved beside it)."""
    from gpusmall.producer.config import load_config

    cfg = load_config(path)
    assert cfg.detectors and Path(cfg.output).is_absolute()
