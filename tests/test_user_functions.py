"""Issue 16: user functions in the event loop (``type: python``, SPEC section 11).

The user's function (written to a file beside the config, as a user would) is compared with the same
computation done by hand on the ROI image of the whole detector written in the same run; batch sizes,
ranks and backends give the same file; bad returns stop the run with a message naming the function and
the event, keeping every batch before."""

import sys
import textwrap

import h5py
import numpy as np
import pytest
import yaml
from fake_cupy import install_fake_cupyx
from test_fake_gpu_pipeline import FakeGpuStrict
from test_mpi import FakeComm, assert_same, datasets

from gpusmall.backend import Backend
from gpusmall.cli import main
from gpusmall.errors import ConfigError
from gpusmall.io.master import build_master, part_path
from gpusmall.producer.config import validate_config
from gpusmall.producer.mpi import Comm
from gpusmall.producer.run import reduce_run

USER_CODE = '''
import numpy as np


def moments(batch, threshold):
    """Pixels at or above threshold: their count, total and intensity-weighted centre (row, col)."""
    xp = batch.xp
    hit = batch.good & (batch.frames >= threshold)
    img = xp.where(hit, batch.frames, xp.float32(0)).sum(axis=1)
    total = img.sum(axis=(1, 2), dtype=xp.float64)
    weight = xp.where(total > 0, total, xp.nan)
    rows = xp.arange(img.shape[1], dtype=xp.float64)
    cols = xp.arange(img.shape[2], dtype=xp.float64)
    return {"n": hit.sum(axis=(1, 2, 3)), "total": total,
            "com": xp.stack([(img.sum(axis=2) * rows).sum(axis=1) / weight,
                             (img.sum(axis=1) * cols).sum(axis=1) / weight], axis=1),
            "ts_mod": xp.asarray(batch.timestamps % 1000), "index": xp.asarray(batch.event_index)}


def scalar(batch):
    return {"x": batch.xp.float32(1)}


def short(batch):
    return {"x": batch.xp.zeros(len(batch) - 1)}


def objects(batch):
    return {"x": np.array([object()] * len(batch))}


def not_a_dict(batch):
    return [1, 2]


def fails_later(batch):
    if batch.event_index[0] >= 8:
        raise ValueError("bad pixel map " + str(int(batch.event_index[0])))
    return {"x": batch.xp.ones(len(batch))}


def keys_change(batch):
    if batch.event_index[0] >= 8:
        return {"y": batch.xp.ones(len(batch))}
    return {"x": batch.xp.ones(len(batch))}
'''


def write_user_code(tmp_path):
    (tmp_path / "userf.py").write_text(textwrap.dedent(USER_CODE))


def config(tmp_path, fn="userf.py:moments", params=None, batch=4, events=18, out="u.h5", under_roi=False):
    user = {
        "type": "python",
        "name": "mom",
        "function": fn,
        "params": params if params is not None else ({"threshold": 20.0} if fn.endswith("moments") else {}),
    }
    functions = [{"type": "roi", "name": "full", "write_area": True}]
    if under_roi:
        functions.append({"type": "roi", "name": "part", "bounds": [[4, 20], [8, 40]], "children": [user]})
    else:
        functions.append(user)
    return {
        "source": {"type": "sim", "events": events, "seed": 2, "damage_every": 7},
        "batch_size": batch,
        "backend": "numpy",
        "output": str(tmp_path / out),
        "detectors": {"cam": {"type": "camera", "shape": [32, 48], "functions": functions}},
    }


def run(tmp_path, data, backend=None, comm=None):
    cfg = validate_config(data, base_dir=tmp_path)
    return reduce_run(cfg, backend or Backend("numpy"), quiet=True, comm=comm or Comm())


