"""Every file gpusmall writes is readable by HDF5 1.x (issue 14): h5py on HDF5 1.14, PyTables, h5dump.

h5py 3.16 is built on HDF5 2.0, whose ``libver="latest"`` stores booleans in a datatype message HDF5 1.14
cannot decode (h5py 3.14: "bad version number for datatype message"; PyTables 3.11 crashed; h5dump 1.10:
"internal error"). gpusmall writes the HDF5 1.10 format (:data:`gpusmall.io.writer.LIBVER`).

The files: a demo-like run (droplets, photons, azav, ROI with its area, run sums, damaged events), a
two-rank master (virtual datasets) with its parts, a constants file, an average image and a cube. A
subprocess reads every dataset and attribute of each with an h5py built on HDF5 1.14, installed apart
from the main environment (``$GPUSMALL_H5PY114``, default ``/tmp/gpusmall-h5py114``; ``.ci/run``
installs it with ``pip install --no-deps --target``), and the digests of what it read must equal those
the main h5py reads. Optional, each skipped with a reason where missing: PyTables
(``$GPUSMALL_TABLES``, default ``/tmp/gpusmall-tables``; also read as smalldata_tools' SmallDataAna lists
and shapes its keys) and ``h5dump`` of HDF5 1.x on the PATH (Debian's ``hdf5-tools``: 1.10).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_smalldata_layout import make_results, smalldata_config

from gpusmall.backend import Backend
from gpusmall.io.writer import LIBVER
from gpusmall.producer.config import validate_config

H5PY114 = Path(os.environ.get("GPUSMALL_H5PY114", "/tmp/gpusmall-h5py114"))
TABLES = Path(os.environ.get("GPUSMALL_TABLES", "/tmp/gpusmall-tables"))

# run by each interpreter: a digest of every attribute and dataset of each file (JSON on stdout)
READER = r"""
import hashlib, json, sys
import h5py, numpy as np

def digest(v):
    if isinstance(v, bytes):
        return "b:" + v.hex()
    if isinstance(v, str):
        return "s:" + v
    a = np.asarray(v)
    if a.dtype.kind == "O":
        return "o:" + repr([x.decode() if isinstance(x, bytes) else str(x) for x in a.ravel()])
    return f"{a.dtype.str}{a.shape}:" + hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()

out = {"hdf5": h5py.version.hdf5_version, "h5py": h5py.__version__, "files": {}}
for path in sys.argv[1:]:
    items = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            for k in obj.attrs:
                items[f"/{name}@{k}"] = digest(obj.attrs[k])
            if isinstance(obj, h5py.Dataset):
                items[f"/{name}"] = digest(obj[()])
        for k in f.attrs:
            items[f"/@{k}"] = digest(f.attrs[k])
        f.visititems(visit)
    out["files"][path] = items
print(json.dumps(out))
"""

# PyTables: every node readable (no UnImplemented leaf, no attribute it cannot type), and SmallDataAna's
# walk: keys down to /a/b/c with their shape, shape[0] of every /a/b leaf, its time axis from /event_time
TABLES_READER = r"""
import sys, warnings
import numpy as np
import tables
warnings.simplefilter("error")  # "problems loading leaf", "Unsupported type for attribute": failures
print(tables.hdf5_version)
for path in sys.argv[1:]:
    with tables.open_file(path, "r") as f:
        for node in f.walk_nodes("/"):
            for k in node._v_attrs._f_list("all"):
                assert getattr(node._v_attrs, k) is not None, (path, node._v_pathname, k)
            if isinstance(node, tables.UnImplemented):
                raise AssertionError(f"{path}: {node._v_pathname} is an UnImplemented node")
            if isinstance(node, tables.Leaf):
                node.read()
        if "event_time" not in f.root:
            continue
        for node in f.root._f_list_nodes():  # SmallDataAna.Keys and _addXarray
            if not isinstance(node, tables.group.Group):
                node.shape
                continue
            for leaf in node._f_list_nodes():
                if isinstance(leaf, tables.group.Group):
                    for sub in leaf._f_list_nodes():
                        f.get_node(leaf._v_pathname, sub.name).shape
                else:
                    f.get_node(node._v_pathname, leaf.name).shape[0]
        et = f.get_node("/event_time").read()
        sec, nsec = et >> 32, et - ((et >> 32) << 32)
        t = np.array([np.datetime64(int(s * 1e9 + n), "ns") for s, n in zip(sec, nsec)])
        assert (t > np.datetime64("2000-01-01")).all() and (t < np.datetime64("2100-01-01")).all(), path
        assert f.get_node("/fiducials").shape == et.shape
