"""Every kernels/*.cu compiles for sm_90 (skipped without nvcc) and defines the kernels the package launches.

CuPy compiles these sources with NVRTC at run time, without the CUDA headers: they must not include any
(nvcc's implicit cuda_runtime.h would hide that). Launch arguments are checked in test_kernel_launches.py,
and each kernel's NumPy twin in the tests of its module.
"""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from gpusmall.backend import find_kernel_source, kernel_dirs
from test_kernel_launches import kernels_used

SOURCES = sorted(p.name for d in kernel_dirs() if d.is_dir() for p in d.glob("*.cu"))


def test_sources_found():
    assert {"azav.cu", "calib.cu", "common_mode.cu"} <= set(SOURCES)


@pytest.mark.parametrize("filename", SOURCES)
def test_no_includes(filename):
    src = find_kernel_source(filename).read_text()
    assert not re.search(r"^\s*#\s*include", src, re.M), f"{filename}: NVRTC compiles without the CUDA headers"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("filename", SOURCES)
def test_kernel_compiles(tmp_path, filename):
    src = find_kernel_source(filename)
    ptx = tmp_path / (src.stem + ".ptx")
    r = subprocess.run(["nvcc", "--ptx", "-arch=sm_90", "--std=c++17", "-o", str(ptx), str(src)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    entries = set(re.findall(r"\.entry\s+(\w+)", ptx.read_text()))
    for f, name in kernels_used():
        if f == filename:
            assert name in entries, f"{filename} defines no kernel {name!r} (PTX entries: {sorted(entries)})"
