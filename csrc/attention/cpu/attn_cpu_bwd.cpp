// Backward pass of the CPU attention kernel (see attn_cpu.h for layout and algorithm).
//
// Work items are (sequence, query head): an item owns the query gradient of its head and
// accumulates the key/value gradients of the whole sequence in fp32 scratch, so threads never
// write the same memory. Under GQA several query heads share a key/value head; their partial
// key/value gradients go to an fp32 [total_k, heads, d] buffer that the caller sums over the
// group. Per (query block, key block): recompute P = exp2(S - lse) from the stored log-sum-exp,
// then dV += P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO * O)), dQ += dS K, dK += dS^T Q.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attn_cpu.h"
#include "attn_vec.h"

namespace deepscale {
namespace attn {

namespace {

struct BwdScratch {
    int64_t d, skp;  // head dim, padded key capacity
    std::vector<float> kt, vt, kr, dk, dv;  // whole-sequence packs: K^T, V^T [d][skp], K [skp][d], grads [skp][d]
    std::vector<float> qs, dout, dq, s, t, pt, delta, lse2;
    BwdScratch(int64_t d_, int64_t max_k)
        : d(d_), skp((max_k + kBlockK - 1) / kBlockK * kBlockK), kt(d * skp), vt(d * skp), kr(skp * d),
          dk(skp * d), dv(skp * d), qs(kBlockQ * d), dout(kBlockQ * d), dq(kBlockQ * d), s(kBlockQ * kBlockK),
          t(kBlockQ * kBlockK), pt(kBlockK * kBlockQ), delta(kBlockQ), lse2(kBlockQ) {}
};

void pack_sequence(const Problem& p, const void* k, const void* v, int64_t tok0, int64_t sk, int64_t kvh,
                   BwdScratch& w) {
    const int64_t d = p.head_dim, skp = w.skp;
    float row[kMaxHeadDim];
    for (int64_t j = 0; j < skp; ++j) {
        if (j < sk) {
            load_row(k, (tok0 + j) * p.k_stride + kvh * d, static_cast<int>(d), p.dtype, w.kr.data() + j * d);
            load_row(v, (tok0 + j) * p.v_stride + kvh * d, static_cast<int>(d), p.dtype, row);
        } else {
            std::fill(w.kr.data() + j * d, w.kr.data() + (j + 1) * d, 0.0f);
            std::fill(row, row + d, 0.0f);
        }
        for (int64_t x = 0; x < d; ++x) {
            w.kt[x * skp + j] = w.kr[j * d + x];
            w.vt[x * skp + j] = row[x];
        }
    }
    std::fill(w.dk.begin(), w.dk.end(), 0.0f);
    std::fill(w.dv.begin(), w.dv.end(), 0.0f);
}

// Loads q (scaled), dO, delta = rowsum(dO * O) and lse in log2 units for rows [i0, i0 + rows).
void load_query_block(const Problem& p, const void* q, const void* out, const void* dout, const float* lse,
                      int64_t h, int64_t tok0, int rows, BwdScratch& w) {
    const int64_t d = p.head_dim, total_q = p.cu_q[p.batch];
    const float qf = p.q_factor();
    float orow[kMaxHeadDim];
    for (int r = 0; r < rows; ++r) {
        const int64_t tok = tok0 + r;
        float* qd = w.qs.data() + r * d;
        load_row(q, tok * p.q_stride + h * d, static_cast<int>(d), p.dtype, qd);
        for (int64_t x = 0; x < d; ++x) qd[x] *= qf;
        float* dd = w.dout.data() + r * d;
        load_row(dout, tok * p.o_stride + h * d, static_cast<int>(d), p.dtype, dd);
        load_row(out, tok * p.o_stride + h * d, static_cast<int>(d), p.dtype, orow);
        float acc = 0.0f;
        for (int64_t x = 0; x < d; ++x) acc += dd[x] * orow[x];
        w.delta[r] = acc;
        const float l = lse[h * total_q + tok];
        // A row that saw no key has lse -inf; +inf makes all its probabilities 0.
        w.lse2[r] = std::isinf(l) ? std::numeric_limits<float>::infinity() : l * 1.4426950408889634f;
    }
    std::fill(w.dq.begin(), w.dq.end(), 0.0f);
}

// One (query block, key block) step; j0 is the first key, n the number of real keys.
void step(const Problem& p, BwdScratch& w, int rows, int64_t i0, int64_t j0, int n, int64_t off) {
    const int d = static_cast<int>(p.head_dim), skp = static_cast<int>(w.skp);
    float *s = w.s.data(), *t = w.t.data();
    std::fill(s, s + rows * kBlockK, 0.0f);
    gemm_acc(rows, kBlockK, d, w.qs.data(), d, w.kt.data() + j0, skp, s, kBlockK);
    const bool capped = p.softcap > 0.0f, full = block_unmasked(p, i0, i0 + rows, j0, j0 + n, off);
    const float cap = p.cap_log2();
    for (int r = 0; r < rows; ++r) {
        float* row = s + r * kBlockK;
        const vf l2 = splat(w.lse2[r]);
        for (int c = 0; c < kBlockK; c += kW) {
            vf x = loadu(row + c);
            if (capped) {
                vf th = tanhv(x);
                storeu(t + r * kBlockK + c, th);
                x = th * cap;
            }
            storeu(row + c, exp2v(x - l2));
        }
        if (!full)
            for (int c = 0; c < n; ++c)
                if (!visible(p, i0 + r, j0 + c, off)) row[c] = 0.0f;
        std::fill(row + n, row + kBlockK, 0.0f);
    }
    // dV += P^T dO (P read transposed in place)
    gemm_acc<true>(kBlockK, d, rows, s, kBlockK, w.dout.data(), d, w.dv.data() + j0 * d, d);
    // dP = dO V^T, then dS = P (dP - delta) (times the tanh derivative under softcap), kept in t.
    float* dp = w.pt.data();
    std::fill(dp, dp + rows * kBlockK, 0.0f);
    gemm_acc(rows, kBlockK, d, w.dout.data(), d, w.vt.data() + j0, skp, dp, kBlockK);
    for (int r = 0; r < rows; ++r) {
        const vf dl = splat(w.delta[r]);
        for (int c = 0; c < kBlockK; c += kW) {
            vf ds = loadu(s + r * kBlockK + c) * (loadu(dp + r * kBlockK + c) - dl);
            if (capped) {
                vf th = loadu(t + r * kBlockK + c);
                ds = ds * (1.0f - th * th);
            }
            storeu(t + r * kBlockK + c, ds);
        }
    }
    // dQ += dS K ; dK += dS^T Q
    gemm_acc(rows, d, kBlockK, t, kBlockK, w.kr.data() + j0 * d, d, w.dq.data(), d);
    gemm_acc<true>(kBlockK, d, rows, t, kBlockK, w.qs.data(), d, w.dk.data() + j0 * d, d);
}

struct Grads {
    void *dq, *dk, *dv;
    int dkv_expanded;
};

void run_head(const Problem& p, int64_t b, int64_t h, const void* q, const void* k, const void* v, const void* out,
              const void* dout, const float* lse, const Grads& g, BwdScratch& w) {
    const int64_t d = p.head_dim;
    const int64_t q0 = p.cu_q[b], sq = p.cu_q[b + 1] - q0;
    const int64_t k0 = p.cu_k[b], sk = p.cu_k[b + 1] - k0, off = sk - sq;
    const int64_t kvh = h / p.group();
    pack_sequence(p, k, v, k0, sk, kvh, w);
    for (int64_t i0 = 0; i0 < sq; i0 += kBlockQ) {
        const int rows = static_cast<int>(std::min<int64_t>(kBlockQ, sq - i0));
        int64_t lo, hi;
        key_range(p, i0, i0 + rows, sq, sk, &lo, &hi);
        if (lo >= hi) continue;  // the caller zero-filled dq
        load_query_block(p, q, out, dout, lse, h, q0 + i0, rows, w);
        for (int64_t j0 = lo; j0 < hi; j0 += kBlockK)
            step(p, w, rows, i0, j0, static_cast<int>(std::min<int64_t>(kBlockK, hi - j0)), off);
        for (int r = 0; r < rows; ++r)
            store_row(g.dq, (q0 + i0 + r) * p.q_stride + h * d, static_cast<int>(d), p.dtype, w.dq.data() + r * d,
                      p.scale);
    }
    const float dk_mul = p.scale / p.q_factor();
    for (int64_t j = 0; j < sk; ++j) {
        if (g.dkv_expanded) {  // fp32 [total_k, heads, d]
            const int64_t at = ((k0 + j) * p.num_heads + h) * d;
            store_row(g.dk, at, static_cast<int>(d), 0, w.dk.data() + j * d, dk_mul);
            store_row(g.dv, at, static_cast<int>(d), 0, w.dv.data() + j * d, 1.0f);
        } else {  // dtype, rows strided like k and v
            store_row(g.dk, (k0 + j) * p.k_stride + kvh * d, static_cast<int>(d), p.dtype, w.dk.data() + j * d,
                      dk_mul);
            store_row(g.dv, (k0 + j) * p.v_stride + kvh * d, static_cast<int>(d), p.dtype, w.dv.data() + j * d,
                      1.0f);
        }
    }
}

}  // namespace

void backward(const Problem& p, const void* q, const void* k, const void* v, const void* out, const void* dout,
              const float* lse, void* dq, void* dk, void* dv, int dkv_expanded) {
    std::vector<std::pair<int64_t, int64_t>> items;  // (sequence, head), longest sequences first
    int64_t max_k = 1;
    for (int64_t b = 0; b < p.batch; ++b) {
        if (p.cu_q[b + 1] == p.cu_q[b] || p.cu_k[b + 1] == p.cu_k[b]) continue;
        max_k = std::max(max_k, p.cu_k[b + 1] - p.cu_k[b]);
        for (int64_t h = 0; h < p.num_heads; ++h) items.push_back({b, h});
    }
    auto work = [&](const std::pair<int64_t, int64_t>& it) {
        return (p.cu_q[it.first + 1] - p.cu_q[it.first]) * (p.cu_k[it.first + 1] - p.cu_k[it.first]);
    };
    std::stable_sort(items.begin(), items.end(), [&](const auto& a, const auto& b) { return work(a) > work(b); });
    const Grads g{dq, dk, dv, dkv_expanded};
    const int64_t count = static_cast<int64_t>(items.size());
#pragma omp parallel num_threads(p.num_threads) if (p.num_threads > 1 && count > 1)
    {
        BwdScratch w(p.head_dim, max_k);
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < count; ++i)
            run_head(p, items[i].first, items[i].second, q, k, v, out, dout, lse, g, w);
    }
}

}  // namespace attn
}  // namespace deepscale
