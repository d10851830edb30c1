"""The compiled run sums (gpusmall/calib/simd_sums.py) against the NumPy transcription of their formula
(simd_sums.reference), numba's kernel and the NumPy path: bit for bit, every kind with and without a threshold,
NaN, -0 and values on the thresholds, tails, groups of sums; builds without AVX; the check on load."""

import ctypes
import platform
from pathlib import Path

import numpy as np
import pytest

from gpusmall.backend import Backend
from gpusmall.calib import cpu_kernels, native_build, simd_sums
from gpusmall.funcs.sums import RunSums, parse_sums

needs_compiler = pytest.mark.skipif(
    native_build.compiler() is None or not native_build.enabled(), reason="no C++ compiler"
)
SUMS = [
    "calib",
    "calib_square",
    "calib_max",
    "nhits",
    "calib_thresADU5",
    "square_thresADU-3.5",
    "calib_max_thresADU5",
    "nhits_thresADU10",
    "max_thresADU1000",
    "calib_thresADU0",
]


def batch(rng, events, npix):
    data = rng.normal(3, 10, (events, npix)).astype(np.float32)
    data[:, ::5] = 0
    flat = data.reshape(-1)
    n = min(flat.size // 8, 12)
    for v in (np.nan, np.inf, -np.inf, -0.0, 5.0, 10.0, -3.5):  # specials and values on the thresholds
        flat[rng.choice(flat.size, n, replace=False)] = v
    return data


def start(rng, specs, npix):
    acc = np.repeat(np.array([s.start() for s in specs])[:, None], npix, 1)
    return acc + rng.normal(0, 50, acc.shape) * (acc == 0)  # earlier batches' sums


def bits(a):
    return np.asarray(a).view(np.uint64)


@needs_compiler
@pytest.mark.parametrize("events,npix", [(1, 8), (5, 13), (16, 1000 + 3), (70, 40), (3, 5)])
@pytest.mark.parametrize("names", [SUMS, SUMS[:1], SUMS[2:5], ["calib_max", "calib_max_thresADU5"]])
def test_matches_formula_and_numba(rng, events, npix, names):
    if not simd_sums.available():
        pytest.skip("no AVX build here")
    specs = parse_sums(names)
    data = batch(rng, events, npix)
    code, thres = simd_sums.codes(specs)
    got = start(rng, specs, npix)
    want, numba_acc = got.copy(), got.copy()
    simd_sums.run_sums(data, code, thres, got)
    simd_sums.reference(data, code, thres, want)
    np.testing.assert_array_equal(bits(got), bits(want))
    if cpu_kernels.available():
        kinds = np.array([s.kernel_kind for s in specs], np.int64)
        has = np.array([s.thres is not None for s in specs], np.bool_)
        with cpu_kernels._threads(1):  # the one-thread build, as the pipeline's calls
            cpu_kernels._run_sums(data, kinds, thres.astype(np.float32), has, numba_acc)
        np.testing.assert_array_equal(bits(got), bits(numba_acc))


@needs_compiler
@pytest.mark.parametrize("threads", [2, 3])
def test_threads_take_ranges_of_pixels(rng, threads):
    """Several threads, a range of whole vectors each (the last with the tail): the bits of one thread."""
    if not simd_sums.available():
        pytest.skip("no AVX build here")
    specs = parse_sums(SUMS)
    data = batch(rng, 4, 3 * 8192 + 13)
    code, thres = simd_sums.codes(specs)
    got = start(rng, specs, data.shape[1])
    want = got.copy()
    simd_sums.run_sums(data, code, thres, got, threads)
    simd_sums.reference(data, code, thres, want)
    np.testing.assert_array_equal(bits(got), bits(want))


def test_reference_is_the_numpy_path(rng, monkeypatch):
    """The transcription against run_sums_numpy's own NumPy arithmetic (sum, einsum, maximum, counts)."""
    monkeypatch.setenv(cpu_kernels.ENV_VAR, "0")
    from gpusmall.funcs.sums import run_sums_numpy

    specs = parse_sums(SUMS)
    data = batch(rng, 9, 301)
    got = start(rng, specs, 301)
    want = got.copy()
    simd_sums.reference(data, *simd_sums.codes(specs), got)
    with np.errstate(invalid="ignore"):  # inf - inf in the sums
        run_sums_numpy(data, None, specs, want)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-9, equal_nan=True)
    for i, s in enumerate(specs):  # max and the counts exactly
        if s.kind in ("max", "nhits"):
            np.testing.assert_array_equal(got[i], want[i])


