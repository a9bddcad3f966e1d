// Interface between the torch binding and the CUDA kernel of the fused multi-tensor Adam.
// The kernel side includes no torch headers, so it compiles with nvcc alone.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace deepscale {

// Elements handled by one thread block; a tensor spans ceil(numel / kChunkElems) blocks.
constexpr int64_t kChunkElems = 32768;
// Metadata layout in the device buffer: kTensorFields int64 per tensor
// (param, grad, exp_avg, exp_avg_sq addresses and numel), then 2 int64 per chunk
// (tensor index, first element).
constexpr int kTensorFields = 5;

struct FusedAdamCoef {
    float beta1, beta2, eps, step_size, inv_sqrt_bias2, decay, l2;
};

enum FusedDType : int { kFusedF32 = 0, kFusedBF16 = 1, kFusedF16 = 2 };

// Launches one kernel over every chunk of every tensor in the group. `meta` is a device
// buffer laid out as above. Returns the launch status.
cudaError_t launch_fused_adam(const int64_t* meta, int num_tensors, int num_chunks, int param_dtype,
                              const FusedAdamCoef& coef, cudaStream_t stream);

}  // namespace deepscale