def run_cli(tmp_path, capsys, data, *options):
    """``gpusmall run`` of config ``data`` written beside the user's code: (exit status, stderr)."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    rc = main(["run", str(path), "--quiet", *options])
    return rc, capsys.readouterr().err


def by_hand(area, threshold):
    """The moments of ``moments`` from the ROI image (bad pixels 0) with NumPy, event by event."""
    n, total, com = [], [], []
    for img in area.astype(np.float64):
        w = np.where(img >= threshold, img, 0.0)
        r, c = np.indices(w.shape)
        n.append(int((img >= threshold).sum()))
        total.append(w.sum())
        com.append([(w * r).sum() / w.sum(), (w * c).sum() / w.sum()] if w.sum() else [np.nan, np.nan])
    return np.array(n), np.array(total), np.array(com)


def check_against_hand(path, prefix="mom", crop=np.s_[:, :, :]):
    with h5py.File(path) as f:
        area, damaged = f["cam/full_area"][()][crop], f["cam/damaged"][()].astype(bool)
        n, total, com = by_hand(area, 20.0)
        ok = ~damaged  # damaged events: results filled (-1 / NaN)
        assert ok.sum() >= 10 and damaged.sum() >= 1
        np.testing.assert_array_equal(f[f"cam/{prefix}_n"][()][ok], n[ok])
        np.testing.assert_allclose(f[f"cam/{prefix}_total"][()][ok], total[ok], rtol=1e-6)
        np.testing.assert_allclose(f[f"cam/{prefix}_com"][()][ok], com[ok], rtol=1e-6)
        np.testing.assert_array_equal(f[f"cam/{prefix}_index"][()][ok], f["event_index"][()][ok])
        np.testing.assert_array_equal(f[f"cam/{prefix}_ts_mod"][()][ok], f["timestamp"][()][ok] % 1000)
        assert f["cam/damaged"][()][ok].sum() == 0 and np.all(f[f"cam/{prefix}_n"][()][damaged] == -1)
        ucfg = f["UserDataCfg/cam"]
        assert ucfg[f"{prefix}__params__threshold"][()] == 20.0
        assert ucfg[f"{prefix}__function"][()].decode().endswith("userf.py:moments")


def test_a_user_function_equals_the_computation_by_hand(tmp_path):
    write_user_code(tmp_path)
    run(tmp_path, config(tmp_path))
    check_against_hand(tmp_path / "u.h5")


def test_a_user_function_under_a_roi_gets_the_roi_image(tmp_path):
    write_user_code(tmp_path)
    run(tmp_path, config(tmp_path, under_roi=True))
    check_against_hand(tmp_path / "u.h5", prefix="part_mom", crop=np.s_[:, 4:20, 8:40])


def test_a_module_function_from_the_users_environment(tmp_path, monkeypatch):
    write_user_code(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("userf", None)
    run(tmp_path, config(tmp_path, fn="userf:moments"))
    with h5py.File(tmp_path / "u.h5") as f:
        assert f["UserDataCfg/cam/mom__function"][()] == b"userf:moments"
    a = datasets(tmp_path / "u.h5")  # the same numbers as from the file next to the config
    write_user_code(tmp_path)
    run(tmp_path, config(tmp_path, out="v.h5"))
    b = datasets(tmp_path / "v.h5")
    for k in a:
        if k.startswith("cam/mom_"):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_the_cupy_code_path_equals_numpy(tmp_path, monkeypatch):
    """The strict CuPy stand-in: the user's xp is not NumPy, device arrays never turn into host ones."""
    install_fake_cupyx(monkeypatch)
    write_user_code(tmp_path)
    run(tmp_path, config(tmp_path, out="np.h5"))
    run(tmp_path, config(tmp_path, out="gpu.h5"), backend=FakeGpuStrict())
    a, b = datasets(tmp_path / "np.h5"), datasets(tmp_path / "gpu.h5")
    for k in a:
        if k.startswith("cam/"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, err_msg=k)
    check_against_hand(tmp_path / "gpu.h5")


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_batch_sizes_give_the_same_file(tmp_path, batch):
    write_user_code(tmp_path)
    run(tmp_path, config(tmp_path, batch=4, out="ref.h5"))
    run(tmp_path, config(tmp_path, batch=batch, out=f"b{batch}.h5"))
    assert_same(tmp_path / "ref.h5", tmp_path / f"b{batch}.h5")


def test_two_ranks_give_the_same_file(tmp_path):
    write_user_code(tmp_path)
    run(tmp_path, config(tmp_path, out="one.h5"))
    data = config(tmp_path, out="two.h5")
    for r in (1, 0):
        run(tmp_path, data, comm=FakeComm(r, 2))
    build_master(tmp_path / "two.h5", [part_path(tmp_path / "two.h5", r) for r in range(2)])
    assert_same(tmp_path / "one.h5", tmp_path / "two.h5")


