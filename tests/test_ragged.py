"""Ragged (sparse) droplet and photon outputs, smalldata_tools' sparse names, the droplet image for children.

* ``layout: ragged`` (the default) and ``padded`` give the same droplets and photons per event, function by
  function (NumPy, CuPy, the CuPy stand-in) and file by file;
* ragged files do not depend on the batch size (1, 7, 64), on a split over fake MPI ranks (the master's
  virtual datasets over the parts' items, or copies), on damaged events or on a batch halved on GPU OOM;
* the writer's per-item datasets: offsets, counts, attributes; the hard links under smalldata_tools' names;
* truncation by a bounded output is counted, stored (root attributes) and printed;
* children of droplet receive the droplet image: projection and roi equal NumPy references.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from helpers_funcs import make_ctx, make_frames, setup
from scipy import ndimage
from test_droplet import DROPLET_FIELDS, PHOTON_FIELDS, sparse_frames, to_padded
from test_mpi import FakeComm, datasets, run_inproc
from test_photons_exact import any_backend, fake_gpu  # noqa: F401 - a fixture

from gpusmall.cli import main
from gpusmall.funcs.droplet import Droplet, sparse_columns
from gpusmall.funcs.photons import Photons
from gpusmall.funcs.projection import Projection
from gpusmall.funcs.roi import Roi
from gpusmall.io.master import build_master, item_names, per_event_names
from gpusmall.io.writer import Columns, ResultWriter


def host(backend, out):
    return {k: backend.to_host(v) for k, v in out.items()}


def droplet_tree(backend, ctx, layout, max_droplets=12, max_photons=25):
    ph = Photons(Photons.Params(adu_per_photon=80, max_photons=max_photons, layout=layout))
    return setup(
        Droplet,
        backend,
        ctx,
        [ph],
        threshold=15,
        threshold_low=6,
        use_rms=False,
        thres_adu=40,
        max_droplets=max_droplets,
        layout=layout,
    )


# ---- the functions ---------------------------------------------------------------------------------------


def test_ragged_and_padded_give_the_same_droplets_and_photons(any_backend, rng):  # noqa: F811
    """Bounds small enough to truncate some events: ragged keeps exactly the rows padded keeps, in the same
    order, ``len = n - n_truncated``, and the per-event outputs are identical."""
    b = any_backend
    shape = (2, 30, 30)
    data = sparse_frames(rng, shape, 5, n_drops=25)
    data[3] = 0  # an event without droplets
    ctx = make_ctx(b, shape)
    rag = host(b, droplet_tree(b, ctx, "ragged")(make_frames(b, data)))
    pad = host(b, droplet_tree(b, ctx, "padded")(make_frames(b, data)))
    assert rag["droplet_data"].ndim == 1 and pad["droplet_data"].shape == (5, 12)
    assert (rag["droplet_nDroplets_truncated"] > 0).any() and (rag["droplet_photons_nPhotons_truncated"] > 0).any()
    np.testing.assert_array_equal(rag["droplet_len"], rag["droplet_nDroplets"] - rag["droplet_nDroplets_truncated"])
    np.testing.assert_array_equal(
        rag["droplet_photons_len"], rag["droplet_photons_nPhotons"] - rag["droplet_photons_nPhotons_truncated"]
    )
    assert rag["droplet_len"][3] == 0 and rag["droplet_photons_len"][3] == 0
    # smalldata_tools' sparse_data of photons: 1 per stored photon (0 in padding), summing to the stored photons
    assert rag["droplet_photons_data"].dtype == np.uint8 and (rag["droplet_photons_data"] == 1).all()
    assert rag["droplet_photons_data"].size == rag["droplet_photons_len"].sum()
    np.testing.assert_array_equal(pad["droplet_photons_data"].sum(axis=1), rag["droplet_photons_len"])
    back = to_padded(to_padded(rag, 12, "droplet_", DROPLET_FIELDS), 25, "droplet_photons_", PHOTON_FIELDS)
    assert sorted(back) == sorted(pad)
    for k in pad:
        assert back[k].dtype == pad[k].dtype, k
        np.testing.assert_array_equal(back[k], pad[k], err_msg=k)


def test_ragged_photons_wait_once_on_the_gpu():
    """Under CuPy's rules: the ragged photons read one number back (how many are stored), padded none."""
    gpu = fake_gpu()
    shape = (1, 16, 16)
    data = np.zeros((3,) + shape, np.float32)
    data[0, 0, 2, 3:5] = [400, 170]
    data[2, 0, 9, 9] = 1e4
    waits = {}
    for layout in ("ragged", "padded"):
        ctx = make_ctx(gpu, shape)
        d = setup(
            Droplet,
            gpu,
            ctx,
            [Photons(Photons.Params(adu_per_photon=100, max_photons=30, layout=layout))],
            threshold=40,
            use_rms=False,
            layout=layout,
        )
        _, child = d.compute(make_frames(gpu, data))
        before = len(gpu.transfers)
        out, _ = d.children[0].compute(child)
        waits[layout] = [t for t in gpu.transfers[before:] if t[0] in ("sync", "d2h")]
        out = {k: gpu.to_host(v) for k, v in out.items()}
        if layout == "ragged":
            np.testing.assert_array_equal(out["len"], [6, 0, 30])
            np.testing.assert_array_equal(out["col"][:6], [3, 3, 3, 3, 4, 4])
    assert len(waits["ragged"]) == 1 and waits["padded"] == [], waits


