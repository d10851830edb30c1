"""Issue 13: refuse bad input before the run, never destroy a file, stop cleanly on every stop signal.

Each test reproduces one case of the issue's list (the number in its name) and failed before the fix.
"""

import copy
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from gpusmall.cli import main
from gpusmall.detectors import get_model
from gpusmall.detectors.constants import load_constants
from gpusmall.errors import ConfigError, ConstantsError
from gpusmall.producer.config import load_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CAM = {"type": "camera", "shape": [16, 16], "functions": [{"type": "roi", "bounds": [[0, 8], [0, 8]]}]}
AZAV = {"type": "azav", "center_um": [8.0, 8.0], "distance_mm": 100.0, "energy_kev": 9.5, "bins": 10}


def config(tmp_path, **top) -> dict:
    cfg = {
        "source": {"type": "sim", "events": 4},
        "batch_size": 2,
        "output": str(tmp_path / "out.h5"),
        "detectors": {"cam": dict(CAM)},
    }
    cfg.update(top)
    return copy.deepcopy(cfg)


def write(tmp_path, cfg, name="c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["GPUSMALL_BACKEND"] = "numpy"
    return e


def start_long_run(tmp_path, out: Path) -> subprocess.Popen:
    """A simulated run that goes on until stopped, once its output holds reduced batches."""
    cfg = write(
        tmp_path,
        config(
            tmp_path,
            source={"type": "sim", "events": 10**7},
            batch_size=8,
            output=str(out),
            detectors={"cam": dict(CAM, shape=[64, 64])},
        ),
        "long.yaml",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpusmall", "run", str(cfg), "--quiet", "--threads", "1"],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    t_end = time.time() + 60
    while time.time() < t_end and proc.poll() is None:
        try:
            with h5py.File(out, "r", swmr=True) as f:
                if "cam/roi_sum" in f and f["cam/roi_sum"].shape[0] >= 16:
                    return proc
        except (OSError, KeyError):
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"the run did not start: {proc.communicate()[1]}")


def stop(proc, sig) -> str:
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return err


# ---- 2: one output, one run ---------------------------------------------------------------------


def test_02_a_second_run_on_a_live_output_is_refused(tmp_path, capsys):
    out = tmp_path / "live.h5"
    proc = start_long_run(tmp_path, out)
    try:
        cfg = write(tmp_path, config(tmp_path, output=str(out)))
        rc, err = run_cli(capsys, "run", cfg, "--backend", "numpy", "--quiet")
        assert rc == 2 and "being written by another gpusmall run" in err and "pid" in err, err
    finally:
        err = stop(proc, signal.SIGTERM)
    assert proc.returncode == 1 and "interrupted (SIGTERM)" in err, err
    with h5py.File(out) as f:  # the first run's file is whole: every batch it reduced is there
        n = int(f.attrs["events"])
        assert n >= 16 and f["cam/roi_sum"].shape == (n,) and f["timestamp"].shape == (n,)
    # once the first run has ended its output may be reused (it is an earlier result)
    rc, err = run_cli(capsys, "run", cfg, "--backend", "numpy", "--quiet")
    assert rc == 0, err


# ---- 6: SIGHUP stops cleanly, as SIGTERM does -----------------------------------------------------


def test_06_sighup_keeps_every_batch_and_closes_the_file(tmp_path):
    out = tmp_path / "hup.h5"
    proc = start_long_run(tmp_path, out)
    err = stop(proc, signal.SIGHUP)
    assert proc.returncode == 1 and "interrupted (SIGHUP)" in err, err
    with h5py.File(out) as f:  # opens plainly: closed by the run, not left in SWMR mode
        n = int(f.attrs["events"])
        assert n >= 16 and not bool(f.attrs["complete"])
        assert f["cam/roi_sum"].shape == (n,) and np.all(np.diff(f["event_index"][()]) == 1)
        assert "Sums" in f or "cam" in f


# ---- 8: every float parameter is finite --------------------------------------------------------

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "where, change",
    [
        ("detectors.cam.functions[0].thres_adu", lambda c: c["detectors"]["cam"]["functions"][0].update(thres_adu=NAN)),
        (
            "detectors.cam.functions[1].center_um[0]",
            lambda c: c["detectors"]["cam"]["functions"].append(dict(AZAV, center_um=[NAN, 0.0])),
        ),
        (
            "detectors.cam.functions[1].range[1]",
            lambda c: c["detectors"]["cam"]["functions"].append(dict(AZAV, range=[0.0, INF])),
        ),
        (
            "detectors.cam.functions[1].distance_mm",
            lambda c: c["detectors"]["cam"]["functions"].append(dict(AZAV, distance_mm=INF)),
        ),
        (
            "detectors.cam.functions[1].energy_kev",
            lambda c: c["detectors"]["cam"]["functions"].append(dict(AZAV, energy_kev=NAN)),
        ),
        (
            "detectors.cam.photon_energy_kev",
            lambda c: c["detectors"]["cam"].update(units="photons", photon_energy_kev=NAN),
        ),
        ("detectors.cam.saturation", lambda c: c["detectors"]["cam"].update(saturation=NAN)),
        ("detectors.cam.pixel_um", lambda c: c["detectors"]["cam"].update(pixel_um=INF)),
        (
            "detectors.cam.common_mode.max_correction",
            lambda c: c["detectors"]["cam"].update(common_mode={"type": "median", "max_correction": INF}),
        ),
    ],
)
def test_08_nan_and_inf_parameters_are_refused(tmp_path, capsys, where, change):
    cfg = config(tmp_path)
    change(cfg)
    with pytest.raises(ConfigError, match=f"config: {re.escape(where)}: .*finite number"):
        validate_config(cfg)
    rc, err = run_cli(capsys, "run", write(tmp_path, cfg), "--quiet")  # YAML writes .nan / .inf
    assert rc == 2 and "finite number" in err, err


