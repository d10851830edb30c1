"""The CuPy code paths' kernel launches, checked on the CPU.

:class:`FakeGpu` is a backend with NumPy arrays that takes the CuPy branches (``is_gpu`` is True) and
hands out :class:`FakeKernel` objects instead of ``cupy.RawKernel``. Each launch is checked against the
kernel's signature parsed from ``kernels/*.cu``, as CuPy would pass it: the argument count; every pointer
argument an array of the exact dtype and C-contiguous (a kernel reads a strided view as if it were
contiguous); every scalar a NumPy scalar of the exact C type (CuPy passes a Python int as 64 bits and a
float as a double, which a kernel taking ``int`` or ``float`` reads as garbage); grid, block and dynamic
shared-memory limits. The launch then runs either a NumPy transcription of the kernel that also checks
its index arithmetic stays inside the arrays, or the CUDA source itself compiled for the CPU
(``tests/cuda_cpu``: block threads as fibers meeting at ``__syncthreads``, run forward and in reverse so
a missing barrier shows), and the wrappers' results are compared with the NumPy backend.

What this cannot see: CUDA compilation (``test_kernels_compile.py``), warp-level behaviour and the GPU
memory model, timing.
"""
from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import cuda_cpu
import numpy as np
import pytest
from cuda_cpu import POINTER, SCALAR
from fake_cupy import DeviceArray, unwrap
from helpers_funcs import make_ctx, make_frames, setup
from test_calibration import make_case

from gpusmall.backend import Backend, find_kernel_source
from gpusmall.calib import Calibrator
from gpusmall.calib.common_mode import MedianCommonMode
from gpusmall.detectors import get_model
from gpusmall.detectors.base import DetectorModel
from gpusmall.detectors.constants import Constants
from gpusmall.funcs.azav import Azav

EPIX = get_model("epix10ka")
JF = get_model("jungfrau")
CAMERA = get_model("camera")
SMALL = DetectorModel(type="small", panel_shape=(8, 12), default_panels=2, data_mask=0x3FFF,
                      gain_names=EPIX.gain_names, pixel_um=100.0, saturation=None, bank_shape=(4, 6),
                      high_gain_ranges=EPIX.high_gain_ranges)

SHARED_LIMIT = 48 * 1024  # default dynamic shared memory per block without cudaFuncSetAttribute
ROOT = Path(__file__).resolve().parents[1]


def signatures(filename: str) -> dict[str, list[tuple[str, str, bool]]]:
    """name -> [(parameter, C type, is pointer)] of every ``extern "C" __global__`` kernel in kernels/<filename>."""
    return cuda_cpu.signatures(find_kernel_source(filename).read_text())


def kernels_used() -> set[tuple[str, str]]:
    """(file, kernel) pairs the package asks ``Backend.kernel`` for."""
    found = set()
    for py in (ROOT / "gpusmall").rglob("*.py"):
        found |= set(re.findall(r'kernel\(\s*"(\w+\.cu)",\s*"(\w+)"', py.read_text()))
    return found


# ---- NumPy transcriptions of the kernels -----------------------------------------------------------------
def _flat(a, n, what):
    assert a.size >= n, f"{what}: array of {a.size} elements, kernel reads {n}"
    return a.reshape(-1)


def _gain_range(family, w, has_config, cb):
    if family == 1:
        d = (w >> 14) & 1
        if not has_config:
            return np.where(d == 1, 5, 3)
        b = (cb[None] & 0x1F) | (d << 5)
        out = np.full(w.shape, -1, np.int64)
        for index, mask, value in reversed(((0, 28, 28), (1, 28, 12), (2, 12, 8), (3, 60, 16), (4, 60, 0),
                                            (5, 60, 48), (6, 60, 32))):
            out = np.where((b & mask) == value, index, out)
        return out
    if family == 2:
        return np.array([0, 1, -1, 2])[(w >> 14) & 3]
    return np.zeros(w.shape, np.int64)


def _pixels(grid, block, raw, n_events, npix, mask, config_bits, has_config):
    E, N = int(n_events), int(npix)
    assert grid[1] >= 1 and grid[0] * block[0] >= 1
    w = _flat(raw, E * N, "raw")[:E * N].reshape(E, N).astype(np.int64)
    keep = _flat(mask, N, "mask")[:N] != 0
    cb = _flat(config_bits, N, "config_bits")[:N].astype(np.int64) if has_config else np.zeros(N, np.int64)
    return E, N, w, keep, cb


