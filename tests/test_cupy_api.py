"""The CuPy API the package calls exists in the installed CuPy (runs wherever CuPy imports, GPU or not).

The CuPy code paths run on the CPU with NumPy in CuPy's place (test_fake_gpu_pipeline); that cannot see
a NumPy function CuPy lacks, or a keyword CuPy's version does not take. This reads every ``xp.<name>``
call of the package (its keywords too, where CuPy gives a signature), every ``cupy.``/``cupyx.`` name,
and the CuPy stream/event/pinned-memory API that ``tests/fake_cupy.py`` stands in for, and looks each up
in the real CuPy. Skipped where CuPy is not installed (CI installs ``cupy-cuda13x``: it imports without
a GPU or driver).
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

cupy = pytest.importorskip("cupy", reason="CuPy not installed (pip install cupy-cuda13x imports without a GPU)")
cupyx = pytest.importorskip("cupyx")

PACKAGE = Path(__file__).resolve().parents[1] / "gpusmall"


def _chain(node) -> list[str]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return parts[::-1]


def _after_xp(chain: list[str]) -> str | None:
    """'name.sub' of ``xp.name.sub``, ``self.xp.name.sub``, ``backend.xp.name.sub`` (``cp`` too: the
    GPU-only code calls CuPy that); None otherwise."""
    for alias in ("xp", "cp"):
        if alias in chain[:-1]:
            return ".".join(chain[chain.index(alias) + 1 :])
    return None


def xp_calls() -> dict[str, set[str]]:
    """'name.sub' -> keyword names, for every ``xp.name.sub(...)`` call or ``xp.name`` use in the package
    (``xp`` also as an attribute: ``self.backend.xp.name``)."""
    found: dict[str, set[str]] = {}
    for py in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(py.read_text())):
            if isinstance(node, ast.Attribute):
                c = _after_xp(_chain(node))
                if c:
                    found.setdefault(c, set())
            if isinstance(node, ast.Call):
                c = _after_xp(_chain(node.func))
                if c:
                    found.setdefault(c, set()).update(k.arg for k in node.keywords if k.arg)
    return found


def _lookup(root, dotted: str):
    obj = root
    for a in dotted.split("."):
        obj = getattr(obj, a)
    return obj


def test_every_xp_name_exists_in_cupy():
    calls = xp_calls()
    assert len(calls) > 30
    missing = []
    for dotted in calls:
        try:
            _lookup(cupy, dotted)
        except AttributeError:
            # xp.<name>.<attr> on the result of a call is an array attribute (e.g. xp.float32(1).item)
            if not hasattr(cupy.ndarray, dotted.split(".")[-1]):
                missing.append(dotted)
    assert not missing, f"not in CuPy {cupy.__version__}: {missing}"


def test_keywords_cupy_takes():
    bad = []
    for dotted, keywords in xp_calls().items():
        try:
            sig = inspect.signature(_lookup(cupy, dotted))
        except (AttributeError, TypeError, ValueError):  # ufuncs and Cython functions give none
            continue
        params = sig.parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            continue
        bad += [f"{dotted}({k}=)" for k in keywords if k not in params]
    assert not bad, f"keywords CuPy {cupy.__version__} does not take: {bad}"


def test_direct_cupy_and_cupyx_names_exist():
    names = set()
    for py in PACKAGE.rglob("*.py"):
        names |= set(re.findall(r"\b((?:cupyx|cupy)(?:\.[A-Za-z_]\w*)+)", py.read_text()))
    assert "cupyx.scipy.sparse" in names and "cupyx.scipy.fft" in names
    import cupyx.scipy.fft
    import cupyx.scipy.ndimage
    import cupyx.scipy.sparse  # noqa: F401

    missing = []
    for dotted in sorted(names):
        root, rest = dotted.split(".", 1)
        try:
            _lookup(cupy if root == "cupy" else cupyx, rest)
        except AttributeError:
            missing.append(dotted)
    assert not missing, missing


def test_the_stand_ins_fake_only_real_cupy_api():
    """What tests/fake_cupy.py and test_kernel_launches.FakeGpu stand in for exists, with the same names."""
    cuda = cupy.cuda
    for name in ("Event", "Stream", "get_elapsed_time", "alloc_pinned_memory", "Device", "runtime"):
        assert hasattr(cuda, name), name
    for name in ("record", "synchronize"):
        assert hasattr(cuda.Event, name), name
    for name in ("wait_event", "synchronize", "__enter__", "__exit__"):
        assert hasattr(cuda.Stream, name), name
    cuda.Stream.__init__  # noqa: B018  Backend.stream calls cupy.cuda.Stream(non_blocking=...): Cython, no signature
    assert "non_blocking" in (cuda.Stream.__doc__ or "") + (cuda.Stream.__init__.__doc__ or "")
    for name in ("empty", "asnumpy", "asarray", "get_default_memory_pool", "RawModule", "RawKernel"):
        assert hasattr(cupy, name), name
    assert hasattr(cupy.ndarray, "set") and hasattr(cupy.cuda.memory.MemoryPool, "free_all_blocks")
    assert cupy.cuda.memory.OutOfMemoryError.__name__ == "OutOfMemoryError"  # process.is_out_of_memory
    assert hasattr(cupy.RawModule, "get_function")
    import cupyx.scipy.sparse

    assert callable(cupyx.scipy.sparse.csr_matrix)