def test_08_a_poni_file_with_a_nan_distance_is_refused(tmp_path, capsys):
    poni = tmp_path / "g.poni"
    poni.write_text(
        'poni_version: 2\nDetector: Detector\nDetector_config: {"pixel1": 0.0001, "pixel2": 0.0001, '
        '"max_shape": null}\nDistance: nan\nPoni1: 0.001\nPoni2: 0.001\nRot1: 0\nRot2: 0\nRot3: 0\n'
        "Wavelength: 1.3e-10\n"
    )
    azav = {"type": "azav", "poni": str(poni), "bins": 10}
    cfg = write(tmp_path, config(tmp_path, detectors={"cam": dict(CAM, functions=[azav])}))
    rc, err = run_cli(capsys, "run", cfg, "--backend", "numpy", "--quiet")
    assert rc == 2 and "Distance is nan" in err and str(poni) in err, err
    assert not (tmp_path / "out.h5").exists()


# ---- 9: constants files are validated like configs ----------------------------------------------


def constants_file(path, **datasets):
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            if isinstance(v, str) and v == "group":
                f.create_group(k)
            else:
                f[k] = v
    return path


@pytest.mark.parametrize(
    "det_type, datasets, message",
    [
        (
            "camera",
            {"pedestal": np.zeros((1, 4, 4), np.float32), "gain": -np.ones((1, 4, 4), np.float32)},
            "'gain' is -1 at",
        ),
        (
            "camera",
            {"pedestal": np.zeros((1, 4, 4), np.float32), "noise": np.full((1, 4, 4), -2, np.float32)},
            "'noise' is -2 at",
        ),
        ("camera", {"pedestal": "group"}, "'pedestal' is a group, not a dataset"),
        (
            "jungfrau",
            {"pedestals": np.zeros((3, 1, 4, 4), np.float32)},
            "unknown dataset 'pedestals' (did you mean 'pedestal'?)",
        ),
        ("camera", {"pedestals": np.zeros((1, 4, 4), np.float32)}, "unknown dataset 'pedestals'"),
        ("camera", {}, "is empty"),
        ("camera", {"pedestal": np.array([b"a", b"b"])}, "not numbers"),
        ("camera", {"pedestal": np.zeros((1, 4, 4), np.float32), "status": np.full((1, 4, 4), 0.5)}, "whole numbers"),
    ],
)
def test_09_bad_constants_files_are_refused(tmp_path, det_type, datasets, message):
    path = constants_file(tmp_path / "k.h5", **datasets)
    with pytest.raises(
        ConstantsError, match="detector det1: .*" + message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")
    ):
        load_constants(path, "det1", get_model(det_type), (1, 4, 4) if det_type == "camera" else (1, 4, 4))


