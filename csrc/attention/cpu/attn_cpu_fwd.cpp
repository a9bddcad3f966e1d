// Forward pass of the CPU attention kernel (see attn_cpu.h for layout and algorithm).
//
// Work items are (sequence, query head, query block), taken dynamically by the threads,
// longest (latest) blocks first so a causal batch ends evenly. Per block: pack q (scaled) once,
// then for each key block pack k transposed and v as fp32, S = Q K^T, cap and mask, update the
// running max/sum, O = O * alpha + P V. Everything a thread touches fits in L2.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attn_cpu.h"
#include "attn_vec.h"

namespace deepscale {
namespace attn {

namespace {

struct Item {
    int64_t b, h, i0;
};

struct FwdScratch {
    std::vector<float> qs, o, kt, vb, s, m, l;
    explicit FwdScratch(int64_t d)
        : qs(kBlockQ * d), o(kBlockQ * d), kt(d * kBlockK), vb(kBlockK * d), s(kBlockQ * kBlockK), m(kBlockQ),
          l(kBlockQ) {}
};

// Scores of one (query block, key block) pair in log2 units: capped, masked; padding is -inf.
void scores_block(const Problem& p, FwdScratch& w, int rows, int64_t i0, int64_t j0, int n, int64_t off) {
    float* s = w.s.data();
    std::fill(s, s + rows * kBlockK, 0.0f);
    gemm_acc(rows, kBlockK, static_cast<int>(p.head_dim), w.qs.data(), static_cast<int>(p.head_dim), w.kt.data(),
             kBlockK, s, kBlockK);
    const float ninf = -std::numeric_limits<float>::infinity();
    if (p.softcap > 0.0f) {
        const float cap = p.cap_log2();
        for (int r = 0; r < rows; ++r)
            for (int c = 0; c < kBlockK; c += kW) storeu(s + r * kBlockK + c, tanhv(loadu(s + r * kBlockK + c)) * cap);
    }
    const bool full = block_unmasked(p, i0, i0 + rows, j0, j0 + n, off);
    for (int r = 0; r < rows; ++r) {
        float* row = s + r * kBlockK;
        if (!full)
            for (int c = 0; c < n; ++c)
                if (!visible(p, i0 + r, j0 + c, off)) row[c] = ninf;
        for (int c = n; c < kBlockK; ++c) row[c] = ninf;
    }
}

// Online softmax update of rows with the block's scores; O *= alpha, S becomes P.
void softmax_update(FwdScratch& w, int rows, int64_t d) {
    const float ninf = -std::numeric_limits<float>::infinity();
    for (int r = 0; r < rows; ++r) {
        float* row = w.s.data() + r * kBlockK;
        vf mv = loadu(row);
        for (int c = kW; c < kBlockK; c += kW) {
            vf x = loadu(row + c);
            mv = x > mv ? x : mv;
        }
        const float m_new = std::max(w.m[r], hmax(mv));
        if (m_new == ninf) {  // nothing visible yet in this row
            std::fill(row, row + kBlockK, 0.0f);
            continue;
        }
        const float alpha = std::exp2(w.m[r] - m_new);  // 0 on the first visible block
        vf sum = splat(0.0f);
        const vf mnv = splat(m_new);
        for (int c = 0; c < kBlockK; c += kW) {
            vf e = exp2v(loadu(row + c) - mnv);
            storeu(row + c, e);
            sum += e;
        }
        w.l[r] = w.l[r] * alpha + hsum(sum);
        w.m[r] = m_new;
        if (alpha != 1.0f) {
            float* o = w.o.data() + r * d;
            const vf av = splat(alpha);
            for (int c = 0; c < d; c += kW) storeu(o + c, loadu(o + c) * av);
        }
    }
}

void pack_keys(const Problem& p, const void* k, const void* v, int64_t tok0, int64_t kvh, int n, FwdScratch& w) {
    const int64_t d = p.head_dim;
    std::vector<float>& kt = w.kt;
    float row[kMaxHeadDim];
    for (int c = 0; c < n; ++c) {
        load_row(k, (tok0 + c) * p.k_stride + kvh * d, static_cast<int>(d), p.dtype, row);
        for (int64_t x = 0; x < d; ++x) kt[x * kBlockK + c] = row[x];
        load_row(v, (tok0 + c) * p.v_stride + kvh * d, static_cast<int>(d), p.dtype, w.vb.data() + c * d);
    }
    for (int c = n; c < kBlockK; ++c) {
        for (int64_t x = 0; x < d; ++x) kt[x * kBlockK + c] = 0.0f;
        std::fill(w.vb.data() + c * d, w.vb.data() + (c + 1) * d, 0.0f);
    }
}

void run_block(const Problem& p, const Item& it, const void* q, const void* k, const void* v, void* out, float* lse,
               FwdScratch& w) {
    const int64_t d = p.head_dim, total_q = p.cu_q[p.batch];
    const int64_t q0 = p.cu_q[it.b], sq = p.cu_q[it.b + 1] - q0;
    const int64_t k0 = p.cu_k[it.b], sk = p.cu_k[it.b + 1] - k0;
    const int rows = static_cast<int>(std::min<int64_t>(kBlockQ, sq - it.i0));
    const int64_t kvh = it.h / p.group(), off = sk - sq;
    const float qf = p.q_factor();
    for (int r = 0; r < rows; ++r) {
        float* dst = w.qs.data() + r * d;
        load_row(q, (q0 + it.i0 + r) * p.q_stride + it.h * d, static_cast<int>(d), p.dtype, dst);
        for (int64_t x = 0; x < d; ++x) dst[x] *= qf;
    }
    std::fill(w.o.begin(), w.o.end(), 0.0f);
    std::fill(w.m.begin(), w.m.end(), -std::numeric_limits<float>::infinity());
    std::fill(w.l.begin(), w.l.end(), 0.0f);
    int64_t lo, hi;
    key_range(p, it.i0, it.i0 + rows, sq, sk, &lo, &hi);
    for (int64_t j0 = lo; j0 < hi; j0 += kBlockK) {
        const int n = static_cast<int>(std::min<int64_t>(kBlockK, hi - j0));
        pack_keys(p, k, v, k0 + j0, kvh, n, w);
        scores_block(p, w, rows, it.i0, j0, n, off);
        softmax_update(w, rows, d);
        gemm_acc(rows, static_cast<int>(d), kBlockK, w.s.data(), kBlockK, w.vb.data(), static_cast<int>(d),
                 w.o.data(), static_cast<int>(d));
    }
    for (int r = 0; r < rows; ++r) {
        const bool any = w.l[r] > 0.0f;
        const float inv = any ? 1.0f / w.l[r] : 0.0f;
        store_row(out, (q0 + it.i0 + r) * p.o_stride + it.h * d, static_cast<int>(d), p.dtype, w.o.data() + r * d,
                  inv);
        lse[it.h * total_q + q0 + it.i0 + r] =
            any ? (w.m[r] + std::log2(w.l[r])) * 0.6931471805599453f : -std::numeric_limits<float>::infinity();
    }
}

}  // namespace

void forward(const Problem& p, const void* q, const void* k, const void* v, void* out, float* lse) {
    std::vector<Item> items;
    for (int64_t b = 0; b < p.batch; ++b) {
        const int64_t sq = p.cu_q[b + 1] - p.cu_q[b];
        for (int64_t i0 = ((sq - 1) / kBlockQ) * kBlockQ; i0 >= 0 && sq > 0; i0 -= kBlockQ)
            for (int64_t h = 0; h < p.num_heads; ++h) items.push_back({b, h, i0});
    }
    // Causal work grows with the block index: hand out the biggest blocks first.
    std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.i0 > b.i0; });
    const int64_t count = static_cast<int64_t>(items.size());
#pragma omp parallel num_threads(p.num_threads) if (p.num_threads > 1 && count > 1)
    {
        FwdScratch w(p.head_dim);
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < count; ++i) run_block(p, items[i], q, k, v, out, lse, w);
    }
}

}  // namespace attn
}  // namespace deepscale
