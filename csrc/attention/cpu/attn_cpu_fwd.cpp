// Forward pass of the CPU attention kernel (see attn_cpu.h for layout and algorithm).
//
// Work items are (sequence, query head, query block), taken dynamically by the threads,
// longest (latest) blocks first so a causal batch ends evenly. Per block: q is transposed and
// scaled once; per key block the scores are computed transposed, S^T = K Q^T, so that k and v
// are read as they lie (fp32) or converted row by row (bf16/fp16), never transposed, and the
// softmax statistics of 16 queries sit in one vector (no horizontal reductions). Then
// O = O * alpha + P V with P^T read transposed. Everything a thread touches fits in L2.
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
    std::vector<float> qt, o, kb, vb, st, m, l, alpha;
    explicit FwdScratch(int64_t d)
        : qt(d * kBlockQ), o(kBlockQ * d), kb(kBlockK * d), vb(kBlockK * d), st(kBlockK * kBlockQ), m(kBlockQ),
          l(kBlockQ), alpha(kBlockQ) {}
};

// Rows [tok0, tok0 + n) of one head of k or v as fp32 [n][d]: the tensor itself when it is
// fp32 (leading dimension = its row stride), else converted into `buf`.
const float* key_rows(const Problem& p, const void* base, int64_t stride, int64_t tok0, int64_t head, int n,
                      float* buf, int* ld) {
    const int64_t d = p.head_dim;
    if (p.dtype == 0) {
        *ld = static_cast<int>(stride);
        return static_cast<const float*>(base) + tok0 * stride + head * d;
    }
    for (int c = 0; c < n; ++c) load_row(base, (tok0 + c) * stride + head * d, static_cast<int>(d), p.dtype, buf + c * d);
    *ld = static_cast<int>(d);
    return buf;
}

// S^T [n][kBlockQ] of one key block in log2 units (capped, masked), then the online softmax
// update: per query column the running max m and sum l; S^T becomes P^T, alpha the O factor.
void scores_and_softmax(const Problem& p, FwdScratch& w, int rows, int64_t i0, int64_t j0, int n, int64_t off) {
    float* st = w.st.data();
    const float ninf = -std::numeric_limits<float>::infinity();
    if (p.softcap > 0.0f) {
        const vf cap = splat(p.cap_log2());
        for (int j = 0; j < n; ++j)
            for (int c = 0; c < kBlockQ; c += kW) storeu(st + j * kBlockQ + c, tanhv(loadu(st + j * kBlockQ + c)) * cap);
    }
    if (!block_unmasked(p, i0, i0 + rows, j0, j0 + n, off))
        for (int j = 0; j < n; ++j)
            for (int r = 0; r < rows; ++r)
                if (!visible(p, i0 + r, j0 + j, off)) st[j * kBlockQ + r] = ninf;
    for (int c = 0; c < kBlockQ; c += kW) {
        vf mx = loadu(w.m.data() + c);
        for (int j = 0; j < n; ++j) {
            vf x = loadu(st + j * kBlockQ + c);
            mx = x > mx ? x : mx;
        }
        const vf m_old = loadu(w.m.data() + c);
        storeu(w.alpha.data() + c, exp2v(m_old - mx));  // 0 while nothing was visible (NaN maps to 0)
        vf sum = splat(0.0f);
        for (int j = 0; j < n; ++j) {
            vf e = exp2v(loadu(st + j * kBlockQ + c) - mx);
            storeu(st + j * kBlockQ + c, e);
            sum += e;
        }
        storeu(w.l.data() + c, loadu(w.l.data() + c) * loadu(w.alpha.data() + c) + sum);
        storeu(w.m.data() + c, mx);
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
    float row[kMaxHeadDim];
    std::fill(w.qt.begin(), w.qt.end(), 0.0f);
    for (int r = 0; r < rows; ++r) {  // q^T [d][kBlockQ], scaled; it is reused by every key block
        load_row(q, (q0 + it.i0 + r) * p.q_stride + it.h * d, static_cast<int>(d), p.dtype, row);
        for (int64_t x = 0; x < d; ++x) w.qt[x * kBlockQ + r] = row[x] * qf;
    }
    std::fill(w.o.begin(), w.o.end(), 0.0f);
    std::fill(w.m.begin(), w.m.end(), -std::numeric_limits<float>::infinity());
    std::fill(w.l.begin(), w.l.end(), 0.0f);
    int64_t lo, hi;
    key_range(p, it.i0, it.i0 + rows, sq, sk, &lo, &hi);
    for (int64_t j0 = lo; j0 < hi; j0 += kBlockK) {
        const int n = static_cast<int>(std::min<int64_t>(kBlockK, hi - j0));
        int ldk, ldv;
        const float* kb = key_rows(p, k, p.k_stride, k0 + j0, kvh, n, w.kb.data(), &ldk);
        std::fill(w.st.begin(), w.st.begin() + n * kBlockQ, 0.0f);
        gemm_acc(n, kBlockQ, static_cast<int>(d), kb, ldk, w.qt.data(), kBlockQ, w.st.data(), kBlockQ);
        scores_and_softmax(p, w, rows, it.i0, j0, n, off);
        for (int r = 0; r < rows; ++r) {
            const float a = w.alpha[r];
            if (a == 1.0f) continue;
            float* o = w.o.data() + r * d;
            const vf av = splat(a);
            for (int c = 0; c < d; c += kW) storeu(o + c, loadu(o + c) * av);
        }
        const float* vb = key_rows(p, v, p.v_stride, k0 + j0, kvh, n, w.vb.data(), &ldv);
        gemm_acc<true>(rows, static_cast<int>(d), n, w.st.data(), kBlockQ, vb, ldv, w.o.data(), static_cast<int>(d));
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