@pytest.mark.parametrize(
    "fn, message",
    [
        ("scalar", "its first axis must be the batch's 1 events"),
        ("short", "its first axis must be the batch's 1 events"),
        ("objects", "has dtype object; numbers or bools only"),
        ("not_a_dict", "must return a non-empty dict of arrays, not list"),
    ],
)
def test_bad_returns_stop_before_the_run(tmp_path, capsys, fn, message):
    write_user_code(tmp_path)
    rc, err = run_cli(tmp_path, capsys, config(tmp_path, fn=f"userf.py:{fn}"))
    assert rc == 2 and "detector cam: function mom (" in err and "the set-up call" in err and message in err, err
    assert not (tmp_path / "u.h5").exists()


@pytest.mark.parametrize(
    "fn, message",
    [
        ("fails_later", "raised:\nTraceback"),
        ("keys_change", "keys, per-event shapes and dtypes must not change"),
    ],
)
def test_a_later_failure_names_the_function_and_event_and_keeps_the_batches(tmp_path, capsys, fn, message):
    write_user_code(tmp_path)
    rc, err = run_cli(tmp_path, capsys, config(tmp_path, fn=f"userf.py:{fn}"), "--threads", "1")
    assert rc == 1 and "function mom (" in err and "the batch starting at event 8" in err and message in err, err
    if fn == "fails_later":
        assert "ValueError: bad pixel map 8" in err  # the user's own traceback
    with h5py.File(tmp_path / "u.h5") as f:  # the two batches before it
        assert f["cam/mom_x"].shape == (8,) and f["event_index"][()].tolist() == list(range(8))


@pytest.mark.parametrize(
    "fn, where",
    [
        ("nofile.py:f", "does not exist"),
        ("userf.py:nothing", "has no 'nothing'"),
        ("no_such_module_xyz:f", "cannot import module"),
    ],
)
def test_a_function_that_cannot_be_found_exits_2(tmp_path, capsys, fn, where):
    write_user_code(tmp_path)
    rc, err = run_cli(tmp_path, capsys, config(tmp_path, fn=fn))
    assert rc == 2 and "detector cam: function mom" in err and where in err, err


def test_the_function_string_is_validated(tmp_path):
    with pytest.raises(ConfigError, match=r"functions\[1\]\.function"):
        validate_config(config(tmp_path, fn="no colon"))


# ---- event-level functions: several detectors' batches of the same events ----------------------------

EVENT_CODE = """
def ratio(batches, scale=1.0):
    a, b = batches["a"], batches["b"]
    xp = a.xp
    ta = a.frames.sum(axis=(1, 2, 3), dtype=xp.float64)
    tb = b.frames.sum(axis=(1, 2, 3), dtype=xp.float64)
    return {"ratio": scale * ta / xp.where(tb != 0, tb, xp.nan), "sum_ab": a.outputs["full_sum"] + b.outputs["full_sum"],
            "index": xp.asarray(a.event_index)}


def fails_later(batches):
    if batches["a"].event_index[0] >= 8:
        raise KeyError("no such shot")
    return {"x": batches["a"].xp.ones(len(batches["a"]))}
"""


def event_config(tmp_path, fn="corr.py:ratio", batch=4, out="e.h5", detectors=("a", "b")):
    (tmp_path / "corr.py").write_text(textwrap.dedent(EVENT_CODE))
    roi = {"type": "roi", "name": "full"}
    return {
        "source": {"type": "sim", "events": 18, "seed": 4, "damage_every": 5},
        "batch_size": batch,
        "backend": "numpy",
        "output": str(tmp_path / out),
        "detectors": {
            "a": {"type": "camera", "shape": [32, 48], "functions": [roi]},
            "b": {"type": "camera", "shape": [16, 16], "functions": [roi]},
        },
        "event_functions": [
            {
                "type": "python",
                "name": "ab",
                "function": fn,
                "detectors": list(detectors),
                "params": {"scale": 2.0} if fn.endswith("ratio") else {},
            }
        ],
    }