def test_09_a_bad_constants_file_stops_the_run_with_exit_2(tmp_path, capsys):
    k = constants_file(tmp_path / "k.h5", pedestals=np.zeros((1, 16, 16), np.float32))
    cfg = write(tmp_path, config(tmp_path, detectors={"cam": dict(CAM, constants=str(k))}))
    rc, err = run_cli(capsys, "run", cfg, "--backend", "numpy", "--quiet")
    assert rc == 2 and "detector cam" in err and "'pedestals'" in err, err


# ---- 10: silent defaults are said once ----------------------------------------------------------


def raw_file(path, n=4, shape=(16, 16)):
    with h5py.File(path, "w") as f:
        f["cam/raw"] = np.random.default_rng(0).integers(0, 100, (n, *shape)).astype(np.uint16)
    return path


def test_10_no_constants_and_no_pixel_size_are_warned_naming_the_detector(tmp_path, capsys, caplog):
    raw = raw_file(tmp_path / "raw.h5")
    cam = dict(CAM, dataset="/cam/raw", functions=[dict(AZAV)])
    cfg = write(tmp_path, config(tmp_path, source={"type": "hdf5", "path": str(raw)}, detectors={"cam": cam}))
    with caplog.at_level("WARNING"):
        rc, err = run_cli(capsys, "run", cfg, "--backend", "numpy", "--quiet")
    assert rc == 0, err
    text = [r.getMessage() for r in caplog.records]
    assert sum("detector cam: no constants file: pedestal 0" in t for t in text) == 1, text
    assert sum("detector cam: no pixel_um" in t and "azav takes 1 um pixels" in t for t in text) == 1, text
    caplog.clear()
    cam = dict(cam, pixel_um=50.0)
    with caplog.at_level("WARNING"):
        main(
            [
                "run",
                str(
                    write(tmp_path, config(tmp_path, source={"type": "hdf5", "path": str(raw)}, detectors={"cam": cam}))
                ),
                "--backend",
                "numpy",
                "--quiet",
            ]
        )
    assert not any("pixel_um" in r.getMessage() for r in caplog.records)


# ---- 11: the function tree is validated by what each parent passes on ----------------------------

DROPLET = {"type": "droplet", "threshold": 5.0, "use_rms": False}


@pytest.mark.parametrize(
    "functions, where, message",
    [
        (
            [{"type": "roi", "bounds": [[0, 8], [0, 8]], "children": [{"type": "photons", "adu_per_photon": 10.0}]}],
            "functions[0].children[0].type",
            "photons cannot work under roi, which passes on image",
        ),
        ([{"type": "photons", "adu_per_photon": 10.0}], "functions[0].type", "photons cannot work at the top level"),
    ],
)
def test_11_children_must_take_what_their_parent_passes(tmp_path, functions, where, message):
    cfg = config(tmp_path, detectors={"cam": dict(CAM, functions=functions)})
    with pytest.raises(ConfigError, match=rf"detectors\.cam\.{re.escape(where)}: {message}"):
        validate_config(cfg)


def test_11_what_fits_still_validates(tmp_path):
    kids = [
        dict(DROPLET, children=[{"type": "photons", "adu_per_photon": 10.0}]),
        {"type": "roi", "bounds": [[0, 8], [0, 8]], "children": [dict(DROPLET, name="d2")]},
    ]
    validate_config(config(tmp_path, detectors={"cam": dict(CAM, functions=kids)}))


