// C entry points of the CPU attention op (a plain shared library loaded with ctypes).
//
// Tensors cross as raw addresses; the Python side (deepscale/ops/attention/cpu_backend.py) has
// checked devices, dtypes, shapes and layouts. Errors come back as -1 with the message in
// ds_last_error(), like the CPU optimizer ops.
#include <stdexcept>
#include <string>

#include "attn_cpu.h"
#include "attn_vec.h"

namespace {

std::string& last_error() {
    static thread_local std::string message;
    return message;
}

template <class F>
int guarded(F&& body) {
    try {
        body();
        return 0;
    } catch (const std::exception& e) {
        last_error() = e.what();
        return -1;
    }
}

deepscale::attn::Problem make_problem(const int64_t* cu_q, const int64_t* cu_k, const int64_t* dims,
                                      const int64_t* strides, int dtype, double scale, double softcap,
                                      int num_threads) {
    using deepscale::attn::kMaxHeadDim;
    using deepscale::attn::kW;
    deepscale::attn::Problem p{};
    p.cu_q = cu_q;
    p.cu_k = cu_k;
    p.batch = dims[0];
    p.num_heads = dims[1];
    p.num_kv_heads = dims[2];
    p.head_dim = dims[3];
    p.left = dims[4];
    p.right = dims[5];
    p.q_stride = strides[0];
    p.k_stride = strides[1];
    p.v_stride = strides[2];
    p.o_stride = strides[3];
    p.dtype = dtype;
    p.scale = static_cast<float>(scale);
    p.softcap = static_cast<float>(softcap);
    p.num_threads = num_threads;
    if (p.head_dim <= 0 || p.head_dim % kW != 0 || p.head_dim > kMaxHeadDim)
        throw std::invalid_argument("head_dim must be a multiple of " + std::to_string(kW) + " up to " +
                                    std::to_string(kMaxHeadDim) + ", got " + std::to_string(p.head_dim));
    if (p.num_kv_heads <= 0 || p.num_heads % p.num_kv_heads != 0)
        throw std::invalid_argument("num_heads must be a multiple of num_kv_heads");
    if (dtype < 0 || dtype > 2) throw std::invalid_argument("dtype code must be 0 (fp32), 1 (bf16) or 2 (fp16)");
    if (num_threads < 1) throw std::invalid_argument("num_threads must be >= 1");
    return p;
}

}  // namespace

extern "C" {

const char* ds_last_error() { return last_error().c_str(); }
const char* ds_simd_level() { return deepscale::simd::level_name(); }
int ds_simd_width() { return deepscale::attn::kW; }

// dims: batch, heads, kv_heads, head_dim, left, right. strides (elements per token row): q, k, v, out.
// lse: fp32 [heads, total_q].
int ds_attn_forward(const void* q, const void* k, const void* v, void* out, float* lse, const int64_t* cu_q,
                    const int64_t* cu_k, const int64_t* dims, const int64_t* strides, int dtype, double scale,
                    double softcap, int num_threads) {
    return guarded([&] {
        auto p = make_problem(cu_q, cu_k, dims, strides, dtype, scale, softcap, num_threads);
        deepscale::attn::forward(p, q, k, v, out, lse);
    });
}

// dout and dq share out's and q's row strides. dk/dv: dtype laid out like k/v, or with
// dkv_expanded fp32 [total_k, heads, head_dim] partial sums the caller reduces over each group.
int ds_attn_backward(const void* q, const void* k, const void* v, const void* out, const void* dout,
                     const float* lse, void* dq, void* dk, void* dv, const int64_t* cu_q, const int64_t* cu_k,
                     const int64_t* dims, const int64_t* strides, int dtype, double scale, double softcap,
                     int dkv_expanded, int num_threads) {
    return guarded([&] {
        auto p = make_problem(cu_q, cu_k, dims, strides, dtype, scale, softcap, num_threads);
        deepscale::attn::backward(p, q, k, v, out, dout, lse, dq, dk, dv, dkv_expanded);
    });
}

}  // extern "C"
