// C++ launchers of the CUDA attention kernels (no torch types: the .cu files build with nvcc
// alone). Layout as the CPU op: packed q [total_q, heads, d], k/v [total_k, kv_heads, d],
// int32 sequence offsets cu_q/cu_k on the device, lse float32 [heads, total_q].
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace deepscale {
namespace flash {

enum class DType { kFloat16 = 0, kBFloat16 = 1 };

struct Params {
    const void *q, *k, *v;
    void* out;
    float* lse;
    const int32_t *cu_q, *cu_k;
    int batch, num_heads, num_kv_heads, head_dim;
    int max_q, max_k;
    float scale, softcap;  // softcap 0: none
    int left, right;       // window bounds, -1 unbounded (causal: right 0)
    DType dtype;
};

struct BackwardParams : Params {
    const void* dout;
    float* delta;         // [heads, total_q] scratch: rowsum(dout * out)
    float* dq;            // fp32 [total_q, heads, d], accumulated atomically
    float *dk, *dv;       // fp32 [total_k, heads, d]: per query head, the caller sums each GQA group
    int total_q;
};

// Return cudaSuccess or the launch error; unsupported head dims give cudaErrorInvalidValue.
cudaError_t run_forward(const Params& p, cudaStream_t stream);
cudaError_t run_backward(const BackwardParams& p, cudaStream_t stream);

}  // namespace flash
}  // namespace deepscale
