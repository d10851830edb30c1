// The median common mode's rows and cols steps, in place, with a sorting network over SIMD lanes: one group
// per lane, 8 or 16 groups at once.
//
// simd_median.py writes a network of a given length as a struct and a C entry point around rows_step or
// cols_step, compiles them with this file (native_build.py: -O3 -march=native, cached per machine) and
// calls them through ctypes. A group's median of its n used values (Use: good, and the gain range
// selected) is (v[max((n - 1) / 2, 0)] + v[min(n / 2, len - 1)]) * 0.5f in float32 over the group sorted
// in NumPy's order (-inf < ... < +inf < NaN), the pixels that do not enter as +inf. The network sorts
// int32 keys of the floats (a total order: every NaN becomes the largest key), so min/max are exact and
// the result is the reference's; -0.0 and +0.0 are ordered (-0 first) where np.sort leaves them as its
// algorithm does: equal as floats.
#include <cmath>

#include "simd_common.hpp"

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

// Which pixels enter a group's median: good, and (unless every range enters) a gain range selected.
struct Use {
    int32_t all_ranges;
    uint32_t range_mask;
    int64_t min_pixels;
    float max_correction;

    inline bool operator()(uint8_t good, int8_t g) const {
        const int32_t gi = g;
        const bool in_range = gi >= 0 && gi < 32 && ((range_mask >> (gi & 31)) & 1u);
        return good && (all_ranges || in_range);
    }
    template <class V, int W>
    inline V lanes(const uint8_t* good, const int8_t* g) const {  // -1 where used, 0 elsewhere
        const V gd = widen<W, false, V>(good);
        if (all_ranges) return gd != 0;
        const V gi = widen<W, true, V>(g);
        const V bit = ((V{} + int32_t(range_mask)) >> (gi & 31)) & 1;
        return (gd != 0) & (gi >= 0) & (gi < 32) & (bit != 0);
    }
    // the median of n used values, or NaN where the group is not corrected (too few, or too large)
    inline float correction(float med, int64_t n) const {
        return n > min_pixels && std::fabs(med) < max_correction ? med : __builtin_nanf("");
    }
};

template <class V>
static inline V used_keys(V bits, V used) {
    return used ? keys_of(bits) : V{} + 0x7F800000;  // +inf's key where a pixel does not enter
}

// The rows step in place: s (groups, Net::len) float32, good uint8 and g int8 alike; each group's used
// values' median is subtracted from its used pixels where the group is corrected.
template <class Net>
static void rows_step(float* s, const uint8_t* good, const int8_t* g, int64_t groups, const Use& use) {
    constexpr int W = ROWS_W;
    using V = typename Vec<W>::type;
    using VF = typename Vec<W>::f;
    constexpr int64_t len = Net::len;
    for (int64_t g0 = 0; g0 < groups; g0 += W) {
        V buf[len];
        V used[len];  // tiles: group q's masks of its values t .. t + W at used[q * len / W + t / W]
        int64_t n[W] = {};
        const int lanes = groups - g0 < W ? int(groups - g0) : W;
        const bool tiles = HAVE_SHUFFLE && lanes == W && len % W == 0;
        if (tiles) {  // W x W tiles, transposed in registers
            V per_group[W] = {};  // row q: group q's used pixels counted lane by lane (-1 each)
            for (int64_t t = 0; t < len; t += W) {
                V r[W];
                for (int q = 0; q < W; ++q) {
                    const int64_t o = (g0 + q) * len + t;
                    const V u = use.lanes<V, W>(good + o, g + o);
                    r[q] = used_keys(load<V>(reinterpret_cast<const int32_t*>(s + o)), u);
                    per_group[q] += u;
                    used[q * (len / W) + t / W] = u;
                }
                transpose<W>(r);
                for (int i = 0; i < W; ++i) buf[t + i] = r[i];
            }
            transpose<W>(per_group);  // lane q of row i: group q's count in lane i; one transpose, not one a tile
            V cnt{};
            for (int i = 0; i < W; ++i) cnt -= per_group[i];
            for (int q = 0; q < W; ++q) n[q] = cnt[q];
        } else {
            for (int lane = 0; lane < W; ++lane) {
                const int64_t o = (g0 + (lane < lanes ? lane : 0)) * len;
                for (int64_t i = 0; i < len; ++i) {
                    const bool u = use(good[o + i], g[o + i]);
                    buf[i][lane] = u ? key_of(s[o + i]) : 0x7F800000;
                    n[lane] += u;
                }
            }
        }
        Net::apply(buf);
        for (int q = 0; q < lanes; ++q) {
            const float d = use.correction(median_of<len>(buf, q, n[q]), n[q]);
            if (d != d) continue;
            const int64_t o = (g0 + q) * len;
            int64_t i = 0;
            for (; i + W <= len; i += W) {
                const V u = tiles ? used[q * (len / W) + i / W] : use.lanes<V, W>(good + o + i, g + o + i);
                VF x = load<VF>(s + o + i);
                x = u ? x - d : x;
                std::memcpy(s + o + i, &x, sizeof x);
            }
            for (; i < len; ++i)
                if (use(good[o + i], g[o + i])) s[o + i] -= d;
        }
    }
}

