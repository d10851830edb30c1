"""``gpusmall run --follow``: reduce an HDF5 run while another process is still writing it (SWMR).

A writer subprocess appends simulated camera events in bursts; the follower's result must equal a
normal run over the finished file, event for event.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest
from test_mpi import assert_same, env

from gpusmall.backend import Backend
from gpusmall.errors import ConfigError
from gpusmall.producer.config import validate_config
from gpusmall.producer.mpi import Comm
from gpusmall.producer.run import reduce_run
from gpusmall.sources import open_source

WRITER = textwrap.dedent("""
    import sys, time
    import h5py, numpy as np
    path, n, burst, pause = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    rng = np.random.default_rng(5)
    with h5py.File(path, "w", libver="latest") as f:
        raw = f.create_dataset("cam/raw", (0, 32, 48), np.uint16, maxshape=(None, 32, 48), chunks=(4, 32, 48))
        ts = f.create_dataset("timestamp", (0,), np.uint64, maxshape=(None,), chunks=(64,))
        f.swmr_mode = True
        print("ready", flush=True)
        for b in range(0, n, burst):
            k = min(burst, n - b)
            raw.resize(b + k, axis=0)
            raw[b:b + k] = rng.poisson(20, (k, 32, 48)).astype(np.uint16)
            raw.flush()
            ts.resize(b + k, axis=0)      # timestamps last: an event counts once both hold it
            ts[b:b + k] = 1000 + np.arange(b, b + k, dtype=np.uint64) * 7
            ts.flush()
            time.sleep(pause)
""")


def config(tmp_path, raw_path, out, **source):
    return validate_config(
        {
            "source": {"type": "hdf5", "path": str(raw_path), **source},
            "batch_size": 8,
            "backend": "numpy",
            "output": str(tmp_path / out),
            "detectors": {
                "cam": {
                    "type": "camera",
                    "shape": [32, 48],
                    "dataset": "cam/raw",
                    "functions": [
                        {"type": "roi", "name": "roi0", "bounds": [[0, 1], [2, 20], [3, 40]]},
                        {"type": "rebin", "shape": [8, 12]},
                    ],
                    "sums": ["calib", "max"],
                }
            },
        }
    )


def test_follow_reduces_a_run_being_written(tmp_path):
    raw_path = tmp_path / "live.h5"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(raw_path), "61", "5", "0.15"], stdout=subprocess.PIPE, text=True, env=env()
    )
    try:
        assert writer.stdout.readline().strip() == "ready"
        t0 = time.monotonic()
        s = reduce_run(
            config(tmp_path, raw_path, "follow.h5", follow=True, follow_timeout_s=1.5),
            Backend("numpy"),
            quiet=True,
            comm=Comm(),
        )
        waited = time.monotonic() - t0
    finally:
        writer.wait(timeout=60)
    assert writer.returncode == 0
    assert s.events == 61 and not s.interrupted
    assert waited > 61 / 5 * 0.15  # it did wait for the writer
    ref = reduce_run(config(tmp_path, raw_path, "ref.h5"), Backend("numpy"), quiet=True, comm=Comm())
    assert ref.events == 61
    assert_same(tmp_path / "ref.h5", tmp_path / "follow.h5")
    with h5py.File(tmp_path / "follow.h5") as f:
        np.testing.assert_array_equal(f["timestamp"][()], 1000 + np.arange(61, dtype=np.uint64) * 7)


def test_follow_respects_events_limit_and_stop(tmp_path):
    raw_path = tmp_path / "done.h5"
    with h5py.File(raw_path, "w") as f:
        f["cam/raw"] = np.ones((10, 32, 48), np.uint16)
    cfg = config(tmp_path, raw_path, "x.h5", follow=True, follow_timeout_s=30)
    with open_source(cfg) as src:
        assert src.n_events is None
        src.should_stop = lambda: True  # a stop ends the wait at once with what is there
        t0 = time.monotonic()
        b = src.read(8, 16)
        assert time.monotonic() - t0 < 5 and len(b) == 2
        np.testing.assert_array_equal(b.event_index, [8, 9])
    cfg = config(tmp_path, raw_path, "x.h5", follow=True, follow_timeout_s=0.2, events=4)
    with open_source(cfg) as src:
        assert len(src.read(0, 8)) == 4 and len(src.read(4, 8)) == 0


def test_follow_is_refused_for_a_simulated_run():
    with pytest.raises(ConfigError, match="follow"):
        validate_config(
            {
                "source": {"type": "sim", "events": 4, "follow": True},
                "detectors": {"cam": {"type": "camera", "shape": [8, 8]}},
            }
        )


def test_cli_follow_on_sim_is_exit_2(tmp_path, capsys):
    import yaml

    from gpusmall.cli import main

    p = tmp_path / "sim.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "source": {"type": "sim", "events": 4},
                "output": str(tmp_path / "o.h5"),
                "detectors": {"cam": {"type": "camera", "shape": [8, 8]}},
            }
        )
    )
    assert main(["run", str(p), "--follow", "--quiet"]) == 2
    assert "--follow" in capsys.readouterr().err and not (tmp_path / "o.h5").exists()


def test_result_file_can_be_read_while_the_run_writes_it(tmp_path):
    """Near-real-time: the result file is in SWMR mode after its first batch, so `inspect`, `plot` or a
    notebook can read the events reduced so far while the run goes on."""
    import signal

    import yaml

    from gpusmall.io.writer import open_result

    cfg = {
        "source": {"type": "sim", "events": 100000, "seed": 1},
        "batch_size": 8,
        "backend": "numpy",
        "output": str(tmp_path / "live_out.h5"),
        "detectors": {
            "cam": {
                "type": "camera",
                "shape": [64, 64],
                "functions": [{"type": "roi", "name": "roi0", "bounds": [[0, 1], [0, 32], [0, 32]]}],
                "sums": ["calib"],
            }
        },
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpusmall", "run", str(tmp_path / "c.yaml"), "--quiet"],
        env=env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = []
    try:
        t_end = time.monotonic() + 120
        while time.monotonic() < t_end and len(seen) < 2:
            time.sleep(0.2)
            try:
                with open_result(tmp_path / "live_out.h5") as f:
                    if "cam/roi0_sum" not in f:
                        continue
                    n = min(f["timestamp"].shape[0], f["cam/roi0_sum"].shape[0])
                    if n and (not seen or n > seen[-1][0]):
                        seen.append((n, f["event_index"][:n], f["cam/roi0_sum"][:n]))
            except OSError:  # created but not yet in SWMR mode (before the first batch)
                continue
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert len(seen) >= 2, err  # read twice while running, the second time with more events
    for n, idx, roi in seen:
        np.testing.assert_array_equal(idx, np.arange(n))
        assert np.isfinite(roi).all()
    with h5py.File(tmp_path / "live_out.h5") as f:  # the final file has what was read, and its sums
        np.testing.assert_array_equal(f["cam/roi0_sum"][: seen[-1][0]], seen[-1][2])
        assert f["Sums/cam_calib"].shape == (64, 64)  # a camera's sums: its 2-D shape