def emu_calibrate_u16(grid, block, shared, raw, pedestal, scale, mask, config_bits, out, good, n_events, npix,
                      n_gains, family, has_config, data_mask):
    E, N, w, keep, cb = _pixels(grid, block, raw, n_events, npix, mask, config_bits, has_config)
    g = _gain_range(int(family), w, int(has_config), cb)
    ok = keep[None] & (g >= 0) & (g < n_gains)
    k = np.clip(g, 0, n_gains - 1) * N + np.arange(N)
    v = (w & int(data_mask)).astype(np.float32)
    ped, sc = _flat(pedestal, n_gains * N, "pedestal"), _flat(scale, n_gains * N, "scale")
    value = np.where(ok, (v - ped[k]) * sc[k], np.float32(0)).astype(np.float32)
    _flat(out, E * N, "out")[:E * N] = value.ravel()
    _flat(good, E * N, "good")[:E * N] = ok.ravel()


def emu_pedestal_u16(grid, block, shared, raw, pedestal, mask, config_bits, s, gain_index, good, n_events, npix,
                     n_gains, family, has_config, data_mask):
    E, N, w, keep, cb = _pixels(grid, block, raw, n_events, npix, mask, config_bits, has_config)
    g = _gain_range(int(family), w, int(has_config), cb)
    valid = (g >= 0) & (g < n_gains)
    gc = np.where(valid, g, np.where(g < 0, 0, n_gains - 1))
    v = (w & int(data_mask)).astype(np.float32)
    ped = _flat(pedestal, n_gains * N, "pedestal")
    _flat(s, E * N, "s")[:E * N] = (v - ped[gc * N + np.arange(N)]).astype(np.float32).ravel()
    _flat(gain_index, E * N, "gain_index")[:E * N] = np.where(valid, g, -1).ravel()
    _flat(good, E * N, "good")[:E * N] = (keep[None] & valid).ravel()


def emu_scale_apply(grid, block, shared, s, gain_index, good, scale, out, n_events, npix):
    E, N = int(n_events), int(npix)
    g = _flat(gain_index, E * N, "gain_index")[:E * N].reshape(E, N).astype(np.int64)
    assert g.max(initial=0) < scale.size // N, "gain index past the scale array"
    sv = _flat(scale, N, "scale")[np.maximum(g, 0) * N + np.arange(N)]
    ok = _flat(good, E * N, "good")[:E * N].reshape(E, N)
    x = _flat(s, E * N, "s")[:E * N].reshape(E, N)
    _flat(out, E * N, "out")[:E * N] = np.where(ok, x * sv, np.float32(0)).astype(np.float32).ravel()


