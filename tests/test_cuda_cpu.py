"""The CPU execution model of CUDA kernels (tests/cuda_cpu) does what the kernels' tests rely on.

Barriers, block shared memory, atomics across blocks running in parallel, thread orders that expose a
missing barrier, guard bytes behind dynamic shared memory, and the portable (ucontext) fiber switch.
"""

from __future__ import annotations

import cuda_cpu
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(cuda_cpu.compiler() is None, reason="no C++ compiler to run kernels on the CPU")

REDUCE = r"""
// block sum of 2^k floats by a shared-memory tree; `barrier` = 0 leaves out the barriers (a race)
extern "C" __global__ void block_sum(const float* x, float* out, int barrier)
{
    extern __shared__ float sh[];
    const int t = threadIdx.x;
    sh[t] = x[(long long)blockIdx.x * blockDim.x + t];
    if (barrier) __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s) sh[t] += sh[t + s];
        if (barrier) __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = sh[0];
}

extern "C" __global__ void histogram(const int* bin, long long n, int* counts, double* sums)
{
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;  // exited threads leave the barrier-free kernel
    atomicAdd(counts + bin[i], 1);
    atomicAdd(sums + bin[i], 0.5);
}

extern "C" __global__ void overrun(float* out, int extra)
{
    extern __shared__ float sh[];
    sh[threadIdx.x + extra] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = sh[threadIdx.x];
}

extern "C" __global__ void shift(const float* x, float* y, int n, int by)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i + by] = x[i];
}

// per-warp sums through shared memory: `mode` 0 __syncwarp (enough: each warp reads only its own part),
// 1 __syncwarp where lane 0 reads the next warp's part too (needs __syncthreads), 2 a divergent barrier
extern "C" __global__ void warp_sums(const float* x, float* out, int mode)
{
    extern __shared__ float sh[];
    const int t = threadIdx.x, lane = t % 32, w = t / 32;
    sh[t] = x[(long long)blockIdx.x * blockDim.x + t];
    if (mode == 2 && t < 16) __syncthreads();  // half the block never gets here: a deadlock
    __syncwarp();
    for (int s = 16; s > 0; s >>= 1) {
        const float v = lane < s ? sh[t + s] : 0.0f;
        __syncwarp();
        if (lane < s) sh[t] += v;
        __syncwarp();
    }
    float total = sh[w * 32];
    if (mode == 1 && lane == 0 && t + 32 < (int)blockDim.x) total += sh[t + 32];  // the next warp's sum
    if (lane == 0) out[blockIdx.x * (blockDim.x / 32) + w] = total;
}

// warp shuffles and votes: out[t] = x of lane ^ m, x of lane src, the warp's ballot of x > 0 and its popcount
extern "C" __global__ void shuffles(const float* x, float* xor_out, float* from_out, int* votes, int* pops,
                                    int m, int src)
{
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    const float v = x[t];
    xor_out[t] = __shfl_xor_sync(0xffffffffu, v, m);
    from_out[t] = __shfl_sync(0xffffffffu, v, src);
    const unsigned b = __ballot_sync(0xffffffffu, v > 0.0f);
    votes[t] = (int)b;
    pops[t] = __popc(b);
}

extern "C" __global__ void early_exit(const int* keep, int* out)
{
    extern __shared__ int cnt[];
    if (threadIdx.x == 0) cnt[0] = 0;
    __syncthreads();
    if (!keep[threadIdx.x]) return;  // leaves before the next barrier
    atomicAdd(cnt, 1);
    __syncthreads();
    if (threadIdx.x == blockDim.x - 1) out[blockIdx.x * 3 + blockIdx.y] = cnt[0] + 1000 * gridDim.y;
}
"""


@pytest.fixture(scope="module", params=[False, True], ids=["asm-switch", "ucontext"])
def src(request):
    return cuda_cpu.build(REDUCE, "runtime_test.cu", ucontext=request.param)


@pytest.mark.parametrize("order", ["forward", "reverse", "shuffle"])
def test_barriers_and_shared_memory(src, order):
    x = np.random.default_rng(0).integers(0, 100, 64 * 256).astype(np.float32)
    out = np.zeros(64, np.float32)
    src.kernel("block_sum")((64,), (256,), (x, out, np.int32(1)), shared_mem=256 * 4, order=order, seed=3)
    np.testing.assert_array_equal(out, x.reshape(64, 256).sum(1))


def test_a_missing_barrier_shows_as_a_difference_between_orders(src):
    x = np.random.default_rng(1).integers(0, 100, 8 * 256).astype(np.float32)
    results = []
    for order in ("forward", "reverse"):
        out = np.zeros(8, np.float32)
        src.kernel("block_sum")((8,), (256,), (x, out, np.int32(0)), shared_mem=256 * 4, order=order)
        results.append(out)
    assert not np.array_equal(results[0], results[1])


def test_warp_barriers_let_warps_run_independently(src):
    x = np.random.default_rng(4).integers(0, 100, 4 * 128).astype(np.float32)
    want = x.reshape(-1, 32).sum(1)
    for order in ("forward", "reverse", "shuffle"):
        out = np.zeros(16, np.float32)
        src.kernel("warp_sums")((4,), (128,), (x, out, np.int32(0)), shared_mem=128 * 4, order=order, seed=5)
        np.testing.assert_array_equal(out, want)


