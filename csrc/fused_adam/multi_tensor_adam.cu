// Fused multi-tensor Adam/AdamW: one launch updates every tensor of a dtype group.
// Parameters and gradients are fp32, fp16 or bf16; the moments are always fp32 and the math
// is done in fp32 (Kingma & Ba 2015; decoupled decay per Loshchilov & Hutter 2019).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fused_adam.h"

namespace deepscale {
namespace {

constexpr int kThreads = 512;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T>
__global__ void __launch_bounds__(kThreads) fused_adam_kernel(const int64_t* __restrict__ meta, int num_tensors,
                                                              FusedAdamCoef c) {
    const int64_t* chunk = meta + static_cast<int64_t>(num_tensors) * kTensorFields + 2 * static_cast<int64_t>(blockIdx.x);
    const int64_t* tensor = meta + chunk[0] * kTensorFields;
    T* param = reinterpret_cast<T*>(tensor[0]);
    const T* grad = reinterpret_cast<const T*>(tensor[1]);
    float* exp_avg = reinterpret_cast<float*>(tensor[2]);
    float* exp_avg_sq = reinterpret_cast<float*>(tensor[3]);
    const int64_t numel = tensor[4];
    const int64_t begin = chunk[1];
    const int64_t end = begin + kChunkElems < numel ? begin + kChunkElems : numel;
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
        float p = to_float(param[i]);
        float g = to_float(grad[i]);
        if (c.l2 != 0.0f) g += c.l2 * p;
        float m = c.beta1 * exp_avg[i] + (1.0f - c.beta1) * g;
        float v = c.beta2 * exp_avg_sq[i] + (1.0f - c.beta2) * g * g;
        float denom = sqrtf(v) * c.inv_sqrt_bias2 + c.eps;
        p = p * c.decay - c.step_size * (m / denom);
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        param[i] = from_float<T>(p);
    }
}

}  // namespace

cudaError_t launch_fused_adam(const int64_t* meta, int num_tensors, int num_chunks, int param_dtype,
                              const FusedAdamCoef& coef, cudaStream_t stream) {
    if (num_chunks == 0) return cudaSuccess;
    dim3 grid(num_chunks), block(kThreads);
    switch (param_dtype) {
        case kFusedF32: fused_adam_kernel<float><<<grid, block, 0, stream>>>(meta, num_tensors, coef); break;
        case kFusedBF16: fused_adam_kernel<__nv_bfloat16><<<grid, block, 0, stream>>>(meta, num_tensors, coef); break;
        case kFusedF16: fused_adam_kernel<__half><<<grid, block, 0, stream>>>(meta, num_tensors, coef); break;
        default: return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
}

}  // namespace deepscale
