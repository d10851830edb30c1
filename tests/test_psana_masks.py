"""gpusmall's static masks (gpusmall/detectors/masks.py) against psana's own mask API (``det.raw._mask_*``,
given the constants we inject) on the two real XTC2 files: status, edges, central (ASIC boundaries) and
bad-pixel neighbours mean the same pixels; psana's ``pixel_mask`` constants become the ``calib`` mask.
Where the two differ by convention (ePix10ka status over every gain range) the test pins the difference.
Skipped without psana or the files."""

from __future__ import annotations

import numpy as np
import pytest

psana = pytest.importorskip("psana")

from test_psana import FILES, inject, psana_frames, psana_run, xtc  # noqa: E402

from gpusmall.detectors import get_model  # noqa: E402
from gpusmall.detectors.constants import Constants  # noqa: E402
from gpusmall.detectors.masks import central_mask, edge_mask, grow_bad, static_mask  # noqa: E402
from gpusmall.sources.psana import PsanaSource  # noqa: E402


def with_status(data_dir, det, rng, n_bad=50):
    """(det.raw with injected constants and random status bits per gain range, model, shape, status)."""
    path = xtc(data_dir, det)
    run, raw = psana_run(path, det)
    model = get_model(FILES[det][1])
    shape = psana_frames(path, det)[1].shape[1:]
    status = np.zeros((model.n_gains, *shape), np.uint64)
    for g in range(model.n_gains):
        status[g].flat[rng.choice(status[g].size, n_bad, replace=False)] = rng.integers(1, 1 << 15, n_bad)
    z = np.zeros((model.n_gains, *shape), np.float32)
    inject(raw, run, det, z, z + 1, status)
    return raw, run, model, shape, status


@pytest.mark.parametrize("det", list(FILES))
def test_status_edges_central_and_neighbours_equal_psanas(data_dir, rng, det):
    raw, run, model, shape, status = with_status(data_dir, det, rng)
    c = PsanaSource._psana_constants(None, det, raw, model, shape)
    ours = static_mask(det, model, shape, c, unbonded=False, calib=False)[0]
    # psana's status mask merges the gain ranges it is asked for; gpusmall's takes every range
    every = tuple(range(model.n_gains))
    theirs = raw._mask_from_status(status_bits=(1 << 64) - 1, gain_range_inds=every).astype(bool)
    np.testing.assert_array_equal(ours, theirs)
    if det == "epixquad":  # psana's ePix10ka default: ranges 0-4 only (not AHL-L, AML-L): fewer pixels bad
        default = raw._mask_from_status().astype(bool)
        np.testing.assert_array_equal(default, ~status[:5].any(axis=0))
        assert (~default).sum() < (~ours).sum()
    for n in (1, 3):
        np.testing.assert_array_equal(edge_mask(shape, n), raw._mask_edges(edge_rows=n, edge_cols=n).astype(bool))
    if det == "epixquad":  # psana 4.3's _mask_center fails on JUNGFRAU ("Cannot convert np.dtype into a dtype")
        for n in (1, 2):
            np.testing.assert_array_equal(
                central_mask(shape, model, n), raw._mask_center(center_rows=n, center_cols=n).astype(bool)
            )
    bad = ~ours
    for ptrn, neighbours in (("r", 4), ("s", 8)):  # psana: rhombus / square of radius 1 around each bad pixel
        np.testing.assert_array_equal(
            ~grow_bad(bad, neighbours), raw._mask_neighbors(ours.astype(np.uint8), rad=1, ptrn=ptrn).astype(bool)
        )


def test_psanas_pixel_mask_is_the_calib_mask(data_dir, rng):
    """psana's ``pixel_mask`` constants (1 = keep) reach the run's mask through ``mask.calib``."""
    det = "jungfrau"
    raw, run, model, shape, _ = with_status(data_dir, det, rng, n_bad=0)
    pixel_mask = np.ones(shape, np.uint8)
    pixel_mask[0, 100:110, 200] = 0
    raw._calibconst["pixel_mask"] = (pixel_mask, {**raw._calibconst["pedestals"][1], "ctype": "pixel_mask"})
    c = PsanaSource._psana_constants(None, det, raw, model, shape)
    np.testing.assert_array_equal(c.mask, pixel_mask)
    np.testing.assert_array_equal(c.mask, raw._mask_calib())
    m = static_mask(det, model, shape, c)[0]
    assert (~m).sum() == 10 and not m[0, 100:110, 200].any()
    assert static_mask(det, model, shape, c, calib=False)[0].all()
    assert Constants(pedestal=c.pedestal, gain=c.gain).mask is None
