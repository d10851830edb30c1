"""psana's exp/run mode and its own MPI event distribution, on the real XTC2 files (issue 6).

psana distributes events over MPI ranks only for an experiment folder (``exp``, ``run``,
``psana: {dir: ...}``) whose ``xtc/smalldata/`` holds the small-data index of each stream. The
fixture builds such a folder from a test file with psana's own ``smdwriter``. Then
``mpiexec -n 3`` (one rank reads small data, one builds events, one reduces) and ``mpiexec -n 4``
with one event per psana batch (two reducing ranks that receive interleaved events) must give the same
file as one rank. Skipped without psana, smdwriter, mpiexec or the files.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

psana = pytest.importorskip("psana")

from test_mpi import assert_same, env, have_mpi  # noqa: E402
from test_psana import FILES, make_constants, psana_frames, xtc  # noqa: E402

from gpusmall.cli import main  # noqa: E402
from gpusmall.detectors.constants import Constants  # noqa: E402
from gpusmall.producer.config import validate_config  # noqa: E402
from gpusmall.sources import open_source  # noqa: E402

#: psana detector -> (experiment, run) recorded in the test file
EXP_RUN = {"jungfrau": ("mfx101332224", 7), "epixquad": ("ueddaq02", 109)}


def smdwriter() -> str | None:
    found = shutil.which("smdwriter")
    if found:
        return found
    cand = Path(psana.__file__).resolve().parents[1] / "bin" / "smdwriter"
    return str(cand) if cand.is_file() else None


@pytest.fixture(scope="module")
def exp_dirs(data_dir, tmp_path_factory):
    """det -> an experiment folder ``<dir>/xtc/<exp>-r<run>-s000-c000.xtc2`` plus its small data."""
    tool = smdwriter()
    if tool is None:
        pytest.skip("psana's smdwriter is not installed")
    out = {}
    for det, (exp, run) in EXP_RUN.items():
        src = xtc(data_dir, det)
        root = tmp_path_factory.mktemp(f"exp_{det}")
        (root / "xtc" / "smalldata").mkdir(parents=True)
        name = f"{exp}-r{run:04d}-s000-c000"
        big = root / "xtc" / f"{name}.xtc2"
        shutil.copyfile(src, big)
        subprocess.run([tool, "-f", str(big)], cwd=root, check=True, capture_output=True, timeout=60)
        (root / "smd.xtc2").rename(root / "xtc" / "smalldata" / f"{name}.smd.xtc2")
        out[det] = root / "xtc"
    return out


def exp_source(det, xtc_dir, **psana_kw):
    exp, run = EXP_RUN[det]
    return {
        "type": "psana",
        "exp": exp,
        "run": run,
        "psana": {"skip_calib_load": "all", "dir": str(xtc_dir), **psana_kw},
    }


@pytest.mark.parametrize("det", list(FILES))
def test_exp_run_reads_what_files_reads(data_dir, exp_dirs, det):
    """exp/run/dir (offline: psana's file database is out of reach) delivers the same events as files."""
    ts, frames = psana_frames(xtc(data_dir, det), det)
    cfg = validate_config(
        {
            "source": exp_source(det, exp_dirs[det]),
            "detectors": {det: {"type": FILES[det][1], "constants": "unused.h5"}},
        }
    )
    with open_source(cfg) as src:
        assert not src.distributed  # one process: psana reads serially
        batches = list(src.batches(1, 0, None))
    np.testing.assert_array_equal(np.concatenate([b.timestamp for b in batches]), ts)
    np.testing.assert_array_equal(np.concatenate([b.raw[det] for b in batches]), frames)


def test_relative_dir_follows_the_config(tmp_path):
    cfg = validate_config(
        {
            "source": {"type": "psana", "exp": "xpptut15", "run": 1, "psana": {"dir": "exp/xtc"}},
            "detectors": {"jf": {"type": "jungfrau"}},
        },
        base_dir=tmp_path,
    )
    assert cfg.source.psana["dir"] == str(tmp_path / "exp" / "xtc")


def write_run(tmp_path, det, source, out):
    frames = psana_frames(Path(source["_file"]), det)[1]
    peds, gain = make_constants(det, frames, "random")
    Constants(pedestal=peds, gain=gain).save(tmp_path / f"{det}_const.h5")
    src = {k: v for k, v in source.items() if k != "_file"}
    cfg = {
        "source": src,
        "batch_size": 1,
        "backend": "numpy",
        "output": out,
        "detectors": {
            det: {
                "type": FILES[det][1],
                "constants": f"{det}_const.h5",
                "units": "adu",
                "common_mode": {"type": "none"},
                "functions": [
                    {
                        "type": "roi",
                        "name": "roi0",
                        "bounds": [[0, 1], [10, 60], [20, 120]],
                        "children": [{"type": "projection", "axis": -1}],
                    },
                    {"type": "rebin", "shape": [16, 32]},
                ],
                "sums": ["calib", "max"],
            }
        },
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def gpusmall_run(cfg_path, ranks=1, extra_env=None):
    e = env()
    e.update(extra_env or {})
    cmd = [sys.executable, "-m", "gpusmall", "run", str(cfg_path), "--quiet"]
    if ranks > 1:
        cmd = ["mpiexec", "-n", str(ranks)] + cmd
    return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=240)


@pytest.mark.skipif(have_mpi() is not None, reason=f"MPI: {have_mpi()}")
# 3 ranks (the fewest: one of each role) and 4 with interleaved events, on both detectors between them;
# (JUNGFRAU, 20 s or more each on 2 cores, in the slow run)
@pytest.mark.parametrize(
    "det,ranks,psana_batch",
    [
        pytest.param("jungfrau", 3, None, marks=pytest.mark.slow),
        pytest.param("jungfrau", 4, 1, marks=pytest.mark.slow),
        ("epixquad", 3, None),
    ],
)
def test_psana_mpi_distribution_equals_one_rank(data_dir, exp_dirs, tmp_path, det, ranks, psana_batch):
    """mpiexec -n 3 / -n 4 (psana's distribution; with one event per psana batch the two reducing ranks
    get interleaved events) == 1 rank, dataset for dataset; the master's per-event datasets are virtual."""
    path = xtc(data_dir, det)
    src = exp_source(det, exp_dirs[det], **({"batch_size": psana_batch} if psana_batch else {}))
    one = write_run(tmp_path, det, {**src, "_file": str(path)}, "one.h5")
    # the one-rank reference in this process (psana is imported already): a subprocess would import it again
    assert main(["run", str(one), "--quiet"]) == 0
    many = write_run(tmp_path, det, {**src, "_file": str(path)}, "many.h5")
    extra = {"PS_SMD_N_EVENTS": "1"} if psana_batch else {}
    r = gpusmall_run(many, ranks, extra)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same(tmp_path / "one.h5", tmp_path / "many.h5", sums_rtol=1e-6)
    with h5py.File(tmp_path / "many.h5", "r") as f:
        assert f["timestamp"].is_virtual and f[f"{det}/roi0_sum"].is_virtual
        assert f.attrs["events"] == 2 and f.attrs["ranks"] == ranks
    counts = []
    for k in range(ranks):  # a part without events has no per-event datasets
        with h5py.File(tmp_path / f"many.part{k}.h5", "r") as p:
            counts.append(p["timestamp"].shape[0] if "timestamp" in p else 0)
    assert counts[:2] == [0, 0] and sum(counts) == 2  # smd0 and eb ranks receive no events
    # with one event per psana batch the two reducing ranks usually get one event each (psana hands
    # batches to whichever rank asks first, so under load one rank may get both); the timestamp
    # ordering of interleaved parts is also checked directly in test_mpi.test_master_segments_follow_timestamps


@pytest.mark.skipif(have_mpi() is not None, reason=f"MPI: {have_mpi()}")
def test_two_ranks_is_a_clear_error(data_dir, exp_dirs, tmp_path):
    """psana's distribution needs 3 ranks: 2 stop with exit 2 and a message, before any file is written."""
    cfg = write_run(
        tmp_path,
        "jungfrau",
        {**exp_source("jungfrau", exp_dirs["jungfrau"]), "_file": str(xtc(data_dir, "jungfrau"))},
        "two.h5",
    )
    r = gpusmall_run(cfg, 2)
    assert r.returncode == 2, r.stderr
    assert "at least 3" in r.stderr and "got 2" in r.stderr
    assert not list(tmp_path.glob("two*.h5"))
