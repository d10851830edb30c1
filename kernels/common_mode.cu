// Median common mode, one step (rows or cols) over a batch (SPEC section 4, `median`).
//
// NumPy twin: gpusmall/calib/common_mode.py MedianCommonMode.reference (and group_median).
//
// s (float32, in place), good (bool) and g (int8 gain index) are flat (events, panels, rows, cols)
// arrays. Group gid = outer * n_inner + inner holds the n pixels at
//     outer * outer_stride + inner * inner_stride + k * elem_stride,   k < n.
// A pixel is *used* when good and its gain range is in range_mask (bit r = range r takes part).
//
// Each block handles gpb groups. A group's values go to shared memory padded to p2 (a power of two
// >= n), unused pixels and padding as +inf, and are sorted with a bitonic network (p2/2 threads per
// group, one compare-exchange each per stage; stages inside a warp's 64 values sync the warp only).
// With m used values the median is
// (v[(m-1)/2] + v[m/2]) * 0.5 (the numpy.median of an even count); it is subtracted from the used
// pixels when m > min_pixels and |median| < max_correction.
//
// Loads/stores: with elem_stride == 1 (rows) consecutive threads take consecutive elements of a
// group; otherwise (cols, groups are neighbouring columns) consecutive threads take the same
// element of consecutive groups, so global accesses are coalesced either way. Shared rows have a
// pitch of p2 + 1 floats to avoid bank conflicts in the second pattern.

// no headers: NVRTC compiles this without the CUDA include directory
#define CM_INF __int_as_float(0x7f800000)
#define CM_NAN __int_as_float(0x7fffffff)

extern "C" __global__ void cm_median_step(
    float* __restrict__ s,
    const bool* __restrict__ good,
    const signed char* __restrict__ g,
    long long n_groups,
    int n,
    int p2,
    int gpb,
    long long n_inner,
    long long outer_stride,
    long long inner_stride,
    long long elem_stride,
    int contiguous,
    unsigned int range_mask,
    int min_pixels,
    float max_correction)
{
    extern __shared__ float sh[];
    const int pitch = p2 + 1;
    float* med = sh + gpb * pitch;                    // gpb medians (gpb * pitch is at most ~1K)
    int* count = (int*)(med + gpb);                   // gpb used counts
    const long long first = (long long)blockIdx.x * gpb;
    const int tid = threadIdx.x;
    const int nthreads = blockDim.x;

    if (tid < gpb) count[tid] = 0;
    __syncthreads();

    // load: used values, +inf elsewhere (and for padding / groups past the end)
    const int total = gpb * p2;
    for (int idx = tid; idx < total; idx += nthreads) {
        int grp, k;
        if (contiguous) { grp = idx / p2; k = idx % p2; }
        else { grp = idx % gpb; k = idx / gpb; }
        const long long gid = first + grp;
        float v = CM_INF;
        if (k < n && gid < n_groups) {
            const long long outer = gid / n_inner, inner = gid % n_inner;
            const long long i = outer * outer_stride + inner * inner_stride + (long long)k * elem_stride;
            const int gi = (int)g[i];
            const bool use = good[i] && gi >= 0 && gi < 32 && ((range_mask >> gi) & 1u);
            if (use) {
                v = s[i];
                atomicAdd(&count[grp], 1);
            }
        }
        sh[grp * pitch + k] = v;
    }
    __syncthreads();

    // bitonic sort of each group's p2 values, ascending. With stride <= 32 the 32 threads of a warp
    // compare-exchange only among the 64 values [64w', 64w' + 64) of their own group (w' = the warp's
    // index inside the group; several small groups share a warp), so a stage whose stride and whose
    // next stage's stride are both <= 32 needs only __syncwarp; the others (and the last) need the block.
    const int half = p2 >> 1;
    const int grp = tid / half;
    const int j = tid % half;
    float* a = sh + grp * pitch;
    for (int size = 2; size <= p2; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            if (grp < gpb) {
                const int pos = 2 * j - (j & (stride - 1));
                const int partner = pos + stride;
                const bool ascending = (pos & size) == 0;
                const float x = a[pos], y = a[partner];
                if ((x > y) == ascending) { a[pos] = y; a[partner] = x; }
            }
            // the next stage's stride: halved, or the first of the next size (= size); after the last
            // stage the medians are read across groups, which needs the whole block
            const int next = stride > 1 ? stride >> 1 : (size < p2 ? size : p2 + 64);
            if (stride > 32 || next > 32) __syncthreads();
            else __syncwarp();
        }
    }

    // median per group (NaN = leave the group as it is)
    if (tid < gpb) {
        const int m = count[tid];
        float mv = CM_NAN;
        if (m > min_pixels && m > 0) {
            const float* b = sh + tid * pitch;
            const float x = __fmul_rn(__fadd_rn(b[(m - 1) / 2], b[m / 2]), 0.5f);
            if (fabsf(x) < max_correction) mv = x;
        }
        med[tid] = mv;
    }
    __syncthreads();

    // subtract from the used pixels
    for (int idx = tid; idx < total; idx += nthreads) {
        int gr, k;
        if (contiguous) { gr = idx / p2; k = idx % p2; }
        else { gr = idx % gpb; k = idx / gpb; }
        const long long gid = first + gr;
        const float mv = med[gr];
        if (k < n && gid < n_groups && mv == mv) {  // mv == mv: not NaN
            const long long outer = gid / n_inner, inner = gid % n_inner;
            const long long i = outer * outer_stride + inner * inner_stride + (long long)k * elem_stride;
            const int gi = (int)g[i];
            const bool use = good[i] && gi >= 0 && gi < 32 && ((range_mask >> gi) & 1u);
            if (use) s[i] = __fsub_rn(s[i], mv);
        }
    }
}