print("ok")
"""


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> list[Path]:
    """Every kind of file gpusmall writes, from one small run."""
    from gpusmall.analysis.avimage import average_image, write_average
    from gpusmall.analysis.cube import make_cube, write_cube
    from gpusmall.sources.sim import SimDetector

    tmp = tmp_path_factory.mktemp("compat")
    files = make_results(tmp)
    c = SimDetector("epix", "epix10ka", (1, 352, 384), seed=3).constants()
    c.mask = np.ones((1, 352, 384), bool)  # a boolean array: stored as uint8
    c.save(tmp / "constants.h5")
    av = average_image(
        validate_config(smalldata_config(tmp / "unused.h5"), base_dir=tmp), "epix", Backend("numpy"), events=4
    )
    write_average(av, tmp / "avimage.h5", attrs={"source_ok": True})
    write_cube(make_cube(files["single"], "epix/roi0_sum", 4), tmp / "cube.h5", source=str(files["single"]))
    return [*files.values(), tmp / "constants.h5", tmp / "avimage.h5", tmp / "cube.h5"]


def read_with(paths, pythonpath: Path | None, script: str = READER, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("HDF5_VDS_PREFIX", None)
    if pythonpath is not None:  # first on the path: its h5py (and numpy, if it has one) shadows the main ones
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run(
        [sys.executable, "-c", script, *map(str, paths)], env=env, capture_output=True, text=True, timeout=240, cwd=cwd
    )


def test_libver_is_hdf5_1_10_and_allows_swmr(tmp_path):
    import h5py

    assert LIBVER == ("v110", "v110")
    with h5py.File(tmp_path / "s.h5", "w", libver=LIBVER) as f:
        f.create_dataset("x", shape=(0,), maxshape=(None,), chunks=(4,), dtype="u8")
        f.swmr_mode = True  # needs superblock version 3: HDF5 1.10's format
        assert f.swmr_mode


@pytest.mark.skipif(
    not H5PY114.is_dir(),
    reason=f"no h5py on HDF5 1.14 in {H5PY114} ($GPUSMALL_H5PY114; .ci/run "
    f"installs it: pip install --no-deps --target {H5PY114} 'h5py==3.14.*')",
)
def test_h5py_on_hdf5_1_14_reads_every_dataset_and_attribute(written):
    old = read_with(written, H5PY114, cwd=Path(sys.prefix))
    assert old.returncode == 0, old.stderr[-3000:]
    new = read_with(written, None)
    assert new.returncode == 0, new.stderr[-3000:]
    old, new = json.loads(old.stdout), json.loads(new.stdout)
    assert old["hdf5"].startswith("1.14"), f"{H5PY114} holds h5py {old['h5py']} on HDF5 {old['hdf5']}, not 1.14"
    for path in map(str, written):
        assert len(new["files"][path]) > 0
        assert old["files"][path] == new["files"][path], path  # the same values: virtual datasets found their parts


@pytest.mark.skipif(
    not (TABLES / "tables").is_dir(),
    reason=f"no PyTables in {TABLES} ($GPUSMALL_TABLES; optional: pip install --target {TABLES} tables)",
)
def test_pytables_reads_every_node_as_smalldata_ana_does(written):
    r = read_with(written, TABLES, TABLES_READER, cwd=Path(sys.prefix))
    assert r.returncode == 0, f"rc {r.returncode}: {r.stdout[-1000:]} {r.stderr[-3000:]}"
    assert r.stdout.split()[-1] == "ok"


def _h5dump_version() -> str | None:
    exe = shutil.which("h5dump")
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"Version (\d+\.\d+\.\d+)", out)
    return m.group(1) if m else None


H5DUMP = _h5dump_version()


@pytest.mark.skipif(
    H5DUMP is None or not H5DUMP.startswith("1."),
    reason=f"no h5dump of HDF5 1.x on the PATH (found: {H5DUMP}; optional: apt-get install hdf5-tools)",
)
def test_h5dump_of_hdf5_1_x_reads_every_file(written):
    """Each file twice, one h5dump per file (with several files h5dump exits 0 when one fails): ``-A`` prints
    every object's header and every attribute's value; ``-b`` reads every dataset's data and writes it raw to
    /dev/null (``-b`` alone skips attribute values; text output of the data took 15 s and checks no more)."""
    for path in written:
        for how in (["-A"], ["-b", "LE", "-o", os.devnull]):
            r = subprocess.run(
                ["h5dump", *how, str(path)], capture_output=True, text=True, timeout=240, cwd=path.parent
            )
            assert r.returncode == 0 and "error" not in r.stderr.lower(), (
                f"h5dump {H5DUMP} {' '.join(how)} {path.name}: {r.stderr[-2000:]}"
            )
            assert f'HDF5 "{path}"' in r.stdout and "DATASET" in r.stdout, r.stdout[-2000:]
