// Vector helpers of the CPU attention kernel: a 16-float vector, exp2, tanh and a small GEMM.
//
// The vector is a GCC/Clang vector-extension type of 16 floats. Built for AVX-512 it is one
// zmm register; for AVX2 the compiler splits it into two ymm halves (and the GEMM uses a
// narrower register tile so the accumulators still fit); elsewhere it lowers to whatever the
// target has. Element conversions (bf16/fp16 <-> fp32) come from the CPU optimizers' vector
// layer (cpu_optim/simd.h), so every CPU op rounds the same way.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "simd.h"

namespace deepscale {
namespace attn {

constexpr int kW = 16;  // floats per vector; head dims and padded key blocks are multiples of it
typedef float vf __attribute__((vector_size(kW * sizeof(float))));
typedef float vf_u __attribute__((vector_size(kW * sizeof(float)), aligned(4)));  // unaligned access
typedef int32_t vi __attribute__((vector_size(kW * sizeof(int32_t))));

inline vf loadu(const float* p) { return *reinterpret_cast<const vf_u*>(p); }
inline void storeu(float* p, vf v) { *reinterpret_cast<vf_u*>(p) = v; }
inline vf splat(float x) { return vf{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
static_assert(kW == 16, "splat lists kW lanes");

inline float hsum(vf v) {
    float s = 0.0f;
    for (int i = 0; i < kW; ++i) s += v[i];
    return s;
}
inline float hmax(vf v) {
    float m = v[0];
    for (int i = 1; i < kW; ++i) m = std::max(m, v[i]);
    return m;
}

// 2^x for x <= 128. x = n + f with n = round(x), |f| <= 1/2; 2^f by a degree-6 polynomial
// (relative error about 2e-7, below float's rounding of the final product), 2^n by building the
// exponent bits. Inputs below -126 (the masked -inf included) give exactly 0.
inline vf exp2v(vf x) {
    const vf lo = splat(-126.0f);
    vf xc = x < lo ? lo : x;
    const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
    vf n = (xc + magic) - magic;
    vf f = xc - n;
    vf p = splat(1.5403530393381606e-4f);
    p = p * f + 1.3333558146428443e-3f;
    p = p * f + 9.6181291076284772e-3f;
    p = p * f + 5.5504108664821580e-2f;
    p = p * f + 2.4022650695910071e-1f;
    p = p * f + 6.9314718055994531e-1f;
    p = p * f + 1.0f;
    vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    vf scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    vf r = p * scale;
    vi keep = x >= lo;  // all ones where x is in range
    vi rb;
    std::memcpy(&rb, &r, sizeof(rb));
    rb &= keep;
    std::memcpy(&r, &rb, sizeof(r));
    return r;
}

// tanh(x) = sign(x) * (1 - 2 / (exp(2|x|) + 1)); |x| is clamped at 20, where tanh is 1 in float.
inline vf tanhv(vf x) {
    vf ax = x < 0 ? -x : x;
    ax = ax > 20.0f ? splat(20.0f) : ax;
    vf e = exp2v(ax * 2.8853900817779268f);  // 2 * log2(e)
    vf t = 1.0f - 2.0f / (e + 1.0f);
    return x < 0 ? -t : t;
}

// ---- small GEMM: row-major with leading dimensions; N % kW == 0 ------------------------------
#if defined(__DEEPSCALE_SIMD_AVX512__)
constexpr int kMR = 6, kNV = 4;  // 24 zmm accumulators, 4 B vectors, 1 broadcast
#else
constexpr int kMR = 4, kNV = 1;  // AVX2 and others: a 16-float vector is two or more registers
#endif

// TA: A is stored transposed (element (r, k) at A[k * lda + r]).
template <int MR, int NV, bool TA>
inline void micro_kernel(int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc) {
    vf acc[MR][NV];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[r][v] = loadu(C + r * ldc + v * kW);
    for (int k = 0; k < K; ++k) {
        vf b[NV];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) b[v] = loadu(B + static_cast<int64_t>(k) * ldb + v * kW);
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
            const vf a = splat(TA ? A[static_cast<int64_t>(k) * lda + r] : A[static_cast<int64_t>(r) * lda + k]);
#pragma GCC unroll 8
            for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) storeu(C + r * ldc + v * kW, acc[r][v]);
}

template <int NV, bool TA>
inline void micro_rows(int mr, int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc) {
    switch (mr) {
        case 6: micro_kernel<6, NV, TA>(K, A, lda, B, ldb, C, ldc); break;
        case 5: micro_kernel<5, NV, TA>(K, A, lda, B, ldb, C, ldc); break;
        case 4: micro_kernel<4, NV, TA>(K, A, lda, B, ldb, C, ldc); break;
        case 3: micro_kernel<3, NV, TA>(K, A, lda, B, ldb, C, ldc); break;
        case 2: micro_kernel<2, NV, TA>(K, A, lda, B, ldb, C, ldc); break;
        default: micro_kernel<1, NV, TA>(K, A, lda, B, ldb, C, ldc); break;
    }
}

// C[M x N] += op(A)[M x K] * B[K x N]; op(A) = A, or A^T stored [K][M] when TA.
template <bool TA = false>
inline void gemm_acc(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc) {
    for (int n0 = 0; n0 < N; n0 += kNV * kW) {
        const int nv = std::min(kNV, (N - n0) / kW);
        for (int m0 = 0; m0 < M; m0 += kMR) {
            const int mr = std::min(kMR, M - m0);
            const float* a = TA ? A + m0 : A + static_cast<int64_t>(m0) * lda;
            const float* b = B + n0;
            float* c = C + static_cast<int64_t>(m0) * ldc + n0;
            switch (nv) {
#if defined(__DEEPSCALE_SIMD_AVX512__)
                case 4: micro_rows<4, TA>(mr, K, a, lda, b, ldb, c, ldc); break;
                case 3: micro_rows<3, TA>(mr, K, a, lda, b, ldb, c, ldc); break;
                case 2: micro_rows<2, TA>(mr, K, a, lda, b, ldb, c, ldc); break;
#endif
                default: micro_rows<1, TA>(mr, K, a, lda, b, ldb, c, ldc); break;
            }
        }
    }
}

// ---- element loads/stores by dtype code (0 fp32, 1 bf16, 2 fp16) -----------------------------
inline float load_elem(const void* base, int64_t i, int dtype) {
    switch (dtype) {
        case 1: return simd::bf16_to_f32(static_cast<const uint16_t*>(base)[i]);
        case 2: return simd::f16_to_f32(static_cast<const uint16_t*>(base)[i]);
        default: return static_cast<const float*>(base)[i];
    }
}

// n contiguous elements starting at element offset `offset` into dst (fp32).
inline void load_row(const void* base, int64_t offset, int n, int dtype, float* dst) {
    if (dtype == 0) {
        std::memcpy(dst, static_cast<const float*>(base) + offset, n * sizeof(float));
    } else if (dtype == 1) {
        const uint16_t* p = static_cast<const uint16_t*>(base) + offset;
        for (int i = 0; i < n; ++i) dst[i] = simd::bf16_to_f32(p[i]);
    } else {
        const uint16_t* p = static_cast<const uint16_t*>(base) + offset;
        for (int i = 0; i < n; ++i) dst[i] = simd::f16_to_f32(p[i]);
    }
}

inline void store_row(void* base, int64_t offset, int n, int dtype, const float* src, float mul) {
    if (dtype == 0) {
        float* p = static_cast<float*>(base) + offset;
        for (int i = 0; i < n; ++i) p[i] = src[i] * mul;
    } else if (dtype == 1) {
        uint16_t* p = static_cast<uint16_t*>(base) + offset;
        for (int i = 0; i < n; ++i) p[i] = simd::f32_to_bf16(src[i] * mul);
    } else {
        uint16_t* p = static_cast<uint16_t*>(base) + offset;
        for (int i = 0; i < n; ++i) p[i] = simd::f32_to_f16(src[i] * mul);
    }
}

}  // namespace attn
}  // namespace deepscale
