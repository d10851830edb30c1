"""The new functions are registered, validate their parameters, and the demo config names them."""
from __future__ import annotations

from importlib import resources

import pytest
import yaml

from gpusmall.errors import ConfigError
from gpusmall.funcs import FUNCTIONS
from gpusmall.producer.config import parse_functions


def test_registered():
    for t in ("azav", "droplet", "photons", "photon_count", "acf"):
        assert t in FUNCTIONS


def test_demo_config_functions():
    cfg = yaml.safe_load(resources.files("gpusmall.producer").joinpath("demo.yaml").read_text())
    funcs = cfg["detectors"]["epix10k2m"]["functions"]
    specs = parse_functions(funcs, ("detectors", "epix10k2m", "functions"))
    types = [s.type for s in specs]
    assert "azav" in types and "droplet" in types
    d = specs[types.index("droplet")]
    assert d.children[0].type == "photons"


@pytest.mark.parametrize("entry, key", [
    ({"type": "azav", "bins": 10, "energy_kev": 9.5}, "functions[0]"),
    ({"type": "azav", "center_um": [0, 0], "distance_mm": 100, "energy_kev": 9.5}, "functions[0]"),
    ({"type": "azav", "center_um": [0, 0], "distance_mm": 100, "energy_kev": 9.5, "bins": 0}, "functions[0].bins"),
    ({"type": "droplet", "threshold": 3, "threshold_low": 5}, "functions[0]"),
    ({"type": "photon_count"}, "functions[0].adu_per_photon"),
    ({"type": "acf", "window": 0}, "functions[0].window"),
])
def test_bad_parameters(entry, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        parse_functions([entry], ("detectors", "d", "functions"))
