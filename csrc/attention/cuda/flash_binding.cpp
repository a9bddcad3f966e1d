// Torch binding of the CUDA attention kernels: checks tensors, fills the launch parameters and
// runs on the current stream. deepscale/ops/attention/cuda_backend.py is the only caller.
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "flash_api.h"

namespace {

using deepscale::flash::BackwardParams;
using deepscale::flash::DType;
using deepscale::flash::Params;

void check_input(const at::Tensor& t, const char* name, at::ScalarType dtype) {
    TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
    TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
}

Params make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                   const at::Tensor& lse, const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q,
                   int64_t max_k, double scale, double softcap, int64_t left, int64_t right) {
    const auto dtype = q.scalar_type();
    TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, "flash_attn takes float16 or bfloat16, got ", dtype);
    for (auto [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}, {&out, "out"}}) check_input(*t, name, dtype);
    check_input(lse, "lse", at::kFloat);
    check_input(cu_q, "cu_seqlens_q", at::kInt);
    check_input(cu_k, "cu_seqlens_k", at::kInt);
    TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k, v must be packed [total, heads, head_dim]");
    TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape");
    TORCH_CHECK(q.size(1) % k.size(1) == 0, "heads must be a multiple of kv heads");
    TORCH_CHECK(q.size(2) == k.size(2), "q and k must share head_dim");
    Params p{};
    p.q = q.data_ptr();
    p.k = k.data_ptr();
    p.v = v.data_ptr();
    p.out = out.data_ptr();
    p.lse = lse.data_ptr<float>();
    p.cu_q = cu_q.data_ptr<int32_t>();
    p.cu_k = cu_k.data_ptr<int32_t>();
    p.batch = static_cast<int>(cu_q.numel() - 1);
    p.num_heads = static_cast<int>(q.size(1));
    p.num_kv_heads = static_cast<int>(k.size(1));
    p.head_dim = static_cast<int>(q.size(2));
    p.max_q = static_cast<int>(max_q);
    p.max_k = static_cast<int>(max_k);
    p.scale = static_cast<float>(scale);
    p.softcap = static_cast<float>(softcap);
    p.left = static_cast<int>(left);
    p.right = static_cast<int>(right);
    p.dtype = dtype == at::kBFloat16 ? DType::kBFloat16 : DType::kFloat16;
    return p;
}

void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
             const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q, int64_t max_k, double scale,
             double softcap, int64_t left, int64_t right) {
    const at::cuda::CUDAGuard guard(q.device());
    Params p = make_params(q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, softcap, left, right);
    const cudaError_t err = deepscale::flash::run_forward(p, at::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "flash_attn forward failed: ", cudaGetErrorString(err));
}

void backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
              const at::Tensor& dout, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
              const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q, int64_t max_k, double scale,
              double softcap, int64_t left, int64_t right) {
    const at::cuda::CUDAGuard guard(q.device());
    BackwardParams p{};
    static_cast<Params&>(p) = make_params(q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, softcap, left, right);
    check_input(dout, "dout", q.scalar_type());
    for (auto [t, name] : {std::pair{&dq, "dq"}, {&dk, "dk"}, {&dv, "dv"}}) check_input(*t, name, at::kFloat);
    TORCH_CHECK(dq.sizes() == q.sizes(), "dq must be shaped like q");
    TORCH_CHECK(dk.size(0) == k.size(0) && dk.size(1) == q.size(1) && dk.size(2) == q.size(2),
                "dk/dv must be fp32 [total_k, heads, head_dim]");
    at::Tensor delta = at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
    p.dout = dout.data_ptr();
    p.delta = delta.data_ptr<float>();
    p.dq = dq.data_ptr<float>();
    p.dk = dk.data_ptr<float>();
    p.dv = dv.data_ptr<float>();
    p.total_q = static_cast<int>(q.size(0));
    const cudaError_t err = deepscale::flash::run_backward(p, at::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "flash_attn backward failed: ", cudaGetErrorString(err));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "deepscale flash attention (tensor-core forward and backward for sm80/sm90)";
    m.def("forward", &forward, "attention forward: fills out and lse");
    m.def("backward", &backward, "attention backward: accumulates dq, writes per-head dk/dv (fp32)");
}