def emu_cm_median_step(grid, block, shared, s, good, g, n_groups, n, p2, gpb, n_inner, outer_stride, inner_stride,
                       elem_stride, contiguous, range_mask, min_pixels, max_correction):
    n_groups, n, p2, gpb, n_inner = int(n_groups), int(n), int(p2), int(gpb), int(n_inner)
    half = p2 // 2
    assert p2 >= 2 and p2 & (p2 - 1) == 0 and p2 >= n, f"p2 {p2} must be a power of two >= max(n, 2) ({n})"
    assert block[0] >= gpb * half, f"{block[0]} threads, the sort needs gpb * p2 / 2 = {gpb * half}"
    assert grid[0] * gpb >= n_groups, "not every group has a block"
    need = 4 * (gpb * (p2 + 1) + 2 * gpb)
    assert shared >= need, f"shared memory {shared} < {need} the kernel uses"
    blocks = grid[0]
    sf, gd, gi_all = s.reshape(-1), good.reshape(-1), g.reshape(-1).astype(np.int64)
    idx = np.arange(gpb * p2)
    grp, k = (idx // p2, idx % p2) if contiguous else (idx % gpb, idx // gpb)
    gid = np.arange(blocks)[:, None] * gpb + grp[None]
    inside = (k[None] < n) & (gid < n_groups)
    i = (gid // n_inner) * outer_stride + (gid % n_inner) * inner_stride + k[None] * elem_stride
    assert (i[inside] >= 0).all() and (i[inside] < sf.size).all(), "group element outside the batch"
    assert np.unique(i[inside]).size == inside.sum(), "two groups share a pixel"
    i = np.where(inside, i, 0)
    gi = gi_all[i]
    use = inside & gd[i] & (gi >= 0) & (gi < 32) & (((int(range_mask) >> np.clip(gi, 0, 31)) & 1) == 1)
    sh = np.full((blocks, gpb, p2), np.inf, np.float32)
    sh[:, grp, k] = np.where(use, sf[i], np.float32(np.inf))
    count = np.zeros((blocks, gpb), np.int64)
    np.add.at(count, (np.broadcast_to(np.arange(blocks)[:, None], use.shape)[use],
                      np.broadcast_to(grp, use.shape)[use]), 1)
    j = np.arange(half)
    size = 2
    while size <= p2:  # the bitonic network as the kernel runs it
        stride = size // 2
        while stride > 0:
            pos = 2 * j - (j & (stride - 1))
            partner = pos + stride
            asc = (pos & size) == 0
            x, y = sh[:, :, pos].copy(), sh[:, :, partner].copy()
            swap = (x > y) == asc
            sh[:, :, pos] = np.where(swap, y, x)
            sh[:, :, partner] = np.where(swap, x, y)
            stride //= 2
        size *= 2
    a = np.take_along_axis(sh, np.clip((count - 1) // 2, 0, p2 - 1)[..., None], 2)[..., 0]
    b = np.take_along_axis(sh, np.clip(count // 2, 0, p2 - 1)[..., None], 2)[..., 0]
    med = ((a + b) * np.float32(0.5)).astype(np.float32)
    ok = (count > min_pixels) & (count > 0) & (np.abs(med) < max_correction)
    mv = np.where(ok, med, np.float32(np.nan))[np.arange(blocks)[:, None], grp[None]]
    w = use & ~np.isnan(mv)
    sf[i[w]] = sf[i[w]] - mv[w]


def _emu_group_medians(s, good, g, i, range_mask, min_pixels, max_correction):
    """The median step on the groups of flat indices ``i`` (groups, n), in place on ``s``."""
    sf = s.reshape(-1)
    assert i.min(initial=0) >= 0 and i.max(initial=0) < sf.size, "group element outside the batch"
    assert np.unique(i).size == i.size, "two groups share a pixel"
    G, n = i.shape
    gi = g.reshape(-1)[i].astype(np.int64)
    use = good.reshape(-1)[i] & (gi >= 0) & (gi < 32) & (((int(range_mask) >> np.clip(gi, 0, 31)) & 1) == 1)
    vals = np.sort(np.where(use, sf[i], np.float32(np.inf)).astype(np.float32), axis=1)
    m = use.sum(axis=1)
    rows = np.arange(G)
    med = ((vals[rows, np.clip((m - 1) // 2, 0, n - 1)] + vals[rows, np.clip(m // 2, 0, n - 1)])
           * np.float32(0.5)).astype(np.float32)
    ok = (m > min_pixels) & (m > 0) & (np.abs(med) < max_correction)
    w = use & ok[:, None]
    sf[i[w]] = (sf[i[w]] - np.broadcast_to(med[:, None], i.shape)[w]).astype(np.float32)


def emu_cm_median_rows_warp(grid, block, shared, s, good, g, n_groups, n, n_inner, outer_stride, inner_stride,
                            range_mask, min_pixels, max_correction):
    G, n, n_inner = int(n_groups), int(n), int(n_inner)
    assert 1 <= n <= 64, f"groups of {n} pixels: the warp kernel holds at most 64"
    assert block[0] % 32 == 0 and grid[0] * block[0] >= 32 * G, "not one whole warp per group"
    gid = np.arange(G)
    i = ((gid // n_inner) * int(outer_stride) + (gid % n_inner) * int(inner_stride))[:, None] + np.arange(n)[None]
    _emu_group_medians(s, good, g, i, range_mask, min_pixels, max_correction)


def emu_cm_median_cols_warp(grid, block, shared, s, good, g, n_outer, n, n_inner, outer_stride, range_mask,
                            min_pixels, max_correction, scale, npix, apply_scale):
    n_outer, n, n_inner = int(n_outer), int(n), int(n_inner)
    assert 1 <= n <= 256, f"columns of {n} pixels: the warp kernel holds at most 256"
    assert block[0] % 32 == 0 and block[0] >= 32, "whole warps"
    tiles = -(-n_inner // 32)
    assert grid[0] >= n_outer * tiles, "not a block per tile of 32 columns"
    need = (n * 33 + 32) * 4 + n * 33
    assert shared >= need, f"shared memory {shared} < the tiles' {need}"
    outer, inner = np.divmod(np.arange(n_outer * n_inner), n_inner)
    i = (outer * int(outer_stride) + inner)[:, None] + np.arange(n)[None] * n_inner
    _emu_group_medians(s, good, g, i, range_mask, min_pixels, max_correction)
    if apply_scale:  # scale_apply on every pixel of the columns
        i = i.ravel()
        P = int(npix)
        ok = good.reshape(-1)[i]
        gi = np.maximum(g.reshape(-1)[i].astype(np.int64), 0)
        assert (gi[ok] * P + i[ok] % P).max(initial=0) < scale.size, "gain range past the scale array"
        sv = _flat(scale, scale.size, "scale")[np.where(ok, gi * P + i % P, 0)]
        sf = s.reshape(-1)
        sf[i] = np.where(ok, sf[i] * sv, np.float32(0)).astype(np.float32)


def emu_azav_histogram(grid, block, shared, data, good, bin, c, events, pixels, nbins, num, den, cnt):
    E, P, nb = int(events), int(pixels), int(nbins)
    assert grid[0] * block[0] >= E * P, "fewer threads than (event, pixel) pairs"
    b = _flat(bin, P, "bin")[:P].astype(np.int64)
    assert b.max(initial=-1) < nb, "bin index past nbins"
    sel = (b[None] >= 0) & _flat(good, E * P, "good")[:E * P].reshape(E, P)
    e, p = np.nonzero(sel)
    o = e * nb + b[p]
    np.add.at(_flat(num, E * nb, "num"), o, _flat(data, E * P, "data")[:E * P].reshape(E, P)[sel].astype(np.float64))
    np.add.at(_flat(den, E * nb, "den"), o, _flat(c, P, "c")[p].astype(np.float64))
    np.add.at(_flat(cnt, E * nb, "cnt"), o, 1)


def emu_run_sums(grid, block, shared, data, keep, events, npix, n_sums, kinds, thres, acc):
    E, N, K = int(events), int(npix), int(n_sums)
    assert 1 <= K <= 8, f"{K} sums in one launch (MAX_SUMS 8)"
    assert grid[0] * block[0] >= 1
    x = _flat(data, E * N, "data")[:E * N].reshape(E, N).astype(np.float64)[_flat(keep, E, "keep")[:E]]
    a = _flat(acc, K * N, "acc")[:K * N].reshape(K, N)
    for k in range(K):
        kind, t = int(kinds[k]), np.float64(np.float32(thres[k]))
        v = np.where(x >= t, x, 0.0)
        if kind == 2:
            a[k] = np.maximum(a[k], v.max(axis=0, initial=-np.inf))
        else:
            a[k] += {0: v, 1: v * v, 3: (x >= t).astype(np.float64), 4: (x > t).astype(np.float64)}[kind].sum(axis=0)


def emu_cube_add(grid, block, shared, data, rows, events, splits, npix, acc, sq, with_square):
    E, S, N = int(events), int(splits), int(npix)
    r = _flat(rows, S * E, "rows")[:S * E].reshape(S, E)
    n_rows = acc.size // N
    assert r.max() < n_rows, "a row past the accumulators"
    x = _flat(data, E * N, "data")[:E * N].reshape(E, N).astype(np.float64)
    a = _flat(acc, n_rows * N, "acc")[:n_rows * N].reshape(n_rows, N)
    q = _flat(sq, n_rows * N, "sq")[:n_rows * N].reshape(n_rows, N)
    for s in range(S):
        for e in range(E):
            if r[s, e] >= 0:
                a[r[s, e]] += x[e]
                if int(with_square):
                    q[r[s, e]] += x[e] * x[e]


def emu_droplet_mask(grid, block, shared, data, good, noise, threshold, threshold_low, use_rms, n, rows, cols, npix,
                     grow, mask):
    n, R, C, P = int(n), int(rows), int(cols), int(npix)
    assert n % P == 0 and P % (R * C) == 0, f"{n} pixels are not whole frames of {P}"
    d = _flat(data, n, "data")[:n].reshape(-1, R, C)
    g = _flat(good, n, "good")[:n].reshape(-1, R, C)
    if use_rms:
        nz = np.tile(_flat(noise, P, "noise")[:P], n // P).reshape(-1, R, C)
        t, tl = nz * threshold, nz * threshold_low  # float32 products
    else:
        t, tl = threshold, threshold_low
    seed = g & (d >= t)
    m = seed.copy()
    if grow:
        near = np.zeros_like(seed)
        near[:, 1:] |= seed[:, :-1]
        near[:, :-1] |= seed[:, 1:]
        near[:, :, 1:] |= seed[:, :, :-1]
        near[:, :, :-1] |= seed[:, :, 1:]
        m |= near & g & (d >= tl)
    _flat(mask, n, "mask")[:n] = m.ravel()


def _label_edges(q, rows, cols):
    """(a, b) position pairs the union step joins: each pixel with its left and upper labelled neighbour."""
    pos = {int(v): k for k, v in enumerate(q)}
    a, b = [], []
    for k, v in enumerate(q):
        v = int(v)
        if v % cols > 0 and v - 1 in pos:
            a.append(k), b.append(pos[v - 1])
        if (v // cols) % rows > 0 and v - cols in pos:
            a.append(k), b.append(pos[v - cols])
    return np.array(a, np.int64), np.array(b, np.int64)


def emu_label_union(grid, block, shared, idx, parent, m, rows, cols):
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    m = int(m)
    q = _flat(idx, m, "idx")[:m]
    assert (np.diff(q) > 0).all(), "idx must be sorted and unique"
    p = _flat(parent, m, "parent")
    assert (p[:m] == np.arange(m)).all(), "parent must start as 0..m-1"
    a, b = _label_edges(q, int(rows), int(cols))
    _, comp = connected_components(coo_matrix((np.ones(a.size), (a, b)), shape=(m, m)), directed=False)
    first = np.full(comp.max() + 1, m)
    np.minimum.at(first, comp, np.arange(m))
    p[:m] = first[comp]  # every position at its set's smallest position (the kernel's roots)


def emu_label_flatten(grid, block, shared, parent, m):
    p = _flat(parent, int(m), "parent")[:int(m)]
    assert (p[p] == p).all(), "parent is not flat after label_union (emulated)"


EMULATORS = {"calibrate_u16": emu_calibrate_u16, "pedestal_u16": emu_pedestal_u16, "scale_apply": emu_scale_apply,
             "cm_median_step": emu_cm_median_step, "cm_median_rows_warp": emu_cm_median_rows_warp,
             "cm_median_cols_warp": emu_cm_median_cols_warp, "azav_histogram": emu_azav_histogram,
             "run_sums": emu_run_sums, "cube_add": emu_cube_add, "droplet_mask": emu_droplet_mask, "label_union": emu_label_union,
             "label_flatten": emu_label_flatten}


# ---- the fake backend ------------------------------------------------------------------------------------
class FakeKernel:
    """A checked launch, then the kernel's NumPy emulation or, with ``compiled``, the kernel itself
    built for the CPU (tests/cuda_cpu), its threads run in ``order``."""

    def __init__(self, filename, name, launches, compiled=False, order="forward"):
        sigs = signatures(filename)
        assert name in sigs, f"{filename} has no kernel {name!r} (it has {sorted(sigs)})"
        self.name, self.sig, self.launches = name, sigs[name], launches
        self.cpu_kernel = cuda_cpu.build_file(find_kernel_source(filename)).kernel(name) if compiled else None
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
            for a, (pname, _, ptr) in zip(args, self.sig):
                assert not ptr or isinstance(a, DeviceArray), f"{self.name}({pname}): a host array passed to a kernel"
            args = tuple(unwrap(a) for a in args)
        for a, (pname, ctype, ptr) in zip(args, self.sig):
            where = f"{self.name}({pname}: {ctype}{' *' if ptr else ''})"
            if ptr:
                assert isinstance(a, np.ndarray), f"{where}: got {type(a).__name__}, not an array"
                assert a.dtype == POINTER[ctype], f"{where}: array of {a.dtype}"
                assert a.flags.c_contiguous, f"{where}: array is not C-contiguous"
            else:
                assert isinstance(a, np.generic), f"{where}: got {type(a).__name__}; wrap it as np.{SCALAR[ctype].__name__}"
                assert a.dtype == SCALAR[ctype], f"{where}: scalar of {a.dtype}"
        self.launches.append((self.name, grid, block, shared_mem))
        if self.cpu_kernel is not None:
            self.cpu_kernel(grid, block, args, shared_mem=shared_mem, order=self.order)
        else:
            EMULATORS[self.name](grid + (1,) * (3 - len(grid)), block, shared_mem, *args)


class FakeGpu(Backend):
    """NumPy arrays on the CuPy code paths (see the module docstring). ``kernels``: "emulated" (NumPy
    transcriptions) or "compiled" (the CUDA source itself, built for the CPU; skips without g++), whose
    threads run in ``order`` ("forward", "reverse", "shuffle")."""

    def __init__(self, kernels="emulated", order="forward"):
        super().__init__("numpy")
        assert kernels in ("emulated", "compiled")
        if kernels == "compiled" and cuda_cpu.compiler() is None:
            pytest.skip("no C++ compiler to run the CUDA kernels on the CPU")
        self.compiled, self.order = kernels == "compiled", order
        self.description = f"fake GPU (NumPy arrays, {kernels} kernels)"
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
        return FakeKernel(filename, name, self.launches, self.compiled, self.order)


# ---- tests -----------------------------------------------------------------------------------------------
def test_every_kernel_the_package_launches_exists_and_is_emulated():
    used = kernels_used()
    assert {k for _, k in used} >= {"calibrate_u16", "pedestal_u16", "scale_apply", "cm_median_step",
                                    "azav_histogram"}
    for filename, name in used:
        assert name in signatures(filename), f"{filename} has no kernel {name}"
        assert name in EMULATORS, f"no emulator for {name}: add one here"
    for filename in ("calib.cu", "common_mode.cu", "azav.cu", "sums.cu", "droplet.cu", "label.cu"):
        for name, sig in signatures(filename).items():
            for _, ctype, ptr in sig:
                assert ctype in (POINTER if ptr else SCALAR), f"{name}: parameter type {ctype!r} not mapped"


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
@pytest.mark.parametrize("kernels", ["emulated", "compiled"])
def test_fused_calibration_kernel(rng, model, with_config, units, kernels):
    shape = (3, 2, 6, 10)
    consts, raw, mask = _case(rng, model, shape, with_config, fortran=True)
    gpu = FakeGpu(kernels)
    big = np.concatenate([raw, raw], axis=3)  # the wrapper gets a strided view and must copy it
    got = Calibrator(model, consts, mask, gpu, units=units, photon_energy_kev=9.5)(big[..., :10])
    want = Calibrator(model, consts, mask, Backend("numpy"), units=units, photon_energy_kev=9.5)(raw)
    assert [name for name, *_ in gpu.launches] == ["calibrate_u16"]
    np.testing.assert_array_equal(got.good, want.good)
    np.testing.assert_array_equal(got.data, want.data)


@pytest.mark.parametrize("model,panel,axes,gain_ranges", [
    (EPIX, (352, 384), ["rows", "cols"], "high"),
    (EPIX, (352, 384), ["banks", "rows", "cols"], "all"),
    (JF, (512, 1024), ["rows", "cols"], "high"),
    (CAMERA, (8, 2048), ["rows", "cols"], "all"),  # rows of 2048 > KERNEL_MAX_GROUP: the array path
])
@pytest.mark.parametrize("kernels,order", [("emulated", "forward"), ("compiled", "reverse")])
def test_calibration_with_median_kernel(rng, model, panel, axes, gain_ranges, kernels, order):
    shape = (1, 2) + panel if model is not JF else (1, 1) + panel
    consts, raw, mask = _case(rng, model, shape, with_config=model is EPIX)
    # values near the pedestal of each pixel's range, plus row offsets, so that medians matter
    gi = model.gain_index(raw, consts.config_bits)
    ped = np.take_along_axis(consts.pedestal[None], np.clip(gi, 0, model.n_gains - 1)[:, None].astype(np.intp), 1)[:, 0]
    vals = ped + rng.normal(0, 3, shape) + rng.normal(0, 20, shape[:3] + (1,))
    raw = (np.clip(np.rint(vals), 0, 0x3FFF).astype(np.uint16)) | (raw & np.uint16(0xC000))
    gpu = FakeGpu(kernels, order)
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


@pytest.mark.parametrize("kernels,order", [("emulated", "forward"), ("compiled", "forward"),
                                          ("compiled", "reverse"), ("compiled", "shuffle")])
@pytest.mark.parametrize("min_pixels", [0, 2])
def test_median_kernel_small_groups(rng, min_pixels, kernels, order):
    """Groups of 6 (rows: 26 of each warp's 32 lanes padding) and 4 (columns: a tile of 12 columns, 20 of
    32 unused) pixels in the warp kernels, against the array reference."""
    from test_common_mode import random_case

    s, good, g = random_case(rng, (3, 2, 8, 12))
    gpu = FakeGpu(kernels, order)
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


@pytest.mark.parametrize("engine,kernels", [("histogram", "emulated"), ("histogram", "compiled"),
                                            ("csr", "emulated")])
def test_azav_gpu_branches(rng, monkeypatch, engine, kernels):
    if engine == "csr":
        _fake_cupyx(monkeypatch)
    shape = (2, 30, 40)
    data = rng.normal(100, 20, (4,) + shape).astype(np.float32)
    good = rng.random(data.shape) > 0.1
    params = dict(center_um=[1000.0, 1500.0], distance_mm=50, energy_kev=9.5, bins=25, phi_bins=3, engine=engine)
    gpu, cpu = FakeGpu(kernels), Backend("numpy")
    out = {}
    for b in (gpu, cpu):
        f = setup(Azav, b, make_ctx(b, shape, 100.0), **params)
        out[b.name if b is cpu else "gpu"] = f.compute(make_frames(b, data, good))[0]
    assert [name for name, *_ in gpu.launches] == (["azav_histogram"] if engine == "histogram" else [])
    np.testing.assert_array_equal(out["gpu"]["count"], out["numpy"]["count"])
    np.testing.assert_allclose(out["gpu"]["azav"], out["numpy"]["azav"], rtol=1e-6, equal_nan=True)


@pytest.mark.parametrize("bank,panel", [((5, 7), (10, 21)), ((2, 1), (4, 3)), ((1, 3), (2, 9)), ((33, 130), (66, 260)),
                                        ((4, 64), (8, 128)), ((3, 33), (6, 66)), ((2, 32), (4, 96)),
                                        pytest.param((256, 2), (512, 70), marks=pytest.mark.slow),
                                        ((300, 70), (600, 140))])
@pytest.mark.parametrize("order", ["reverse", "shuffle"])
def test_compiled_median_kernel_odd_group_sizes(rng, bank, panel, order):
    """The CUDA median kernels themselves: rows of up to 64 pixels in the rows warp kernel (1, 2, 3, 7, 32,
    33, 64: lanes half or fully used), columns of up to 256 in the columns warp kernel (1 to 256 values;
    66 and 70 columns: partly used tiles), longer groups in the shared-memory sort (rows of 70 and 130,
    columns of 300; p2 up to 512, partly filled last blocks); threads in two orders; against the array
    reference."""
    from test_common_mode import random_case

    model = DetectorModel(type="odd", panel_shape=panel, default_panels=3, data_mask=0x3FFF,
                          gain_names=EPIX.gain_names, pixel_um=100.0, saturation=None, bank_shape=bank,
                          high_gain_ranges=EPIX.high_gain_ranges)
    s, good, g = random_case(rng, (2, 3) + panel)
    for min_pixels in (0, 1):
        gpu = FakeGpu("compiled", order)
        got = MedianCommonMode(model, panel, ["rows", "cols"], gain_ranges="all", min_pixels=min_pixels,
                               max_correction=60.0, backend=gpu)(s, good, g)
        want = MedianCommonMode(model, panel, ["rows", "cols"], gain_ranges="all", min_pixels=min_pixels,
                                max_correction=60.0)(s, good, g)
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
    including JUNGFRAU's invalid gain bits, equal to the NumPy emulation."""
    if cuda_cpu.compiler() is None:
        pytest.skip("no C++ compiler to run the CUDA kernels on the CPU")
    kernel = cuda_cpu.build_file(find_kernel_source("calib.cu")).kernel(name)
    for events, npix, family, n_gains in ((1, 7, 2, 3), (9, 301, 1, 7), (19, 64, 0, 1), (8, 1000, 2, 2)):
        raw = rng.integers(0, 2**16, (events, npix), dtype=np.uint16)
        ped = rng.normal(1000, 50, (n_gains, npix)).astype(np.float32)
        scale = rng.normal(1, 0.1, (n_gains, npix)).astype(np.float32)
        mask = (rng.random(npix) > 0.1).astype(np.uint8)
        cfg = rng.integers(0, 32, npix).astype(np.uint8)
        outs = {}
        for run in ("compiled", "emulated"):
            out = np.full((events, npix), np.nan, np.float32)
            gi = np.full((events, npix), 99, np.int8)
            good = np.zeros((events, npix), bool)
            head = (raw, ped, scale, mask, cfg, out, good) if name == "calibrate_u16" else (raw, ped, mask, cfg, out, gi, good)
            args = head + (np.int64(events), np.int64(npix), np.int32(n_gains), np.int32(family),
                           np.int32(family == 1), np.uint32(0x3FFF))
            if run == "compiled":
                kernel(grid, (32,), args, order="reverse")
            else:
                EMULATORS[name](grid + (1,), (32,), 0, *args)
            outs[run] = (out, gi, good)
        for a, b in zip(outs["compiled"], outs["emulated"]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kernels", ["emulated", "compiled"])
@pytest.mark.parametrize("square", [False, True])
def test_cube_add_kernel_equals_numpy(rng, kernels, square):
    """The cube's frame sums through DetectorCube: the ``cube_add`` kernel (rows of consecutive events summed in a
    register, two splits, events out of the cube, a batch over more bins than device rows) equals the NumPy twin
    and the grouping formula."""
    from gpusmall.producer.cube import DetectorCube

    shape = (2, 5, 7)
    batches = [rng.normal(5, 20, (6,) + shape).astype(np.float32) for _ in range(3)]
    ids = [np.array([[0, 0, 1, -1, 1, 2], [-1, 2, 2, 2, 0, -1]]), np.array([[3, 3, 3, 3, 4, 4], [3, -1, 3, -1, 4, 4]]),
           np.array([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])]
    gpu, cpu = FakeGpu(kernels), Backend("numpy")
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


SUM_NAMES = ["calib", "square", "max", "nhits", "calib_thresADU10", "square_thresADU-5", "calib_max_thresADU30",
             "nhits_thresADU15.5", "max_thresADU1000", "calib_thresADU-3.5"]  # 10: two launches of <= 8


@pytest.mark.parametrize("kernels", ["emulated", "compiled"])
@pytest.mark.parametrize("damaged", [[], [1], [0, 1, 2]])
def test_run_sums_kernel_equals_numpy(rng, kernels, damaged):
    """Every kind of run sum, with and without thresholds, over two batches (the second with ``damaged``
    events left out; all of them: nothing changes), in one read of each batch (two launches for 10
    sums): the CUDA kernel through RunSums equals the NumPy twin, and both equal the formula."""
    from gpusmall.funcs.sums import RunSums

    shape = (2, 7, 9)
    batches = [rng.normal(5, 20, (3,) + shape).astype(np.float32) for _ in range(2)]
    batches[0][0, 0, 0, :4] = [0.0, 10.0, 30.0, 15.5]  # values on the thresholds
    keeps = [None, None if not damaged else ~np.isin(np.arange(3), damaged)]
    gpu, cpu = FakeGpu(kernels), Backend("numpy")
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
    written = ["calib", "calib_square", "calib_max", "nhits", "calib_thresADU10", "calib_square_thresADU-5",
               "calib_max_thresADU30", "nhits_thresADU15.5", "calib_max_thresADU1000", "calib_thresADU-3.5"]
    assert list(got[cpu]) == list(got[gpu]) == written  # smalldata_tools' names
    for name in written:
        kind, _, t = name.partition("_thresADU")
        t = float(t) if t else None
        v = d if t is None else np.where(d >= t, d, 0)
        want = {"calib": v.sum(0), "calib_square": (v * v).sum(0), "calib_max": v.max(0),
                "nhits": (d >= t if t is not None else d > 0).sum(0)}[kind]
        assert got[cpu][name].dtype == {"calib_max": np.float32, "nhits": np.int64}.get(kind, np.float64)
        for b in (gpu, cpu):
            assert got[b][name].dtype == got[cpu][name].dtype and got[b][name].shape == shape
            np.testing.assert_allclose(got[b][name], want, rtol=1e-12, err_msg=f"{name} {b.description}")


@pytest.mark.parametrize("kernels,order", [("emulated", "forward"), ("compiled", "shuffle")])
@pytest.mark.parametrize("use_rms,low", [(True, 2.0), (False, 12.0), (False, None)])
def test_droplet_mask_kernel_equals_numpy(rng, kernels, order, use_rms, low):
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
    gpu, cpu = FakeGpu(kernels, order), Backend("numpy")
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


@pytest.mark.parametrize("kernels,order", [("emulated", "forward"), ("compiled", "forward"), ("compiled", "shuffle")])
@pytest.mark.parametrize("density,shape", [(0.7, (3, 2, 20, 24)), (0.45, (2, 3, 33, 17)), (0.95, (1, 1, 40, 50)),
                                           (0.02, (4, 2, 16, 16))])
def test_union_find_labels_equal_scipy(rng, kernels, order, density, shape):
    """The CuPy labelling (union-find over the labelled pixels, kernels/label.cu) gives SciPy's labels at
    every labelled pixel, numbered the same way, with no droplet across a panel or event edge: dense
    masks (long chains, many merges between blocks running at once), sparse ones, odd sizes."""
    from gpusmall.funcs.droplet import label_stack

    mask = rng.random(shape) < density
    mask[..., 0, :] = mask[..., -1, :] = True  # full first and last rows: frames touch only across edges
    gpu = FakeGpu(kernels, order)
    idx = np.flatnonzero(mask)
    got, n = label_stack(gpu, mask, idx)
    want, n_want = label_stack(Backend("numpy"), mask, idx)
    assert n == n_want and n >= shape[0] * shape[1]
    np.testing.assert_array_equal(got, want)
    assert [name for name, *_ in gpu.launches] == ["label_union", "label_flatten"]


def test_union_find_on_no_pixels():
    from gpusmall.funcs.droplet import label_stack

    gpu = FakeGpu("emulated")
    got, n = label_stack(gpu, np.zeros((2, 1, 5, 6), bool))
    assert n == 0 and got.size == 0 and gpu.launches == []
