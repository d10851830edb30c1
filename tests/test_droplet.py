"""droplet and photons against scipy.ndimage.label + per-label sums, frame by frame, panel by panel.

Both layouts: ``ragged`` (the default: flat arrays and a per-event ``len``) is read back into rows with
:func:`to_padded`, and must equal ``padded`` row by row (``tests/test_ragged.py`` checks that file-wide)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers_funcs import make_ctx, make_frames, setup
from scipy import ndimage

from gpusmall.funcs.droplet import Droplet
from gpusmall.funcs.photons import Photons


def reference(data, good, thr, thr_low, thres_adu=None):
    """Droplet lists per event: list of (sum, npix, row, col, tile), in first-pixel order."""
    out = []
    for e in range(data.shape[0]):
        lst = []
        for p in range(data.shape[1]):
            d, g = data[e, p].astype(np.float64), good[e, p]
            seeds = g & (d >= thr[p])
            mask = seeds
            if thr_low is not None:
                grown = ndimage.binary_dilation(seeds, structure=ndimage.generate_binary_structure(2, 1))
                mask = seeds | (grown & g & (d >= thr_low[p]))
            lab, n = ndimage.label(mask)
            if n == 0:
                continue
            ids = np.arange(1, n + 1)
            s = ndimage.sum_labels(d, lab, ids)
            npix = ndimage.sum_labels(np.ones_like(d), lab, ids)
            rr, cc = np.indices(d.shape)
            row = ndimage.sum_labels(d * rr, lab, ids) / s
            col = ndimage.sum_labels(d * cc, lab, ids) / s
            for i in range(n):
                if thres_adu is None or s[i] >= thres_adu:
                    lst.append((s[i], npix[i], row[i], col[i], p))
        out.append(lst)
    return out


DROPLET_FIELDS = ("data", "npix", "row", "col", "tile")
PHOTON_FIELDS = ("data", "row", "col", "tile")


def to_padded(out, m, prefix="", keys=DROPLET_FIELDS):
    """Outputs with the ragged ``<prefix><key>`` (flat, event after event, ``<prefix>len`` per event) as the
    padded layout has them: (events, m), padded with 0; ``len`` dropped. Padded outputs come back as they are."""
    if prefix + "len" not in out:
        return dict(out)
    n = np.asarray(out[prefix + "len"])
    start = np.cumsum(n) - n
    res = {k: v for k, v in out.items() if k != prefix + "len"}
    for k in keys:
        flat = np.asarray(out[prefix + k])
        assert flat.shape == (n.sum(),), (k, flat.shape, n.sum())
        a = np.zeros((len(n), m), flat.dtype)
        for e in range(len(n)):
            a[e, : n[e]] = flat[start[e] : start[e] + n[e]]
        res[prefix + k] = a
    return res


def check(out, ref, m):
    if "len" in out:  # ragged: every stored droplet, and no more than max_droplets an event
        np.testing.assert_array_equal(out["len"], out["nDroplets"] - out["nDroplets_truncated"])
        out = to_padded(out, m)
    n = out["nDroplets"]
    for e, lst in enumerate(ref):
        assert n[e] == len(lst)
        k = min(len(lst), m)
        if k:
            exp = np.array(lst[:k])
            np.testing.assert_allclose(out["data"][e, :k], exp[:, 0], rtol=1e-5)
            np.testing.assert_array_equal(out["npix"][e, :k], exp[:, 1])
            np.testing.assert_allclose(out["row"][e, :k], exp[:, 2], rtol=1e-5, atol=1e-4)
            np.testing.assert_allclose(out["col"][e, :k], exp[:, 3], rtol=1e-5, atol=1e-4)
            np.testing.assert_array_equal(out["tile"][e, :k], exp[:, 4])
        assert (out["data"][e, k:] == 0).all() and (out["npix"][e, k:] == 0).all()
        assert out["nDroplets_truncated"][e] == max(len(lst) - m, 0)


def sparse_frames(rng, shape, n_events, n_drops=30, noise=3.0):
    data = rng.normal(0, noise, (n_events,) + shape).astype(np.float32)
    for e in range(n_events):
        for _ in range(n_drops):
            p, r, c = (rng.integers(0, s) for s in shape)
            data[e, p, r, c] += rng.uniform(50, 400)
            if c + 1 < shape[2]:
                data[e, p, r, c + 1] += rng.uniform(0, 60)
    return data


def to_host(backend, out):
    return {k: backend.to_host(v) for k, v in out.items()}


@pytest.mark.parametrize("layout", ["ragged", "padded"])
@pytest.mark.parametrize("low", [None, 3.0])
def test_droplet_sparse_rms(backend, rng, low, layout):
    shape = (3, 40, 50)
    data = sparse_frames(rng, shape, 4)
    good = rng.random(data.shape) > 0.02
    noise = rng.uniform(2, 4, shape).astype(np.float32)
    ctx = make_ctx(backend, shape, noise=noise)
    f = setup(Droplet, backend, ctx, threshold=5, threshold_low=low, use_rms=True, max_droplets=200, layout=layout)
    out = to_host(backend, f.compute(make_frames(backend, data, good))[0])
    ref = reference(np.where(good, data, 0), good, 5 * noise, None if low is None else low * noise)
    check(out, ref, 200)
    assert (out["nDroplets_all"] == out["nDroplets"]).all()


@pytest.mark.parametrize("layout", ["ragged", "padded"])
def test_droplet_dense_truncation_veto(backend, rng, layout):
    shape = (2, 30, 30)
    data = rng.exponential(20, (3,) + shape).astype(np.float32)
    ctx = make_ctx(backend, shape)
    f = setup(
        Droplet,
        backend,
        ctx,
        threshold=30,
        threshold_low=10,
        use_rms=False,
        thres_adu=60,
        max_droplets=15,
        layout=layout,
    )
    out = to_host(backend, f.compute(make_frames(backend, data))[0])
    ref = reference(data, np.ones(data.shape, bool), np.full(2, 30.0), np.full(2, 10.0), thres_adu=60)
    check(out, ref, 15)
    assert (out["nDroplets_all"] >= out["nDroplets"]).all() and (out["nDroplets_truncated"] > 0).any()


def test_droplet_no_connection_across_panels_or_events(backend):
    shape = (2, 4, 4)
    data = np.zeros((2,) + shape, np.float32)
    data[0, 0, 3, :] = 100  # last row of panel 0 ...
    data[0, 1, 0, :] = 100  # ... touches first row of panel 1 in the flattened stack
    data[1, 0, 0, :] = 100  # first row of event 1 follows the last panel of event 0
    data[0, 1, 3, :] = 100
    ctx = make_ctx(backend, shape)
    f = setup(Droplet, backend, ctx, threshold=50, use_rms=False)
    out = to_padded(to_host(backend, f.compute(make_frames(backend, data))[0]), 1000)
    np.testing.assert_array_equal(out["nDroplets"], [3, 1])
    np.testing.assert_array_equal(out["tile"][0, :3], [0, 1, 1])
    np.testing.assert_array_equal(out["npix"][0, :3], [4, 4, 4])
    np.testing.assert_array_equal(out["row"][0, :3], [3, 0, 3])


def test_droplet_masked_pixels(backend):
    shape = (1, 5, 5)
    data = np.zeros((1,) + shape, np.float32)
    data[0, 0, 2, :] = 100
    good = np.ones(data.shape, bool)
    good[0, 0, 2, 2] = False  # splits the line in two
    ctx = make_ctx(backend, shape)
    f = setup(Droplet, backend, ctx, threshold=50, use_rms=False)
    out = to_padded(to_host(backend, f.compute(make_frames(backend, data, good))[0]), 1000)
    assert out["nDroplets"][0] == 2
    np.testing.assert_allclose(out["data"][0, :2], [200, 200])
    np.testing.assert_allclose(out["col"][0, :2], [0.5, 3.5])


@pytest.mark.parametrize("layout", ["ragged", "padded"])
def test_photons(backend, layout):
    shape = (1, 6, 8)
    data = np.zeros((2,) + shape, np.float32)
    data[0, 0, 1, 1:4] = [100, 250, 70]  # 420 ADU -> floor(420/160+0.5) = 3 photons: 0+1+0 base, 2 left
    data[0, 0, 4, 6] = 330  # 2 photons (floor 2.06+0.5 = 2), base 2
    data[1, 0, 2, 2] = 60  # 0 photons
    ctx = make_ctx(backend, shape)
    ph = Photons(Photons.Params(adu_per_photon=160, max_photons=4, layout=layout))
    f = setup(Droplet, backend, ctx, [ph], threshold=50, use_rms=False, layout=layout)
    out = f(make_frames(backend, data))
    out = to_host(backend, out)
    if layout == "ragged":
        np.testing.assert_array_equal(out["droplet_photons_len"], [4, 0])
        np.testing.assert_array_equal(out["droplet_photons_col"], [1, 2, 2, 6])
        out = to_padded(out, 4, "droplet_photons_", PHOTON_FIELDS)
    np.testing.assert_array_equal(out["droplet_photons_nPhotons"], [5, 0])
    # droplet 1: base (0,1,0) remainders (.625,.5625,.4375): extra to col 1 and col 2 -> cols 1,2,2
    np.testing.assert_array_equal(out["droplet_photons_col"][0], [1, 2, 2, 6])  # 5 photons, 4 kept
    np.testing.assert_array_equal(out["droplet_photons_row"][0], [1, 1, 1, 4])
    assert (out["droplet_photons_row"][1] == 0).all()


def test_photons_total_matches_rule(numpy_backend, rng):
    shape = (2, 30, 30)
    data = sparse_frames(rng, shape, 3, n_drops=40)
    ctx = make_ctx(numpy_backend, shape)
    ph = Photons(Photons.Params(adu_per_photon=80, max_photons=5000))
    f = setup(Droplet, numpy_backend, ctx, [ph], threshold=15, threshold_low=6, use_rms=False)
    out = to_padded(f(make_frames(numpy_backend, data)), 1000, "droplet_")
    m = out["droplet_data"]
    expected = np.floor(m / 80 + 0.5).astype(int) * (out["droplet_npix"] > 0)
    np.testing.assert_array_equal(out["droplet_photons_nPhotons"], expected.sum(axis=1))


@pytest.mark.parametrize("layout", ["ragged", "padded"])
def test_no_droplets(backend, layout):
    shape = (2, 8, 8)
    ctx = make_ctx(backend, shape)
    ph = Photons(Photons.Params(adu_per_photon=100, max_photons=5, layout=layout))
    f = setup(Droplet, backend, ctx, [ph], threshold=5, use_rms=True, max_droplets=3, layout=layout)
    out = to_host(backend, f(make_frames(backend, np.zeros((3,) + shape, np.float32))))
    if layout == "padded":
        assert out["droplet_data"].shape == (3, 3) and out["droplet_photons_row"].shape == (3, 5)
    else:
        assert out["droplet_data"].shape == (0,) and out["droplet_photons_row"].shape == (0,)
        np.testing.assert_array_equal(out["droplet_len"], 0)
        np.testing.assert_array_equal(out["droplet_photons_len"], 0)
    for k in ("droplet_nDroplets", "droplet_nDroplets_all", "droplet_nDroplets_truncated", "droplet_photons_nPhotons"):
        np.testing.assert_array_equal(out[k], 0)


def test_labels_at_the_labelled_pixels_are_scipys():
    """label_stack (NumPy) gives SciPy's labels of the whole stack, read at the labelled pixels."""
    from gpusmall.backend import Backend
    from gpusmall.funcs.droplet import label_stack

    mask = np.random.default_rng(0).random((3, 2, 20, 24)) > 0.7
    got, n = label_stack(Backend("numpy"), mask)
    full, n_full = ndimage.label(
        mask.reshape(6, 20, 24), structure=[[[0] * 3] * 3, [[0, 1, 0], [1, 1, 1], [0, 1, 0]], [[0] * 3] * 3]
    )
    assert n == n_full > 10
    np.testing.assert_array_equal(got, full.ravel()[np.flatnonzero(mask)])


