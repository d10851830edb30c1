"""One declaration per CUDA kernel, and the one way the package launches it.

Each kernel the package launches is a :class:`KernelSpec`, declared once beside its NumPy twin (the
module that launches it): the source file in ``kernels/``, the ``extern "C" __global__`` name, the
launch geometry as a function of the arguments (``grid``), and the twin it must agree with
(``reference``). Its parameters are read from the ``.cu`` source itself (:func:`parse_signatures`) the first
time it is launched, so the signature has one home: the CUDA source.

:meth:`KernelSpec.launch` takes the arguments by the signature's parameter names, puts them in order,
turns every scalar into the exact C type (``np.int32`` for ``int``, ``np.int64`` for ``long long``,
``np.uint32`` for ``unsigned int``, ``np.float32`` for ``float``: CuPy passes a Python int as 64 bits and a
float as a double, which a kernel taking ``int`` or ``float`` reads as garbage) and checks that every
pointer argument is a C-contiguous array of the exact dtype, raising :class:`KernelArgumentError`
naming the kernel and the parameter. It then asks ``backend.kernel(file, name)`` for the launchable
(``cupy.RawKernel`` on a GPU; the tests' stand-ins run the same source compiled for the CPU).

:func:`registry` gives every kernel the package launches (tests check it against the sources and the
launch sites).
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backend import find_kernel_source

POINTER_DTYPES: dict[str, type] = {
    "float": np.float32,
    "double": np.float64,
    "bool": np.bool_,
    "unsigned short": np.uint16,
    "unsigned char": np.uint8,
    "signed char": np.int8,
    "int": np.int32,
    "unsigned int": np.uint32,
    "long long": np.int64,
}
"""C type of a kernel's pointer parameter -> the dtype of the array it takes."""

SCALAR_TYPES: dict[str, type] = {"long long": np.int64, "int": np.int32, "unsigned int": np.uint32, "float": np.float32}
"""C type of a kernel's scalar parameter -> the NumPy scalar type it is passed as."""

RESERVED = ("backend", "grid", "block", "shared_mem")  # launch()'s own keywords: no kernel parameter may be one

LAUNCHING_MODULES = (
    "gpusmall.calib.calibrate",
    "gpusmall.calib.common_mode",
    "gpusmall.funcs.azav",
    "gpusmall.funcs.sums",
    "gpusmall.funcs.droplet",
    "gpusmall.producer.cube",
)
"""The modules that declare (and launch) kernels; :func:`registry` imports them."""


class KernelArgumentError(TypeError):
    """A launch's arguments do not fit the kernel's signature."""


@dataclass(frozen=True)
class Param:
    """One kernel parameter: its name, C type (qualifiers dropped) and whether it is a pointer."""

    name: str
    ctype: str
    pointer: bool

    @property
    def dtype(self) -> np.dtype:
        """The array dtype (pointer) or scalar type of the argument."""
        return np.dtype((POINTER_DTYPES if self.pointer else SCALAR_TYPES)[self.ctype])

    def __str__(self) -> str:
        return f"{self.name}: {self.ctype}{' *' if self.pointer else ''}"


def parse_signatures(src: str) -> dict[str, tuple[Param, ...]]:
    """name -> parameters of every ``extern "C" __global__`` kernel in CUDA source ``src``."""
    src = re.sub(r"//[^\n]*", "", src)
    src = re.sub(r"/\*.*?\*/", "", src, flags=re.S)
    out = {}
    for name, params in re.findall(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)', src):
        sig = []
        for p in params.split(","):
            p = " ".join(p.replace("__restrict__", " ").replace("const ", " ").split())
            words = p.replace("*", " ").split()
            sig.append(Param(words[-1], " ".join(words[:-1]), "*" in p))
        out[name] = tuple(sig)
    return out


@functools.cache
def file_signatures(filename: str) -> dict[str, tuple[Param, ...]]:
    """:func:`parse_signatures` of ``kernels/<filename>`` (read once per process)."""
    return parse_signatures(find_kernel_source(filename).read_text())


GridPolicy = Callable[[Mapping[str, Any]], tuple[tuple[int, ...], tuple[int, ...], int]]
SizePolicy = Callable[[Mapping[str, Any]], Mapping[str, int]]

_REGISTRY: dict[str, KernelSpec] = {}


