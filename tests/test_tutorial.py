"""The tutorial notebook (docs/tutorial.py, jupytext percent format) runs headless from start to end, and what it
finds is right: the beam centre and distance of the simulation, a pump-probe signal after time zero only."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # 20-40 s on 2 cores: the slow run (.ci/run runs it)
def test_tutorial_runs_and_finds_the_simulated_geometry(tmp_path):
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "tutorial.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    centre = re.search(r"centre \(um\) \[\s*(\S+)\s+(\S+)\s*\] distance \(mm\) (\S+)", out)
    cx, cy, dist = (float(v) for v in centre.groups())
    assert np.hypot(cx, cy) < 50 and abs(dist - 100.0) < 1.0  # the sim: beam at (0, 0), 100 mm; pixels 100 um
    signal = re.search(r"pump-probe signal per delay step: \[([^\]]*)\]", out).group(1).split()
    before, after = np.abs([float(v) for v in signal[:2]]), float(signal[2])
    assert after > 5 * before.max() and after > 0
    for name in (
        "tutorial.h5",
        "tutorial.cube.h5",
        "tutorial_avimage.png",
        "tutorial_roi.png",
        "tutorial_cube.png",
        "tutorial_mask.npy",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    with h5py.File(tmp_path / "tutorial.cube.h5") as f:
        assert f["bins/count"][()].sum() == 60 - 6  # every X-ray shot, in laser_on or laser_off
    with h5py.File(tmp_path / "tutorial.h5") as f:
        assert abs(f["UserDataCfg/epix/azav__distance_mm"][()] - dist) < 0.01  # the fitted distance was used