#define FULL_WARP 0xffffffffu

// Bitonic sort, ascending, of the 32 * K values a warp holds in registers: lane l holds elements
// l + 32 j in v[j] (K a power of two). Strides >= 32 pair registers of the same lane, shorter strides
// lanes (__shfl_xor_sync). The loops unroll completely, so every register index is a compile-time
// constant (v stays in registers; an index known only at run time would put it in local memory).
template <int K>
__device__ __forceinline__ void warp_bitonic_sort(float (&v)[K], int lane)
{
#pragma unroll
    for (int size = 2; size <= 32 * K; size <<= 1) {
#pragma unroll
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            if (stride >= 32) {  // partners j and j ^ (stride / 32) in the same lane
                const int js = stride >> 5;
#pragma unroll
                for (int j = 0; j < K; ++j) {
#pragma unroll
                    for (int q = 1; q < K; q <<= 1) {  // q == js, with constant indices
                        if (q != js || (j & q)) continue;
                        const bool ascending = ((lane + 32 * j) & size) == 0;
                        const float lo = fminf(v[j], v[j | q]), hi = fmaxf(v[j], v[j | q]);
                        v[j] = ascending ? lo : hi;
                        v[j | q] = ascending ? hi : lo;
                    }
                }
            } else {
#pragma unroll
                for (int j = 0; j < K; ++j) {
                    const int e = lane + 32 * j;
                    const float other = __shfl_xor_sync(FULL_WARP, v[j], stride);
                    const bool ascending = (e & size) == 0;
                    const bool lower = (e & stride) == 0;  // the smaller index of the pair
                    v[j] = (lower == ascending) ? fminf(v[j], other) : fmaxf(v[j], other);
                }
            }
        }
    }
}

// The median step's correction from the warp's sorted values (m of them used, the rest +inf): the mean
// of the middle two (numpy.median of an even count), NaN (leave the group as it is) unless
// m > min_pixels and |median| < max_correction. Every lane gets it.
template <int K>
__device__ __forceinline__ float warp_median_correction(const float (&v)[K], int lane, int m, int min_pixels,
                                                        float max_correction)
{
    const int ia = (m - 1) / 2 > 0 ? (m - 1) / 2 : 0, ib = m / 2;
    // each lane's candidates v[ia / 32] and v[ib / 32], picked by masks (an indexed pick would put v in
    // local memory)
    int sa = 0, sb = 0;
#pragma unroll
    for (int j = 0; j < K; ++j) {
        sa |= (j == (ia >> 5) ? -1 : 0) & __float_as_int(v[j]);
        sb |= (j == (ib >> 5) ? -1 : 0) & __float_as_int(v[j]);
    }
    const float a = __shfl_sync(FULL_WARP, __int_as_float(sa), ia & 31);
    const float b = __shfl_sync(FULL_WARP, __int_as_float(sb), ib & 31);
    if (!(m > min_pixels && m > 0)) return CM_NAN;
    const float x = __fmul_rn(__fadd_rn(a, b), 0.5f);
    return fabsf(x) < max_correction ? x : CM_NAN;
}

// The same step for groups of at most 64 contiguous pixels (rows of a bank: 48 on ePix10ka, 64 on
// JUNGFRAU), one warp per group and no shared memory: lane l holds elements l and l + 32 in registers
// (warp_bitonic_sort<2>). The median, the conditions and the subtraction are those of cm_median_step
// (same numbers). Group gid holds the n pixels at outer * outer_stride + inner * inner_stride + k, k < n <= 64.
extern "C" __global__ void cm_median_rows_warp(
    float* __restrict__ s,
    const bool* __restrict__ good,
    const signed char* __restrict__ g,
    long long n_groups,
    int n,
    long long n_inner,
    long long outer_stride,
    long long inner_stride,
    unsigned int range_mask,
    int min_pixels,
    float max_correction)
{
    const int lane = threadIdx.x & 31;
    const long long gid = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (gid >= n_groups) return;  // whole warps leave together (gid is the same for the 32 lanes)
    const long long base = (gid / n_inner) * outer_stride + (gid % n_inner) * inner_stride;

    float v[2], orig[2];
    bool use[2];
    int m = 0;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int k = lane + 32 * h;
        use[h] = false;
        v[h] = CM_INF;
        if (k < n) {
            const long long i = base + k;
            const int gi = (int)g[i];
            use[h] = good[i] && gi >= 0 && gi < 32 && ((range_mask >> gi) & 1u);
            if (use[h]) v[h] = s[i];
        }
        orig[h] = v[h];
        m += __popc(__ballot_sync(FULL_WARP, use[h]));
    }
    warp_bitonic_sort<2>(v, lane);
    const float mv = warp_median_correction<2>(v, lane, m, min_pixels, max_correction);
    if (!(mv == mv)) return;  // NaN: leave the group as it is
