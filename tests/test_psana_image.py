"""gpusmall's assembled image is psana's ``det.raw.image()``, cell for cell, on the two real XTC2 files.

Each pixel gets a distinct value (its flat index + 1); gpusmall assembles it with the geometry its psana source
gives (:func:`gpusmall.analysis.avimage.assemble`) and psana with ``raw.image(evt, nda=...)``. The shapes must be
equal and so must every cell where both have a pixel (psana fills holes inside a panel from their neighbours
and leaves 0 in the gaps; gpusmall leaves both as gaps). Skipped without psana or without the files.
"""

from __future__ import annotations

import numpy as np
import pytest

psana = pytest.importorskip("psana")

from test_psana import FILES, xtc  # noqa: E402  (the real files and their detector types)

from gpusmall.analysis.avimage import assemble, pixel_grid  # noqa: E402
from gpusmall.detectors import get_model  # noqa: E402
from gpusmall.producer.config import validate_config  # noqa: E402
from gpusmall.sources import open_source  # noqa: E402


def source_geometry(path, det):
    """(x, y, pixel_um) as gpusmall's psana source and detector model give them."""
    cfg = validate_config(
        {
            "source": {"type": "psana", "files": [str(path)], "psana": {"skip_calib_load": "all"}},
            "detectors": {det: {"type": FILES[det][1], "constants": "unused.h5"}},
        }
    )
    with open_source(cfg) as src:
        info = src.detectors[det]
    return info.x, info.y, float(get_model(FILES[det][1]).pixel_um)


def psana_run(path, det):
    ds = psana.DataSource(files=str(path), skip_calib_load="all")
    run = next(ds.runs())
    return run, run.Detector(det).raw


def distinct(shape):
    """Each pixel its flat index + 1 (exact in float32 for these detectors)."""
    return (np.arange(int(np.prod(shape)), dtype=np.float64) + 1).reshape(shape)


@pytest.mark.parametrize("det", list(FILES))
def test_assembled_image_is_psana_image(data_dir, det):
    """psana's own pixel coordinates (``raw._pixel_coords()``, float64): every cell equal, where several pixels
    share a cell too (both keep the largest)."""
    path = xtc(data_dir, det)
    run, raw = psana_run(path, det)
    evt = next(run.events())
    shape = raw.raw(evt).shape
    x, y, _ = (np.asarray(a, np.float64).reshape(shape) for a in raw._pixel_coords())
    values = distinct(shape)
    theirs = np.asarray(raw.image(evt, nda=values))
    ours = assemble(values, x, y, float(get_model(FILES[det][1]).pixel_um), fill=0.0)
    assert ours.shape == theirs.shape
    assert (theirs[ours != 0] != 0).all()  # every pixel of ours is drawn by psana
    both = (ours != 0) & (theirs != 0)  # psana also fills holes inside panels: not compared
    np.testing.assert_array_equal(ours[both], theirs[both])


@pytest.mark.parametrize("det", list(FILES))
def test_source_geometry_assembles_as_psana(data_dir, det):
    """The geometry gpusmall's psana source hands out (float32 x, y): psana's image, but for the few pixels
    within float32 rounding of a cell boundary (a handful of 540k on the ePix10ka quad)."""
    path = xtc(data_dir, det)
    x, y, pixel_um = source_geometry(path, det)
    run, raw = psana_run(path, det)
    evt = next(run.events())
    values = distinct(x.shape)
    theirs = np.asarray(raw.image(evt, nda=values))
    ours = assemble(values, x, y, pixel_um, fill=0.0)
    assert ours.shape == theirs.shape
    both = (ours != 0) & (theirs != 0)
    assert both.sum() > 0.999 * (ours != 0).sum()
    assert (ours[both] != theirs[both]).sum() <= 1e-4 * both.sum()
    # the index maps: where one pixel alone fills a cell, psana has that pixel there
    rows, cols, _, _ = pixel_grid(x, y, pixel_um)
    alone = (np.bincount((rows * ours.shape[1] + cols).ravel(), minlength=ours.size) == 1)[rows * ours.shape[1] + cols]
    assert np.mean(theirs[rows[alone], cols[alone]] == values[alone]) > 0.9999


def test_jungfrau_module_is_not_rotated(data_dir):
    """A single unrotated JUNGFRAU module is drawn as psana draws it: 512 rows x 1024 columns (plus the
    double-pixel gaps between its ASICs), image rows along the panel's rows, columns along its columns."""
    path = xtc(data_dir, "jungfrau")
    x, y, pixel_um = source_geometry(path, "jungfrau")
    rows, cols, shape, _ = pixel_grid(x, y, pixel_um)
    assert x.shape == (1, 512, 1024) and shape == (514, 1030)
    assert (rows == rows[:, :, :1]).all() and (cols == cols[:, :1, :]).all()  # row from panel row only
    assert len(np.unique(rows)) == 512 and len(np.unique(cols)) == 1024
