"""photons: positions that do not depend on the batch split, exact photon counts, memory bounded by max_photons.

* A droplet's photons go to the same pixels whatever its droplet id (ids are numbered per batch and per
  thread block): the old single float key ``droplet + (1 - remainder) * 0.999`` lost the remainder's low
  bits for large ids and gave near ties to the earlier pixel.
* ``n`` is summed exactly from the pixels, so it does not depend on the order of a float sum (GPU atomics).
* A saturated frame is counted, not materialised: ``max_photons`` entries per event, ``nPhotons_truncated``.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from conftest import make_backend
from helpers_funcs import make_ctx, make_frames, setup

from gpusmall.backend import Backend
from gpusmall.funcs.droplet import Droplet, bincount
from gpusmall.funcs.photons import Photons, good_per_event, photons_per_pixel

# Two pixels of one droplet whose remainders differ by 2.8e-10 photon (1.2 units of 2**-32), the later one
# larger: 72.749924 / ADU = 0.46269714946..., 42839.34 / ADU = 272.46269714974...; n = floor(272.925 + 0.5)
# = 273, base (0, 272), one photon left: it goes to the later pixel. The old key rounds the two to a tie for
# droplet ids from 2**21 (FIRST_IDS), and gave the photon to the earlier pixel.
ADU = 157.23011
NEAR_TIE = np.array([72.74992370605469, 42839.33984375], np.float32)
NEAR_TIE_PHOTONS = [0, 273]
FIRST_IDS = [2**21 + 1, 2**22 + 1, 3 * 2**21 + 3]


def old_photons_per_pixel(xp, value, droplet, droplet_sum, adu):
    """The former rule (one float64 key per pixel), to show that the values here confuse it."""
    nd = droplet_sum.size
    n = xp.floor(droplet_sum / adu + 0.5).astype(xp.int64)
    r = value / adu
    base = xp.maximum(xp.floor(r), 0).astype(xp.int64)
    frac = xp.where(r > 0, r - xp.floor(r), 0.0)
    left = n - bincount(xp, droplet, weights=base, minlength=nd).astype(xp.int64)
    key = droplet.astype(xp.float64) + (1.0 - frac) * 0.999
    order = xp.argsort(key, kind="stable")
    sd = droplet[order]
    seg_count = bincount(xp, droplet, minlength=nd)
    seg_start = xp.cumsum(seg_count) - seg_count
    rank_sorted = xp.arange(sd.size) - seg_start[sd]
    rank = xp.empty_like(rank_sorted)
    rank[order] = rank_sorted
    return base + (rank < left[droplet]).astype(xp.int64)


def fake_gpu():
    """The CuPy code paths under CuPy's rules on the CPU (tests/fake_cupy.py), every transfer logged."""
    from test_fake_gpu_pipeline import FakeGpuStrict

    return FakeGpuStrict()


@pytest.fixture(params=["numpy", "cupy", "fake_gpu"])
def any_backend(request) -> Backend:
    """NumPy, CuPy (skipped without a GPU, as conftest's ``backend``), and the CuPy stand-in."""
    if request.param == "fake_gpu":
        return fake_gpu()
    return make_backend(request.param)


def per_pixel(backend, value, droplet, droplet_sum, adu=ADU, f=photons_per_pixel):
    d = backend.to_device
    return backend.to_host(
        f(
            backend.xp,
            d(np.asarray(value, np.float64)),
            d(np.asarray(droplet, np.int64)),
            d(np.asarray(droplet_sum, np.float64)),
            adu,
        )
    )


