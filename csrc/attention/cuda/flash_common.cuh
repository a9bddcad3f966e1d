// Shared pieces of the CUDA attention kernels: tensor-core mma.sync m16n8k16 (sm80+; also the
// path on sm90), fragment loads from row-major shared-memory tiles, masks and conversions.
//
// Fragment layout of mma.m16n8k16 (PTX ISA, "Matrix fragments for mma.m16n8k16"): with
// g = lane / 4 and t = lane % 4, A (16x16, row-major) holds rows g and g + 8, columns
// 2t, 2t + 1 and 2t + 8, 2t + 9; B (16x8) holds k = 2t, 2t + 1 (b0) and 2t + 8, 2t + 9 (b1)
// of column g; the fp32 accumulator holds rows g (c0, c1) and g + 8 (c2, c3), columns 2t, 2t + 1.
// An accumulator pair of two adjacent 8-column tiles is therefore exactly an A fragment of
// the next product (FlashAttention-2's register reuse of P).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "flash_api.h"

namespace deepscale {
namespace flash {

constexpr int kWarps = 4;
constexpr int kBlockM = 16 * kWarps;  // query rows per forward CTA, query rows per backward step
constexpr int kBlockN = 64;           // keys per forward step, keys per backward CTA
constexpr float kLog2e = 1.4426950408889634f;

template <int D>
struct Tile {
    static constexpr int kStride = D + 8;  // halves per smem row: rows start on different banks
};

template <class T>
__device__ __forceinline__ uint32_t pack2(float a, float b);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
}

template <class T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <class T>
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two consecutive halves of a row (4-byte aligned: even column, even stride).
template <class T>
__device__ __forceinline__ uint32_t ld_pair(const T* p) { return *reinterpret_cast<const uint32_t*>(p); }

// Two halves of one column in consecutive rows.
template <class T>
__device__ __forceinline__ uint32_t ld_pair_col(const T* p, int stride) {
    const uint16_t lo = *reinterpret_cast<const uint16_t*>(p);
    const uint16_t hi = *reinterpret_cast<const uint16_t*>(p + stride);
    return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

// A fragment of rows [r0, r0 + 16), columns [c0, c0 + 16) of a row-major tile.
template <class T>
__device__ __forceinline__ void ld_a(uint32_t (&a)[4], const T* tile, int stride, int r0, int c0, int lane) {
    const int g = lane >> 2, t = lane & 3;
    const T* p = tile + (r0 + g) * stride + c0 + 2 * t;
    a[0] = ld_pair(p);
    a[1] = ld_pair(p + 8 * stride);
    a[2] = ld_pair(p + 8);
    a[3] = ld_pair(p + 8 * stride + 8);
}

// B fragment (16 x 8) whose column n is row n0 + n of the tile (B = tile^T): k runs along the row.
template <class T>
__device__ __forceinline__ void ld_b_trans(uint32_t& b0, uint32_t& b1, const T* tile, int stride, int n0, int k0,
                                           int lane) {
    const int g = lane >> 2, t = lane & 3;
    const T* p = tile + (n0 + g) * stride + k0 + 2 * t;
    b0 = ld_pair(p);
    b1 = ld_pair(p + 8);
}

// B fragment (16 x 8) read straight from a row-major [k][n] tile (k runs down the rows).
template <class T>
__device__ __forceinline__ void ld_b(uint32_t& b0, uint32_t& b1, const T* tile, int stride, int k0, int n0, int lane) {
    const int g = lane >> 2, t = lane & 3;
    const T* p = tile + (k0 + 2 * t) * stride + n0 + g;
    b0 = ld_pair_col(p, stride);
    b1 = ld_pair_col(p + 8 * stride, stride);
}

// Copy rows [row0, row0 + rows) of one head (row stride `gstride` elements) into a smem tile
// of kRows rows; rows past `valid` are zero. 16-byte vectors: d is a multiple of 8.
template <class T, int D, int kRows>
__device__ __forceinline__ void load_tile(T* tile, const T* src, int64_t gstride, int valid) {
    constexpr int kVec = 8, kPerRow = D / kVec;
    for (int idx = threadIdx.x; idx < kRows * kPerRow; idx += blockDim.x) {
        const int r = idx / kPerRow, c = (idx % kPerRow) * kVec;
        uint4 val = make_uint4(0, 0, 0, 0);
        if (r < valid) val = *reinterpret_cast<const uint4*>(src + r * gstride + c);
        *reinterpret_cast<uint4*>(tile + r * Tile<D>::kStride + c) = val;
    }
}

__device__ __forceinline__ bool visible(int i, int j, int off, int left, int right) {
    const int d = j - (i + off);
    return (right < 0 || d <= right) && (left < 0 || -d <= left);
}

// Score in log2 units from a raw dot product; `th` gets tanh(x / softcap) for the backward.
__device__ __forceinline__ float log2_score(float dot, float scale, float softcap, float* th) {
    if (softcap > 0.0f) {
        *th = tanhf(dot * scale / softcap);
        return *th * softcap * kLog2e;
    }
    return dot * scale * kLog2e;
}

}  // namespace flash
}  // namespace deepscale
