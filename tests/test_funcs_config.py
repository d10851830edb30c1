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


@pytest.mark.parametrize(
    "entry, key",
    [
        ({"type": "azav", "bins": 10, "energy_kev": 9.5}, "functions[0]"),
        ({"type": "azav", "center_um": [0, 0], "distance_mm": 100, "energy_kev": 9.5}, "functions[0]"),
        ({"type": "azav", "center_um": [0, 0], "distance_mm": 100, "energy_kev": 9.5, "bins": 0}, "functions[0].bins"),
        ({"type": "droplet", "threshold": 3, "threshold_low": 5}, "functions[0]"),
        ({"type": "photon_count"}, "functions[0].adu_per_photon"),
        ({"type": "acf", "window": 0}, "functions[0].window"),
    ],
)
def test_bad_parameters(entry, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        parse_functions([entry], ("detectors", "d", "functions"))


def _tree(entries):
    from gpusmall.funcs import build_function

    return [build_function(s) for s in parse_functions(entries, ("detectors", "d", "functions"))]


def test_parameters_under_smalldata_tools_names(numpy_backend):
    """Every parameter (and static output) also as <top>__<owner>_<param>, smalldata_tools' rule: the owner is
    the function itself (any depth, its own name); bounds -> bound, thres_adu -> thresADU; ours stay."""
    import numpy as np
    from helpers_funcs import make_ctx

    roi, azav = _tree(
        [
            {
                "type": "roi",
                "name": "roi0",
                "bounds": [[0, 8], [0, 10]],
                "thres_adu": [1.0, 50.0],
                "children": [
                    {"type": "projection", "axis": 1},
                    {"type": "droplet", "threshold": 3, "children": [{"type": "photons", "adu_per_photon": 9}]},
                ],
            },
            {"type": "azav", "center_um": [0, 0], "distance_mm": 100, "energy_kev": 9.5, "bins": 7},
        ]
    )
    ctx = make_ctx(numpy_backend, (1, 16, 16))
    for f in (roi, azav):
        f.setup(ctx)
    sd, ours = roi.smalldata_params(), roi.params()
    assert sd["roi0__roi0_bound"] == ours["roi0__bounds"] == [[0, 8], [0, 10]]
    assert sd["roi0__roi0_thresADU"] == [1.0, 50.0] and sd["roi0__roi0_write_area"] is False
    assert sd["roi0__roi0_user_mask"] == "null" == ours["roi0__user_mask"]
    assert sd["roi0__pj_ax_1_axis"] == 1 == ours["roi0_pj_ax_1__axis"]
    assert sd["roi0__droplet_threshold"] == 3 and sd["roi0__droplet_thresADU"] == "null"
    assert sd["roi0__photons_adu_per_photon"] == 9 == ours["roi0_droplet_photons__adu_per_photon"]
    assert not set(sd) & set(ours)
    # one key per parameter of every function of the tree: as many as ours
    assert len(sd) == len(ours)
    sa, oa = azav.smalldata_params(), azav.params()
    np.testing.assert_array_equal(sa["azav__azav_q"], oa["azav__q"])
    assert sa["azav__azav_bins"] == 7 and len(sa["azav__azav_q"]) == 7


def test_smalldata_names_of_two_functions_of_one_name_are_left_out():
    """Two functions of the same name under one top function would write the same smalldata_tools key: it is
    left out (ours, which name the whole path, are there)."""
    (top,) = _tree(
        [
            {
                "type": "roi",
                "name": "r",
                "bounds": [[0, 8], [0, 8]],
                "children": [
                    {
                        "type": "roi",
                        "name": "a",
                        "bounds": [[0, 4], [0, 4]],
                        "children": [{"type": "projection", "axis": 0}],
                    },
                    {
                        "type": "roi",
                        "name": "b",
                        "bounds": [[0, 4], [0, 4]],
                        "children": [{"type": "projection", "axis": 0}],
                    },
                ],
            }
        ]
    )
    sd = top.smalldata_params()
    assert "r__a_bound" in sd and "r__b_bound" in sd and not any(k.startswith("r__pj_ax_0_") for k in sd)
    assert top.params()["r_a_pj_ax_0__axis"] == 0 == top.params()["r_b_pj_ax_0__axis"]


def test_smalldata_names_never_replace_ours():
    """Children named ``b_`` and ``_b``: smalldata_tools' ``a__b__axis`` (b_'s axis) is our name of _b's axis."""
    (top,) = _tree(
        [
            {
                "type": "roi",
                "name": "a",
                "bounds": [[0, 8], [0, 8]],
                "children": [
                    {"type": "projection", "name": "b_", "axis": 0},
                    {"type": "projection", "name": "_b", "axis": 1},
                ],
            }
        ]
    )
    assert top.params()["a__b__axis"] == 1
    sd = top.smalldata_params()
    assert "a__b__axis" not in sd and sd["a___b_axis"] == 1
