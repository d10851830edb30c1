"""The compiled median steps (gpusmall/calib/simd_median.py) against NumPy's sort, and the network itself."""

import itertools

import numpy as np
import pytest

from gpusmall.backend import Backend
from gpusmall.calib import cpu_median, native_build, simd_median
from gpusmall.calib.common_mode import MedianCommonMode
from gpusmall.detectors import get_model

needs_compiler = pytest.mark.skipif(native_build.compiler() is None, reason="no C++ compiler")


def sorted_median(v, n):
    """The reference: (s[(n - 1) // 2] + s[n // 2]) * 0.5 over np.sort of each group (last axis), float32."""
    s = np.sort(v, axis=-1).astype(np.float32)
    length = v.shape[-1]
    lo = np.maximum((n - 1) // 2, 0)[..., None]
    hi = np.minimum(n // 2, length - 1)[..., None]
    with np.errstate(over="ignore"):  # 3.4e38 + 3.4e38, as in the kernels
        return (np.take_along_axis(s, lo, -1)[..., 0] + np.take_along_axis(s, hi, -1)[..., 0]) * np.float32(0.5)


@pytest.mark.parametrize("n", [2, 3, 5, 8, 13, 16, 17, 48, 64, 96, 176, 256])
def test_network_sorts(n):
    """The odd-even merge sort sorts every 0/1 input (so, by the 0-1 principle, every input) for small n,
    and random 0/1 and integer inputs for large n; the cut network orders ranks 0 .. n // 2."""
    rng = np.random.default_rng(n)
    if n <= 16:
        x = np.array(list(itertools.product((0, 1), repeat=n)), np.int8)
    else:
        x = np.concatenate(
            [
                rng.integers(0, 2, (4000, n)),
                rng.integers(0, 5, (2000, n)),
                rng.permutation(np.tile(np.arange(n), (500, 1)).T).T,
            ]
        ).astype(np.int16)
    for net, ranks in ((simd_median.odd_even_merge_sort(n), n), (simd_median.median_network(n).tolist(), n // 2 + 1)):
        y = x.copy()
        for i, j in net:
            assert i < j
            lo, hi = np.minimum(y[:, i], y[:, j]), np.maximum(y[:, i], y[:, j])
            y[:, i], y[:, j] = lo, hi
        np.testing.assert_array_equal(y[:, :ranks], np.sort(x, axis=1)[:, :ranks])
    assert len(simd_median.median_network(n)) <= len(simd_median.odd_even_merge_sort(n)) - (n >= 8)


def special_values(rng, shape, axis):
    """(s, good, g): float32 values with the kinds of input the steps meet: NaN, +-inf, ties, zeros of both
    signs, groups with every, few or no pixels used; good and the gain index (-1 invalid, 0-2) alike.
    axis: the groups' axis."""
    s = rng.normal(0, 20, shape).astype(np.float32)
    flat = s.reshape(-1)
    for value in (np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-45, 3.4e38):
        flat[rng.integers(0, flat.size, max(1, flat.size // 200))] = value
    s[::7] = np.round(s[::7] / 40)  # ties (and -0.0 from rounding)
    good = rng.random(shape) > rng.choice([0.0, 0.3, 0.9], shape[:axis] + (1,) + shape[axis + 1 :])
    good[(-1,) * axis + (slice(None),) + (-1,) * (len(shape) - axis - 1)] = False  # a group of none (the last)
    g = rng.integers(-1, 3, shape).astype(np.int8)
    g[rng.random(shape) < 0.7] = 0
    return s, good, g


def reference_step(s, good, g, limits, axis):
    """The step by NumPy: used = good & (all ranges | range selected); the median of the used values (+inf
    elsewhere) by np.sort; subtracted from the used pixels where n > min_pixels and |median| < max_correction."""
    all_ranges, range_mask, min_pixels, max_correction = limits
    gi = g.astype(np.int64)
    selected = (gi >= 0) & (gi < 32) & (((range_mask >> np.clip(gi, 0, 31)) & 1) != 0)
    used = good & (all_ranges | selected)
    v = np.moveaxis(np.where(used, s, np.float32(np.inf)), axis, -1)
    n = np.moveaxis(used, axis, -1).sum(axis=-1)
    med = np.expand_dims(sorted_median(v, n), axis)
    n = np.expand_dims(n, axis)
    with np.errstate(invalid="ignore"):
        corrected = (n > min_pixels) & (np.abs(med) < max_correction)
        return np.where(used & corrected, s - med, s), n


def same(got, want):
    """Equal as floats (-0 == +0; NaN == NaN), and bit for bit where neither is a zero or NaN."""
    np.testing.assert_array_equal(got, want)
    keep = (want != 0) & ~np.isnan(want)
    np.testing.assert_array_equal(got.view(np.uint32)[keep], want.view(np.uint32)[keep])


LIMITS = [(False, 0b1, 10, 100.0), (True, 0, 0, 1e30), (False, 0b101, 3, 15.0)]


@needs_compiler
@pytest.mark.parametrize("limits", LIMITS)
@pytest.mark.parametrize("length,groups", [(48, 45), (48, 8), (64, 33), (96, 16), (7, 100), (2, 17), (176, 40)])
def test_rows_step_matches_numpy(length, groups, limits):
    """In place on (groups, length): the vector path (8-group tiles) and the scalar one (the last groups;
    lengths not a multiple of 8)."""
    assert simd_median.available("rows", length)
    rng = np.random.default_rng(length * 1000 + groups)
    s, good, g = special_values(rng, (groups, length), 1)
    want, n = reference_step(s, good, g, limits, 1)
    assert n[-1, 0] == 0
    simd_median.rows_step(s, good, g, limits)
    same(s, want)


@needs_compiler
@pytest.mark.parametrize("limits", LIMITS)
@pytest.mark.parametrize("length,m,cols", [(176, 3, 384), (176, 2, 20), (256, 2, 64), (9, 3, 5), (48, 1, 17)])
def test_cols_step_matches_numpy(length, m, cols, limits):
    """Columns as lanes, including the last vector's partial columns (cols not a multiple of the lanes)."""
    assert simd_median.available("cols", length)
    rng = np.random.default_rng(length * 1000 + cols)
    s, good, g = special_values(rng, (m, length, cols), 1)
    want, _ = reference_step(s, good, g, limits, 1)
    simd_median.cols_step(s, good, g, limits)
    same(s, want)


def test_without_a_compiler_numpy_sorts(monkeypatch):
    """GPUSMALL_NATIVE=0 (or no compiler): not available, and the median steps keep NumPy's sort (the numba
    passes around it) with the compiled steps' result."""
    if not cpu_median.cpu_kernels.available():
        pytest.skip("numba off")
    rng = np.random.default_rng(5)
    s, good, g = special_values(rng, (2, 2, 352, 384), 3)
    cm = MedianCommonMode(get_model("epix10ka"), (352, 384), axes=("rows", "cols"), backend=Backend("numpy"))
    results = []
    for native in ("1", "0"):
        monkeypatch.setenv("GPUSMALL_NATIVE", native)
        native_build.load.cache_clear()
        simd_median._entry.cache_clear()
        assert simd_median.available("rows", 48) == (native == "1" and native_build.compiler() is not None)
        results.append(cm(s.copy(), good, g))
    native_build.load.cache_clear()
    simd_median._entry.cache_clear()
    same(results[0], results[1])
    assert not np.array_equal(results[1], s, equal_nan=True)  # corrected


def test_a_failed_build_is_remembered(monkeypatch, tmp_path):
    """Code that does not compile: None, a .failed file with the compiler's message, no second attempt."""
    if native_build.compiler() is None:
        pytest.skip("no C++ compiler")
    monkeypatch.setenv("GPUSMALL_CACHE_DIR", str(tmp_path))
    native_build.load.cache_clear()
    assert native_build.load("broken", "this is not C++;") is None
    failed = list((tmp_path / "native").glob("broken-*.failed"))
    assert len(failed) == len(native_build.ARCH_FLAGS) and "error" in failed[0].read_text()
    calls = []
    run = native_build.subprocess.run

    def spy(cmd, *a, **k):
        calls.append(cmd)
        return run(cmd, *a, **k)

    monkeypatch.setattr(native_build.subprocess, "run", spy)
    native_build.load.cache_clear()
    assert native_build.load("broken", "this is not C++;") is None
    assert calls and all("--version" in c for c in calls)  # the version (for the key), no compile
    native_build.load.cache_clear()