def test_a_warp_barrier_where_a_block_barrier_is_needed_shows(src):
    x = np.random.default_rng(5).integers(0, 100, 128).astype(np.float32)
    results = []
    for order in ("forward", "reverse"):
        out = np.zeros(4, np.float32)
        src.kernel("warp_sums")((1,), (128,), (x, out, np.int32(1)), shared_mem=128 * 4, order=order)
        results.append(out)
    assert not np.array_equal(results[0], results[1])


@pytest.mark.parametrize("order", ["forward", "reverse", "shuffle"])
def test_warp_shuffles_and_votes(src, order):
    rng = np.random.default_rng(6)
    x = rng.normal(size=3 * 128).astype(np.float32)
    lane = np.arange(x.size) % 32
    warp0 = np.arange(x.size) // 32 * 32
    for m, srcl in ((1, 0), (16, 31), (5, 7)):
        xo, fo = np.zeros_like(x), np.zeros_like(x)
        votes, pops = np.zeros(x.size, np.int32), np.zeros(x.size, np.int32)
        src.kernel("shuffles")((3,), (128,), (x, xo, fo, votes, pops, np.int32(m), np.int32(srcl)), order=order, seed=m)
        np.testing.assert_array_equal(xo, x[warp0 + (lane ^ m)])
        np.testing.assert_array_equal(fo, x[warp0 + srcl])
        want = np.array([sum(1 << k for k in range(32) if x[w + k] > 0) for w in warp0], np.uint32)
        np.testing.assert_array_equal(votes.view(np.uint32), want)
        np.testing.assert_array_equal(pops, [bin(int(v)).count("1") for v in want])


def test_divergent_barriers_are_a_deadlock(src):
    with pytest.raises(cuda_cpu.BarrierDeadlock, match="warp_sums"):
        src.kernel("warp_sums")(
            (1,), (64,), (np.zeros(64, np.float32), np.zeros(2, np.float32), np.int32(2)), shared_mem=64 * 4
        )


def test_atomics_across_parallel_blocks(src):
    rng = np.random.default_rng(2)
    n = 300_001
    bins = rng.integers(0, 17, n).astype(np.int32)
    counts, sums = np.zeros(17, np.int32), np.zeros(17, np.float64)
    k = src.kernel("histogram")
    k.workers = 4
    k(((n + 127) // 128,), (128,), (bins, np.int64(n), counts, sums))
    np.testing.assert_array_equal(counts, np.bincount(bins, minlength=17))
    np.testing.assert_array_equal(sums, 0.5 * np.bincount(bins, minlength=17))


def test_writing_past_shared_memory_is_caught(src):
    out = np.zeros(32, np.float32)
    src.kernel("overrun")((1,), (32,), (out, np.int32(0)), shared_mem=32 * 4)
    np.testing.assert_array_equal(out, 1.0)
    with pytest.raises(cuda_cpu.SharedMemoryOverrun, match="overrun"):
        src.kernel("overrun")((1,), (32,), (out, np.int32(1)), shared_mem=32 * 4)


def test_global_arrays_are_guarded(src):
    x = np.arange(10, dtype=np.float32)
    y = np.zeros(10, np.float32)
    k = src.kernel("shift")
    k((1,), (16,), (x, y, np.int32(10), np.int32(0)))
    np.testing.assert_array_equal(y, x)
    with pytest.raises(cuda_cpu.GlobalMemoryOverrun, match=r"shift\(y\): 0 bytes written before the array, 4 after"):
        k((1,), (16,), (x, y, np.int32(10), np.int32(1)))
    with pytest.raises(cuda_cpu.GlobalMemoryOverrun, match="8 bytes written before"):
        k((1,), (16,), (x, y, np.int32(10), np.int32(-2)))
    z = np.arange(12, dtype=np.float32)
    k((1,), (16,), (z, z, np.int32(10), np.int32(2)))  # one array as two arguments: one copy (threads in order)
    np.testing.assert_array_equal(z, [0, 1] * 6)
    with pytest.raises(ValueError, match="overlaps"):
        k((1,), (16,), (z[:10], z[2:], np.int32(10), np.int32(0)))


def test_reading_past_an_array_gives_nan(src):
    x = np.arange(10, dtype=np.float32)
    y = np.zeros(12, np.float32)
    src.kernel("shift")((1,), (16,), (x, y, np.int32(12), np.int32(0)))
    np.testing.assert_array_equal(y[:10], x)
    assert np.isnan(y[10:]).all()


def test_unwritten_shared_memory_reads_as_nan(src):
    out = np.zeros(32, np.float32)
    src.kernel("overrun")((1,), (16,), (out, np.int32(16)), shared_mem=64 * 4)  # writes sh[16:32], reads sh[0:16]
    assert np.isnan(out[:16]).all() and (out[16:] == 0).all()


def test_exited_threads_leave_the_barrier_and_2d_grids(src):
    keep = (np.arange(64) % 3 != 0).astype(np.int32)
    keep[-1] = 1
    out = np.zeros(6, np.int32)
    src.kernel("early_exit")((2, 3), (64,), (keep, out), shared_mem=4, order="shuffle")
    np.testing.assert_array_equal(out, keep.sum() + 3000)


def test_launch_argument_checks(src):
    with pytest.raises(TypeError, match="C-contiguous float32"):
        src.kernel("block_sum")((1,), (4,), (np.zeros(8, np.float64), np.zeros(1, np.float32), np.int32(1)))
    with pytest.raises(TypeError, match="2 arguments for 3"):
        src.kernel("block_sum")((1,), (4,), (np.zeros(8, np.float32), np.zeros(1, np.float32)))
    with pytest.raises(KeyError, match="no kernel 'nope'"):
        src.kernel("nope")
