"""kernels/azav.cu compiles for sm_90 (skipped without nvcc); its NumPy twin is tested in test_azav.py."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from gpusmall.backend import find_kernel_source


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_azav_kernel_compiles(tmp_path):
    src = find_kernel_source("azav.cu")
    r = subprocess.run(["nvcc", "--ptx", "-arch=sm_90", "--std=c++17", "-o", str(tmp_path / "azav.ptx"), str(src)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "azav_histogram" in (tmp_path / "azav.ptx").read_text()