def test_sparse_columns_name_smalldata_tools_datasets(numpy_backend):
    ctx = make_ctx(numpy_backend, (1, 8, 8))
    rag, pad = (sparse_columns([droplet_tree(numpy_backend, ctx, layout)]) for layout in ("ragged", "padded"))
    assert rag.items["droplet_data"] == ("droplet_len", "droplet_offset")
    assert rag.items["droplet_photons_col"] == ("droplet_photons_len", "droplet_photons_offset")
    assert rag.bounds["droplet_npix"] == 12 and rag.bounds["droplet_photons_row"] == 25
    assert rag.links["var_droplet_sparse/data"] == "droplet_data"
    assert rag.links["var_droplet_sparse_len"] == "droplet_len"
    assert rag.links["var_droplet_photons_sparse/tile"] == "droplet_photons_tile"
    assert not pad.items and not pad.bounds
    assert {k: v for k, v in pad.links.items() if not k.startswith("droplet_photons")} == {
        f"droplet_sparse_{k}": f"droplet_{k}" for k in DROPLET_FIELDS
    }
    assert pad.links["droplet_photons_sparse_row"] == "droplet_photons_row"


# ---- the droplet image for children ------------------------------------------------------------------------


def droplet_image_reference(data, good, thr, thr_low, thres_adu):
    """The calibrated values at the pixels of the droplets kept, 0 elsewhere (scipy, panel by panel)."""
    img = np.zeros(data.shape, np.float64)
    four = ndimage.generate_binary_structure(2, 1)
    for e in range(data.shape[0]):
        for p in range(data.shape[1]):
            d, g = data[e, p].astype(np.float64), good[e, p]
            seeds = g & (d >= thr)
            mask = seeds | (ndimage.binary_dilation(seeds, structure=four) & g & (d >= thr_low))
            lab, n = ndimage.label(mask)
            total = ndimage.sum_labels(d, lab, np.arange(1, n + 1))
            keep = np.isin(lab, 1 + np.flatnonzero(total >= thres_adu))
            img[e, p] = np.where(keep, d, 0)
    return img