@needs_compiler
def test_bad_arrays_are_refused(rng):
    if not simd_sums.available():
        pytest.skip("no AVX build here")
    code, thres = simd_sums.codes(parse_sums(["calib", "calib_max"]))
    data, acc = rng.normal(0, 1, (3, 64)).astype(np.float32), np.zeros((2, 64))
    with pytest.raises(ValueError, match="float32"):
        simd_sums.run_sums(data.astype(np.float64), code, thres, acc)
    with pytest.raises(ValueError, match="float64"):
        simd_sums.run_sums(data, code, thres, acc[:1])
    with pytest.raises(ValueError):
        simd_sums.run_sums(data, code, thres, np.zeros((2, 128))[:, ::2])
    with pytest.raises(ValueError, match="codes"):
        simd_sums.run_sums(data, np.array([0, 12], np.int32), thres, acc)


@pytest.mark.parametrize("native", ["1", "0"])
def test_run_sums_take_the_compiled_kernel_where_built(rng, monkeypatch, native):
    """RunSums on NumPy with one thread goes through the compiled kernel where it is built and through numba's
    otherwise: the same bits either way."""
    if not cpu_kernels.available():
        pytest.skip("numba off")
    monkeypatch.setenv(native_build.ENV_VAR, native)
    native_build.load.cache_clear()
    simd_sums._entry.cache_clear()
    used = []
    spy = simd_sums.run_sums
    monkeypatch.setattr(simd_sums, "run_sums", lambda *a: used.append(len(a[1])) or spy(*a))
    try:
        shape = (2, 9, 13)
        data = [batch(rng, 4, 2 * 9 * 13).reshape(4, *shape) for _ in range(2)]
        sums = RunSums(SUMS, shape, Backend("numpy"))
        for d in data:
            sums.update(d)
        got = sums.results()
        specs = parse_sums(SUMS)
        want = np.repeat(np.array([s.start() for s in specs])[:, None], 2 * 9 * 13, 1)
        for d in data:
            simd_sums.reference(d.reshape(4, -1), *simd_sums.codes(specs), want)
        for k, s in enumerate(specs):
            np.testing.assert_array_equal(got[s.name].reshape(-1), s.host_result(want[k]))
        compiled = native == "1" and native_build.compiler() is not None and simd_sums.available()
        assert used == ([len(SUMS)] * 2 if compiled else [])
    finally:
        native_build.load.cache_clear()
        simd_sums._entry.cache_clear()


@needs_compiler
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 targets")
@pytest.mark.parametrize("arch", ["-march=x86-64", "-march=haswell"])
def test_builds_without_and_with_avx(rng, monkeypatch, tmp_path, arch):
    """An SSE2 build (no AVX: not used, the vectors would be emulated) and an AVX2 build give the formula's
    bits; only the AVX build is taken."""
    if arch == "-march=haswell" and "avx2" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("no AVX2 here")
    monkeypatch.setenv("GPUSMALL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native_build, "ARCH_FLAGS", [[arch]])
    native_build.load.cache_clear()
    simd_sums._entry.cache_clear()
    try:
        lib = native_build.load("simd_sums", simd_sums.SOURCE)
        assert lib is not None
        assert bool(lib.gs_sums_vectors()) == (arch != "-march=x86-64") == simd_sums.available()
        fn = lib.gs_run_sums
        fn.argtypes, fn.restype = simd_sums._ARGS, None
        specs = parse_sums(SUMS)
        code, thres = simd_sums.codes(specs)
        data = batch(rng, 6, 4 * 8 + 5)
        got = start(rng, specs, data.shape[1])
        want = got.copy()
        npix = data.shape[1]
        fn(data.ctypes.data, 6, npix, npix, len(code), code.ctypes.data, thres.ctypes.data, got.ctypes.data, npix)
        simd_sums.reference(data, code, thres, want)
        np.testing.assert_array_equal(bits(got), bits(want))
    finally:
        native_build.load.cache_clear()
        simd_sums._entry.cache_clear()


@needs_compiler
def test_a_build_that_disagrees_is_not_used(rng, monkeypatch):
    """The check on load: a kernel whose results differ from the reference is refused with a warning, and the
    run sums go through numba's kernel (the same bits)."""
    calls = []

    def wrong(data, n, npix, stride, n_sums, code, thres, acc, acc_stride):
        calls.append(n_sums)
        np.ctypeslib.as_array(ctypes.cast(acc, ctypes.POINTER(ctypes.c_double)), (n_sums * npix,))[:] = 0

    assert not simd_sums._agrees(wrong) and calls == [9]
    if not simd_sums.available():
        pytest.skip("no AVX build here")
    assert simd_sums._agrees(simd_sums._entry())
    monkeypatch.setattr(simd_sums, "_agrees", lambda fn: False)
    simd_sums._entry.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="disagree"):
            assert not simd_sums.available()
        if cpu_kernels.available():
            specs = parse_sums(SUMS)
            data = batch(rng, 3, 77)
            got = start(rng, specs, 77)
            want = got.copy()
            assert cpu_kernels.run_sums(data, specs, got)
            simd_sums.reference(data, *simd_sums.codes(specs), want)
            np.testing.assert_array_equal(bits(got), bits(want))
    finally:
        simd_sums._entry.cache_clear()
