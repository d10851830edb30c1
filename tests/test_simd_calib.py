"""The compiled one-pass calibration (gpusmall/calib/simd_calib.py) against the NumPy transcription of its
formula (simd_calib.reference) and against the numba kernels it stands in for: bit for bit, every key, okb
byte, special constant, tail and block size; its builds for older x86 CPUs; its check on load."""

import ctypes
import platform
from pathlib import Path

import numpy as np
import pytest

from gpusmall.backend import Backend
from gpusmall.calib import Calibrator, cpu_kernels, native_build, simd_calib
from gpusmall.detectors import get_model
from gpusmall.detectors.constants import Constants

needs_compiler = pytest.mark.skipif(
    native_build.compiler() is None or not native_build.enabled(), reason="no C++ compiler"
)
N_OPT = {"single": 1, "one_bit": 2, "two_bits": 3}


def tables(rng, kind, npix):
    n_opt = N_OPT[kind]
    tab = rng.uniform(-50, 3000, (2 * n_opt, npix + 16)).astype(np.float32)
    flat = tab[:, :npix].reshape(-1)
    specials = np.array([np.nan, np.inf, -np.inf, -0.0, 1e-42, -3e38], np.float32)
    m = min(40, flat.size // 12)
    flat[rng.choice(flat.size, 6 * m, replace=False)] = np.repeat(specials, m)
    tab[:, :npix] = flat.reshape(2 * n_opt, npix)
    return tab


def same(got, want):
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(np.asarray(got[0]).view(np.uint32), np.asarray(want[0]).view(np.uint32))


@needs_compiler
@pytest.mark.parametrize("kind", ["single", "one_bit", "two_bits"])
@pytest.mark.parametrize("npix,block", [(1013, 4096), (1013, 7), (4096 + 24, 64), (16, 16), (5, 4096)])
def test_matches_formula_and_numba(rng, kind, npix, block):
    raw2 = rng.integers(0, 1 << 16, (5, npix), dtype=np.uint16)
    okb = rng.integers(0, 16, npix).astype(np.uint8)
    okb[::5] = 0
    tab = tables(rng, kind, npix)
    dmask = 0xFFFF if kind == "single" else 0x3FFF
    out = np.full((5, npix), 7.0, np.float32)
    good = np.zeros((5, npix), bool)
    simd_calib.calibrate(kind, raw2, dmask, tab, okb, out, good, block)
    want = simd_calib.reference(kind, raw2, dmask, tab, okb)
    same((out, good), want)
    assert good.any() and not good.all()
    numba_gives(want, kind, raw2, dmask, tab, okb, block)


def numba_gives(want, kind, raw2, dmask, tab, okb, block):
    """numba's kernel for ``kind`` (one-thread build, as the pipeline's calls) gives ``want`` too."""
    if cpu_kernels.available():
        kernel = {"single": cpu_kernels._calib1, "one_bit": cpu_kernels._calib2, "two_bits": cpu_kernels._calib3}[kind]
        out, good = np.empty(raw2.shape, np.float32), np.empty(raw2.shape, bool)
        with cpu_kernels._threads(1):
            kernel(raw2, np.uint16(dmask), tab, okb, out, good, block)
        same((out, good), want)


def runs_of_one_key(rng, raw2, kind):
    """raw2 with its key bits held over runs of 1-40 pixels: vectors of one key (every key, the compiled
    kernel's fast path) and vectors that mix them."""
    if kind == "single":
        return raw2
    top = 1 if kind == "one_bit" else 3
    out = raw2.copy()
    for row in out:
        p = 0
        while p < row.size:
            n = int(rng.integers(1, 41))
            row[p : p + n] = (row[p : p + n] & 0x3FFF) | (np.uint16(rng.integers(0, top + 1)) << 14)
            p += n
    return out


@needs_compiler
@pytest.mark.parametrize("kind", ["single", "one_bit", "two_bits"])
@pytest.mark.parametrize("npix,block", [(1013, 4096), (4096 + 24, 100)])
def test_vectors_of_one_key_match_formula_and_numba(rng, kind, npix, block):
    raw2 = runs_of_one_key(rng, rng.integers(0, 1 << 16, (4, npix), dtype=np.uint16), kind)
    okb = rng.integers(0, 16, npix).astype(np.uint8)
    tab = tables(rng, kind, npix)
    dmask = 0xFFFF if kind == "single" else 0x3FFF
    out, good = np.empty((4, npix), np.float32), np.empty((4, npix), bool)
    simd_calib.calibrate(kind, raw2, dmask, tab, okb, out, good, block)
    want = simd_calib.reference(kind, raw2, dmask, tab, okb)
    same((out, good), want)
    if kind != "single":  # the runs made vectors of each single key
        keys = (raw2[:, : npix // 8 * 8].reshape(4, -1, 8) >> 14).astype(int)
        one = keys.min(-1) == keys.max(-1)
        assert set(np.unique(keys[..., 0][one])) == set(range(2 if kind == "one_bit" else 4))
    numba_gives(want, kind, raw2, dmask, tab, okb, block)


@needs_compiler
def test_bad_arrays_are_refused(rng):
    raw2 = rng.integers(0, 1 << 16, (2, 64), dtype=np.uint16)
    tab, okb = tables(rng, "two_bits", 64), np.ones(64, np.uint8)
    out, good = np.empty((2, 64), np.float32), np.empty((2, 64), bool)
    with pytest.raises(ValueError, match="uint16"):
        simd_calib.calibrate("two_bits", raw2.astype(np.int32), 0x3FFF, tab, okb, out, good, 64)
    with pytest.raises(ValueError, match="float32"):
        simd_calib.calibrate("two_bits", raw2, 0x3FFF, tab[:4], okb, out, good, 64)  # one_bit's tables
    with pytest.raises(ValueError):
        simd_calib.calibrate("two_bits", raw2, 0x3FFF, tab, okb, np.empty((2, 128), np.float32)[:, ::2], good, 64)


@pytest.mark.parametrize("det", ["jungfrau", "epix10ka"])
def test_calibrator_same_bits_with_and_without_the_compiled_kernel(rng, monkeypatch, det):
    """The Calibrator takes the compiled kernel where it is built and numba's otherwise: the same bits."""
    if not cpu_kernels.available():
        pytest.skip("numba off")
    model = get_model(det)
    shape = (1, 64, 96) if det == "jungfrau" else (2, 32, 48)
    ped = rng.uniform(0, 3000, (model.n_gains, *shape)).astype(np.float32)
    gain = rng.uniform(0.1, 40, (model.n_gains, *shape)).astype(np.float32)
    cfg = rng.integers(0, 32, shape).astype(np.uint8) if det == "epix10ka" else None
    raw = rng.integers(0, 1 << 16, (3, *shape), dtype=np.uint16)
    mask = rng.random(shape) > 0.1
    results, used = [], []
    native = simd_calib.available()  # built here (and it passed its check on load)
    spy = simd_calib.calibrate
    monkeypatch.setattr(simd_calib, "calibrate", lambda *a: used.append(a[0]) or spy(*a))
    for native in ("1", "0"):
        monkeypatch.setenv(native_build.ENV_VAR, native)
        native_build.load.cache_clear()
        simd_calib._entry.cache_clear()
        cal = Calibrator(model, Constants(pedestal=ped, gain=gain, config_bits=cfg), mask, Backend("numpy"))
        got = cal(raw)
        results.append((got.data.copy(), got.good.copy()))
    native_build.load.cache_clear()
    simd_calib._entry.cache_clear()
    same(results[0], results[1])
    assert used == ([{"jungfrau": "two_bits", "epix10ka": "one_bit"}[det]] if native else [])


@needs_compiler
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 targets")
@pytest.mark.parametrize("arch", ["-march=x86-64", "-march=x86-64-v2", "-march=haswell"])
def test_builds_for_other_vector_widths(rng, monkeypatch, tmp_path, arch):
    """SSE2 (generic vector code), SSE4 and AVX2 builds, where this CPU runs them, give the formula's bits."""
    if arch == "-march=haswell" and "avx2" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("no AVX2 here")
    monkeypatch.setenv("GPUSMALL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native_build, "ARCH_FLAGS", [[arch]])
    native_build.load.cache_clear()
    simd_calib._entry.cache_clear()
    try:
        assert simd_calib.available()  # built, and it passed its own check
        npix = 2 * 4096 + 29
        for kind in ("single", "one_bit", "two_bits"):
            raw2 = rng.integers(0, 1 << 16, (3, npix), dtype=np.uint16)
            okb = rng.integers(0, 16, npix).astype(np.uint8)
            tab = tables(rng, kind, npix)
            out, good = np.empty((3, npix), np.float32), np.empty((3, npix), bool)
            simd_calib.calibrate(kind, raw2, 0x3FFF, tab, okb, out, good, 4096)
            same((out, good), simd_calib.reference(kind, raw2, 0x3FFF, tab, okb))
    finally:
        native_build.load.cache_clear()
        simd_calib._entry.cache_clear()


@needs_compiler
def test_a_build_that_disagrees_is_not_used(rng, monkeypatch):
    """The check on load: a kernel whose results differ from the reference is refused with a warning, and the
    Calibrator calibrates with numba (the same bits as before)."""
    calls = []

    def wrong(kind, raw, n, npix, dmask, tab, stride, okb, out, good, block):
        calls.append(kind)
        np.ctypeslib.as_array(ctypes.cast(out, ctypes.POINTER(ctypes.c_float)), (n * npix,))[:] = 0

    assert not simd_calib._agrees(wrong) and calls == [1]
    assert simd_calib._agrees(simd_calib._entry())
    monkeypatch.setattr(simd_calib, "_agrees", lambda fn: False)
    simd_calib._entry.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="disagrees"):
            assert not simd_calib.available()
        if cpu_kernels.available():
            model = get_model("jungfrau")
            ped = rng.uniform(0, 3000, (3, 1, 16, 32)).astype(np.float32)
            gain = rng.uniform(0.1, 40, (3, 1, 16, 32)).astype(np.float32)
            raw = rng.integers(0, 1 << 16, (2, 1, 16, 32), dtype=np.uint16)
            cal = Calibrator(model, Constants(pedestal=ped, gain=gain), np.ones((1, 16, 32), bool), Backend("numpy"))
            got = cal(raw)
            want = simd_calib.reference("two_bits", raw.reshape(2, -1), 0x3FFF, cal.cpu.tab, cal.cpu.okb)
            same((got.data.reshape(2, -1), got.good.reshape(2, -1)), want)
    finally:
        simd_calib._entry.cache_clear()