@dataclass(frozen=True)
class KernelSpec:
    """A kernel of ``kernels/<file>`` as the package launches it.

    Args:
        file: the CUDA source in ``kernels/``.
        name: the ``extern "C" __global__`` function.
        grid: launch geometry from the named arguments: ``grid(args) -> (grid, block, shared_mem)``.
        reference: the NumPy twin the kernel must agree with, ``"module:function"``.
        sizes: from the named arguments, the elements the kernel indexes in each pointer argument (at
            least): ``sizes(args) -> {parameter: elements}``; a launch with a smaller array is refused
            (the host-side check of the kernel's index arithmetic; arrays' sizes are known on the host).
        options: extra NVRTC options.
    """

    file: str
    name: str
    grid: GridPolicy = field(repr=False)
    reference: str = ""
    sizes: SizePolicy | None = field(default=None, repr=False)
    options: tuple[str, ...] = ()

    def __post_init__(self):
        old = _REGISTRY.get(self.name)
        if old is not None and (old.file, old.reference) != (self.file, self.reference):
            raise ValueError(f"kernel {self.name!r} declared twice ({old.file}, {self.file})")
        _REGISTRY[self.name] = self

    @property
    def label(self) -> str:
        return f"{self.file}:{self.name}"

    @property
    def params(self) -> tuple[Param, ...]:
        """The parameters, as the ``.cu`` source declares them."""
        sigs = file_signatures(self.file)
        if self.name not in sigs:
            raise KeyError(f"{self.file} declares no kernel {self.name!r} (it has {sorted(sigs)})")
        return sigs[self.name]

    def reference_function(self) -> Callable:
        """The NumPy twin named by ``reference``."""
        module, _, attr = self.reference.partition(":")
        return getattr(importlib.import_module(module), attr)

    def arguments(self, named: Mapping[str, Any]) -> tuple:
        """The positional argument tuple of a launch: ``named`` in the signature's order, scalars as their
        exact C types, pointer arguments checked (KernelArgumentError otherwise)."""
        params = self.params
        names = [p.name for p in params]
        missing = [n for n in names if n not in named]
        extra = [n for n in named if n not in names]
        if missing or extra:
            raise KernelArgumentError(f"{self.label}: missing {missing}, unknown {extra} (parameters {names})")
        out = []
        for p in params:
            v = named[p.name]
            if p.pointer:
                dtype, flags = getattr(v, "dtype", None), getattr(v, "flags", None)
                if dtype is None or flags is None or getattr(v, "ndim", 0) < 1:
                    raise KernelArgumentError(f"{self.label}({p}): got {type(v).__name__}, not an array")
                if dtype != p.dtype:
                    raise KernelArgumentError(f"{self.label}({p}): array of {dtype}, needs {p.dtype}")
                if not flags.c_contiguous:
                    raise KernelArgumentError(f"{self.label}({p}): array is not C-contiguous")
                out.append(v)
                continue
            kind = p.dtype.kind
            if kind in "iu":
                if isinstance(v, (bool, np.bool_)):
                    v = int(v)
                if not isinstance(v, (int, np.integer)):
                    raise KernelArgumentError(f"{self.label}({p}): got {type(v).__name__}, not an integer")
                info = np.iinfo(p.dtype)
                if not info.min <= int(v) <= info.max:
                    raise KernelArgumentError(f"{self.label}({p}): {int(v)} does not fit {p.ctype}")
                out.append(p.dtype.type(int(v)))
            else:
                if not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, (bool, np.bool_)):
                    raise KernelArgumentError(f"{self.label}({p}): got {type(v).__name__}, not a number")
                out.append(p.dtype.type(v))
        if self.sizes is not None:
            for pname, need in self.sizes(named).items():
                have = int(named[pname].size)
                if have < int(need):
                    raise KernelArgumentError(f"{self.label}({pname}): {have} elements, the kernel indexes {int(need)}")
        return tuple(out)

    def launch(self, backend, grid=None, block=None, shared_mem: int | None = None, **named) -> None:
        """Launch on ``backend`` with the arguments by parameter name; ``grid``/``block``/``shared_mem``
        default to the spec's policy."""
        args = self.arguments(named)
        if grid is None or block is None or shared_mem is None:
            g, b, s = self.grid(named)
            grid = g if grid is None else grid
            block = b if block is None else block
            shared_mem = s if shared_mem is None else shared_mem
        grid = tuple(int(v) for v in grid)
        block = tuple(int(v) for v in block)
        kernel = backend.kernel(self.file, self.name, self.options)
        if shared_mem:
            kernel(grid, block, args, shared_mem=int(shared_mem))
        else:
            kernel(grid, block, args)


def blocks_1d(n: int, threads: int, limit: int = 2**31 - 1) -> tuple[int, ...]:
    """A 1-d grid of at least one and at most ``limit`` blocks of ``threads`` covering ``n`` items."""
    return (max(1, min((int(n) + threads - 1) // threads, limit)),)


def registry() -> dict[str, KernelSpec]:
    """name -> spec of every kernel the package launches (imports the modules that declare them)."""
    for m in LAUNCHING_MODULES:
        importlib.import_module(m)
    return dict(_REGISTRY)
