// Vector abstraction used by the CPU optimizer kernels.
//
// Each optimizer writes its update once as a template over a value type V that is either a
// plain float (scalar tail, portable builds) or a SIMD register. GCC and Clang define the
// arithmetic operators on the x86 vector types, so only loads, stores, splats, sqrt and sign
// need per-level code here. Conversions round to nearest even, like torch's own casts.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__DEEPSCALE_SIMD_AVX512__) || defined(__DEEPSCALE_SIMD_AVX2__)
#include <immintrin.h>
#endif

namespace deepscale {
namespace simd {

// ---- scalar conversions (also the tail of every vector loop) ------------------------------
inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
}

inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof(bits));
    if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // canonical quiet NaN
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return static_cast<uint16_t>(bits >> 16);
}

inline float f16_to_f32(uint16_t h) {
    uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu;
    uint32_t mantissa = h & 0x3ffu;
    uint32_t bits;
    if (exponent == 0) {
        if (mantissa == 0) {
            bits = sign;
        } else {  // subnormal half: renormalise into a float exponent
            int shift = -1;
            do {
                ++shift;
                mantissa <<= 1;
            } while ((mantissa & 0x400u) == 0);
            bits = sign | (static_cast<uint32_t>(127 - 15 - shift) << 23) | ((mantissa & 0x3ffu) << 13);
        }
    } else if (exponent == 0x1f) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    }
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
}

inline uint16_t f32_to_f16(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof(bits));
    uint32_t sign = (bits >> 16) & 0x8000u;
    uint32_t magnitude = bits & 0x7fffffffu;
    if (magnitude >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (magnitude > 0x7f800000u ? 0x200u : 0u));
    if (magnitude >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
    if (magnitude < 0x38800000u) {
        // Below the smallest normal half: the result is round(|f| * 2^24) units of 2^-24.
        // Scaling by a power of two is exact, and nearbyint rounds half to even.
        float abs_f;
        std::memcpy(&abs_f, &magnitude, sizeof(abs_f));
        uint32_t units = static_cast<uint32_t>(std::nearbyint(abs_f * 16777216.0f));
        return static_cast<uint16_t>(sign | units);
    }
    uint32_t half = (((magnitude >> 23) - 112u) << 10) | ((magnitude & 0x7fffffu) >> 13);
    uint32_t rest = magnitude & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) half += 1;  // a carry moves into the exponent
    return static_cast<uint16_t>(sign | half);
}

// ---- element type tags ----------------------------------------------------------------------
struct F32 { using T = float; };
struct BF16 { using T = uint16_t; };
struct F16 { using T = uint16_t; };
struct NoOut { using T = uint16_t; };

inline float load1(F32, const float* p) { return *p; }
inline float load1(BF16, const uint16_t* p) { return bf16_to_f32(*p); }
inline float load1(F16, const uint16_t* p) { return f16_to_f32(*p); }
inline void store1(F32, float* p, float v) { *p = v; }
inline void store1(BF16, uint16_t* p, float v) { *p = f32_to_bf16(v); }
inline void store1(F16, uint16_t* p, float v) { *p = f32_to_f16(v); }
inline void store1(NoOut, uint16_t*, float) {}

inline float splat(float, float x) { return x; }
inline float vsqrt(float x) { return std::sqrt(x); }
inline float vsign(float x) { return static_cast<float>((x > 0.0f) - (x < 0.0f)); }

// ---- AVX-512 ---------------------------------------------------------------------------------
#if defined(__DEEPSCALE_SIMD_AVX512__)
constexpr int kWidth = 16;
using Vec = __m512;
inline Vec splat(Vec, float x) { return _mm512_set1_ps(x); }
inline Vec vsqrt(Vec x) { return _mm512_sqrt_ps(x); }
inline Vec vsign(Vec x) {
    const Vec zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
    Vec pos = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, zero, _CMP_GT_OQ), one);
    Vec neg = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, zero, _CMP_LT_OQ), one);
    return _mm512_sub_ps(pos, neg);
}
inline Vec loadv(F32, const float* p) { return _mm512_loadu_ps(p); }
inline Vec loadv(BF16, const uint16_t* p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline Vec loadv(F16, const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
using Half = __m256i;  // kWidth half-precision values
inline Half to_half(BF16, Vec v) {
    __m512i bits = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7fc0));
    return _mm512_cvtepi32_epi16(rounded);
}
inline Half to_half(F16, Vec v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT); }
inline void store_half(uint16_t* p, Half h) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h); }
inline void stream_half(uint16_t* p, Half h) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), h); }
inline void storev(F32, float* p, Vec v) { _mm512_storeu_ps(p, v); }

// ---- AVX2 (+FMA, F16C) -----------------------------------------------------------------------
#elif defined(__DEEPSCALE_SIMD_AVX2__)
constexpr int kWidth = 8;
using Vec = __m256;
inline Vec splat(Vec, float x) { return _mm256_set1_ps(x); }
inline Vec vsqrt(Vec x) { return _mm256_sqrt_ps(x); }
inline Vec vsign(Vec x) {
    const Vec zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
    Vec pos = _mm256_and_ps(_mm256_cmp_ps(x, zero, _CMP_GT_OQ), one);
    Vec neg = _mm256_and_ps(_mm256_cmp_ps(x, zero, _CMP_LT_OQ), one);
    return _mm256_sub_ps(pos, neg);
}
inline Vec loadv(F32, const float* p) { return _mm256_loadu_ps(p); }
inline Vec loadv(BF16, const uint16_t* p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline Vec loadv(F16, const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
using Half = __m128i;  // kWidth half-precision values
inline Half to_half(BF16, Vec v) {
    __m256i bits = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(nan));
    // Values are <= 0xffff, so unsigned-saturating packing keeps them; it packs within
    // 128-bit lanes, hence the split into halves first.
    return _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
}
inline Half to_half(F16, Vec v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT); }
inline void store_half(uint16_t* p, Half h) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h); }
inline void stream_half(uint16_t* p, Half h) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), h); }
inline void storev(F32, float* p, Vec v) { _mm256_storeu_ps(p, v); }

#endif

#if defined(__DEEPSCALE_SIMD_AVX512__) || defined(__DEEPSCALE_SIMD_AVX2__)
// Half-precision stores, shared by both x86 levels. stream_half is a non-temporal store: it
// writes around the caches (no read-for-ownership of a line that is only written), for
// destinations aligned to sizeof(Half) that nobody reads back soon.
template <class H>
inline void storev(H tag, uint16_t* p, Vec v) { store_half(p, to_half(tag, v)); }
inline void storev(NoOut, uint16_t*, Vec) {}
template <class H>
inline void streamv(H tag, uint16_t* p, Vec v) { stream_half(p, to_half(tag, v)); }
inline void streamv(NoOut, uint16_t*, Vec) {}
inline void stream_fence() { _mm_sfence(); }

// ---- portable (scalar, NEON): the compiler vectorises the scalar loop ------------------------
#else
constexpr int kWidth = 1;
#define DEEPSCALE_SIMD_SCALAR_ONLY 1
#endif

inline const char* level_name() {
#if defined(__DEEPSCALE_SIMD_AVX512__)
    return "avx512";
#elif defined(__DEEPSCALE_SIMD_AVX2__)
    return "avx2";
#elif defined(__DEEPSCALE_SIMD_NEON__)
    return "neon";
#else
    return "scalar";
#endif
}

}  // namespace simd
}  // namespace deepscale
