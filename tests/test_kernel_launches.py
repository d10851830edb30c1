"""The CuPy code paths' kernel launches, checked on the CPU.

:class:`FakeGpu` is a backend with NumPy arrays that takes the CuPy branches (``is_gpu`` is True) and
hands out :class:`FakeKernel` objects instead of ``cupy.RawKernel``. The package launches every kernel
through its :class:`~gpusmall.kernel_specs.KernelSpec` (arguments by parameter name, scalars turned into
the exact C types, pointer dtypes and contiguity checked there); each launch that reaches the fake is
checked again against the kernel's signature parsed from ``kernels/*.cu``, as CuPy would pass it: the
argument count; every pointer argument an array of the exact dtype and C-contiguous (a kernel reads a
strided view as if it were contiguous); every scalar a NumPy scalar of the exact C type; grid, block and
dynamic shared-memory limits. The launch then runs the CUDA source itself compiled for the CPU
(``tests/cuda_cpu``: block threads as fibers meeting at ``__syncthreads``, run forward, in reverse or
shuffled so that a missing barrier shows; every array between guard zones, so a write outside it
fails), and the wrappers' results are compared with the NumPy backend, i.e. with each kernel's NumPy
twin (the spec's ``reference``).

What this cannot see: CUDA compilation (``test_kernels_compile.py``), warp-level behaviour and the GPU
memory model, timing, and reads outside an array (they read the guard zone's 0xFF bytes, NaN or -1,
which shows only through the results).
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import cuda_cpu
import numpy as np
import pytest
from fake_cupy import DeviceArray, unwrap
from helpers_funcs import make_ctx, make_frames, setup
from test_calibration import make_case

from gpusmall import kernel_specs
from gpusmall.backend import Backend, find_kernel_source
from gpusmall.calib import Calibrator
from gpusmall.calib.common_mode import MedianCommonMode
from gpusmall.detectors import get_model
from gpusmall.detectors.base import DetectorModel
from gpusmall.detectors.constants import Constants
from gpusmall.funcs.azav import Azav
from gpusmall.kernel_specs import POINTER_DTYPES, SCALAR_TYPES, KernelArgumentError, file_signatures

EPIX = get_model("epix10ka")
JF = get_model("jungfrau")
CAMERA = get_model("camera")
SMALL = DetectorModel(
    type="small",
    panel_shape=(8, 12),
    default_panels=2,
    data_mask=0x3FFF,
    gain_names=EPIX.gain_names,
    pixel_um=100.0,
    saturation=None,
    bank_shape=(4, 6),
    high_gain_ranges=EPIX.high_gain_ranges,
)

SHARED_LIMIT = 48 * 1024  # default dynamic shared memory per block without cudaFuncSetAttribute
ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p.name for p in (ROOT / "kernels").glob("*.cu"))


def kernels_used() -> set[tuple[str, str]]:
    """(file, kernel) pairs the package declares a :class:`~gpusmall.kernel_specs.KernelSpec` for (read from
    its source: the registry as the code spells it)."""
    found = set()
    for py in (ROOT / "gpusmall").rglob("*.py"):
        found |= set(re.findall(r'KernelSpec\(\s*"(\w+\.cu)",\s*"(\w+)"', py.read_text()))
    return found


# ---- the fake backend ------------------------------------------------------------------------------------
class FakeKernel:
    """A checked launch, then the kernel itself built for the CPU (tests/cuda_cpu), its threads run in
    ``order``."""

    def __init__(self, filename, name, launches, order="forward"):
        sigs = file_signatures(filename)
        assert name in sigs, f"{filename} has no kernel {name!r} (it has {sorted(sigs)})"
        self.name, self.sig, self.launches = name, sigs[name], launches
        self.cpu_kernel = cuda_cpu.build_file(find_kernel_source(filename)).kernel(name)
        self.order = order

    def __call__(self, grid, block, args, shared_mem=0, **kw):
        assert not kw, f"unexpected launch keywords {kw}"
        grid, block = tuple(grid), tuple(block)
        assert 1 <= len(grid) <= 3 and 1 <= len(block) <= 3
        assert all(isinstance(v, (int, np.integer)) and v >= 1 for v in grid + block), (grid, block)
        assert grid[0] < 2**31 and all(v <= 65535 for v in grid[1:]), f"grid {grid} over the CUDA limits"
        assert int(np.prod(block)) <= 1024, f"block {block} has more than 1024 threads"
        assert 0 <= shared_mem <= SHARED_LIMIT, f"{shared_mem} bytes of shared memory"
        assert len(args) == len(self.sig), f"{self.name}: {len(args)} arguments for {len(self.sig)} parameters"
        if any(isinstance(a, DeviceArray) for a in args):  # a backend under CuPy's rules: no host arrays
            for a, p in zip(args, self.sig):
                assert not p.pointer or isinstance(a, DeviceArray), f"{self.name}({p}): a host array passed to a kernel"
            args = tuple(unwrap(a) for a in args)
        for a, p in zip(args, self.sig):
            where = f"{self.name}({p})"
            if p.pointer:
                assert isinstance(a, np.ndarray), f"{where}: got {type(a).__name__}, not an array"
                assert a.dtype == p.dtype, f"{where}: array of {a.dtype}"
                assert a.flags.c_contiguous, f"{where}: array is not C-contiguous"
            else:
                assert isinstance(a, np.generic), (
                    f"{where}: got {type(a).__name__}; wrap it as np.{p.dtype.type.__name__}"
                )
                assert a.dtype == p.dtype, f"{where}: scalar of {a.dtype}"
        self.launches.append((self.name, grid, block, shared_mem))
        self.cpu_kernel(grid, block, args, shared_mem=shared_mem, order=self.order)


class FakeGpu(Backend):
    """NumPy arrays on the CuPy code paths (see the module docstring); the kernels are the CUDA sources
    built for the CPU (skips without g++), their threads run in ``order`` ("forward", "reverse",
    "shuffle"). ``kernels`` is "compiled" (the only kind left: the NumPy transcriptions this file once had
    are gone)."""

    def __init__(self, kernels="compiled", order="forward"):
        super().__init__("numpy")
        assert kernels == "compiled", kernels
        if cuda_cpu.compiler() is None:
            pytest.skip("no C++ compiler to run the CUDA kernels on the CPU")
        self.order = order
        self.description = "fake GPU (NumPy arrays, compiled kernels)"
        self.launches = []

    @property
    def is_gpu(self) -> bool:
        return True

    def to_host(self, a):
        return None if a is None else np.asarray(a)

    def pinned_empty(self, shape, dtype):
        return np.empty(shape, dtype)

    def synchronize(self) -> None:
        pass

    def kernel(self, filename, name, options=()):
        return FakeKernel(filename, name, self.launches, self.order)


# ---- tests -----------------------------------------------------------------------------------------------
def test_the_registry_is_every_kernel_the_package_declares_and_launches():
    """One declaration per kernel: the registry holds every KernelSpec of the package's source, each names
    a kernel its .cu declares and a NumPy twin that exists; every kernel of kernels/*.cu is launched; every
    parameter type is mapped; no launch goes around the specs (``backend.kernel(`` outside kernel_specs)."""
    reg = kernel_specs.registry()
    assert {(s.file, name) for name, s in reg.items()} == kernels_used()
    declared = {(f, name) for f in SOURCES for name in file_signatures(f)}
    assert declared == kernels_used(), "a kernel in kernels/*.cu nothing launches, or a spec of none"
    for spec in reg.values():
        assert callable(spec.reference_function()), spec
        for p in spec.params:
            assert p.ctype in (POINTER_DTYPES if p.pointer else SCALAR_TYPES), f"{spec.label}: {p} not mapped"
            assert p.name not in kernel_specs.RESERVED, f"{spec.label}: parameter {p} is a launch keyword"
        assert spec.sizes is not None, f"{spec.label}: no sizes (the elements it indexes in each array)"
        pointers = {p.name for p in spec.params if p.pointer}
        args = {p.name: 3 for p in spec.params if not p.pointer}
        assert set(spec.sizes(args)) == pointers, (
            f"{spec.label}: sizes of {sorted(spec.sizes(args))}, pointers {pointers}"
        )
    for py in (ROOT / "gpusmall").rglob("*.py"):
        if py.name not in ("kernel_specs.py", "backend.py"):
            assert not re.search(r"\.kernel\(", py.read_text()), f"{py}: a kernel launched around its KernelSpec"


@pytest.mark.parametrize("name", ["epix10ka", "jungfrau", "camera", "epix100", "cspad"])
def test_gain_table_decodes_as_the_model(rng, name):
    """The CUDA kernels' gain decoding, the model's table indexed by the raw word's gain bits and the pixel's
    configuration byte, gives the model's ``gain_index`` for any word and byte (invalid ranges too)."""
    for model in (get_model(name), get_model(name).with_invalid_ranges((0,))):
        words = rng.integers(0, 2**16, (3, 1, 1, 4096), dtype=np.uint16)
        for cfg in (None, rng.integers(0, 256, (1, 1, 4096), dtype=np.uint8)):
            table = model.gain_table(cfg is not None)
            assert table.dtype == np.int8 and table.shape == ((model.gain_bits + 1) * 256,)
            key = ((words.astype(np.int64) >> model.gain_shift) & model.gain_bits) << 8
            if cfg is not None:
                key = key | cfg[None]
            np.testing.assert_array_equal(table[key], model.gain_index(words, cfg))


def test_launch_orders_and_converts_the_named_arguments():
    gpu = FakeGpu()
    seen = []
    gpu.kernel = lambda f, n, o=(): lambda grid, block, args, shared_mem=0: seen.append((grid, block, args))
    from gpusmall.funcs.droplet import LABEL_UNION

    idx, parent = np.arange(3, dtype=np.int64), np.arange(3, dtype=np.int32)
    LABEL_UNION.launch(gpu, cols=5, rows=np.int64(4), m=3, parent=parent, idx=idx)
    grid, block, args = seen[0]
    assert grid == (1,) and block == (256,)
    assert args[0] is idx and args[1] is parent
    assert [type(a) for a in args[2:]] == [np.int64, np.int32, np.int32] and args[2:] == (3, 4, 5)
    with pytest.raises(KernelArgumentError, match=r"label_union\(parent: int \*\): array of int64, needs int32"):
        LABEL_UNION.launch(gpu, idx=idx, parent=idx, m=3, rows=4, cols=5)
    with pytest.raises(KernelArgumentError, match=r"label_union\(idx: long long \*\): array is not C-contiguous"):
        LABEL_UNION.launch(gpu, idx=np.arange(6)[::2], parent=parent, m=3, rows=4, cols=5)
    with pytest.raises(KernelArgumentError, match=r"missing \['cols'\], unknown \['col'\]"):
        LABEL_UNION.launch(gpu, idx=idx, parent=parent, m=3, rows=4, col=5)
    with pytest.raises(KernelArgumentError, match=r"rows: int\): 4294967296 does not fit int"):
        LABEL_UNION.launch(gpu, idx=idx, parent=parent, m=3, rows=2**32, cols=5)
    with pytest.raises(KernelArgumentError, match=r"cols: int\): got float, not an integer"):
        LABEL_UNION.launch(gpu, idx=idx, parent=parent, m=3, rows=4, cols=5.0)
    with pytest.raises(KernelArgumentError, match=r"label_union\(parent\): 3 elements, the kernel indexes 4"):
        LABEL_UNION.launch(gpu, idx=np.arange(4), parent=parent, m=4, rows=4, cols=5)
    assert len(seen) == 1


def test_to_device_gives_c_contiguous_arrays():
    b = Backend("numpy")
    f = np.asfortranarray(np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    d = b.to_device(f)
    assert d.flags.c_contiguous
    np.testing.assert_array_equal(d, f)
    c = np.zeros((2, 3))
    assert b.to_device(c) is c  # no copy when already C-ordered


def _case(rng, model, shape, with_config, fortran=False):
    ped, gain, raw, mask, cfg = make_case(rng, model, shape, with_config)
    if fortran:  # constants as a reader might hand them over: Fortran-ordered
        ped, gain, mask = np.asfortranarray(ped), np.asfortranarray(gain), np.asfortranarray(mask)
        cfg = None if cfg is None else np.asfortranarray(cfg)
    return Constants(pedestal=ped, gain=gain, config_bits=cfg), raw, mask


@pytest.mark.parametrize("units", ["adu", "photons"])
@pytest.mark.parametrize("model,with_config", [(EPIX, True), (EPIX, False), (JF, False), (CAMERA, False)])
def test_fused_calibration_kernel(rng, model, with_config, units):
    shape = (3, 2, 6, 10)
    consts, raw, mask = _case(rng, model, shape, with_config, fortran=True)
    gpu = FakeGpu()
    big = np.concatenate([raw, raw], axis=3)  # the wrapper gets a strided view and must copy it
    got = Calibrator(model, consts, mask, gpu, units=units, photon_energy_kev=9.5)(big[..., :10])
    want = Calibrator(model, consts, mask, Backend("numpy"), units=units, photon_energy_kev=9.5)(raw)
    assert [name for name, *_ in gpu.launches] == ["calibrate_u16"]
    np.testing.assert_array_equal(got.good, want.good)
    np.testing.assert_array_equal(got.data, want.data)


@pytest.mark.parametrize(
    "model,panel,axes,gain_ranges",
    [
        (EPIX, (352, 384), ["rows", "cols"], "high"),
        (EPIX, (352, 384), ["banks", "rows", "cols"], "all"),
        (JF, (512, 1024), ["rows", "cols"], "high"),
        (CAMERA, (8, 2048), ["rows", "cols"], "all"),  # rows of 2048 > KERNEL_MAX_GROUP: the array path
    ],
)
@pytest.mark.parametrize("order", ["reverse"])
def test_calibration_with_median_kernel(rng, model, panel, axes, gain_ranges, order):
    shape = (1, 2) + panel if model is not JF else (1, 1) + panel
    consts, raw, mask = _case(rng, model, shape, with_config=model is EPIX)
    # values near the pedestal of each pixel's range, plus row offsets, so that medians matter
    gi = model.gain_index(raw, consts.config_bits)
    ped = np.take_along_axis(consts.pedestal[None], np.clip(gi, 0, model.n_gains - 1)[:, None].astype(np.intp), 1)[:, 0]
    vals = ped + rng.normal(0, 3, shape) + rng.normal(0, 20, shape[:3] + (1,))
    raw = (np.clip(np.rint(vals), 0, 0x3FFF).astype(np.uint16)) | (raw & np.uint16(0xC000))
    gpu = FakeGpu(order=order)
    cm = MedianCommonMode(model, panel, axes, gain_ranges=gain_ranges, backend=gpu)
    got = Calibrator(model, consts, mask, gpu, common_mode=cm)(raw)
    cm_np = MedianCommonMode(model, panel, axes, gain_ranges=gain_ranges)
    want = Calibrator(model, consts, mask, Backend("numpy"), common_mode=cm_np)(raw)
    names = [name for name, *_ in gpu.launches]
    # rows of a bank (48 ePix10ka, 64 JUNGFRAU) and columns (176, 256; the camera's 8) by the warp kernels;
    # the column step, last, applies the gain scale as well (no scale_apply pass)
    assert names[0] == "pedestal_u16" and names[-1] == "cm_median_cols_warp" and "scale_apply" not in names
    assert names.count("cm_median_step") == 0 and names.count("cm_median_cols_warp") == 1
    assert names.count("cm_median_rows_warp") == (0 if model is CAMERA else 1)
    np.testing.assert_array_equal(got.good, want.good)
    np.testing.assert_array_equal(got.data, want.data)


@pytest.mark.parametrize("order", ["forward", "reverse", "shuffle"])
@pytest.mark.parametrize("min_pixels", [0, 2])
def test_median_kernel_small_groups(rng, min_pixels, order):
    """Groups of 6 (rows: 26 of each warp's 32 lanes padding) and 4 (columns: a tile of 12 columns, 20 of
    32 unused) pixels in the warp kernels, against the array reference."""
    from test_common_mode import random_case

    s, good, g = random_case(rng, (3, 2, 8, 12))
    gpu = FakeGpu(order=order)
    cm = MedianCommonMode(SMALL, (8, 12), ["rows", "cols"], min_pixels=min_pixels, backend=gpu)
    got = cm(s, good, g)
    want = MedianCommonMode(SMALL, (8, 12), ["rows", "cols"], min_pixels=min_pixels)(s, good, g)
    assert [name for name, *_ in gpu.launches] == ["cm_median_rows_warp", "cm_median_cols_warp"]
    np.testing.assert_array_equal(got, want)


def _fake_cupyx(monkeypatch):
    """cupyx.scipy.sparse.csr_matrix as the identity on a SciPy matrix (for the csr engine's GPU branch)."""
    mods = {n: types.ModuleType(n) for n in ("cupyx", "cupyx.scipy", "cupyx.scipy.sparse")}
    mods["cupyx"].scipy = mods["cupyx.scipy"]
    mods["cupyx.scipy"].sparse = mods["cupyx.scipy.sparse"]
    mods["cupyx.scipy.sparse"].csr_matrix = lambda m: m
    for n, m in mods.items():
        monkeypatch.setitem(sys.modules, n, m)


@pytest.mark.parametrize("engine", ["histogram", "csr"])
def test_azav_gpu_branches(rng, monkeypatch, engine):
    if engine == "csr":
        _fake_cupyx(monkeypatch)
    shape = (2, 30, 40)
    data = rng.normal(100, 20, (4,) + shape).astype(np.float32)
    good = rng.random(data.shape) > 0.1
    params = dict(center_um=[1000.0, 1500.0], distance_mm=50, energy_kev=9.5, bins=25, phi_bins=3, engine=engine)
    gpu, cpu = FakeGpu(), Backend("numpy")
    out = {}
    for b in (gpu, cpu):
        f = setup(Azav, b, make_ctx(b, shape, 100.0), **params)
        out[b.name if b is cpu else "gpu"] = f.compute(make_frames(b, data, good))[0]
    assert [name for name, *_ in gpu.launches] == (["azav_histogram"] if engine == "histogram" else [])
    np.testing.assert_array_equal(out["gpu"]["count"], out["numpy"]["count"])
    np.testing.assert_allclose(out["gpu"]["azav"], out["numpy"]["azav"], rtol=1e-6, equal_nan=True)


_ODD_BANKS = [
    ((5, 7), (10, 21)),
    ((2, 1), (4, 3)),
    ((1, 3), (2, 9)),
    ((33, 130), (66, 260)),
    ((4, 64), (8, 128)),
    ((3, 33), (6, 66)),
    ((2, 32), (4, 96)),
    ((256, 2), (512, 70)),
    ((300, 70), (600, 140)),
]
_ODD_SLOW = {(((256, 2), (512, 70)), "shuffle"), (((256, 2), (512, 70)), "reverse")} | {
    (case, "reverse") for case in _ODD_BANKS if case[1][0] * case[1][1] >= 66 * 260
}  # the largest panels


@pytest.mark.parametrize(
    "bank,panel,order",
    [
        pytest.param(bank, panel, order, marks=[pytest.mark.slow] if ((bank, panel), order) in _ODD_SLOW else [])
        for order in ("reverse", "shuffle")
        for bank, panel in _ODD_BANKS
    ],
)
def test_compiled_median_kernel_odd_group_sizes(rng, bank, panel, order):
    """The CUDA median kernels themselves: rows of up to 64 pixels in the rows warp kernel (1, 2, 3, 7, 32,
    33, 64: lanes half or fully used), columns of up to 256 in the columns warp kernel (1 to 256 values;
    66 and 70 columns: partly used tiles), longer groups in the shared-memory sort (rows of 70 and 130,
    columns of 300; p2 up to 512, partly filled last blocks); threads in two orders (the largest panels
    shuffled only, both in the slow run); against the array reference."""
    from test_common_mode import random_case

    model = DetectorModel(
        type="odd",
        panel_shape=panel,
        default_panels=3,
        data_mask=0x3FFF,
        gain_names=EPIX.gain_names,
        pixel_um=100.0,
        saturation=None,
        bank_shape=bank,
        high_gain_ranges=EPIX.high_gain_ranges,
    )
    s, good, g = random_case(rng, (2, 3) + panel)
    for min_pixels in (0, 1):
        gpu = FakeGpu("compiled", order)
        got = MedianCommonMode(
            model, panel, ["rows", "cols"], gain_ranges="all", min_pixels=min_pixels, max_correction=60.0, backend=gpu
        )(s, good, g)
        want = MedianCommonMode(
            model, panel, ["rows", "cols"], gain_ranges="all", min_pixels=min_pixels, max_correction=60.0
        )(s, good, g)
        rows_kernel = "cm_median_rows_warp" if bank[1] <= 64 else "cm_median_step"
        cols_kernel = "cm_median_cols_warp" if bank[0] <= 256 else "cm_median_step"
        assert [name for name, *_ in gpu.launches] == [rows_kernel, cols_kernel]
        np.testing.assert_array_equal(got, want)


def test_calib_grid_matches_the_kernels_event_chunk():
    from gpusmall.calib.calibrate import KERNEL_EVENTS_PER_THREAD, kernel_grid

    src = find_kernel_source("calib.cu").read_text()
    assert f"#define EVENTS_PER_THREAD {KERNEL_EVENTS_PER_THREAD}\n" in src
    assert kernel_grid(16 * 352 * 384, 64) == (4096, 8)
    assert kernel_grid(10, 1) == (1, 1) and kernel_grid(10, 9) == (1, 2)


@pytest.mark.parametrize("grid", [(1, 1), (3, 2), (64, 5)])
@pytest.mark.parametrize("name", ["calibrate_u16", "pedestal_u16"])
def test_compiled_calib_kernels_any_grid(rng, name, grid):
    """The calib.cu kernels themselves cover every (event, pixel) for grids smaller than one thread per
    pixel and event chunk (grid-stride in both directions), for 1..19 events and odd pixel counts,
    including JUNGFRAU's invalid gain bits and ranges without constants (2 of JUNGFRAU's 3), equal to the
    kernel at its policy's grid and to the NumPy twin (the spec's reference)."""
    from gpusmall.calib import calibrate

    spec = kernel_specs.registry()[name]
    for events, npix, model, n_gains in ((1, 7, JF, 3), (9, 301, EPIX, 7), (19, 64, CAMERA, 1), (8, 1000, JF, 2)):
        raw = rng.integers(0, 2**16, (events, 1, 1, npix), dtype=np.uint16)
        ped = rng.normal(1000, 50, (n_gains, 1, 1, npix)).astype(np.float32)
        scale = rng.normal(1, 0.1, (n_gains, 1, 1, npix)).astype(np.float32)
        mask = rng.random((1, 1, npix)) > 0.1
        cfg = rng.integers(0, 32, (1, 1, npix)).astype(np.uint8) if model is EPIX else None
        outs = {}
        for run in ("small grid", "policy grid"):
            out = np.full(raw.shape, np.nan, np.float32)
            gi = np.full(raw.shape, 99, np.int8)
            good = np.zeros(raw.shape, bool)
            args = calibrate.decode_arguments(Backend("numpy"), model, raw, ped, mask, cfg)
            args["n_gains"] = n_gains
            args.update(dict(scale=scale, out=out) if name == "calibrate_u16" else dict(s=out, gain_index=gi))
            gpu = FakeGpu(order="reverse")
            spec.launch(gpu, **args, good=good, grid=grid if run == "small grid" else None)
            assert gpu.launches[0][1] == (grid if run == "small grid" else spec.grid(args)[0])
            outs[run] = (out, gi, good)
        for a, b in zip(outs["small grid"], outs["policy grid"]):
            np.testing.assert_array_equal(a, b)
        if n_gains != model.n_gains:  # (the twin takes constants for every range)
            continue
        out, gi, good = outs["small grid"]
        if name == "calibrate_u16":
            want_out, want_good = calibrate.calibrate_reference(np, model, raw, ped, scale, mask, cfg)
            np.testing.assert_array_equal(out, want_out)
        else:
            want_s, want_g = calibrate.pedestal_subtract(np, model, raw, ped, cfg)
            want_good = mask[None] & (want_g >= 0)
            np.testing.assert_array_equal(out, want_s)
            np.testing.assert_array_equal(gi, want_g)
        np.testing.assert_array_equal(good, want_good)


@pytest.mark.parametrize("square", [False, True])
def test_cube_add_kernel_equals_numpy(rng, square):
    """The cube's frame sums through DetectorCube: the ``cube_add`` kernel (rows of consecutive events summed in a
    register, two splits, events out of the cube, a batch over more bins than device rows) equals the NumPy twin
    and the grouping formula."""
    from gpusmall.producer.cube import DetectorCube

    shape = (2, 5, 7)
    batches = [rng.normal(5, 20, (6,) + shape).astype(np.float32) for _ in range(3)]
    ids = [
        np.array([[0, 0, 1, -1, 1, 2], [-1, 2, 2, 2, 0, -1]]),
        np.array([[3, 3, 3, 3, 4, 4], [3, -1, 3, -1, 4, 4]]),
        np.array([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]]),
    ]
    gpu, cpu = FakeGpu(), Backend("numpy")
    got = {}
    for b in (gpu, cpu):
        cube = DetectorCube(shape, b, splits=2, rows=2, square=square)
        for data, i in zip(batches, ids):
            cube.add(b.to_device(data), i)
        got[b] = cube.host_sums()
    assert {name for name, *_ in gpu.launches} == {"cube_add"}
    for k in range(6):
        for s in range(2):
            m = [i[s] == k for i in ids]
            x = np.concatenate([d[mm] for d, mm in zip(batches, m)]).astype(np.float64).reshape(-1, 70)
            for b in (gpu, cpu):
                np.testing.assert_allclose(got[b][k][0][s], x.sum(0), rtol=1e-12, atol=1e-9)
                if square:
                    np.testing.assert_allclose(got[b][k][1][s], (x * x).sum(0), rtol=1e-12, atol=1e-9)
                else:
                    assert got[b][k][1] is None


SUM_NAMES = [
    "calib",
    "square",
    "max",
    "nhits",
    "calib_thresADU10",
    "square_thresADU-5",
    "calib_max_thresADU30",
    "nhits_thresADU15.5",
    "max_thresADU1000",
    "calib_thresADU-3.5",
]  # 10: two launches of <= 8


@pytest.mark.parametrize("damaged", [[], [1], [0, 1, 2]])
def test_run_sums_kernel_equals_numpy(rng, damaged):
    """Every kind of run sum, with and without thresholds, over two batches (the second with ``damaged``
    events left out; all of them: nothing changes), in one read of each batch (two launches for 10
    sums): the CUDA kernel through RunSums equals the NumPy twin, and both equal the formula."""
    from gpusmall.funcs.sums import RunSums

    shape = (2, 7, 9)
    batches = [rng.normal(5, 20, (3,) + shape).astype(np.float32) for _ in range(2)]
    batches[0][0, 0, 0, :4] = [0.0, 10.0, 30.0, 15.5]  # values on the thresholds
    keeps = [None, None if not damaged else ~np.isin(np.arange(3), damaged)]
    gpu, cpu = FakeGpu(), Backend("numpy")
    got = {}
    for b in (gpu, cpu):
        sums = RunSums(SUM_NAMES, shape, b)
        for data, keep in zip(batches, keeps):
            sums.update(b.to_device(data), keep)
        got[b] = sums.results()
        assert sums.events == 3 + 3 - len(damaged)
    assert [name for name, *_ in gpu.launches] == ["run_sums"] * (4 if len(damaged) < 3 else 2)
    kept = np.concatenate([batches[0], batches[1][keeps[1]] if keeps[1] is not None else batches[1]])
    d = kept.astype(np.float64)
    written = [
        "calib",
        "calib_square",
        "calib_max",
        "nhits",
        "calib_thresADU10",
        "calib_square_thresADU-5",
        "calib_max_thresADU30",
        "nhits_thresADU15.5",
        "calib_max_thresADU1000",
        "calib_thresADU-3.5",
    ]
    assert list(got[cpu]) == list(got[gpu]) == written  # smalldata_tools' names
    for name in written:
        kind, _, t = name.partition("_thresADU")
        t = float(t) if t else None
        v = d if t is None else np.where(d >= t, d, 0)
        want = {
            "calib": v.sum(0),
            "calib_square": (v * v).sum(0),
            "calib_max": v.max(0),
            "nhits": (d >= t if t is not None else d > 0).sum(0),
        }[kind]
        assert got[cpu][name].dtype == {"calib_max": np.float32, "nhits": np.int64}.get(kind, np.float64)
        for b in (gpu, cpu):
            assert got[b][name].dtype == got[cpu][name].dtype and got[b][name].shape == shape
            np.testing.assert_allclose(got[b][name], want, rtol=1e-12, err_msg=f"{name} {b.description}")


def test_run_sums_kernel_keeps_nan_as_numpy():
    """A NaN among a pixel's values (a NaN constant) makes its max NaN, as np.maximum over the events
    does, whichever batch or event it comes in; sums are NaN too, counts and thresholded sums skip it."""
    from gpusmall.funcs.sums import RunSums

    shape = (1, 2, 4)
    b0 = np.arange(3 * 8, dtype=np.float32).reshape(3, *shape)
    b1 = b0[::-1].copy() + 100
    b0[1, 0, 0, 1] = np.nan  # middle event of the first batch
    b1[0, 0, 1, 2] = np.nan  # first event of the second batch: the earlier batch's max is a number
    b1[2, 0, 0, 3] = np.nan  # last event
    names = ["calib", "calib_max", "calib_max_thresADU5", "nhits_thresADU5"]
    gpu, cpu = FakeGpu(), Backend("numpy")
    got = {}
    for b in (gpu, cpu):
        sums = RunSums(names, shape, b)
        for data in (b0, b1):
            sums.update(b.to_device(data))
        got[b] = sums.results()
    d = np.concatenate([b0, b1]).astype(np.float64)
    nan_px = np.isnan(d).any(0)
    for b in (gpu, cpu):
        np.testing.assert_array_equal(np.isnan(got[b]["calib_max"]), nan_px, err_msg=b.description)
        np.testing.assert_array_equal(got[b]["calib_max"], np.maximum.reduce(d).astype(np.float32))
        np.testing.assert_array_equal(got[b]["calib"], d.sum(0))
        np.testing.assert_array_equal(got[b]["calib_max_thresADU5"], np.where(d >= 5, d, 0).max(0))
        np.testing.assert_array_equal(got[b]["nhits_thresADU5"], (d >= 5).sum(0))


@pytest.mark.parametrize("use_rms,low", [(True, 2.0), (False, 12.0), (False, None)])
def test_droplet_mask_kernel_equals_numpy(rng, use_rms, low):
    """The droplet pixels (seeds, growth by 4-neighbours within a panel) from the CUDA kernel through
    Droplet equal the NumPy twin, on 3 panels with bad pixels and seeds on panel edges; and the droplets
    found from them are the same."""
    from gpusmall.funcs.droplet import Droplet

    shape = (3, 9, 11)
    data = rng.normal(0, 4, (2,) + shape).astype(np.float32)
    data[rng.random(data.shape) < 0.08] = 40.0
    data[:, :, 0, :] = 25.0  # seeds along the panels' first rows: growth must not cross into the panel above
    good = rng.random(data.shape) > 0.1
    params = dict(threshold=4.0 if use_rms else 20.0, threshold_low=low, use_rms=use_rms, max_droplets=50)
    noise = rng.uniform(2, 6, shape).astype(np.float32)
    gpu, cpu = FakeGpu(order="shuffle"), Backend("numpy")
    masks, outs = {}, {}
    for b in (gpu, cpu):
        f = setup(Droplet, b, make_ctx(b, shape, 100.0, noise=noise), **params)
        frames = make_frames(b, data, good)
        masks[b] = np.asarray(f.mask(frames.data, frames.good))
        outs[b] = {k: np.asarray(v) for k, v in f(frames).items()}
    assert [name for name, *_ in gpu.launches] == ["droplet_mask"] * 2 + ["label_union", "label_flatten"]
    np.testing.assert_array_equal(masks[gpu], masks[cpu])
    assert masks[cpu].sum() > 20
    for k, v in outs[cpu].items():
        np.testing.assert_allclose(outs[gpu][k], v, rtol=1e-6, err_msg=k)


@pytest.mark.parametrize("order", ["forward", "shuffle"])
@pytest.mark.parametrize(
    "density,shape", [(0.7, (3, 2, 20, 24)), (0.45, (2, 3, 33, 17)), (0.95, (1, 1, 40, 50)), (0.02, (4, 2, 16, 16))]
)
def test_union_find_labels_equal_scipy(rng, order, density, shape):
    """The CuPy labelling (union-find over the labelled pixels, kernels/label.cu) gives SciPy's labels at
    every labelled pixel, numbered the same way, with no droplet across a panel or event edge: dense
    masks (long chains, many merges between blocks running at once), sparse ones, odd sizes."""
    from gpusmall.funcs.droplet import label_stack

    mask = rng.random(shape) < density
    mask[..., 0, :] = mask[..., -1, :] = True  # full first and last rows: frames touch only across edges
    gpu = FakeGpu(order=order)
    idx = np.flatnonzero(mask)
    got, n = label_stack(gpu, mask, idx)
    want, n_want = label_stack(Backend("numpy"), mask, idx)
    assert n == n_want and n >= shape[0] * shape[1]
    np.testing.assert_array_equal(got, want)
    assert [name for name, *_ in gpu.launches] == ["label_union", "label_flatten"]


def test_union_find_on_no_pixels():
    from gpusmall.funcs.droplet import label_stack

    gpu = FakeGpu()
    got, n = label_stack(gpu, np.zeros((2, 1, 5, 6), bool))
    assert n == 0 and got.size == 0 and gpu.launches == []