# ---- parameters that would let negative pixels into droplets; photons with negative pixels -------------
@pytest.mark.parametrize(
    "params, loc",
    [
        (dict(threshold=100, threshold_low=-200), "threshold_low"),
        (dict(threshold=0), "threshold"),
        (dict(threshold=-5, threshold_low=-10), "threshold"),
    ],
)
def test_droplet_rejects_negative_thresholds(params, loc):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as e:
        Droplet.Params(**params)
    assert loc in [err["loc"][0] for err in e.value.errors()]
    Droplet.Params(threshold=100, threshold_low=0)  # 0 is a valid low threshold


def photons_reference(value, droplet, adu):
    """The module docstring's rule, droplet by droplet in Python: floors, then the leftover photons one each
    to the largest remainders (ties: the earlier pixel)."""
    out = np.zeros(value.size, np.int64)
    for d in np.unique(droplet):
        pix = np.flatnonzero(droplet == d)
        r = value[pix] / adu
        n = int(np.floor(value[pix].sum() / adu + 0.5))
        k = np.floor(r).astype(np.int64)
        order = sorted(range(pix.size), key=lambda j: (-(r[j] - np.floor(r[j])), j))
        for j in order[: n - k.sum()]:
            k[j] += 1
        out[pix] = k
    return out