def test_11_image_functions_under_droplet_work_on_the_droplet_image(tmp_path, capsys):
    """droplet passes on droplets and the droplet image: a projection (and a roi, and photons beside them)
    under droplet validates, and computes the projection of the droplet image, i.e. the calibrated values at
    the pixels of the droplets kept (after thres_adu), 0 elsewhere: checked against scipy's labels."""
    from scipy import ndimage

    raw = raw_file(tmp_path / "raw.h5", n=6)  # camera, no constants: calibrated = raw where the mask keeps it
    drop = dict(
        DROPLET,
        threshold=80.0,
        thres_adu=150.0,
        children=[
            {"type": "projection", "axis": -1},
            {"type": "projection", "axis": 0},
            {"type": "roi", "name": "r", "bounds": [[2, 10], [3, 12]], "children": [{"type": "projection", "axis": 1}]},
            {"type": "photons", "adu_per_photon": 50.0},
        ],
    )
    cam = dict(CAM, dataset="/cam/raw", functions=[drop])
    cfg = write(tmp_path, config(tmp_path, source={"type": "hdf5", "path": str(raw)}, detectors={"cam": cam}))
    validate_config(yaml.safe_load(cfg.read_text()))
    rc, err = run_cli(capsys, "run", cfg, "--backend", "numpy", "--quiet")
    assert rc == 0, err
    with h5py.File(tmp_path / "out.h5", "r") as f, h5py.File(raw, "r") as r:
        mask = f["UserDataCfg/cam/mask"][()].reshape(16, 16) != 0
        cal = np.where(mask, r["cam/raw"][()].astype(np.float64), 0.0)
        image = np.zeros_like(cal)
        for e in range(len(cal)):
            lab, n = ndimage.label(mask & (cal[e] >= 80))
            total = ndimage.sum_labels(cal[e], lab, np.arange(1, n + 1))
            keep = np.isin(lab, 1 + np.flatnonzero(total >= 150))
            image[e] = np.where(keep, cal[e], 0)
        assert (image > 0).any() and ((cal >= 80) & (image == 0)).any()  # some droplets vetoed, some kept
        np.testing.assert_allclose(f["cam/droplet_pj_ax_1_data"][()], image.sum(axis=(1, 2)), rtol=1e-6)
        np.testing.assert_allclose(f["cam/droplet_pj_ax_0_data"][()], image.sum(axis=1), rtol=1e-6)
        np.testing.assert_allclose(f["cam/droplet_r_sum"][()], image[:, 2:10, 3:12].sum(axis=(1, 2)), rtol=1e-6)
        np.testing.assert_allclose(f["cam/droplet_r_pj_ax_1_data"][()], image[:, 2:10, 3:12].sum(axis=2), rtol=1e-6)
        assert f["cam/droplet_photons_nPhotons"][()].sum() > 0


# ---- 12: names are identifiers -----------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["Sums", "UserDataCfg", "timestamp", "event_index", "a/b", "..", "", "a\nb", "1cam", "cam.0", "ca m"]
)
def test_12_detector_names_are_identifiers_and_not_reserved(tmp_path, name):
    with pytest.raises(
        ConfigError, match=r"config: detectors\..*: detector name .* (is not an identifier|is reserved)"
    ):
        validate_config(config(tmp_path, detectors={name: dict(CAM)}))


@pytest.mark.parametrize("name", ["a/b", "..", "", "x\ny", "roi.1", "roi-1", "2roi"])
def test_12_function_names_are_identifiers(tmp_path, name):
    cam = dict(CAM, functions=[{"type": "roi", "name": name, "bounds": [[0, 8], [0, 8]]}])
    with pytest.raises(ConfigError, match=r"functions\[0\]\.name: function name .* is not an identifier"):
        validate_config(config(tmp_path, detectors={"cam": cam}))


def test_12_identifiers_pass(tmp_path):
    cam = dict(CAM, functions=[{"type": "roi", "name": "roi_A1", "bounds": [[0, 8], [0, 8]]}])
    validate_config(config(tmp_path, detectors={"epix10k2M_1": cam, "_cam": dict(CAM)}))


# ---- 16: what cannot fit is refused at set-up, naming the key ---------------------------------------


@pytest.mark.parametrize(
    "change, key",
    [
        (
            dict(
                source={"type": "sim", "events": 10**12},
                batch_size=10**9,
                detectors={"cam": dict(CAM, shape=[512, 512])},
            ),
            "batch_size",
        ),
        (dict(detectors={"cam": dict(CAM, shape=[10**6, 10**6])}), "detectors.cam.shape"),
        (
            dict(
                source={"type": "sim", "events": 10**9},
                batch_size=1 << 16,
                detectors={"cam": dict(CAM, functions=[dict(DROPLET, max_droplets=1 << 22)])},
            ),
            "detectors.cam.functions[0]",
        ),
    ],
)
def test_16_runs_that_cannot_fit_are_refused_before_the_first_event(tmp_path, capsys, change, key):
    cfg = write(tmp_path, config(tmp_path, **change))
    rc, err = run_cli(capsys, "run", cfg, "--backend", "numpy", "--quiet")
    assert rc == 2 and f"error: {key}: " in err and "GiB" in err, err
    assert not (tmp_path / "out.h5").exists()


@pytest.mark.parametrize(
    "function, key",
    [
        (dict(DROPLET, max_droplets=10**9), "max_droplets"),
        (dict(AZAV, bins=10**9), "bins"),
        (dict(DROPLET, children=[{"type": "photons", "adu_per_photon": 1.0, "max_photons": 10**9}]), "max_photons"),
    ],
)
def test_16_padded_lengths_and_bins_have_a_ceiling(tmp_path, function, key):
    with pytest.raises(ConfigError, match=key):
        validate_config(config(tmp_path, detectors={"cam": dict(CAM, functions=[function])}))


