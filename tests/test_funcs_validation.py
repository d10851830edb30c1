"""Function-tree checks at config validation (children only under functions that pass frames on, droplet
thresholds) and what a run writes for function parameters and run sums (None parameters, mask_value: nan)."""

from __future__ import annotations

import copy

import h5py
import numpy as np
import pytest
import yaml

from gpusmall.cli import main
from gpusmall.errors import ConfigError
from gpusmall.funcs import FUNCTIONS
from gpusmall.producer.config import parse_functions, validate_config

PREFIX = ("detectors", "cam", "functions")
AZAV = {"type": "azav", "center_um": [0, 0], "distance_mm": 100, "energy_kev": 9.5, "bins": 8}

BASE = {
    "source": {"type": "sim", "events": 6, "seed": 1},
    "batch_size": 4,
    "output": "out.h5",
    "detectors": {
        "cam": {
            "type": "camera",
            "shape": [32, 48],
            "mask": {"edges": 2},
            "functions": [{"type": "roi", "bounds": [[0, 8], [0, 8]]}],
            "sums": ["calib", "square", "max", "nhits", "max_thresADU5"],
        }
    },
}


def test_only_roi_and_droplet_take_children():
    assert {t: f.passes for t, f in FUNCTIONS.items() if f.passes} == {"roi": "image", "droplet": ("droplets", "image")}


@pytest.mark.parametrize(
    "entry, where",
    [
        (
            {"type": "rebin", "shape": [8, 8], "children": [{"type": "roi", "bounds": [[0, 2], [0, 2]]}]},
            "detectors.cam.functions[0].children: rebin takes no children",
        ),
        (
            dict(AZAV, children=[{"type": "projection", "axis": 0}]),
            "detectors.cam.functions[0].children: azav takes no children",
        ),
        (
            {
                "type": "roi",
                "bounds": [[0, 8], [0, 8]],
                "children": [{"type": "projection", "axis": 0, "children": [{"type": "rebin", "shape": [2, 2]}]}],
            },
            "detectors.cam.functions[0].children[0].children: projection takes no children",
        ),
        (
            {
                "type": "droplet",
                "threshold": 10,
                "children": [
                    {"type": "photons", "adu_per_photon": 100, "children": [{"type": "rebin", "shape": [2, 2]}]}
                ],
            },
            "detectors.cam.functions[0].children[0].children: photons takes no children",
        ),
    ],
)
def test_children_under_a_function_that_passes_nothing_on(entry, where):
    with pytest.raises(ConfigError) as e:
        parse_functions([entry], PREFIX)
    assert str(e.value) == f"config: {where}"


def test_children_where_they_are_taken_and_empty_children():
    specs = parse_functions(
        [
            {"type": "roi", "bounds": [[0, 8], [0, 8]], "children": [dict(AZAV)]},
            {"type": "droplet", "threshold": 10, "children": [{"type": "photons", "adu_per_photon": 100}]},
            {"type": "rebin", "shape": [8, 8], "children": []},
        ],
        PREFIX,
    )
    assert [len(s.children) for s in specs] == [1, 1, 0]


@pytest.mark.parametrize(
    "params, key",
    [
        ({"threshold": 100, "threshold_low": -200}, "threshold_low"),
        ({"threshold": 0}, "threshold"),
    ],
)
def test_droplet_thresholds_at_validation(params, key):
    with pytest.raises(ConfigError, match=rf"detectors\.cam\.functions\[0\]\.{key}: .*greater than"):
        parse_functions([dict(type="droplet", **params)], PREFIX)


def cfg_with(tmp_path, functions=None, **det):
    d = copy.deepcopy(BASE)
    d["output"] = str(tmp_path / "out.h5")
    if functions is not None:
        d["detectors"]["cam"]["functions"] = functions
    d["detectors"]["cam"].update(det)
    return d


def test_run_with_children_under_rebin_exits_2(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        yaml.safe_dump(
            cfg_with(
                tmp_path,
                [{"type": "rebin", "shape": [8, 8], "children": [{"type": "roi", "bounds": [[0, 2], [0, 2]]}]}],
            )
        )
    )
    assert main(["run", str(cfg), "--backend", "numpy"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "detectors.cam.functions[0].children: rebin takes no children" in err[0], err
    assert not (tmp_path / "out.h5").exists()


def built(entry):
    from helpers_funcs import make_ctx

    from gpusmall.backend import Backend
    from gpusmall.funcs import build_function

    f = build_function(parse_functions([entry], PREFIX)[0])
    f.setup(make_ctx(Backend("numpy"), (1, 16, 16)))
    return f


def test_none_parameters_are_written_as_null():
    p = built(dict(AZAV, polarization=None, name="ring")).params()
    assert p["ring__polarization"] == "null"
    assert p["ring__range"] == "null" and p["ring__bin_width"] == "null"  # every parameter is there
    assert p["ring__bins"] == 8 and p["ring__distance_mm"] == 100
    default = built(dict(AZAV, name="ring")).params()
    assert default["ring__polarization"] == 0.99
    fields = set(FUNCTIONS["azav"].Params.model_fields) - {"name"}
    assert {k.split("__", 1)[1] for k in p if "__" in k} >= fields


def run(tmp_path, cfg):
    from gpusmall.backend import Backend
    from gpusmall.producer.run import reduce_run

    return reduce_run(validate_config(cfg), Backend("numpy"), quiet=True).output


def test_run_writes_null_parameters_and_nan_sums(tmp_path):
    functions = [dict(AZAV, name="ring", polarization=None), dict(AZAV, name="pol")]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    out_nan = run(tmp_path / "a", cfg_with(tmp_path / "a", functions, mask_value="nan"))
    out_zero = run(tmp_path / "b", cfg_with(tmp_path / "b", functions))
    with h5py.File(out_nan, "r") as f, h5py.File(out_zero, "r") as g:
        u = f["UserDataCfg/cam"]
        v = u["ring__polarization"][()]
        assert (v.decode() if isinstance(v, bytes) else v) == "null"
        assert float(u["pol__polarization"][()]) == pytest.approx(0.99)
        assert u["mask__user"][()] in (b"null", "null")  # the mask's parameters: every key too
        mask = u["mask"][()].astype(bool)
        assert mask.shape == (1, 32, 48) and 0 < mask.sum() < mask.size  # edges: 2 masks the frame border
        mask = mask[0]  # a camera's sums are (rows, cols), as smalldata_tools writes them
        for name in ("calib", "calib_square", "calib_max", "calib_max_thresADU5"):  # as written (smalldata_tools')
            a, b = f[f"Sums/cam_{name}"][()], g[f"Sums/cam_{name}"][()]
            assert np.isnan(a[~mask]).all() and np.isfinite(a[mask]).all(), name
            np.testing.assert_array_equal(b[~mask], 0, err_msg=name)
            np.testing.assert_array_equal(a[mask], b[mask], err_msg=name)  # same run otherwise
        n_nan, n_zero = f["Sums/cam_nhits"][()], g["Sums/cam_nhits"][()]
        assert n_nan.dtype.kind == "i"
        np.testing.assert_array_equal(n_nan, n_zero)
        np.testing.assert_array_equal(n_nan[~mask], 0)
        # the azav counts (one per good pixel, the range spanning them all) see the same static mask
        assert int(f["cam/ring_count"][0].sum()) == int(mask.sum())
