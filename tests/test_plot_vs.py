"""Plots against the scan (gpusmall/analysis/plot_vs.py): the binned means are NumPy's grouping; the command
line draws a result's value against another and a cube file's keys against its bins."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from test_context_cube import STEP_CUBE, scan_config
from test_mpi import run_inproc

from gpusmall.analysis.plot_vs import binned_mean
from gpusmall.cli import main


def test_binned_mean_per_value_and_per_bin():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, 200).astype(float)
    y = rng.normal(size=200) + x
    x[3], y[5] = np.nan, np.inf
    b = binned_mean(x, y)
    ok = np.isfinite(x) & np.isfinite(y)
    np.testing.assert_array_equal(b["centers"], [0, 1, 2, 3])
    for k in range(4):
        m = ok & (x == k)
        assert b["count"][k] == m.sum()
        np.testing.assert_allclose(b["mean"][k], y[m].mean())
        np.testing.assert_allclose(b["sem"][k], y[m].std(ddof=1) / np.sqrt(m.sum()))
    xs = rng.uniform(0, 10, 500)
    b = binned_mean(xs, 2 * xs, bins=5)  # continuous x: 5 equal bins over its range
    edges = np.linspace(xs.min(), xs.max(), 6)
    idx = np.clip(np.searchsorted(edges, xs, side="right") - 1, 0, 4)
    np.testing.assert_allclose(b["mean"], [2 * xs[idx == k].mean() for k in range(5)])


def test_plot_vs_and_cube_from_the_command_line(tmp_path, capsys):
    run_inproc(scan_config(tmp_path, cube=STEP_CUBE), tmp_path)
    res, cube = tmp_path / "scan.h5", tmp_path / "scan.cube.h5"
    assert main(["plot", str(res), "cam/full_sum", "--vs", "ipm/sum", "--png", str(tmp_path / "vs.png")]) == 0
    assert "45 events" in capsys.readouterr().err
    for key in ("ipm/sum", "cam/frame", "cam/azav_azav_sum"):
        png = tmp_path / f"{key.replace('/', '_')}.png"
        assert main(["plot", str(cube), key, "--png", str(png)]) == 0
        assert "5 bins x 2 splits" in capsys.readouterr().err and png.stat().st_size > 0
    assert main(["plot", str(cube), "nope", "--png", str(tmp_path / "x.png")]) == 2
    assert "has no 'nope'" in capsys.readouterr().err
    assert main(["plot", str(res), "cam/full_sum", "--vs", "cam/full_area", "--png", str(tmp_path / "y.png")]) == 2
    assert "--vs key 'cam/full_area' must be a per-event scalar" in capsys.readouterr().err
    with h5py.File(res) as f:  # the plotted binned means are those of the file (the function tested above)
        assert f["ipm/sum"].shape == (45,)


@pytest.mark.parametrize("key", ["scan/varStep"])
def test_plot_vs_a_scan_variable_bins_per_step(tmp_path, capsys, key):
    run_inproc(scan_config(tmp_path), tmp_path)
    assert main(["plot", str(tmp_path / "scan.h5"), "cam/full_sum", "--vs", key, "--png", str(tmp_path / "s.png")]) == 0
    assert "5 bins" in capsys.readouterr().err