def test_children_of_droplet_receive_the_droplet_image(any_backend, rng):  # noqa: F811
    """projection (whole image, along rows, along columns) and roi (with a projection of its own) under droplet
    equal NumPy on the droplet image; photons beside them are unchanged by them."""
    b = any_backend
    shape = (2, 24, 28)
    data = sparse_frames(rng, shape, 4, n_drops=20)
    good = rng.random(data.shape) > 0.03
    frames_data = np.where(good, data, 0).astype(np.float32)
    ctx = make_ctx(b, shape)

    def tree(children):
        return setup(
            Droplet, b, ctx, children, threshold=15, threshold_low=6, use_rms=False, thres_adu=60, max_droplets=3
        )  # truncation bounds the outputs, not the image

    kids = [
        Projection(Projection.Params(axis=-1)),
        Projection(Projection.Params(axis=0)),
        Projection(Projection.Params(axis=1, name="pj_mean", mean=True)),
        Roi(Roi.Params(name="r", bounds=[[1, 2], [4, 20], [5, 25]]), [Projection(Projection.Params(axis=1))]),
        Photons(Photons.Params(adu_per_photon=80)),
    ]
    out = host(b, tree(kids)(make_frames(b, data, good)))
    alone = host(b, tree([Photons(Photons.Params(adu_per_photon=80))])(make_frames(b, data, good)))
    img = droplet_image_reference(frames_data, good, 15, 6, 60)
    assert (img > 0).any() and (out["droplet_nDroplets_truncated"] > 0).any()
    assert ((frames_data >= 15) & good & (img == 0)).any()  # vetoed droplets are not in the image
    np.testing.assert_allclose(out["droplet_pj_ax_1_data"], img.sum(axis=(1, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(out["droplet_pj_ax_0_data"], img.sum(axis=2), rtol=1e-5, atol=1e-3)
    # mean: over the good pixels (the good mask is the frames')
    np.testing.assert_allclose(out["droplet_pj_mean_data"], img.sum(axis=3) / good.sum(axis=3), rtol=1e-5, atol=1e-4)
    roi = img[:, 1, 4:20, 5:25]
    np.testing.assert_allclose(out["droplet_r_sum"], roi.sum(axis=(1, 2)), rtol=1e-5)
    np.testing.assert_allclose(out["droplet_r_max"], roi.max(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_allclose(out["droplet_r_pj_ax_1_data"], roi.sum(axis=2), rtol=1e-5, atol=1e-3)
    for k, v in alone.items():
        np.testing.assert_array_equal(out[k], v, err_msg=k)


# ---- files -------------------------------------------------------------------------------------------------


def cam_droplets(
    tmp_path, events=30, batch=8, layout="ragged", out="cam.h5", damage_every=0, max_droplets=200, max_photons=400
):
    return {
        "source": {"type": "sim", "events": events, "seed": 5, "damage_every": damage_every},
        "batch_size": batch,
        "backend": "numpy",
        "output": str(tmp_path / out),
        "detectors": {
            "cam": {
                "type": "camera",
                "shape": [1, 48, 64],
                "functions": [
                    {
                        "type": "droplet",
                        "threshold": 30,
                        "threshold_low": 10,
                        "use_rms": False,
                        "thres_adu": 40,
                        "max_droplets": max_droplets,
                        "layout": layout,
                        "children": [
                            {"type": "photons", "adu_per_photon": 100.0, "max_photons": max_photons, "layout": layout},
                            {"type": "projection", "axis": 0},
                        ],
                    },
                    {"type": "roi", "name": "r", "bounds": [[0, 1], [0, 24], [0, 32]]},
                ],
                "sums": ["calib"],
            }
        },
    }


def assert_same_files(a_path, b_path):
    """Same datasets (values, dtypes, shapes), the same per-item attributes and the same second names."""
    a, b = datasets(a_path), datasets(b_path)
    assert sorted(a) == sorted(b)
    for k in a:
        if k.startswith("UserDataCfg/") and not isinstance(a[k], np.ndarray):
            assert a[k] == b[k], k
        elif k.startswith("Sums/"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-12, err_msg=k)
        else:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    with h5py.File(a_path) as fa, h5py.File(b_path) as fb:
        assert item_names(fa) == item_names(fb)
        assert links(fa) == links(fb)


def links(f):
    """The second names of datasets (root attribute ``aliases``), each checked to be the same dataset."""
    out = json.loads(f.attrs["aliases"]) if "aliases" in f.attrs else {}
    for name, target in out.items():
        assert f[name] == f[target] and isinstance(f.get(name, getlink=True), h5py.HardLink), name
    return out


def per_event_items(f, name):
    """Items of a ragged dataset, event by event (list of arrays), through its offset and count."""
    ds = f[name]
    group = ds.parent
    off, n = group[ds.attrs["items_offset"]][()], group[ds.attrs["items_count"]][()]
    data = ds[()]
    assert len(off) == len(n) and (off == np.cumsum(n) - n).all() and n.sum() == len(data)
    return [data[o : o + k] for o, k in zip(off, n)]


def test_files_ragged_and_padded_hold_the_same_droplets(tmp_path):
    run_inproc(cam_droplets(tmp_path, out="rag.h5"), tmp_path)
    run_inproc(cam_droplets(tmp_path, out="pad.h5", layout="padded"), tmp_path)
    with h5py.File(tmp_path / "rag.h5") as r, h5py.File(tmp_path / "pad.h5") as p:
        assert r["cam/droplet_nDroplets"][()].sum() > 100 and r["cam/droplet_photons_nPhotons"][()].sum() > 100
        for prefix, keys in (("droplet_", DROPLET_FIELDS), ("droplet_photons_", PHOTON_FIELDS)):
            n = r[f"cam/{prefix}len"][()]
            for k in keys:
                rows = per_event_items(r, f"cam/{prefix}{k}")
                pad = p[f"cam/{prefix}{k}"][()]
                assert r[f"cam/{prefix}{k}"].attrs["items_count"] == f"{prefix}len"
                assert r[f"cam/{prefix}{k}"].dtype == pad.dtype
                for e, row in enumerate(rows):
                    np.testing.assert_array_equal(row, pad[e, : n[e]], err_msg=f"{k} {e}")
                    assert (pad[e, n[e] :] == 0).all()
            # smalldata_tools' names: the same datasets
            for k in keys:
                np.testing.assert_array_equal(r[f"cam/var_{prefix[:-1]}_sparse/{k}"][()], r[f"cam/{prefix}{k}"][()])
                np.testing.assert_array_equal(p[f"cam/{prefix}sparse_{k}"][()], p[f"cam/{prefix}{k}"][()])
            np.testing.assert_array_equal(r[f"cam/var_{prefix[:-1]}_sparse_len"][()], n)
        # everything per event is the same
        for k in per_event_names(p):
            if k in r and "items_count" not in r[k].attrs:
                np.testing.assert_array_equal(r[k][()], p[k][()], err_msg=k)
        assert "cam/droplet_data" in item_names(r) and not item_names(p)
        assert "cam/droplet_data" not in per_event_names(r)
        assert r["cam/var_droplet_sparse_len"] == r["cam/droplet_len"]  # the same dataset (a hard link)
        assert links(r)["cam/var_droplet_sparse/data"] == "cam/droplet_data"
        assert links(p)["cam/droplet_photons_sparse_tile"] == "cam/droplet_photons_tile"


def test_ragged_files_do_not_depend_on_the_batch_size(tmp_path):
    ref = tmp_path / "b64.h5"
    run_inproc(cam_droplets(tmp_path, events=70, batch=64, out="b64.h5"), tmp_path)
    with h5py.File(ref) as f:
        assert f["cam/droplet_data"].shape[0] > 300
    for bs in (1, 7):
        run_inproc(cam_droplets(tmp_path, events=70, batch=bs, out=f"b{bs}.h5"), tmp_path)
        assert_same_files(ref, tmp_path / f"b{bs}.h5")


@pytest.mark.parametrize("layout", ["ragged", "padded"])
def test_two_ranks_master_equals_one_rank(tmp_path, monkeypatch, layout):
    """Fake ranks (contiguous blocks): the master's ragged datasets are virtual over the parts' items, their
    offsets recomputed; a master of copies (beyond MAX_MAPPINGS) is the same. Second names in both layouts."""
    run_inproc(cam_droplets(tmp_path, out="one.h5", events=37, batch=6, layout=layout), tmp_path)
    data = cam_droplets(tmp_path, out="two.h5", events=37, batch=6, layout=layout)
    for r in (1, 0):
        s = run_inproc(data, tmp_path, comm=FakeComm(r, 2))
    assert s.events == 37
    with h5py.File(tmp_path / "two.h5") as f:
        assert f["cam/droplet_data"].is_virtual and f["cam/droplet_photons_row"].is_virtual
        assert layout == "padded" or not f["cam/droplet_offset"].is_virtual
        assert len(links(f)) == (11 if layout == "ragged" else 9)  # droplet 5 + photons 4 fields (+ 2 lens)
    assert_same_files(tmp_path / "one.h5", tmp_path / "two.h5")
    from gpusmall.io import master

    monkeypatch.setattr(master, "MAX_MAPPINGS", 0)
    build_master(tmp_path / "two.h5")
    with h5py.File(tmp_path / "two.h5") as f:
        assert not f["cam/droplet_data"].is_virtual
    assert_same_files(tmp_path / "one.h5", tmp_path / "two.h5")


def test_second_names_that_sort_first_do_not_confuse_the_master(tmp_path):
    """A droplet named ``zz``: ``var_zz_sparse/data`` comes before ``zz_data`` in h5py's visit, which sees each
    dataset once; the master still builds every dataset under its own name and the second names over them."""

    def named(out):
        data = cam_droplets(tmp_path, out=out, events=20, batch=6)
        data["detectors"]["cam"]["functions"][0]["name"] = "zz"
        return data

    run_inproc(named("one.h5"), tmp_path)
    for r in (1, 0):
        run_inproc(named("two.h5"), tmp_path, comm=FakeComm(r, 2))
    with h5py.File(tmp_path / "two.h5") as f, h5py.File(tmp_path / "one.h5") as one:
        assert "cam/zz_len" in per_event_names(f) and "cam/var_zz_sparse_len" not in per_event_names(f)
        assert item_names(f)["cam/zz_data"] == ("cam/zz_len", "cam/zz_offset")
        assert f["cam/zz_data"].is_virtual and f["cam/var_zz_sparse/data"] == f["cam/zz_data"]
        assert links(f) == links(one) and links(f)["cam/var_zz_photons_sparse/row"] == "cam/zz_photons_row"
        for k in ("cam/zz_data", "cam/zz_offset", "cam/zz_photons_col", "cam/var_zz_sparse_len"):
            np.testing.assert_array_equal(f[k][()], one[k][()], err_msg=k)


def ragged_batch(ts, counts, values_of):
    """A batch of Columns: per event ``counts[e]`` items whose values are ``values_of(ts[e])``."""
    counts = np.asarray(counts, np.int32)
    items = np.concatenate([values_of(t)[:c] for t, c in zip(ts, counts)]) if len(ts) else np.zeros(0)
    return Columns(
        {
            "timestamp": np.asarray(ts, np.uint64),
            "det/f_len": counts,
            "det/f_data": items.astype(np.float32),
            "det/f_n_truncated": (counts == 3).astype(np.int32),
        },
        ragged={"det/f_data": ("det/f_len", "det/f_offset")},
        links={"det/var_f_sparse/data": "det/f_data"},
    )


def test_master_of_interleaved_parts_orders_the_items_by_timestamp(tmp_path, monkeypatch):
    """Parts whose events interleave (psana's MPI distribution): one mapping per run of events, the items of
    each run in the master's event order; the same with copies."""

    def values(t):
        return t * 10.0 + np.arange(5)

    rng = np.random.default_rng(1)
    ts = np.arange(1, 41)
    counts = {int(t): int(rng.integers(0, 4)) for t in ts}
    owner = rng.integers(0, 3, ts.size)
    for r in range(3):
        with ResultWriter(tmp_path / f"m.part{r}.h5", chunk_events=4) as w:
            mine = ts[owner == r]
            for a in range(0, len(mine), 4):
                w.append(ragged_batch(mine[a : a + 4], [counts[int(t)] for t in mine[a : a + 4]], values))
            w.set_attrs("/", {"rank": r, "ranks": 3, "complete": True})
    with ResultWriter(tmp_path / "ref.h5", chunk_events=40) as w:
        w.append(ragged_batch(ts, [counts[int(t)] for t in ts], values))
    for mappings in (10_000, 0):
        from gpusmall.io import master

        monkeypatch.setattr(master, "MAX_MAPPINGS", mappings)
        info = build_master(tmp_path / "m.h5", [tmp_path / f"m.part{r}.h5" for r in range(3)])
        with h5py.File(tmp_path / "m.h5") as f, h5py.File(tmp_path / "ref.h5") as ref:
            assert f["det/f_data"].is_virtual == (mappings > 0)
            for k in ("timestamp", "det/f_len", "det/f_offset", "det/f_data", "det/var_f_sparse/data"):
                np.testing.assert_array_equal(f[k][()], ref[k][()], err_msg=k)
            rows = per_event_items(f, "det/f_data")
            assert all((row == values(t)[: len(row)]).all() for row, t in zip(rows, ts))
            want = sum(counts[int(t)] == 3 for t in ts)
            assert int(f.attrs["truncated_events"]) == want == info["truncated_events"]
            assert json.loads(f.attrs["truncated"]) == {"det/f_n_truncated": want}


def test_writer_checks_the_items_against_their_counts(tmp_path):
    with ResultWriter(tmp_path / "w.h5") as w:
        bad = ragged_batch([1, 2], [2, 1], lambda t: np.arange(5.0))
        bad["det/f_len"] = np.array([2, 2], np.int32)
        with pytest.raises(ValueError, match="3 items, its count det/f_len says 4"):
            w.append(bad)
        clash = ragged_batch([1, 2], [2, 1], lambda t: np.arange(5.0))
        clash["det/f_offset"] = np.zeros(2, np.int64)
        with pytest.raises(ValueError, match="the offset the writer adds"):
            w.append(clash)
        w.append(ragged_batch([1, 2], [2, 0], lambda t: np.arange(5.0)))
        w.append(ragged_batch([3], [0], lambda t: np.arange(5.0)))  # a batch without items
        w.append(ragged_batch([4, 5], [3, 1], lambda t: t + np.arange(5.0)))
        # readable while the run goes on (SWMR)
        with h5py.File(tmp_path / "w.h5", "r", swmr=True) as r:
            np.testing.assert_array_equal(r["det/f_offset"][()], [0, 2, 2, 2, 5])
            np.testing.assert_array_equal(r["det/var_f_sparse/data"][()], [0, 1, 4, 5, 6, 5])
        assert w.truncated == {"det/f_n_truncated": 1} and w.truncated_events == 1


def test_damaged_events_hold_no_items(tmp_path):
    s = run_inproc(cam_droplets(tmp_path, damage_every=4, out="d.h5"), tmp_path)
    assert s.damaged == {"cam": 7}
    run_inproc(cam_droplets(tmp_path, out="clean.h5"), tmp_path)
    bad = np.arange(30) % 4 == 3
    with h5py.File(tmp_path / "d.h5") as d, h5py.File(tmp_path / "clean.h5") as c:
        assert (d["cam/droplet_len"][()][bad] == 0).all() and (d["cam/droplet_nDroplets"][()][bad] == -1).all()
        for name in ("cam/droplet_data", "cam/droplet_photons_col"):
            got, want = per_event_items(d, name), per_event_items(c, name)
            for e in np.flatnonzero(~bad):
                np.testing.assert_array_equal(got[e], want[e], err_msg=f"{name} {e}")
    data = cam_droplets(tmp_path, damage_every=4, out="d2.h5")
    for r in (1, 0):
        run_inproc(data, tmp_path, comm=FakeComm(r, 2))
    assert_same_files(tmp_path / "d.h5", tmp_path / "d2.h5")


def test_a_batch_halved_on_out_of_memory_gives_the_same_ragged_file(tmp_path, monkeypatch):
    from test_mpi import out_of_memory_above

    run_inproc(cam_droplets(tmp_path, out="ref.h5"), tmp_path)
    out_of_memory_above(monkeypatch)
    run_inproc(cam_droplets(tmp_path, out="oom.h5"), tmp_path)
    assert_same_files(tmp_path / "ref.h5", tmp_path / "oom.h5")


def test_truncation_is_counted_stored_and_printed(tmp_path, capsys):
    import yaml

    data = cam_droplets(tmp_path, out="t.h5", max_droplets=3, max_photons=5)
    cfg = tmp_path / "t.yaml"
    cfg.write_text(yaml.safe_dump(data))
    assert main(["run", str(cfg), "--backend", "numpy", "--quiet"]) == 0
    err = capsys.readouterr().err
    with h5py.File(tmp_path / "t.h5") as f:
        nd, nph = f["cam/droplet_nDroplets_truncated"][()], f["cam/droplet_photons_nPhotons_truncated"][()]
        want = int(((nd > 0) | (nph > 0)).sum())
        assert 0 < want <= 30 and int(f.attrs["truncated_events"]) == want
        assert json.loads(f.attrs["truncated"]) == {
            "cam/droplet_nDroplets_truncated": int((nd > 0).sum()),
            "cam/droplet_photons_nPhotons_truncated": int((nph > 0).sum()),
        }
        assert (f["cam/droplet_len"][()] <= 3).all()
    assert f"gpusmall: {want} of 30 events truncated by a bounded output" in err, err
    # under fake ranks the master counts them all
    data = cam_droplets(tmp_path, out="t2.h5", max_droplets=3, max_photons=5)
    for r in (1, 0):
        s = run_inproc(data, tmp_path, comm=FakeComm(r, 2))
    assert s.truncated_events == want
    with h5py.File(tmp_path / "t2.h5") as f:
        assert int(f.attrs["truncated_events"]) == want
    # without truncation: nothing said
    data = cam_droplets(tmp_path, out="u.h5")
    cfg.write_text(yaml.safe_dump(data))
    capsys.readouterr()
    assert main(["run", str(cfg), "--backend", "numpy", "--quiet"]) == 0
    assert "truncated" not in capsys.readouterr().err
    with h5py.File(tmp_path / "u.h5") as f:
        assert int(f.attrs["truncated_events"]) == 0


def test_memory_estimate_counts_ragged_outputs_at_their_bound(tmp_path):
    """The set-up memory check takes max_droplets / max_photons items an event, as for padded outputs."""
    from gpusmall.backend import Backend
    from gpusmall.producer.config import validate_config
    from gpusmall.producer.pipeline import DetectorPipeline
    from gpusmall.sources.sim import SimSource

    sizes = {}
    for layout in ("ragged", "padded"):
        cfg = validate_config(cam_droplets(tmp_path, layout=layout))
        src = SimSource(2, {"cam": {"type": "camera", "shape": (1, 48, 64)}}, seed=1)
        pl = DetectorPipeline(
            "cam", cfg.detectors["cam"], src.detectors["cam"], cfg.function_specs("cam"), Backend("numpy")
        )
        sizes[layout] = pl.event_output_nbytes()
    drop = "detectors.cam.functions[0]"
    # ragged: the padded arrays' bytes plus the two per-event len columns
    assert sizes["ragged"][drop] == sizes["padded"][drop] + 2 * 4


@pytest.mark.parametrize("sizes", [[5000, 100_000, 3, 0, 70_000, 40_961], [1, 8191, 8192, 8193, 50_000]])
def test_writer_items_written_as_whole_chunks_and_partial_ends_equal_the_data(tmp_path, sizes):
    """Batches of items that start and end inside chunks and span many (whole chunks go to the file
    directly, the partial ends through HDF5's chunk cache): the file holds exactly the items appended."""
    rng = np.random.default_rng(2)
    got = []
    with ResultWriter(tmp_path / "c.h5", chunk_events=4) as w:
        t = 0
        for k in sizes:
            counts = np.array([k // 2, k - k // 2], np.int32)
            items = rng.random(k).astype(np.float32)
            got.append(items)
            w.append(
                Columns(
                    {
                        "timestamp": np.array([t, t + 1], np.uint64),
                        "d/x_len": counts,
                        "d/x": items,
                        "d/i": (items * 1000).astype(np.int64),
                    },
                    ragged={"d/x": ("d/x_len", "d/x_offset"), "d/i": ("d/x_len", "d/x_offset")},
                )
            )
            t += 2
    want = np.concatenate(got)
    with h5py.File(tmp_path / "c.h5") as f:
        assert f["d/x"].chunks[0] < len(want) // 4  # many chunks
        np.testing.assert_array_equal(f["d/x"][()], want)
        np.testing.assert_array_equal(f["d/i"][()], (want * 1000).astype(np.int64))
        n = f["d/x_len"][()]
        np.testing.assert_array_equal(f["d/x_offset"][()], np.cumsum(n) - n)