# ---- 13: the same photons whatever the droplet id -------------------------------------------------------
@pytest.mark.parametrize("first_id", FIRST_IDS)
def test_photon_positions_do_not_depend_on_the_droplet_id(any_backend, first_id):
    """The same droplets alone (ids 0, 1, 2) and after ``first_id`` others (as the last event of a big
    batch): the same photons. The near tie goes to the pixel with the larger remainder, an exact tie to the
    earlier pixel."""
    v = np.concatenate([NEAR_TIE, NEAR_TIE[::-1], [100.0, 100.0]]).astype(np.float64)  # + an exact tie
    ids = np.array([0, 0, 1, 1, 2, 2])
    want = NEAR_TIE_PHOTONS + NEAR_TIE_PHOTONS[::-1] + [1, 0]
    sums = np.bincount(ids, weights=v)
    alone = per_pixel(any_backend, v, ids, sums)
    # many droplets before: one pixel each for some of them, the rest have no pixel here
    before = np.arange(0, first_id, max(1, first_id // 1000))
    v_big = np.concatenate([np.full(before.size, 200.0), v])
    ids_big = np.concatenate([before, ids + first_id])
    sums_big = np.bincount(ids_big, weights=v_big, minlength=first_id + 3)
    in_batch = per_pixel(any_backend, v_big, ids_big, sums_big)
    np.testing.assert_array_equal(alone, want)
    np.testing.assert_array_equal(in_batch[before.size :], want)
    np.testing.assert_array_equal(in_batch[: before.size], 1)

    # the old key: right alone, the near tie to the earlier pixel with the big ids (its key rounds to a tie)
    f = (v[:2] / ADU) % 1
    assert f[1] - f[0] > 0 and first_id + (1 - f[0]) * 0.999 == first_id + (1 - f[1]) * 0.999
    host = Backend("numpy")
    np.testing.assert_array_equal(per_pixel(host, v, ids, sums, f=old_photons_per_pixel), want)
    assert per_pixel(host, v_big, ids_big, sums_big, f=old_photons_per_pixel)[before.size :][:2].tolist() == [1, 272]


def test_photon_positions_of_an_event_alone_and_last_in_a_big_batch(backend):
    """Through droplet: an event's photons alone and after 4 events of 2**19 droplets each (its droplets' ids
    are then 2**21 and 2**21 + 1): the same; its photons come after the 2**21 of the events before."""
    shape = (1, 1024, 1024)
    last = np.zeros((1,) + shape, np.float32)
    last[0, 0, 0, 5] = 200.0  # one photon
    last[0, 0, 3, 10:12] = NEAR_TIE  # droplet 2**21 + 1 in the big batch
    filler = np.zeros((4,) + shape, np.float32)
    rows, cols = np.indices(shape[1:])
    filler[:, 0][:, (rows + cols) % 2 == 0] = 200.0  # a checkerboard: isolated pixels, a photon each
    ctx = make_ctx(backend, shape)

    def run(data):
        ph = Photons(Photons.Params(adu_per_photon=ADU, max_photons=300, layout="padded"))
        f = setup(Droplet, backend, ctx, [ph], threshold=20, use_rms=False, max_droplets=10)
        return {k: backend.to_host(v) for k, v in f(make_frames(backend, data)).items()}

    alone = run(last)
    batch = run(np.concatenate([filler, last]))
    np.testing.assert_array_equal(batch["droplet_nDroplets_all"], [2**19] * 4 + [2])
    for k in ("row", "col", "tile", "nPhotons", "nPhotons_truncated"):
        np.testing.assert_array_equal(batch[f"droplet_photons_{k}"][-1], alone[f"droplet_photons_{k}"][0], err_msg=k)
    np.testing.assert_array_equal(alone["droplet_photons_col"][0, :274], [5] + [11] * 273)
    np.testing.assert_array_equal(alone["droplet_photons_row"][0, :274], [0] + [3] * 273)
    assert (alone["droplet_photons_col"][0, 274:] == 0).all()
    np.testing.assert_array_equal(batch["droplet_photons_nPhotons"], [2**19] * 4 + [274])
    np.testing.assert_array_equal(batch["droplet_photons_nPhotons_truncated"], [2**19 - 300] * 4 + [0])
    np.testing.assert_array_equal(batch["droplet_photons_col"][:4], np.tile(np.arange(0, 600, 2), (4, 1)))
    assert (batch["droplet_photons_row"][:4] == 0).all()
    # the old key at that droplet id rounds the near tie to a tie
    f = (NEAR_TIE.astype(np.float64) / ADU) % 1
    assert 2**21 + 1 + (1 - f[0]) * 0.999 == 2**21 + 1 + (1 - f[1]) * 0.999


# ---- 13: n summed exactly --------------------------------------------------------------------------------
def test_photon_count_is_exact_whatever_the_order_of_the_sum(any_backend):
    """A droplet whose float64 total depends on the order of the additions (as GPU atomics order them) on
    either side of n + 1/2: the photons are those of the exact total, whichever total is passed in."""
    a, b, c = 2.0**28, 0.5 - 2.0**-24, 3 * 2.0**-27  # float32 values; exact total 2**28 + 1/2 - 2**-26
    v = np.array([a, b, c, c], np.float32).astype(np.float64)
    exact = sum(Fraction(x) for x in v)
    n = int(np.floor(exact + Fraction(1, 2)))
    assert n == 2**28
    forward = ((v[0] + v[1]) + v[2]) + v[3]
    backward = ((v[3] + v[2]) + v[1]) + v[0]
    assert np.floor(forward + 0.5) == n and np.floor(backward + 0.5) == n + 1  # the order decides
    ids = np.zeros(4, np.int64)
    got = [per_pixel(any_backend, v, ids, [s], adu=1.0) for s in (forward, backward)]
    np.testing.assert_array_equal(got[0], [2**28, 0, 0, 0])
    np.testing.assert_array_equal(got[1], got[0])
    # with an ADU that is not a power of two: the same photons as the exact rule (Fractions)
    rng = np.random.default_rng(3)
    v = (rng.exponential(0.6, 300) * 160).astype(np.float32).astype(np.float64)
    ids = np.sort(rng.integers(0, 40, v.size))
    ids = np.unique(ids, return_inverse=True)[1]
    got = per_pixel(any_backend, v, ids, np.bincount(ids, weights=v), adu=160.0)
    for d in range(ids.max() + 1):
        pix = np.flatnonzero(ids == d)
        total = sum(Fraction(x) for x in v[pix]) / 160
        assert got[pix].sum() == int(np.floor(total + Fraction(1, 2)))


# ---- 14: memory bounded by max_photons -------------------------------------------------------------------
def saturated(backend, data, max_photons=None):
    shape = data.shape[1:]
    params = {} if max_photons is None else {"max_photons": max_photons}
    ph = Photons(Photons.Params(adu_per_photon=1.0, layout="padded", **params))
    f = setup(Droplet, backend, make_ctx(backend, shape), [ph], threshold=10, use_rms=False)
    return {k: backend.to_host(v) for k, v in f(make_frames(backend, data)).items()}


def test_saturated_frames_are_counted_not_materialised(backend):
    """16 frames of 256 x 256 pixels at 1e6 ADU, 1 ADU a photon: 6.6e10 photons an event (the old code made an
    entry for each: 8 TB); max_photons entries an event, the rest counted in nPhotons_truncated."""
    data = np.full((16, 1, 256, 256), 1e6, np.float32)
    out = saturated(backend, data)
    n = 256 * 256 * 10**6  # one droplet an event: floor(sum / 1 + 0.5)
    np.testing.assert_array_equal(out["droplet_nDroplets"], 1)
    np.testing.assert_array_equal(out["droplet_photons_nPhotons"], n)
    np.testing.assert_array_equal(out["droplet_photons_nPhotons_truncated"], n - 2000)
    for k in ("row", "col", "tile"):
        a = out[f"droplet_photons_{k}"]
        assert a.shape == (16, 2000) and a.dtype == np.int32
        assert (a == 0).all()  # the first 2000 photons are all on pixel (0, 0, 0), which holds 1e6
    # the first entries end on a pixel boundary and within a pixel: 1e6 on (0, 0), 1e6 on (0, 1), 1 on (0, 2)
    one = saturated(backend, data[:1], max_photons=2 * 10**6 + 1)
    np.testing.assert_array_equal(np.bincount(one["droplet_photons_col"][0]), [10**6, 10**6, 1])
    assert (one["droplet_photons_row"][0] == 0).all()
    np.testing.assert_array_equal(one["droplet_photons_nPhotons_truncated"], [n - 2 * 10**6 - 1])


def test_huge_and_infinite_values_do_not_overflow(backend):
    """Pixels beyond 2**30 photons (inf too) count 2**30 each: no int64 overflow, counts stay consistent."""
    data = np.zeros((2, 1, 8, 8), np.float32)
    data[0, 0, 2, 2:4] = [3e38, np.inf]
    data[1, 0, 5, 5] = 1e20
    out = saturated(backend, data, max_photons=10)
    np.testing.assert_array_equal(out["droplet_photons_nPhotons"], [2**31, 2**30])
    np.testing.assert_array_equal(out["droplet_photons_nPhotons_truncated"], [2**31 - 10, 2**30 - 10])
    np.testing.assert_array_equal(out["droplet_photons_col"], [[2] * 10, [5] * 10])
    np.testing.assert_array_equal(out["droplet_photons_row"], [[2] * 10, [5] * 10])


def test_bounded_entries_are_the_first_of_the_unbounded_ones(any_backend, rng):
    """Small frames: with max_photons 7 the entries are the first 7 of those with room for all (row-major
    order), nPhotons is the same and nPhotons_truncated the rest; with room for all nothing is truncated."""
    shape = (2, 20, 24)
    data = np.zeros((4,) + shape, np.float32)
    for e in range(3):  # event 3 has no droplet
        for _ in range(12):
            p, r, c = rng.integers(0, 2), rng.integers(0, 19), rng.integers(0, 23)
            data[e, p, r : r + 2, c : c + 2] += rng.uniform(20, 900, (2, 2)).astype(np.float32)
    ctx = make_ctx(any_backend, shape)

    def run(m):
        ph = Photons(Photons.Params(adu_per_photon=150.0, max_photons=m, layout="padded"))
        f = setup(Droplet, any_backend, ctx, [ph], threshold=30, threshold_low=10, use_rms=False, layout="padded")
        return {k: any_backend.to_host(v) for k, v in f(make_frames(any_backend, data)).items()}

    small, big = run(7), run(5000)
    n = big["droplet_photons_nPhotons"]
    assert (n[:3] > 7).all() and n[3] == 0
    np.testing.assert_array_equal(small["droplet_photons_nPhotons"], n)
    np.testing.assert_array_equal(small["droplet_photons_nPhotons_truncated"], np.maximum(n - 7, 0))
    np.testing.assert_array_equal(big["droplet_photons_nPhotons_truncated"], 0)
    for k in ("row", "col", "tile"):
        np.testing.assert_array_equal(small[f"droplet_photons_{k}"], big[f"droplet_photons_{k}"][:, :7], err_msg=k)
    # the unbounded entries: each labelled pixel k times, row-major (tile, row, col never decrease together)
    for e in range(3):
        t, r, c = (big[f"droplet_photons_{k}"][e, : n[e]] for k in ("tile", "row", "col"))
        flat = (t * shape[1] + r) * shape[2] + c
        assert (np.diff(flat) >= 0).all() and (big["droplet_photons_row"][e, n[e] :] == 0).all()
    np.testing.assert_array_equal(n, np.floor(big["droplet_data"] / 150.0 + 0.5).sum(axis=1).astype(int))


def test_photons_wait_for_nothing_on_the_gpu():
    """Under CuPy's rules (stand-in): photons make no device->host copy or wait (no size read back), and
    give NumPy's numbers."""
    gpu = fake_gpu()
    shape = (1, 16, 16)
    data = np.zeros((3,) + shape, np.float32)
    data[0, 0, 2, 3:5] = [400, 170]
    data[0, 0, 9, 9] = 1e6
    data[2, 0, 4:6, 4] = NEAR_TIE
    outs = []
    for b in (Backend("numpy"), gpu):
        ctx = make_ctx(b, shape)
        d = setup(
            Droplet,
            b,
            ctx,
            [Photons(Photons.Params(adu_per_photon=ADU, max_photons=30, layout="padded"))],
            threshold=40,
            use_rms=False,
        )
        _, child = d.compute(make_frames(b, data))
        before = len(getattr(b, "transfers", []))
        out, _ = d.children[0].compute(child)
        if b is gpu:
            waits = [t for t in gpu.transfers[before:] if t[0] in ("sync", "d2h")]
            assert waits == [], waits
        outs.append({k: b.to_host(v) for k, v in out.items()})
    for k in outs[0]:
        np.testing.assert_array_equal(outs[1][k], outs[0][k], err_msg=k)
        assert outs[1][k].dtype == outs[0][k].dtype
    assert outs[0]["nPhotons"].tolist() == [4 + 6360, 0, 273]


# ---- prob: smalldata_tools' photon statistics -----------------------------------------------------------
def ref_prob(photon_image, good):
    """smalldata_tools' prob of one event: over the good pixels, the fraction holding k = 0..10 photons, then
    the mean photons per good pixel (kavg), 12 entries."""
    v = photon_image[good]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.array([np.count_nonzero(v == k) / v.size for k in range(11)] + [v.sum() / v.size])


def photon_images(out, key, shape):
    """Photons per pixel of each event, from the photon positions (all of them: no truncation)."""
    n = out[f"{key}_nPhotons"]
    assert (out[f"{key}_nPhotons_truncated"] == 0).all()
    img = np.zeros((len(n),) + shape, np.int64)
    start = np.cumsum(n) - n  # ragged layout: the stored photons event after event
    for e in range(len(n)):
        if out[f"{key}_row"].ndim == 2:  # padded layout: (events, max_photons)
            t, r, c = (out[f"{key}_{k}"][e, : n[e]] for k in ("tile", "row", "col"))
        else:
            t, r, c = (out[f"{key}_{k}"][start[e] : start[e] + n[e]] for k in ("tile", "row", "col"))
        np.add.at(img[e], (t, r, c), 1)
    return img


@pytest.mark.parametrize("under_roi", [False, True])
def test_prob_is_the_fraction_of_good_pixels_holding_k_photons(any_backend, rng, under_roi):
    """prob (events, 12) float32: entries 0..10 the fraction of the good pixels of the droplet's frame (the ROI's
    under a roi) holding k photons (pixels outside droplets hold 0, more than 10 are in no entry), entry 11 the
    mean photons per good pixel; NaN for an event without a good pixel."""
    from gpusmall.funcs.roi import Roi

    shape = (2, 12, 16)
    data = np.zeros((5,) + shape, np.float32)
    for e in range(3):  # events 3 (no droplet) and 4 (no good pixel) have none
        for _ in range(10):
            p, r, c = rng.integers(0, 2), rng.integers(0, 11), rng.integers(0, 15)
            data[e, p, r : r + 2, c] += rng.uniform(20, 700, 2).astype(np.float32)
    data[0, 1, 5, 5] = 2600.0  # 17 photons on one pixel: more than 10
    good = rng.random(data.shape) > 0.15
    good[0, 1, 5, 5] = True
    good[4] = False
    bounds = [[0, 2], [2, 12], [1, 15]]
    ctx = make_ctx(any_backend, shape)
    ph = Photons(Photons.Params(adu_per_photon=150.0, max_photons=5000))
    drop = Droplet(Droplet.Params(threshold=30, threshold_low=10, use_rms=False), [ph])
    f = Roi(Roi.Params(name="r", bounds=bounds), [drop]) if under_roi else drop
    f.setup(ctx)
    out = {k: any_backend.to_host(v) for k, v in f(make_frames(any_backend, data, good)).items()}
    key = "r_droplet_photons" if under_roi else "droplet_photons"
    index = tuple(slice(a, b) for a, b in bounds) if under_roi else (slice(None),) * 3
    sub_good = good[(slice(None),) + index]
    img = photon_images(out, key, sub_good.shape[1:])
    want = np.array([ref_prob(i, g) for i, g in zip(img, sub_good)])
    got = out[f"{key}_prob"]
    assert got.shape == (5, 12) and got.dtype == np.float32
    assert img.max() > 10 and (img[:3] > 0).any()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert np.isnan(got[4]).all() and got[3, 0] == 1 and (got[3, 1:] == 0).all()
    np.testing.assert_allclose(got[:4, 11], out[f"{key}_nPhotons"][:4] / sub_good[:4].reshape(4, -1).sum(1), rtol=1e-6)


def test_prob_without_any_droplet(any_backend):
    shape = (1, 6, 6)
    ctx = make_ctx(any_backend, shape)
    f = setup(Droplet, any_backend, ctx, [Photons(Photons.Params(adu_per_photon=100.0))], threshold=50, use_rms=False)
    out = {k: any_backend.to_host(v) for k, v in f(make_frames(any_backend, np.zeros((2,) + shape))).items()}
    np.testing.assert_array_equal(out["droplet_photons_prob"], [[1] + [0] * 11] * 2)


def test_good_per_event_counts_each_event():
    """good_per_event (one count_nonzero per event on NumPy) == the bool sum over each event's pixels,
    for a strided view too."""
    rng = np.random.default_rng(3)
    good = rng.random((5, 2, 30, 40)) > 0.3
    good[2] = False
    for g in (good, good[:, :, ::2]):
        got = good_per_event(np, g)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, g.reshape(g.shape[0], -1).sum(axis=1))
    assert good_per_event(np, good)[2] == 0
