// The one-pass calibration of uint16 raw frames over SIMD lanes: gain key from the raw word, the key's
// pedestal and scale selected among the pixel's options, out = ok ? (float32(w & dmask) - P) * S : 0,
// good = ok, ok the key's bit of the pixel's okb byte.
//
// simd_calib.py compiles this file (native_build.py: -O3 -march=native, no fast-math, no FMA contraction)
// and calls calib_u16 through ctypes; cpu_kernels.py builds the tables and keeps numba's _calib1/2/3 as
// the fallback. The tables are cpu_kernels' (options then scales, rows of `stride` floats): the option of
// key k is k for one-bit gains (ePix10ka: bit 14), min(k, 2) for two bits (JUNGFRAU: bits 14-15), 0 for
// a single range. Selecting the option's loaded pedestal and scale before the arithmetic gives the same
// float32 result as computing every option and selecting the result (numba's form): one subtraction and
// one multiplication of the same operands.
#include "simd_common.hpp"

#if defined(__AVX512F__)
#define GS_CALIB_W 16
#else
#define GS_CALIB_W 8
#endif
constexpr int CW = GS_CALIB_W;  // pixels per vector (a macro too: the preprocessor picks the widening code)

using ci32 = Vec<CW>::type;
using cf32 = Vec<CW>::f;

// Float vectors loaded and stored through an unaligned, aliasing view (plain vector moves; a memcpy into a
// local went through the stack here).
typedef float cf32u __attribute__((vector_size(CW * 4), aligned(4), may_alias));

static inline cf32 loadf(const float* p) { return *reinterpret_cast<const cf32u*>(p); }

static inline void storef(float* p, cf32 v) { *reinterpret_cast<cf32u*>(p) = v; }

// CW raw words as int32 lanes (zero-extended) and 0/1 int32 lanes back to bytes: one vpmovzxwd / vpmovdb
// (or packs) where the CPU has them; the okb bytes widen with simd_common's widen.
static inline ci32 widen_u16(const uint16_t* p) {
#if GS_CALIB_W == 16
    return reinterpret_cast<ci32>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif defined(__AVX2__)
    return reinterpret_cast<ci32>(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
    return __builtin_convertvector(load<Vec<CW>::u16>(p), ci32);
#endif
}

static inline void store_bytes(uint8_t* p, ci32 v) {  // v's lanes are 0 or 1
#if GS_CALIB_W == 16
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(reinterpret_cast<__m512i>(v)));
#elif defined(__AVX2__)
    const __m256i x = reinterpret_cast<__m256i>(v);
    const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(w, w));
#else
    const Vec<CW>::u8 b = __builtin_convertvector(v, Vec<CW>::u8);
    std::memcpy(p, &b, sizeof b);
#endif
}

// Whether every lane's key bits (km) are clear (0), all set (1) or mixed (-1): most vectors of a real
// frame hold one gain range (JUNGFRAU's test run: 99.6% of 8-pixel vectors all in range 0), and a vector
// of one key needs only that option's pedestal and scale and a shift by a constant.
static inline int uniform_key(ci32 w, int32_t km) {
#if GS_CALIB_W == 16
    const __m512i x = reinterpret_cast<__m512i>(w), m = _mm512_set1_epi32(km);
    const __mmask16 set = _mm512_test_epi32_mask(x, m);
    if (set == 0) return 0;
    return _mm512_cmpeq_epi32_mask(_mm512_and_si512(x, m), m) == 0xFFFF ? 1 : -1;
#elif defined(__AVX2__)
    const __m256i x = reinterpret_cast<__m256i>(w), m = _mm256_set1_epi32(km);
    if (_mm256_testz_si256(x, m)) return 0;
    return _mm256_testc_si256(x, m) ? 1 : -1;
#else
    int32_t any = 0, all = km;
    for (int i = 0; i < CW; ++i) {
        any |= w[i] & km;
        all &= w[i];
    }
    return any == 0 ? 0 : (all & km) == km ? 1 : -1;
#endif
}