def test_16_a_bin_width_that_makes_too_many_bins_is_refused(tmp_path, capsys):
    azav = {k: v for k, v in AZAV.items() if k != "bins"} | {"bin_width": 1e-12}
    cfg = write(tmp_path, config(tmp_path, detectors={"cam": dict(CAM, functions=[azav])}))
    rc, err = run_cli(capsys, "run", cfg, "--backend", "numpy", "--quiet")
    assert rc == 2 and "bin_width 1e-12" in err, err


def test_16_a_batch_larger_than_the_run_is_clamped(tmp_path, capsys):
    cfg = write(tmp_path, config(tmp_path, batch_size=10**9))
    rc, err = run_cli(capsys, "run", cfg, "--backend", "numpy", "--quiet")
    assert rc == 0, err
    with h5py.File(tmp_path / "out.h5") as f:
        assert f["cam/roi_sum"].shape == (4,)


# ---- 17: a config that is not text ---------------------------------------------------------------


@pytest.mark.parametrize(
    "data", [b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "source: {type: sim}\n".encode("utf-16"), b"source:\x00 {}"]
)
@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_17_binary_or_utf16_configs_exit_2(tmp_path, capsys, data, suffix):
    path = tmp_path / f"c{suffix}"
    path.write_bytes(data)
    rc, err = run_cli(capsys, "run", path, "--quiet")
    assert rc == 2 and "not a YAML/TOML text file" in err, err


# ---- 18: no hang, no traceback ---------------------------------------------------------------------


def test_18_inspect_into_a_closed_pipe_is_quiet(tmp_path, capsys):
    cfg = write(tmp_path, config(tmp_path, detectors={f"cam{i}": dict(CAM) for i in range(40)}))
    assert run_cli(capsys, "run", cfg, "--backend", "numpy", "--quiet")[0] == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpusmall", "inspect", str(tmp_path / "out.h5")],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # as `| head` does once it has read enough
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


def have_mpi():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return shutil.which("mpiexec") is not None