// The cols step in place: s (m, Net::len, cols) float32 row-major, good and g alike; the groups are the
// columns of each of the m blocks.
template <class Net>
static void cols_step(float* s, const uint8_t* good, const int8_t* g, int64_t m, int64_t cols, const Use& use) {
    constexpr int W = COLS_W;
    using V = typename Vec<W>::type;
    using VF = typename Vec<W>::f;
    constexpr int64_t rows = Net::len;
    for (int64_t q = 0; q < m; ++q) {
        float* sq = s + q * rows * cols;
        const uint8_t* gdq = good + q * rows * cols;
        const int8_t* gq = g + q * rows * cols;
        for (int64_t j0 = 0; j0 < cols; j0 += W) {
            V buf[rows];
            V cnt{};
            const int lanes = cols - j0 < W ? int(cols - j0) : W;
            if (lanes == W) {
                for (int64_t r = 0; r < rows; ++r) {
                    const int64_t o = r * cols + j0;
                    const V u = use.lanes<V, W>(gdq + o, gq + o);
                    buf[r] = used_keys(load<V>(reinterpret_cast<const int32_t*>(sq + o)), u);
                    cnt -= u;
                }
            } else {
                for (int64_t r = 0; r < rows; ++r)
                    for (int lane = 0; lane < W; ++lane) {
                        const int64_t o = r * cols + j0 + (lane < lanes ? lane : 0);
                        const bool u = use(gdq[o], gq[o]);
                        buf[r][lane] = u ? key_of(sq[o]) : 0x7F800000;
                        cnt[lane] += u;
                    }
            }
            Net::apply(buf);
            VF d;  // each column's correction, NaN where not corrected
            bool any = false;
            for (int lane = 0; lane < W; ++lane) {
                d[lane] = lane < lanes ? use.correction(median_of<rows>(buf, lane, cnt[lane]), cnt[lane])
                                       : __builtin_nanf("");
                any |= d[lane] == d[lane];
            }
            if (!any) continue;
            const V corrected = d == d;  // -1 per lane
            const VF zero{};
            const VF dz = corrected ? d : zero;
            if (lanes == W) {
                for (int64_t r = 0; r < rows; ++r) {
                    const int64_t o = r * cols + j0;
                    const V u = use.lanes<V, W>(gdq + o, gq + o) & corrected;
                    VF x;
                    std::memcpy(&x, sq + o, sizeof x);
                    x = u ? x - dz : x;
                    std::memcpy(sq + o, &x, sizeof x);
                }
            } else {
                for (int64_t r = 0; r < rows; ++r)
                    for (int lane = 0; lane < lanes; ++lane) {
                        const int64_t o = r * cols + j0 + lane;
                        if (d[lane] == d[lane] && use(gdq[o], gq[o])) sq[o] -= d[lane];
                    }
            }
        }
    }
}
