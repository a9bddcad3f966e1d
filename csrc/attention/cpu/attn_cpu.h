// The CPU attention kernel: problem description and the two passes.
//
// Layout: packed variable-length batches, q [total_q, heads, d], k/v [total_k, kv_heads, d],
// sequence b spanning tokens cu_q[b]..cu_q[b+1] (cu_k for keys). A padded [batch, seq, ...]
// batch is the special case cu = 0, seq, 2*seq, ... Each token row may have a stride (so q
// can be a view into a fused qkv tensor); heads and dims inside a row are contiguous.
//
// Algorithm: FlashAttention-2 (Dao, "FlashAttention-2: Faster Attention with Better
// Parallelism and Work Partitioning", 2023) on CPU. The forward keeps a running row max and
// sum (online softmax) over blocks of keys and stores the log-sum-exp; the backward recomputes
// the probabilities block by block from it, so no [seq x seq] buffer exists.
#pragma once

#include <algorithm>
#include <cstdint>

namespace deepscale {
namespace attn {

constexpr int kBlockQ = 64;  // query rows per block
constexpr int kBlockK = 64;  // keys per block (a multiple of kW)
constexpr int kMaxHeadDim = 256;

struct Problem {
    const int64_t* cu_q;
    const int64_t* cu_k;
    int64_t batch;
    int64_t num_heads, num_kv_heads, head_dim;
    int64_t q_stride, k_stride, v_stride, o_stride;  // elements between consecutive token rows
    int dtype;                                        // 0 fp32, 1 bf16, 2 fp16
    float scale, softcap;                             // softcap 0: none
    int64_t left, right;                              // window bounds, -1 unbounded (causal: right 0)
    int num_threads;

    int64_t group() const { return num_heads / num_kv_heads; }
    // Factor folded into q so scores come out in log2 units (or pre-tanh units with softcap).
    float q_factor() const { return softcap > 0.0f ? scale / softcap : scale * 1.4426950408889634f; }
    float cap_log2() const { return softcap * 1.4426950408889634f; }
};

// Key range [lo, hi) holding every key visible to query rows [i0, i1) of a sequence with sq
// queries and sk keys; lo is rounded down to a block (the extra keys are masked).
inline void key_range(const Problem& p, int64_t i0, int64_t i1, int64_t sq, int64_t sk, int64_t* lo, int64_t* hi) {
    const int64_t off = sk - sq;
    *lo = p.left < 0 ? 0 : std::max<int64_t>(0, i0 + off - p.left);
    *lo = *lo / kBlockK * kBlockK;  // key blocks stay aligned to the packed buffers
    *hi = p.right < 0 ? sk : std::min<int64_t>(sk, i1 - 1 + off + p.right + 1);
}

// Whether every (row, key) pair of the block is visible (then the mask is skipped).
inline bool block_unmasked(const Problem& p, int64_t i0, int64_t i1, int64_t j0, int64_t j1, int64_t off) {
    bool ok = true;
    if (p.right >= 0) ok = ok && (j1 - 1) - (i0 + off) <= p.right;
    if (p.left >= 0) ok = ok && (i1 - 1 + off) - j0 <= p.left;
    return ok;
}

inline bool visible(const Problem& p, int64_t i, int64_t j, int64_t off) {
    const int64_t d = j - (i + off);
    return (p.right < 0 || d <= p.right) && (p.left < 0 || -d <= p.left);
}

void forward(const Problem& p, const void* q, const void* k, const void* v, void* out, float* lse);
void backward(const Problem& p, const void* q, const void* k, const void* v, const void* out, const void* dout,
              const float* lse, void* dq, void* dk, void* dv, int dkv_expanded);

}  // namespace attn
}  // namespace deepscale
