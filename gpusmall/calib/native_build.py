"""A C++ source of the package compiled for this machine on first use and loaded with ctypes.

``load(name, code)`` compiles C++ ``code`` (a few generated lines that include a source next to this
module) with the system's C++ compiler
(``$CXX``, else ``c++``/``g++``/``clang++``) for the CPU it runs on (``-march=native``, no fast-math,
no FMA contraction: the arithmetic stays the reference's) into a per-user cache, ``$GPUSMALL_CACHE_DIR``
or ``$XDG_CACHE_HOME/gpusmall`` (``~/.cache/gpusmall``). The library's name is a hash of the code, the
package's sources, the compiler, the flags and the CPU's feature flags, so a home directory shared by nodes with different
CPUs holds one build per kind of CPU. Concurrent processes (MPI ranks, test workers) wait on a file
lock and one of them compiles; the library is written under a temporary name and renamed into place.

Nothing here is required: without a compiler, when it fails, or with ``GPUSMALL_NATIVE=0``, :func:`load`
returns None and the callers keep their NumPy/numba path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

ENV_VAR = "GPUSMALL_NATIVE"
"""``GPUSMALL_NATIVE=0`` turns the compiled kernels off (the numba/NumPy path, e.g. to compare)."""
HERE = Path(__file__).resolve().parent
FLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-fno-fast-math", "-ffp-contract=off", "-fno-strict-aliasing"]
ARCH_FLAGS = [["-march=native"], []]
"""Tried in order: for this CPU's vector width, else the compiler's default target."""


def enabled() -> bool:
    return os.environ.get(ENV_VAR, "1") != "0"


def cache_dir() -> Path:
    root = os.environ.get("GPUSMALL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "gpusmall"
    )
    return Path(root) / "native"


def compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_id() -> str:
    """The CPU's model and feature flags (Linux: /proc/cpuinfo), else what platform says."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [ln for ln in lines if ln.split(":")[0].strip() in ("flags", "Features", "model name", "CPU part")]
        return "\n".join(sorted(set(keep)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _version(cxx: str) -> str:
    r = subprocess.run([cxx, "--version"], check=False, capture_output=True, text=True)
    return r.stdout


@functools.cache
def load(name: str, code: str) -> ctypes.CDLL | None:
    """The library compiled from C++ ``code`` (which may ``#include`` the package's sources next to this
    module), cached as ``name-<hash>.so``; None where it cannot be built (see the module)."""
    if not enabled():
        return None
    cxx = compiler()
    if cxx is None:
        return None
    try:
        sources = b"".join(p.read_bytes() for p in sorted([*HERE.glob("*.cpp"), *HERE.glob("*.hpp")]))
        ident = code.encode() + sources + _version(cxx).encode() + _cpu_id().encode() + " ".join(FLAGS).encode()
        for arch in ARCH_FLAGS:
            key = hashlib.sha256(ident + " ".join(arch).encode()).hexdigest()[:20]
            lib = _build(cxx, name, code, arch, key)
            if lib is not None:
                try:
                    return ctypes.CDLL(str(lib))
                except OSError:
                    continue
    except Exception:  # no writable cache, no fcntl (Windows), a compiler that does not run: keep the fallback
        return None
    return None


def _build(cxx: str, name: str, code: str, arch: list[str], key: str) -> Path | None:
    lib = cache_dir() / f"{name}-{key}.so"
    failed = lib.with_suffix(".failed")  # the compiler's message, so that no later process tries again
    if failed.exists():
        return None
    try:
        compile_once(cxx, [*FLAGS, *arch, f"-I{HERE}"], code, lib)
    except CompileError as e:
        failed.write_text(str(e))
        return None
    return lib


class CompileError(RuntimeError):
    """A compile that failed; the message is the compiler's (its last 4000 characters)."""


def compile_once(cxx: str, flags: list[str], code: str, lib: Path) -> str:
    """Compile C++ ``code`` with ``flags`` into the shared library ``lib`` unless it is there already; returns
    the compiler's warnings ("" when it was there). One process compiles while the others wait on a file
    lock beside ``lib``; the library is written under a temporary name and renamed into place, so a reader
    never sees half of one. Raises :class:`CompileError` when the compiler fails."""
    import fcntl

    if lib.exists():
        return ""
    lib.parent.mkdir(parents=True, exist_ok=True)
    with open(lib.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if lib.exists():
            return ""
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
        os.close(fd)
        src = Path(tmp).with_suffix(".cpp")
        try:
            src.write_text(code)
            r = subprocess.run([cxx, *flags, "-o", tmp, str(src)], check=False, capture_output=True, text=True)
            if r.returncode != 0:
                raise CompileError(r.stderr[-4000:])
            os.replace(tmp, lib)
            return r.stderr
        finally:
            for path in (tmp, src):
                if os.path.exists(path):
                    os.unlink(path)