def test_photons_are_placed_by_largest_remainders(backend, rng):
    from gpusmall.funcs.photons import photons_per_pixel

    adu = 160.0
    droplet = np.unique(np.sort(rng.integers(0, 60, 400)), return_inverse=True)[1]
    value = np.abs(rng.normal(1.0, 3.0, droplet.size)) * adu  # droplet pixels are never negative
    s = np.bincount(droplet, weights=value)
    k = backend.to_host(
        photons_per_pixel(backend.xp, backend.to_device(value), backend.to_device(droplet), backend.to_device(s), adu)
    )
    np.testing.assert_array_equal(k, photons_reference(value, droplet, adu))
    np.testing.assert_array_equal(np.bincount(droplet, weights=k), np.floor(s / adu + 0.5))


@pytest.mark.parametrize(
    "use_rms,low,shape",
    [
        (True, 3.0, (3, 37, 41)),
        (False, None, (3, 37, 41)),
        (False, 10.0, (3, 37, 41)),
        (True, 3.0, (3, 24, 64)),
        (False, 10.0, (3, 33, 72)),
    ],
)
def test_numba_find_bit_identical_to_the_array_path(rng, use_rms, low, shape):
    """gpusmall/funcs/cpu_droplet.py (numba) against Droplet.find_arrays (scipy.ndimage.label + bincount), every
    field bit for bit: dense exponential frames (droplets that merge through U and spiral shapes), a frame
    full of signal, an empty one, bad pixels, droplets on every panel edge; rows of whole 8-pixel words
    (64, 72 columns: the kernels skip empty words) and not (41)."""
    from gpusmall.backend import get_backend
    from gpusmall.funcs import cpu_droplet

    if not cpu_droplet.supports(np.zeros((1, 1, 1, 1), np.float32)):
        pytest.skip("numba not available")
    backend = get_backend("numpy")
    data = rng.exponential(12, (4,) + shape).astype(np.float32)
    data[1, 0] = 500.0  # one droplet the size of the panel
    data[2, 1] = 0.0  # nothing
    data[3, 2, ::3, :] = 200.0  # combs joined at the last column: one droplet found only through unions
    data[3, 2, :, -1] = 200.0
    data[0] *= rng.random(shape) < 0.08  # sparse: most 8-pixel words empty
    good = rng.random(data.shape) > 0.03
    noise = rng.uniform(2, 4, shape).astype(np.float32)
    ctx = make_ctx(backend, shape, noise=noise)
    f = setup(
        Droplet, backend, ctx, threshold=20 if not use_rms else 6, threshold_low=low, use_rms=use_rms, max_droplets=5000
    )
    frames = make_frames(backend, data, good)
    got, ref = f.find(frames), f.find_arrays(frames)
    assert got["n"] == ref["n"] > 100
    for k in ("idx", "lab", "val", "total", "npix", "row", "col", "event", "tile", "ep"):
        assert got[k].dtype == ref[k].dtype, k
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