#pragma unroll
    for (int h = 0; h < 2; ++h)
        if (use[h]) s[base + lane + 32 * h] = __fsub_rn(orig[h], mv);
}

// The same step for columns of at most 256 pixels (ePix10ka 176, JUNGFRAU 256): a block takes 32
// neighbouring columns of one bank row, loads them row by row (coalesced) into shared memory (a tile of
// n x 32, pitch 33) with each pixel's gain code (its range if good, else -1), and each of its 8 warps sorts
// 4 of the columns in registers (warp_bitonic_sort<8>: lane l holds elements l + 32 j, unused pixels as
// +inf). The tile still holds the original values: the used ones get the column's median subtracted as
// the block writes the tile back. With apply_scale (the last common-mode step), the write-back is
// scale_apply's as well: every pixel becomes good ? value * scale[range * npix + pixel] : 0 (scale:
// (ranges, npix) float32), so the batch is not read once more. Same numbers as cm_median_step (+ scale_apply).
// Column inner (< n_inner) of bank row outer holds the n pixels at outer * outer_stride + inner + k * n_inner.
#define COLS_PER_BLOCK 32
#define COL_VALUES_PER_LANE 8

extern "C" __global__ void cm_median_cols_warp(
    float* __restrict__ s,
    const bool* __restrict__ good,
    const signed char* __restrict__ g,
    long long n_outer,
    int n,
    long long n_inner,
    long long outer_stride,
    unsigned int range_mask,
    int min_pixels,
    float max_correction,
    const float* __restrict__ scale,
    long long npix,
    int apply_scale)
{
    // shared: n * (COLS_PER_BLOCK + 1) values, COLS_PER_BLOCK medians, then n * (COLS_PER_BLOCK + 1) gain codes
    extern __shared__ float tile[];
    const int pitch = COLS_PER_BLOCK + 1;
    float* med = tile + n * pitch;
    signed char* code = (signed char*)(med + COLS_PER_BLOCK);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    const long long tiles = (n_inner + COLS_PER_BLOCK - 1) / COLS_PER_BLOCK;
    const long long outer = blockIdx.x / tiles;
    const long long c0 = (blockIdx.x % tiles) * COLS_PER_BLOCK;
    if (outer >= n_outer) return;  // the whole block
    const long long base = outer * outer_stride + c0;
    const bool col_in = c0 + lane < n_inner;

    for (int k = warp; k < n; k += n_warps) {  // row k of the tile: 32 neighbouring pixels
        float v = CM_INF;
        signed char gc = -1;
        if (col_in) {
            const long long i = base + (long long)k * n_inner + lane;
            gc = good[i] ? g[i] : (signed char)-1;
            v = s[i];
        }
        tile[k * pitch + lane] = v;
        code[k * pitch + lane] = gc;
    }
    __syncthreads();

    for (int c = warp; c < COLS_PER_BLOCK; c += n_warps) {
        float v[COL_VALUES_PER_LANE];
        int m = 0;
#pragma unroll
        for (int j = 0; j < COL_VALUES_PER_LANE; ++j) {
            const int e = lane + 32 * j;
            v[j] = CM_INF;
            if (e < n) {
                const int gi = code[e * pitch + c];
                if (gi >= 0 && gi < 32 && ((range_mask >> gi) & 1u)) v[j] = tile[e * pitch + c];
            }
            m += __popc(__ballot_sync(FULL_WARP, v[j] < CM_INF));
        }
        warp_bitonic_sort<COL_VALUES_PER_LANE>(v, lane);
        const float mv = warp_median_correction<COL_VALUES_PER_LANE>(v, lane, m, min_pixels, max_correction);
        if (lane == 0) med[c] = mv;
    }
    __syncthreads();

    if (!col_in) return;
    const float mv = med[lane];
    const bool correct = mv == mv;  // NaN: leave the column as it is
    for (int k = warp; k < n; k += n_warps) {
        const long long i = base + (long long)k * n_inner + lane;
        const int gi = code[k * pitch + lane];
        const bool used = gi >= 0 && gi < 32 && ((range_mask >> gi) & 1u);
        float x = tile[k * pitch + lane];
        if (used && correct) x = __fsub_rn(x, mv);
        if (apply_scale) s[i] = gi >= 0 ? __fmul_rn(x, scale[(long long)gi * npix + i % npix]) : 0.0f;
        else if (used && correct) s[i] = x;
    }
}
