// Medians of many small groups with a sorting network over SIMD lanes: one group per lane, W groups at once.
//
// simd_median.py writes a network of a given length as a struct and a C entry point around medians_rows or
// medians_cols, compiles them with this file (native_build.py: -O3 -march=native, cached per machine) and
// calls them through ctypes.
// Values are float32 with +inf where a pixel does not enter the median; a group's median of n used
// values is (v[max((n - 1) / 2, 0)] + v[min(n / 2, len - 1)]) * 0.5f in float32 over the group sorted in
// NumPy's order (-inf < ... < +inf < NaN). The network sorts int32 keys of the floats (a total order:
// every NaN becomes the largest key), so min/max are exact and the result is the reference's; -0.0 and
// +0.0 are ordered (-0 first) where np.sort leaves them as its algorithm does: equal as floats.
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
constexpr int W = 16;
#else
constexpr int W = 8;  // AVX2: one ymm; SSE / NEON: two registers
#endif

typedef int32_t vkey __attribute__((vector_size(W * 4), aligned(W * 4)));

static inline int32_t key_of(float x) {
    int32_t b;
    std::memcpy(&b, &x, 4);
    if ((b & 0x7FFFFFFF) > 0x7F800000) return 0x7FFFFFFF;  // NaN (either sign): after +inf, as np.sort
    return b ^ ((b >> 31) & 0x7FFFFFFF);
}

static inline vkey keys_of(vkey b) {
    vkey mag = b & 0x7FFFFFFF;
    vkey k = b ^ ((b >> 31) & 0x7FFFFFFF);
    return mag > 0x7F800000 ? vkey{} + 0x7FFFFFFF : k;
}

static inline float float_of(int32_t k) {
    int32_t b = k ^ ((k >> 31) & 0x7FFFFFFF);
    float x;
    std::memcpy(&x, &b, 4);
    return x;
}

// One comparator of a network over the vectors b (min to i, max to j); the network is written out by
// simd_median.py as a struct with `len` and `apply(vkey* b)`, CX(i, j) after CX(i, j), and compiled
// with this file: the compiler sees every index.
#define CX(i, j) { const vkey x = b[i], y = b[j]; b[i] = x < y ? x : y; b[j] = x < y ? y : x; }

template <int64_t len>
static inline float median_of(const vkey* buf, int lane, int64_t n) {
    const int64_t lo = n >= 1 ? (n - 1) / 2 : 0;
    const int64_t hi = n / 2 < len ? n / 2 : len - 1;
    return (float_of(buf[lo][lane]) + float_of(buf[hi][lane])) * 0.5f;
}

// groups contiguous groups of Net::len floats (v, row-major); n (groups) used values each; med (groups) out.
template <class Net>
static void medians_rows(const float* v, int64_t groups, const int64_t* n, float* med) {
    constexpr int64_t len = Net::len;
    for (int64_t g0 = 0; g0 < groups; g0 += W) {
        vkey buf[len];
        const int lanes = groups - g0 < W ? int(groups - g0) : W;
        for (int lane = 0; lane < W; ++lane) {
            const float* src = v + (g0 + (lane < lanes ? lane : 0)) * len;
            for (int64_t i = 0; i < len; ++i) buf[i][lane] = key_of(src[i]);
        }
        Net::apply(buf);
        for (int lane = 0; lane < lanes; ++lane) med[g0 + lane] = median_of<len>(buf, lane, n[g0 + lane]);
    }
}

// w (m, Net::len, cols) row-major: the groups are its columns (m * cols of them); n, med (m, cols).
template <class Net>
static void medians_cols(const float* w, int64_t m, int64_t cols, const int64_t* n, float* med) {
    constexpr int64_t rows = Net::len;
    for (int64_t q = 0; q < m; ++q) {
        const float* wq = w + q * rows * cols;
        for (int64_t j0 = 0; j0 < cols; j0 += W) {
            vkey buf[rows];
            const int lanes = cols - j0 < W ? int(cols - j0) : W;
            if (lanes == W) {
                for (int64_t r = 0; r < rows; ++r) {
                    vkey b;
                    std::memcpy(&b, wq + r * cols + j0, sizeof b);
                    buf[r] = keys_of(b);
                }
            } else {
                for (int64_t r = 0; r < rows; ++r)
                    for (int lane = 0; lane < W; ++lane)
                        buf[r][lane] = key_of(wq[r * cols + j0 + (lane < lanes ? lane : 0)]);
            }
            Net::apply(buf);
            for (int lane = 0; lane < lanes; ++lane)
                med[q * cols + j0 + lane] = median_of<rows>(buf, lane, n[q * cols + j0 + lane]);
        }
    }
}

extern "C" int gs_simd_lanes() { return W; }