def check_event_outputs(path):
    with h5py.File(path) as f:
        a, b = f["a/full_sum"][()].astype(np.float64), f["b/full_sum"][()].astype(np.float64)
        bad = f["a/damaged"][()].astype(bool) | f["b/damaged"][()].astype(bool)
        assert bad.any() and (~bad).sum() >= 10
        np.testing.assert_allclose(
            f["ab_ratio"][()][~bad], 2.0 * a[~bad] / np.where(b != 0, b, np.nan)[~bad], rtol=1e-6
        )
        np.testing.assert_allclose(f["ab_sum_ab"][()][~bad], (a + b)[~bad], rtol=1e-6)
        np.testing.assert_array_equal(f["ab_index"][()][~bad], f["event_index"][()][~bad])
        assert np.isnan(f["ab_ratio"][()][bad]).all()  # damaged in either detector
        assert "ab" in f.attrs["event_functions"]


def test_an_event_function_combines_two_detectors(tmp_path):
    run(tmp_path, event_config(tmp_path))
    check_event_outputs(tmp_path / "e.h5")


def test_an_event_function_on_the_cupy_code_path(tmp_path, monkeypatch):
    install_fake_cupyx(monkeypatch)
    run(tmp_path, event_config(tmp_path, out="gpu.h5"), backend=FakeGpuStrict())
    check_event_outputs(tmp_path / "gpu.h5")


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_event_functions_do_not_depend_on_the_batch_size_or_ranks(tmp_path, batch):
    run(tmp_path, event_config(tmp_path, out="ref.h5"))
    run(tmp_path, event_config(tmp_path, batch=batch, out=f"b{batch}.h5"))
    assert_same(tmp_path / "ref.h5", tmp_path / f"b{batch}.h5")
    if batch == 7:
        data = event_config(tmp_path, batch=batch, out="two.h5")
        for r in (1, 0):
            run(tmp_path, data, comm=FakeComm(r, 2))
        build_master(tmp_path / "two.h5", [part_path(tmp_path / "two.h5", r) for r in range(2)])
        assert_same(tmp_path / "ref.h5", tmp_path / "two.h5")


def test_an_event_function_failure_names_it_and_keeps_the_batches(tmp_path, capsys):
    rc, err = run_cli(tmp_path, capsys, event_config(tmp_path, fn="corr.py:fails_later"))
    assert rc == 1 and "event function ab (" in err and "the batch starting at event 8" in err, err
    assert "KeyError: 'no such shot'" in err
    with h5py.File(tmp_path / "e.h5") as f:
        assert f["ab_x"].shape == (8,)


@pytest.mark.parametrize(
    "change, where",
    [
        (
            lambda c: c["event_functions"][0].update(detectors=["a", "zz"]),
            r"event_functions\[0\]\.detectors\[1\]: no detector 'zz'",
        ),
        (lambda c: c["event_functions"][0].update(name="a"), r"event_functions\[0\]\.name: 'a' is taken"),
        (
            lambda c: c["event_functions"][0].update(name="timestamp"),
            r"event_functions\[0\]\.name: 'timestamp' is taken",
        ),
        (lambda c: c["event_functions"][0].update(function="nocolon"), r"event_functions\[0\]\.function"),
        (lambda c: c["event_functions"][0].update(extra=1), r"event_functions\[0\]\.extra: unknown key"),
    ],
)
def test_event_function_entries_are_validated(tmp_path, change, where):
    data = event_config(tmp_path)
    change(data)
    with pytest.raises(ConfigError, match=where):
        validate_config(data, base_dir=tmp_path)


def test_the_readme_examples_run(tmp_path, capsys):
    from pathlib import Path

    cfg = Path(__file__).resolve().parents[1] / "producers" / "user_functions.yaml"
    rc = main(["run", str(cfg), "--events", "8", "--out", str(tmp_path / "x.h5"), "--quiet", "--backend", "numpy"])
    assert rc == 0, capsys.readouterr().err
    with h5py.File(tmp_path / "x.h5") as f:
        np.testing.assert_allclose(f["cams_roi_sums"][:, 0], f["cam/roi0_sum"][()], rtol=1e-6)
        assert f["cam/moments_com"].shape == (8, 2) and f["cams_ratio"].shape == (8,)