@pytest.mark.mpi
@pytest.mark.skipif(not have_mpi(), reason="mpiexec or mpi4py missing")
def test_18_an_input_named_like_a_part_stops_every_rank_at_once(tmp_path):
    raw = raw_file(tmp_path / "out.part1.h5")  # rank 1's part would overwrite the source
    cfg = write(
        tmp_path,
        config(tmp_path, source={"type": "hdf5", "path": str(raw)}, detectors={"cam": dict(CAM, dataset="/cam/raw")}),
    )
    e = env()
    e["GPUSMALL_BARRIER_TIMEOUT"] = "120"
    t0 = time.monotonic()
    p = subprocess.run(
        ["mpiexec", "-n", "2", sys.executable, "-m", "gpusmall", "run", str(cfg), "--quiet"],
        env=e,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert time.monotonic() - t0 < 60
    assert p.returncode == 2 and "source.path" in p.stderr and "out.part1.h5" in p.stderr, p.stderr
    with h5py.File(raw) as f:
        assert f["cam/raw"].shape == (4, 16, 16)
    assert not (tmp_path / "out.h5").exists()


# ---- the config loader never gives a traceback ----------------------------------------------------


def test_a_valid_config_still_loads(tmp_path):
    cfg = load_config(write(tmp_path, config(tmp_path)))
    assert cfg.batch_size == 2 and math.isfinite(cfg.source.events)


def test_02_merge_refuses_an_output_a_run_is_writing(tmp_path, capsys):
    from gpusmall.producer.lock import OutputLock

    for r in range(2):  # two parts of an interrupted MPI run
        cfg = write(tmp_path, config(tmp_path, output=str(tmp_path / f"m.part{r}.h5")), f"p{r}.yaml")
        assert run_cli(capsys, "run", cfg, "--backend", "numpy", "--quiet")[0] == 0
    with OutputLock(tmp_path / "m.h5"):  # as a run writing m.h5 holds it
        rc, err = run_cli(capsys, "merge", tmp_path / "m.h5")
        assert rc == 2 and "being written by another gpusmall run" in err, err
    assert not (tmp_path / "m.h5").exists()
    rc, err = run_cli(capsys, "merge", tmp_path / "m.h5")
    assert rc == 0, err


# ---- every output command overwrites only what gpusmall wrote, of its own kind (a new user's trial) ------


def foreign_files(tmp_path):
    """A config, a text file, a foreign HDF5 file and a PNG that gpusmall did not write."""
    cfg_like = tmp_path / "other.yaml"
    cfg_like.write_text("source: {type: sim}\n")
    text = tmp_path / "notes.h5"
    text.write_text("my notes\n")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["data"] = np.arange(3)
    png = tmp_path / "photo.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    return [cfg_like, text, foreign, png]


def test_darks_avimage_cube_plot_never_overwrite_a_file_gpusmall_did_not_write(tmp_path, capsys):
    cfg = write(tmp_path, config(tmp_path))
    assert run_cli(capsys, "run", cfg, "--backend", "numpy", "--quiet")[0] == 0
    result = tmp_path / "out.h5"
    files = foreign_files(tmp_path) + [result]  # a run's result is not a constants file, average or cube
    for target in files:
        before = target.read_bytes()
        for argv in (
            ["darks", cfg, "--out", target, "--events", "2", "--backend", "numpy"],
            ["avimage", cfg, "--events", "2", "--png", tmp_path / "a.png", "--out", target, "--backend", "numpy"],
            ["cube", result, "--by", "cam/roi_sum", "--bins", "2", "--out", target],
        ):
            if target == result and argv[0] == "cube":
                continue  # cube refuses its own input (tested elsewhere)
            rc, err = run_cli(capsys, *argv)
            assert rc == 2 and "gpusmall overwrites only files it wrote" in err, (argv, err)
            assert target.read_bytes() == before, argv
        if target.suffix == ".png" or target == result:
            rc, err = run_cli(capsys, "plot", result, "cam/roi_sum", "--png", target)
            assert rc == 2 and target.read_bytes() == before, err
    # what they wrote themselves they may write again
    for argv in (
        ["darks", cfg, "--out", tmp_path / "k.h5", "--events", "2", "--backend", "numpy"],
        [
            "avimage",
            cfg,
            "--events",
            "2",
            "--png",
            tmp_path / "a.png",
            "--out",
            tmp_path / "av.h5",
            "--backend",
            "numpy",
        ],
        ["cube", result, "--by", "cam/roi_sum", "--bins", "2", "--out", tmp_path / "c.h5"],
        ["plot", result, "cam/roi_sum", "--png", tmp_path / "p.png"],
    ):
        for _ in range(2):
            rc, err = run_cli(capsys, *argv)
            assert rc == 0, (argv, err)


def test_a_single_rank_run_removes_the_parts_of_an_earlier_mpi_run_of_its_output(tmp_path, capsys):
    from test_mpi import FakeComm, cam_config, run_inproc

    from gpusmall.io.master import part_path

    data = cam_config(tmp_path, out="m.h5")
    for r in (1, 0):
        run_inproc(data, tmp_path, comm=FakeComm(r, 2))
    assert part_path(tmp_path / "m.h5", 1).exists()
    keep = tmp_path / "m.partner.h5"
    keep.write_text("not a part")
    run_inproc(data, tmp_path)
    assert not part_path(tmp_path / "m.h5", 0).exists() and not part_path(tmp_path / "m.h5", 1).exists()
    assert keep.read_text() == "not a part"


def test_inspect_lists_hard_links_too(tmp_path, capsys):
    out = tmp_path / "o.h5"
    with h5py.File(out, "w") as f:
        f.attrs["gpusmall_version"] = "0"
        f["det/droplet_data"] = np.zeros(3, np.float32)
        f["det/var_droplet_sparse/data"] = f["det/droplet_data"]  # an alias, as smalldata_tools names it
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "var_droplet_sparse/" in text and text.count("(3,)") == 2, text


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["source"].update(evnts=3), "source.evnts: unknown key (did you mean 'events'?)"),
        (
            lambda c: c["detectors"]["cam"]["functions"][0].update(thres_adux=3.0),
            "detectors.cam.functions[0].thres_adux: unknown key (did you mean 'thres_adu'?)",
        ),
        (lambda c: c["detectors"]["cam"].update(zzz=1), "detectors.cam.zzz: unknown key"),
    ],
)
def test_a_misspelt_key_gets_the_closest_name(tmp_path, change, message):
    cfg = config(tmp_path)
    change(cfg)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert str(err.value) == f"config: {message}"
