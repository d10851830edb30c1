"""Every kernels/*.cu compiles for sm_90 and defines the kernels the package launches: with nvcc (skipped
without it) and with NVRTC (from the ``nvidia-cuda-nvrtc`` wheel; skipped without it).

CuPy compiles these sources with NVRTC at run time, without the CUDA headers: they must not include any
(nvcc's implicit cuda_runtime.h would hide that; the NVRTC test compiles them as CuPy does). Launch arguments are checked in test_kernel_launches.py,
and each kernel's NumPy twin in the tests of its module.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from test_kernel_launches import kernels_used

from gpusmall.backend import find_kernel_source, kernel_dirs

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
    r = subprocess.run(
        ["nvcc", "--ptx", "-arch=sm_90", "--std=c++17", "-o", str(ptx), str(src)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    entries = set(re.findall(r"\.entry\s+(\w+)", ptx.read_text()))
    for f, name in kernels_used():
        if f == filename:
            assert name in entries, f"{filename} defines no kernel {name!r} (PTX entries: {sorted(entries)})"


def _nvrtc():
    """libnvrtc from the ``nvidia-cuda-nvrtc`` wheel (CI installs it), or None."""
    import ctypes
    import glob

    try:
        import nvidia
    except ImportError:
        return None
    for d in getattr(nvidia, "__path__", []):
        for lib in sorted(glob.glob(f"{d}/*/lib/libnvrtc.so*")):
            if "builtins" not in lib:
                try:
                    return ctypes.CDLL(lib)
                except OSError:
                    continue
    return None


def nvrtc_compile(source: str, name: str, options: list[str]) -> tuple[int, str, str]:
    """(result code, log, PTX) of NVRTC on ``source``, as CuPy's RawModule compiles it."""
    import ctypes

    lib = _nvrtc()
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None) == 0
    opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
    rc = lib.nvrtcCompileProgram(prog, len(options), opts)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    ptx = b""
    if rc == 0:
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetPTX(prog, buf)
        ptx = buf.value
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc, log.value.decode(errors="replace"), ptx.decode(errors="replace")


@pytest.mark.skipif(_nvrtc() is None, reason="NVRTC not installed (pip install nvidia-cuda-nvrtc; CI does)")
@pytest.mark.parametrize("filename", SOURCES)
def test_nvrtc_compiles_without_headers_or_warnings(filename):
    """NVRTC, the compiler CuPy uses at run time, with no include path (as ``Backend.kernel`` calls it)."""
    rc, log, ptx = nvrtc_compile(
        find_kernel_source(filename).read_text(),
        filename,
        ["--std=c++17", "--gpu-architecture=compute_90", "--Wreorder"],
    )
    assert rc == 0, log
    assert "warning" not in log.lower(), log
    entries = set(re.findall(r"\.entry\s+(\w+)", ptx))
    for f, name in kernels_used():
        if f == filename:
            assert name in entries, f"{filename}: NVRTC made no kernel {name!r} (entries {sorted(entries)})"


@pytest.mark.skipif(_nvrtc() is None, reason="NVRTC not installed (pip install nvidia-cuda-nvrtc; CI does)")
def test_nvrtc_reports_errors():
    rc, log, _ = nvrtc_compile(
        'extern "C" __global__ void k(float* x) { x[0] = undefined_name; }', "bad.cu", ["--std=c++17"]
    )
    assert rc != 0 and "undefined_name" in log
