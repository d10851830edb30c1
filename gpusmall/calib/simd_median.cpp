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

typedef int32_t vkey8 __attribute__((vector_size(32)));
typedef int32_t vkey16 __attribute__((vector_size(64)));
template <int W> struct Vec;
template <> struct Vec<8> { using type = vkey8; };
template <> struct Vec<16> { using type = vkey16; };

// Lanes per vector. Rows: 8 (the 48-64 vectors of a group stay in the 32 registers of AVX-512 or spill
// less; faster than 16 on Zen 4). Cols: 16 with AVX-512 (the network runs from L1 either way).
constexpr int ROWS_W = 8;
#if defined(__AVX512F__)
constexpr int COLS_W = 16;
#else
constexpr int COLS_W = 8;
#endif

static inline int32_t key_of(float x) {
    int32_t b;
    std::memcpy(&b, &x, 4);
    if ((b & 0x7FFFFFFF) > 0x7F800000) return 0x7FFFFFFF;  // NaN (either sign): after +inf, as np.sort
    return b ^ ((b >> 31) & 0x7FFFFFFF);
}

template <class V>
static inline V keys_of(V b) {
    const V mag = b & 0x7FFFFFFF;
    const V k = b ^ ((b >> 31) & 0x7FFFFFFF);
    return mag > 0x7F800000 ? V{} + 0x7FFFFFFF : k;
}

template <class V>
static inline V load_keys(const float* p) {
    V b;
    std::memcpy(&b, p, sizeof b);
    return keys_of(b);
}

static inline float float_of(int32_t k) {
    int32_t b = k ^ ((k >> 31) & 0x7FFFFFFF);
    float x;
    std::memcpy(&x, &b, 4);
    return x;
}

// One comparator of a network over the vectors b (min to i, max to j); the network is written out by
// simd_median.py as a struct with `len` and `template <class V> apply(V* b)`, CX(i, j) after CX(i, j),
// and compiled with this file: the compiler sees every index.
#define CX(i, j) { const V x = b[i], y = b[j]; b[i] = x < y ? x : y; b[j] = x < y ? y : x; }

template <int64_t len, class V>
static inline float median_of(const V* buf, int lane, int64_t n) {
    const int64_t lo = n >= 1 ? (n - 1) / 2 : 0;
    const int64_t hi = n / 2 < len ? n / 2 : len - 1;
    return (float_of(buf[lo][lane]) + float_of(buf[hi][lane])) * 0.5f;
}

#if defined(__GNUC__) && !defined(__clang__)
// One butterfly stage of a W x W transpose: rows i and i + S swap their off-diagonal S x S blocks.
template <int W, int S, class V>
static inline void transpose_stage(V* r) {
    V m1, m2;
    for (int j = 0; j < W; ++j) {
        m1[j] = (j & S) ? W + (j - S) : j;
        m2[j] = (j & S) ? W + j : j + S;
    }
    for (int i = 0; i < W; ++i)
        if (!(i & S)) {
            const V a = r[i], b = r[i + S];
            r[i] = __builtin_shuffle(a, b, m1);
            r[i + S] = __builtin_shuffle(a, b, m2);
        }
}

template <int W, class V>
static inline void transpose(V* r) {
    if constexpr (W >= 16) transpose_stage<W, 8>(r);
    transpose_stage<W, 4>(r);
    transpose_stage<W, 2>(r);
    transpose_stage<W, 1>(r);
}
constexpr bool HAVE_SHUFFLE = true;
#else
template <int W, class V>
static inline void transpose(V*) {}
constexpr bool HAVE_SHUFFLE = false;
#endif

// groups contiguous groups of Net::len floats (v, row-major); n (groups) used values each; med (groups) out.
template <class Net>
static void medians_rows(const float* v, int64_t groups, const int64_t* n, float* med) {
    constexpr int W = ROWS_W;
    using V = typename Vec<W>::type;
    constexpr int64_t len = Net::len;
    for (int64_t g0 = 0; g0 < groups; g0 += W) {
        V buf[len];
        const int lanes = groups - g0 < W ? int(groups - g0) : W;
        if (HAVE_SHUFFLE && lanes == W && len % W == 0) {  // W x W tiles, transposed in registers
            for (int64_t t = 0; t < len; t += W) {
                V r[W];
                for (int g = 0; g < W; ++g) r[g] = load_keys<V>(v + (g0 + g) * len + t);
                transpose<W>(r);
                for (int i = 0; i < W; ++i) buf[t + i] = r[i];
            }
        } else {
            for (int lane = 0; lane < W; ++lane) {
                const float* src = v + (g0 + (lane < lanes ? lane : 0)) * len;
                for (int64_t i = 0; i < len; ++i) buf[i][lane] = key_of(src[i]);
            }
        }
        Net::apply(buf);
        for (int lane = 0; lane < lanes; ++lane) med[g0 + lane] = median_of<len>(buf, lane, n[g0 + lane]);
    }
}

// w (m, Net::len, cols) row-major: the groups are its columns (m * cols of them); n, med (m, cols).
template <class Net>
static void medians_cols(const float* w, int64_t m, int64_t cols, const int64_t* n, float* med) {
    constexpr int W = COLS_W;
    using V = typename Vec<W>::type;
    constexpr int64_t rows = Net::len;
    for (int64_t q = 0; q < m; ++q) {
        const float* wq = w + q * rows * cols;
        for (int64_t j0 = 0; j0 < cols; j0 += W) {
            V buf[rows];
            const int lanes = cols - j0 < W ? int(cols - j0) : W;
            if (lanes == W) {
                for (int64_t r = 0; r < rows; ++r) buf[r] = load_keys<V>(wq + r * cols + j0);
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