// KIND: 1 single range (ok = okb != 0), 2 one key bit, 3 two key bits.
template <int KIND>
static inline void calib_pixel(const uint16_t* r, const float* tab, int64_t ts, const uint8_t* okb, uint32_t dm,
                               float* o, uint8_t* g, int64_t p) {
    const uint32_t w = r[p];
    const uint32_t k = KIND == 1 ? 0u : (w >> 14) & (KIND == 2 ? 1u : 3u);
    const uint32_t opt = k >= 2 ? 2u : k;
    const int64_t n_opt = KIND;
    const float v = float(int32_t(w & dm));
    const float x = (v - tab[opt * ts + p]) * tab[(n_opt + opt) * ts + p];
    const bool ok = KIND == 1 ? okb[p] != 0 : ((uint32_t(okb[p]) >> k) & 1u) != 0;
    o[p] = ok ? x : 0.0f;
    g[p] = ok;
}

template <int KIND>
static void calib_u16(const uint16_t* raw, int64_t n_events, int64_t npix, uint32_t dm, const float* tab, int64_t ts,
                      const uint8_t* okb, float* out, uint8_t* good, int64_t block) {
    constexpr int64_t n_opt = KIND;
    // each option's rows (options a kind does not have read option 0's: never selected)
    const float* __restrict p0 = tab;
    const float* __restrict p1 = tab + (KIND >= 2 ? 1 : 0) * ts;
    const float* __restrict p2 = tab + (KIND >= 3 ? 2 : 0) * ts;
    const float* __restrict s0 = tab + n_opt * ts;
    const float* __restrict s1 = s0 + (KIND >= 2 ? 1 : 0) * ts;
    const float* __restrict s2 = s0 + (KIND >= 3 ? 2 : 0) * ts;
    const ci32 dmv = ci32{} + int32_t(dm);
    for (int64_t b0 = 0; b0 < npix; b0 += block) {
        const int64_t b1 = b0 + block < npix ? b0 + block : npix;
        for (int64_t e = 0; e < n_events; ++e) {
            const uint16_t* __restrict r = raw + e * npix;
            float* __restrict o = out + e * npix;
            uint8_t* __restrict g = good + e * npix;
            int64_t p = b0;
            for (; p + CW <= b1; p += CW) {
                const ci32 w = widen_u16(r + p);
                const cf32 v = __builtin_convertvector(w & dmv, cf32);
                if constexpr (KIND >= 2) {
                    const int u = uniform_key(w, KIND == 2 ? 0x4000 : 0xC000);
                    if (u >= 0) {  // one key in every lane: option 0 (key 0) or the last option (key 1 or 3)
                        const int kk = u == 0 ? 0 : (KIND == 2 ? 1 : 3);
                        const float* pp = u == 0 ? p0 : (KIND == 2 ? p1 : p2);
                        const float* ss = u == 0 ? s0 : (KIND == 2 ? s1 : s2);
                        const ci32 ok = (widen<CW, false, ci32>(okb + p) >> kk) & 1;
                        const cf32 x = (v - loadf(pp + p)) * loadf(ss + p);
                        storef(o + p, ok != 0 ? x : cf32{});
                        store_bytes(g + p, ok);
                        continue;
                    }
                }
                cf32 ped = loadf(p0 + p), sc = loadf(s0 + p);
                ci32 k = ci32{};
                if constexpr (KIND >= 2) {
                    k = (w >> 14) & (KIND == 2 ? 1 : 3);
                    const ci32 is1 = k == 1;
                    ped = is1 ? loadf(p1 + p) : ped;
                    sc = is1 ? loadf(s1 + p) : sc;
                }
                if constexpr (KIND == 3) {
                    const ci32 is2 = k >= 2;
                    ped = is2 ? loadf(p2 + p) : ped;
                    sc = is2 ? loadf(s2 + p) : sc;
                }
                const ci32 okw = widen<CW, false, ci32>(okb + p);
                const ci32 ok = KIND == 1 ? (okw != 0) & 1 : (okw >> k) & 1;
                const cf32 x = (v - ped) * sc;
                storef(o + p, ok != 0 ? x : cf32{});
                store_bytes(g + p, ok);
            }
            for (; p < b1; ++p) calib_pixel<KIND>(r, tab, ts, okb, dm, o, g, p);
        }
    }
}
