"""One orientation for every image gpusmall draws (SPEC 9, "Plots"): array row 0 at the top, column 0 at the left,
colour bars labelled with a unit; per-item (droplet, photon) lists never drawn as curves.

Every plot kind gets one bright cell at array [0, 0] (for an assembled image: the pixel the project's own
:func:`~gpusmall.analysis.avimage.assemble` puts in cell [0, 0], the smallest x and y, where psana's
``det.raw.image()`` puts it too: rows from x, columns from y, tests/test_psana_image.py) on a background of
zeros; the figure is rendered with Agg and the pixels of the colormap's top colour are located on the canvas,
inside the drawn image: they must lie in its top-left corner.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import h5py
import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from gpusmall.analysis import maskmaker, roi_picker  # noqa: E402
from gpusmall.analysis.avimage import AverageImage, assemble, pixel_grid, plot_average, plot_image, tile_panels  # noqa: E402
from gpusmall.analysis.plot import plot_key  # noqa: E402
from gpusmall.analysis.plot_vs import plot_cube  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
SHAPE = (2, 6, 8)  # panels, rows, cols
PIX = 100.0
BRIGHT = 10.0


def geometry(shape=SHAPE, pix=PIX):
    """Panels side by side along x, 3 pixels apart; row along y: pixel (0, 0, 0) has the smallest x and y."""
    p, r, c = np.indices(shape)
    return ((c + 0.5 + p * (shape[2] + 3)) * pix).astype(np.float32), ((r + 0.5) * pix).astype(np.float32)


def planted(shape=SHAPE):
    a = np.zeros(shape, np.float32)
    a[(0,) * len(shape)] = BRIGHT
    return a


# ---- what the test looks at ----------------------------------------------------------------------------


@pytest.fixture
def saved(monkeypatch):
    """Every Figure saved while the test runs (PNG writers draw on a Figure and save it)."""
    figs: list = []
    original = Figure.savefig

    def savefig(self, *a, **k):
        figs.append(self)
        return original(self, *a, **k)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return figs


def image_axes(fig):
    """(axes, main image) of the figure: the first image of an axes that is not a colour bar."""
    for ax in fig.axes:
        if getattr(ax, "_colorbar", None) is None and ax.get_images():
            return ax, ax.get_images()[0]
    raise AssertionError("no image drawn")


def bright_spot(fig):
    """(fx, fy): where the colormap's top colour is drawn, as fractions of the drawn image from its left and
    from its TOP edge (rendered with Agg)."""
    ax, im = image_axes(fig)
    ax.set_facecolor("k")
    canvas = FigureCanvasAgg(fig) if not isinstance(fig.canvas, FigureCanvasAgg) else fig.canvas
    canvas.draw()
    buf = np.asarray(canvas.buffer_rgba())[..., :3].astype(np.int32)
    box = im.get_window_extent(canvas.get_renderer())
    box = box.intersection(box, ax.get_window_extent()) or box
    height = buf.shape[0]
    r0, r1 = int(np.ceil(height - box.y1)), int(np.floor(height - box.y0))
    c0, c1 = int(np.ceil(box.x0)), int(np.floor(box.x1))
    region = buf[r0:r1, c0:c1]
    top = np.round(np.asarray(im.cmap.get_over()[:3]) * 255).astype(np.int32)
    hit = np.abs(region - top).max(axis=-1) <= 3
    assert hit.any(), "the bright cell is not drawn"
    rr, cc = np.nonzero(hit)
    return cc.mean() / region.shape[1], rr.mean() / region.shape[0]


UNIT = re.compile(r"\S.*\[[^\]\s][^\]]*\]")


def assert_labelled_colorbars(fig):
    bars = [ax._colorbar for ax in fig.axes if getattr(ax, "_colorbar", None) is not None]
    assert bars, "no colour bar"
    for cb in bars:
        label = cb.ax.get_ylabel() or cb.ax.get_xlabel()
        assert UNIT.fullmatch(label), f"colour bar label {label!r} has no [unit]"


def assert_top_left(fig, frac=0.35):
    fx, fy = bright_spot(fig)
    assert fx < frac and fy < frac, (
        f"the cell at array [0, 0] is drawn at {fx:.2f} from the left, {fy:.2f} from the top"
    )
    assert_labelled_colorbars(fig)


# ---- result files written directly (the layout of SPEC section 8) ----------------------------------------


def result_file(
    path, per_event=None, static=None, sums=None, det="cam", shape=SHAPE, geo=True, units="kev", extra=None, events=4
):
    with h5py.File(path, "w") as f:
        f["timestamp"] = np.arange(events, dtype=np.int64)
        f[f"{det}/damaged"] = np.zeros(events, np.uint8)
        cfg = f.create_group(f"UserDataCfg/{det}")
        cfg["units"] = np.bytes_(units)
        cfg["shape"] = np.asarray(shape, np.int64)
        if geo:
            cfg["x"], cfg["y"] = geometry(shape)
            cfg["pixel_um"] = PIX
        for k, v in (per_event or {}).items():
            f[f"{det}/{k}"] = v
        for k, v in (static or {}).items():
            cfg[k] = v
        for k, v in (sums or {}).items():
            f[f"Sums/{det}_{k}"] = v
        for k, v in (extra or {}).items():
            f[k] = v
    return path


def per_event(inner, events=4):
    """(events, *inner) zeros with BRIGHT at [0, ...] in event 0 (the event mean is bright at [0, 0])."""
    a = np.zeros((events, *inner), np.float32)
    a[(0,) * (1 + len(inner))] = BRIGHT * events
    return a


# ---- the plot kinds ------------------------------------------------------------------------------------


def average():
    x, y = geometry()
    rows, cols, _, _ = pixel_grid(x, y, PIX)
    assert rows[0, 0, 0] == 0 and cols[0, 0, 0] == 0  # the project's assembly puts it in cell [0, 0]
    mean = planted()
    return AverageImage("cam", mean, np.ones(SHAPE, np.int32), 4, 0, x, y, PIX, units="kev")


def kind_avimage(tmp_path, saved):
    av = average()
    assert assemble(av.mean, av.x_um, av.y_um, PIX)[0, 0] == BRIGHT
    plot_average(av, tmp_path / "av.png")
    return saved[-1]


def kind_api_average_figure(tmp_path, saved):
    from gpusmall.api import average_figure

    return average_figure(average(), "cam: mean of 4 events")


def kind_tiled_panels(tmp_path, saved):
    plot_image(tile_panels(planted()), tmp_path / "tiled.png", "tiled", label="calib mean", unit="keV")
    return saved[-1]


def kind_plot_event_2d(tmp_path, saved):
    plot_key(result_file(tmp_path / "r.h5", {"roi_area": per_event((6, 8))}), "cam/roi_area", tmp_path / "p.png")
    return saved[-1]


def kind_plot_event_3d_tiled(tmp_path, saved):
    path = result_file(tmp_path / "r.h5", {"frame": per_event(SHAPE)}, geo=False)
    plot_key(path, "cam/frame", tmp_path / "p.png")
    return saved[-1]


def kind_plot_sum_assembled(tmp_path, saved):
    plot_key(result_file(tmp_path / "r.h5", sums={"calib": planted()}), "Sums/cam_calib", tmp_path / "p.png")
    return saved[-1]


def kind_plot_static_2d(tmp_path, saved):
    path = result_file(tmp_path / "r.h5", static={"ped": planted((6, 8))}, shape=(1, 6, 8), geo=False)
    plot_key(path, "UserDataCfg/cam/ped", tmp_path / "p.png")
    return saved[-1]


def kind_plot_events_x_bins(tmp_path, saved):
    plot_key(result_file(tmp_path / "r.h5", {"azav_azav": per_event((40,))}), "cam/azav_azav", tmp_path / "p.png")
    return saved[-1]


def kind_cube_bins_x_values(tmp_path, saved):
    res = result_file(tmp_path / "r.h5", {"azav_azav": per_event((40,))})
    path = tmp_path / "cube.h5"
    with h5py.File(path, "w") as f:
        f.attrs.update(
            {"gpusmall_kind": "cube", "by": "scan/delay", "keys": json.dumps(["cam/azav_azav"]), "source": str(res)}
        )
        f["bins/centers"] = np.arange(5.0)
        f["bins/count"] = np.ones(5)
        total = np.zeros((5, 40))
        total[0, 0] = BRIGHT
        f["cam/azav_azav_sum"] = total
    plot_cube(path, "cam/azav_azav", tmp_path / "c.png")
    return saved[-1]


def kind_roi_tiled(tmp_path, saved):
    return roi_picker.roi_figure(planted(), grid=100, label="calib mean", unit="keV")


def kind_roi_assembled(tmp_path, saved):
    x, y = geometry()
    return roi_picker.roi_figure(planted(), x, y, PIX, grid=100, label="calib mean", unit="keV")


def kind_roi_picker(tmp_path, saved):
    fig = Figure()
    roi_picker.RoiPicker(
        roi_picker.PanelView(planted(), label="calib mean", unit="keV"), ax=fig.add_subplot(), verbose=False
    )
    return fig


def _bad():
    bad = np.zeros(SHAPE, bool)
    bad[1, 5, 7] = True
    return bad


def kind_mask_tiled(tmp_path, saved):
    return maskmaker.show_mask(planted(), _bad(), label="dark mean", unit="ADU")


def kind_mask_assembled(tmp_path, saved):
    x, y = geometry()
    return maskmaker.show_mask(planted(), _bad(), x, y, PIX)


def padded_droplets(tmp_path, rows, cols, events=4, length=5, n=1):
    """A result file with padded droplets: ``n`` droplets per event at (rows, cols) of panel 0, then zeros."""
    r, c = np.zeros((events, length), np.float32), np.zeros((events, length), np.float32)
    r[:, :n], c[:, :n] = rows, cols
    count = np.full(events, n, np.int32)
    return result_file(
        tmp_path / "pad.h5",
        {
            "droplet_row": r,
            "droplet_col": c,
            "droplet_tile": np.zeros((events, length), np.int32),
            "droplet_data": np.where(np.arange(length) < n, 30.0, 0.0)[None].repeat(events, 0).astype(np.float32),
            "droplet_nDroplets": count,
            "droplet_nDroplets_truncated": np.zeros(events, np.int32),
        },
        static={"droplet__layout": np.bytes_("padded"), "droplet__max_droplets": length},
        shape=(1, 6, 8),
        geo=False,
    )


def kind_droplet_positions(tmp_path, saved):
    plot_key(padded_droplets(tmp_path, 0.2, 0.3), "cam/droplet_row", tmp_path / "p.png")
    return saved[-1]


KINDS = {k[5:]: v for k, v in globals().items() if k.startswith("kind_")}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_array_row_0_is_drawn_at_the_top_left(kind, tmp_path, saved):
    fig = KINDS[kind](tmp_path, saved)
    assert image_axes(fig)[1].origin == "upper"
    assert_top_left(fig)


def test_the_check_sees_the_other_orientation():
    """The same figure drawn with origin='lower' puts the bright cell at the bottom: the check can fail."""
    fig = Figure()
    ax = fig.add_subplot()
    im = ax.imshow(planted((6, 8)), origin="lower", vmin=0, vmax=0.5)
    fig.colorbar(im, ax=ax, label="value [a.u.]")
    fx, fy = bright_spot(fig)
    assert fx < 0.35 and fy > 0.65
    fig2 = Figure()
    ax2 = fig2.add_subplot()
    fig2.colorbar(ax2.imshow(planted((6, 8))), ax=ax2)
    with pytest.raises(AssertionError, match="has no"):
        assert_labelled_colorbars(fig2)


def test_colour_bar_units_follow_the_file(tmp_path, saved):
    path = result_file(
        tmp_path / "r.h5",
        {"roi_area": per_event((6, 8))},
        static={"ped": planted((6, 8))},
        sums={"calib": planted(), "calib_square": planted(), "nhits": planted()},
        units="photons",
    )
    want = {
        "cam/roi_area": "[photons]",
        "UserDataCfg/cam/ped": "[ADU]",
        "Sums/cam_calib": "[photons]",
        "Sums/cam_calib_square": "[photons^2]",
        "Sums/cam_nhits": "[events]",
    }
    for key, unit in want.items():
        plot_key(path, key, tmp_path / "p.png")
        (label,) = [a._colorbar.ax.get_ylabel() for a in saved[-1].axes if getattr(a, "_colorbar", None)]
        assert label.endswith(unit) and key in label, (key, label)
    plot_average(average(), tmp_path / "av.png")
    fig = saved[-1]
    assert [a._colorbar.ax.get_ylabel() for a in fig.axes if getattr(a, "_colorbar", None)] == ["cam calib mean [keV]"]


# ---- per-item lists -------------------------------------------------------------------------------------


def lines_drawn(fig):
    return [line for ax in fig.axes for line in ax.get_lines() if len(line.get_xdata()) > 1]


def test_padded_positions_leave_the_padding_out(tmp_path, saved):
    """One droplet per event at (5, 7): the zeros after it (padding) must not count at (0, 0)."""
    path = padded_droplets(tmp_path, 5.0, 7.0, events=4, length=5)
    for key in ("cam/droplet_row", "cam/droplet_col"):
        assert "positions" in plot_key(path, key, tmp_path / "p.png")
        fig = saved[-1]
        assert not lines_drawn(fig)
        img = np.ma.filled(image_axes(fig)[1].get_array(), np.nan)
        assert img.shape == (6, 8) and img[5, 7] == 4 and np.nansum(img) == 4 and img[0, 0] == 0
    assert "histogram of 4 per-item values" in plot_key(path, "cam/droplet_data", tmp_path / "p.png")
    assert not lines_drawn(saved[-1])


@pytest.fixture(scope="module")
def droplet_runs(tmp_path_factory):
    """The same simulated droplets and photons written in both layouts by ``gpusmall run``."""
    from test_ragged import cam_droplets

    from gpusmall.api import open_run

    tmp = tmp_path_factory.mktemp("items")
    return {
        lay: open_run(cam_droplets(tmp, events=12, layout=lay, out=f"{lay}.h5")).run() for lay in ("ragged", "padded")
    }


@pytest.mark.parametrize(
    "key",
    [
        "cam/droplet_row",
        "cam/droplet_col",
        "cam/droplet_data",
        "cam/droplet_npix",
        "cam/droplet_photons_row",
        "cam/droplet_photons_tile",
        "cam/droplet_sparse_row",
        "cam/var_droplet_sparse/col",
    ],
)
def test_item_lists_are_not_drawn_as_curves(droplet_runs, key, tmp_path, saved):
    out = {}
    for lay, path in droplet_runs.items():
        with h5py.File(path) as f:
            if key not in f:
                continue
        out[lay] = plot_key(path, key, tmp_path / f"{lay}.png")
        fig = saved[-1]
        assert not lines_drawn(fig), f"{key} ({lay}) drawn as a curve"
        if key.endswith(("row", "col")):
            img = np.ma.filled(image_axes(fig)[1].get_array(), 0)
            count = "cam/droplet_photons_nPhotons" if "photons" in key else "cam/droplet_nDroplets"
            with h5py.File(path) as f:
                n, cut = f[count][()], f[f"{count}_truncated"][()]
            assert img.sum() == (n - cut).sum() > 0  # every stored item once, no padding
            assert_labelled_colorbars(fig)
    assert out
    if len(out) == 2:  # both layouts: the same picture of the same items
        assert out["ragged"] == out["padded"]
