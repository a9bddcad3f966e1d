// Torch binding of the fused multi-tensor Adam: validates a dtype group, packs the tensor
// addresses and chunk table into one buffer, copies it to the device and launches once.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "fused_adam.h"

namespace deepscale {

static int dtype_code(at::ScalarType t) {
    switch (t) {
        case at::kFloat: return kFusedF32;
        case at::kBFloat16: return kFusedBF16;
        case at::kHalf: return kFusedF16;
        default: TORCH_CHECK(false, "FusedAdam supports float32, bfloat16 and float16 parameters, got ", t);
    }
    return -1;
}

static void fused_adam_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                            const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                            int64_t step, double lr, double beta1, double beta2, double eps, double weight_decay,
                            bool bias_correction, bool adamw_mode) {
    const size_t n = params.size();
    TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n,
                "params, grads, exp_avgs and exp_avg_sqs must have the same length");
    TORCH_CHECK(step >= 1, "step must be >= 1");
    if (n == 0) return;
    const at::ScalarType dtype = params[0].scalar_type();
    const int code = dtype_code(dtype);
    std::vector<int64_t> meta(n * kTensorFields);
    std::vector<int64_t> chunks;
    for (size_t i = 0; i < n; ++i) {
        const auto& p = params[i];
        TORCH_CHECK(p.is_cuda() && p.is_contiguous() && p.scalar_type() == dtype,
                    "every parameter of a group must be a contiguous CUDA tensor of one dtype");
        TORCH_CHECK(grads[i].scalar_type() == dtype && grads[i].is_contiguous() && grads[i].numel() == p.numel(),
                    "grad ", i, " must be contiguous with the parameter's dtype and size");
        TORCH_CHECK(exp_avgs[i].scalar_type() == at::kFloat && exp_avg_sqs[i].scalar_type() == at::kFloat,
                    "optimizer states must be float32");
        meta[i * kTensorFields + 0] = reinterpret_cast<int64_t>(p.data_ptr());
        meta[i * kTensorFields + 1] = reinterpret_cast<int64_t>(grads[i].data_ptr());
        meta[i * kTensorFields + 2] = reinterpret_cast<int64_t>(exp_avgs[i].data_ptr());
        meta[i * kTensorFields + 3] = reinterpret_cast<int64_t>(exp_avg_sqs[i].data_ptr());
        meta[i * kTensorFields + 4] = p.numel();
        for (int64_t b = 0; b < p.numel(); b += kChunkElems) {
            chunks.push_back(static_cast<int64_t>(i));
            chunks.push_back(b);
        }
    }
    const int num_chunks = static_cast<int>(chunks.size() / 2);
    meta.insert(meta.end(), chunks.begin(), chunks.end());
    auto host = at::empty({static_cast<int64_t>(meta.size())}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    std::memcpy(host.data_ptr<int64_t>(), meta.data(), meta.size() * sizeof(int64_t));
    auto device_meta = host.to(params[0].device(), /*non_blocking=*/true);

    const double bias1 = bias_correction ? 1.0 - std::pow(beta1, static_cast<double>(step)) : 1.0;
    const double bias2 = bias_correction ? 1.0 - std::pow(beta2, static_cast<double>(step)) : 1.0;
    FusedAdamCoef c{static_cast<float>(beta1), static_cast<float>(beta2), static_cast<float>(eps),
                    static_cast<float>(lr / bias1), static_cast<float>(1.0 / std::sqrt(bias2)),
                    adamw_mode ? static_cast<float>(1.0 - lr * weight_decay) : 1.0f,
                    adamw_mode ? 0.0f : static_cast<float>(weight_decay)};
    auto stream = c10::cuda::getCurrentCUDAStream(params[0].device().index());
    cudaError_t err = launch_fused_adam(device_meta.data_ptr<int64_t>(), static_cast<int>(n), num_chunks, code, c, stream);
    TORCH_CHECK(err == cudaSuccess, "fused Adam launch failed: ", cudaGetErrorString(err));
}

}  // namespace deepscale

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("fused_adam_step", &deepscale::fused_adam_step, "One fused Adam/AdamW step over a dtype group of CUDA tensors.");
}
