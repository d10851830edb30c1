"""The compiled group medians (gpusmall/calib/simd_median.py) against NumPy's sort, and the network itself."""
import itertools

import numpy as np
import pytest

from gpusmall.calib import cpu_median, native_build, simd_median

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
        x = np.concatenate([rng.integers(0, 2, (4000, n)), rng.integers(0, 5, (2000, n)),
                            rng.permutation(np.tile(np.arange(n), (500, 1)).T).T]).astype(np.int16)
    for net, ranks in ((simd_median.odd_even_merge_sort(n), n), (simd_median.median_network(n).tolist(), n // 2 + 1)):
        y = x.copy()
        for i, j in net:
            assert i < j
            lo, hi = np.minimum(y[:, i], y[:, j]), np.maximum(y[:, i], y[:, j])
            y[:, i], y[:, j] = lo, hi
        np.testing.assert_array_equal(y[:, :ranks], np.sort(x, axis=1)[:, :ranks])
    assert len(simd_median.median_network(n)) <= len(simd_median.odd_even_merge_sort(n)) - (n >= 8)


def special_values(rng, shape, axis):
    """float32 values with the kinds of input the medians meet: +inf padding, NaN, -inf, ties, zeros of both
    signs, counts from 0 to the group length. axis: the groups' axis."""
    v = rng.normal(0, 20, shape).astype(np.float32)
    used = rng.random(shape) > rng.choice([0.0, 0.3, 0.9], shape[:axis] + (1,) + shape[axis + 1:])
    flat = v.reshape(-1)
    for value in (np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-45, 3.4e38):
        flat[rng.integers(0, flat.size, max(1, flat.size // 200))] = value
    v[::7] = np.round(v[::7] / 40)  # ties (and -0.0 from rounding)
    used[(-1,) * axis + (slice(None),) + (-1,) * (len(shape) - axis - 1)] = False  # a group of none (the last)
    v[~used] = np.inf
    return v, used.sum(axis=axis).astype(np.int64)


def same(got, want):
    """Equal as floats (-0 == +0; NaN == NaN), and bit for bit where neither is a zero or NaN."""
    np.testing.assert_array_equal(got, want)
    keep = (want != 0) & ~np.isnan(want)
    np.testing.assert_array_equal(got.view(np.uint32)[keep], want.view(np.uint32)[keep])


@needs_compiler
@pytest.mark.parametrize("length,groups", [(48, 45), (48, 1), (64, 33), (96, 16), (7, 100), (2, 17), (176, 40)])
def test_rows_medians_match_numpy(length, groups):
    assert simd_median.available("rows", length)
    rng = np.random.default_rng(length * 1000 + groups)
    v, n = special_values(rng, (groups, length), 1)
    med = np.full(groups, -1, np.float32)
    simd_median.medians_rows(v, n, med)
    same(med, sorted_median(v, n))
    assert n[-1] == 0  # and its median is +inf


@needs_compiler
@pytest.mark.parametrize("length,m,cols", [(176, 3, 384), (176, 2, 20), (256, 2, 64), (9, 3, 5), (48, 1, 17)])
def test_cols_medians_match_numpy(length, m, cols):
    """Columns as lanes, including the last vector's partial columns (cols not a multiple of the lanes)."""
    assert simd_median.available("cols", length)
    rng = np.random.default_rng(length * 1000 + cols)
    w, n = special_values(rng, (m, length, cols), 1)
    med = np.full((m, cols), -1, np.float32)
    simd_median.medians_cols(w, n, med)
    same(med, sorted_median(w.transpose(0, 2, 1), n))


def test_without_a_compiler_numpy_sorts(monkeypatch):
    """GPUSMALL_NATIVE=0 (or no compiler): not available, and the median steps keep NumPy's sort with the
    same result as the compiled medians."""
    monkeypatch.setenv("GPUSMALL_NATIVE", "0")
    native_build.load.cache_clear()
    simd_median._entry.cache_clear()
    try:
        assert not simd_median.available("rows", 48)
        rng = np.random.default_rng(5)
        v, n = special_values(rng, (40, 48), 1)
        v2 = v.copy()
        med = np.empty((40, 1), np.float32)
        if cpu_median.cpu_kernels.available():
            cpu_median._medians_sorted(np.sort(v2, axis=-1), n, med.reshape(-1))
            same(med[:, 0], sorted_median(v, n))
    finally:
        monkeypatch.delenv("GPUSMALL_NATIVE")
        native_build.load.cache_clear()
        simd_median._entry.cache_clear()


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
