// Vector types and loads shared by the compiled CPU kernels (simd_median.cpp, simd_calib.cpp), GCC vector
// extensions over W lanes; native_build.py compiles them with -march=native where it can.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

// Vectors of W lanes: int32, float32, and the uint8 / int8 / uint16 inputs (good, gain index, raw).
template <int W> struct Vec;
template <> struct Vec<8> {
    typedef int32_t type __attribute__((vector_size(32)));
    typedef float f __attribute__((vector_size(32)));
    typedef uint8_t u8 __attribute__((vector_size(8)));
    typedef int8_t i8 __attribute__((vector_size(8)));
    typedef uint16_t u16 __attribute__((vector_size(16)));
};
template <> struct Vec<16> {
    typedef int32_t type __attribute__((vector_size(64)));
    typedef float f __attribute__((vector_size(64)));
    typedef uint8_t u8 __attribute__((vector_size(16)));
    typedef int8_t i8 __attribute__((vector_size(16)));
    typedef uint16_t u16 __attribute__((vector_size(32)));
};

template <class V, class T>
static inline V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

// W bytes as W int32 lanes (sign- or zero-extended): one vpmov[sz]xbd where the CPU has it (GCC's
// __builtin_convertvector of a byte vector goes lane by lane).
template <int W, bool SIGNED, class V, class T>
static inline V widen(const T* p) {
#if defined(__AVX512F__)
    if constexpr (W == 16) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
        return reinterpret_cast<V>(SIGNED ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b));
    }
#endif
#if defined(__AVX2__)
    if constexpr (W == 8) {
        const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
        return reinterpret_cast<V>(SIGNED ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b));
    }
#endif
    using B = std::conditional_t<SIGNED, typename Vec<W>::i8, typename Vec<W>::u8>;
    return __builtin_convertvector(load<B>(p), V);
}

