// The run sums of a batch (kernels/sums.cu run_sums, cpu_kernels._run_sums) over SIMD lanes: up to GROUP sums
// in one read of each event's pixels, their float64 accumulators in registers while the events go by.
//
// simd_sums.py compiles this file (native_build.py: -O3 -march=native, no fast-math, no FMA contraction)
// and calls gs_run_sums through ctypes. Per pixel and sum, as numba's kernel and the NumPy path: a float64
// accumulator starts at 0 (max: -inf) and takes the batch's events in order, x = float64(v) (with a
// threshold t: v >= t ? x : 0); calib a += x, square a += x * x, max a = (x > a || x != x) ? x : a (NumPy's
// maximum: NaN wins; after a threshold NaN is 0 and a = x > a ? x : a), nhits a += v >= t ? 1 : 0 (without
// a threshold v > 0); then acc += a (max: the same maximum of acc and a). The same operations in the same
// order give the same float64 bits. v >= t is compared in float64: float32 values and thresholds convert
// exactly, so the result is the float32 comparison's.
#include <cstdint>
#if defined(__AVX__)
#include <immintrin.h>
#endif

typedef double d4 __attribute__((vector_size(32)));
typedef float f4u __attribute__((vector_size(16), aligned(4), may_alias));
typedef double d4u __attribute__((vector_size(32), aligned(8), may_alias));

static inline d4 load_d4(const float* p) {  // 4 floats as doubles: one vcvtps2pd from memory where there is AVX
#if defined(__AVX__)
    return reinterpret_cast<d4>(_mm256_cvtps_pd(_mm_loadu_ps(p)));
#else
    return __builtin_convertvector(*reinterpret_cast<const f4u*>(p), d4);
#endif
}

// code = 2 * kind + has_threshold (kinds: sums.KINDS); nhits (kinds 3, 4) compares with t either way
static inline d4 step(int code, d4 a, d4 x, d4 t) {
    const d4 zero = d4{}, one = d4{} + 1.0;
    switch (code) {
    case 0: return a + x;
    case 1: { const d4 y = x >= t ? x : zero; return a + y; }
    case 2: return a + x * x;
    case 3: { const d4 y = x >= t ? x : zero; return a + y * y; }
    case 4: return (x > a) | (x != x) ? x : a;
    case 5: { const d4 y = x >= t ? x : zero; return y > a ? y : a; }
    case 6: case 7: return a + (x >= t ? one : zero);
    default: return a + (x > t ? one : zero);
    }
}

static inline double step1(int code, double a, double x, double t) {
    switch (code) {
    case 0: return a + x;
    case 1: { const double y = x >= t ? x : 0.0; return a + y; }
    case 2: return a + x * x;
    case 3: { const double y = x >= t ? x : 0.0; return a + y * y; }
    case 4: return (x > a || x != x) ? x : a;
    case 5: { const double y = x >= t ? x : 0.0; return y > a ? y : a; }
    case 6: case 7: return a + (x >= t ? 1.0 : 0.0);
    default: return a + (x > t ? 1.0 : 0.0);
    }
}

static constexpr bool is_max(int code) { return code == 4 || code == 5; }

constexpr int V = 2;      // vectors of 4 doubles a sum holds: 8 pixels a pass
constexpr int PX = 4 * V;
constexpr int GROUP = 4;  // sums a pass holds in registers (4 x 2 accumulators, 2 values, 4 thresholds)

// N sums over PX pixels of every event (rows `stride` floats apart) into out (N rows acc_stride apart). The
// loops over the sums unroll, so each sum's kind is a jump inside the events' loop and the
// accumulators stay in registers.
template <int N>
static void sums_n(const float* x, int64_t n_events, int64_t stride, const int* code, const double* thres,
                   double* out, int64_t acc_stride) {
    d4 a[N][V], t[N];
    int c[N];
#pragma GCC unroll 8
    for (int k = 0; k < N; ++k) {
        c[k] = code[k];
        t[k] = d4{} + thres[k];
#pragma GCC unroll 8
        for (int j = 0; j < V; ++j) a[k][j] = is_max(c[k]) ? d4{} - __builtin_inf() : d4{};
    }
    for (int64_t e = 0; e < n_events; ++e, x += stride) {
        d4 v[V];
#pragma GCC unroll 8
        for (int j = 0; j < V; ++j) v[j] = load_d4(x + 4 * j);
#pragma GCC unroll 8
        for (int k = 0; k < N; ++k)
#pragma GCC unroll 8
            for (int j = 0; j < V; ++j) a[k][j] = step(c[k], a[k][j], v[j], t[k]);
    }
#pragma GCC unroll 8
    for (int k = 0; k < N; ++k) {
        d4u* o = reinterpret_cast<d4u*>(out + k * acc_stride);
#pragma GCC unroll 8
        for (int j = 0; j < V; ++j) {
            const d4 cc = o[j];
            o[j] = is_max(c[k]) ? ((a[k][j] > cc) | (a[k][j] != a[k][j]) ? a[k][j] : cc) : cc + a[k][j];
        }
    }
}

typedef void (*SumsN)(const float*, int64_t, int64_t, const int*, const double*, double*, int64_t);
static const SumsN SUMS_N[GROUP + 1] = {nullptr, sums_n<1>, sums_n<2>, sums_n<3>, sums_n<4>};

// data (n_events, npix) float32, rows `stride` floats apart; code, thres (n_sums,); acc (n_sums, npix)
// float64, rows acc_stride apart, updated (a thread may take a range of pixels of the same arrays).
static void run_sums(const float* data, int64_t n_events, int64_t npix, int64_t stride, int64_t n_sums,
                     const int* code, const double* thres, double* acc, int64_t acc_stride) {
    int64_t p = 0;
    for (; p + PX <= npix; p += PX)
        for (int64_t k0 = 0; k0 < n_sums; k0 += GROUP) {
            const int64_t g = n_sums - k0 < GROUP ? n_sums - k0 : GROUP;
            SUMS_N[g](data + p, n_events, stride, code + k0, thres + k0, acc + k0 * acc_stride + p, acc_stride);
        }
    for (; p < npix; ++p) {  // the last npix % PX pixels
        for (int64_t k = 0; k < n_sums; ++k) {
            const int c = code[k];
            double a = is_max(c) ? -__builtin_inf() : 0.0;
            for (int64_t e = 0; e < n_events; ++e) a = step1(c, a, double(data[e * stride + p]), thres[k]);
            double* out = acc + k * acc_stride + p;
            *out = is_max(c) ? ((a > *out || a != a) ? a : *out) : *out + a;
        }
    }
}
