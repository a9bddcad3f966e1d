// Forward kernel of the CUDA attention op: FlashAttention-2 (Dao, 2023) with mma.sync.
//
// One CTA of four warps per (query block of 64 rows, query head, sequence); each warp owns 16
// query rows. Per key block of 64: S = Q K^T on tensor cores (fp32 accumulators), scale/cap,
// mask, online softmax in registers (row statistics reduced over the 4 lanes sharing a row),
// and O += P V with P taken straight from the accumulators. The log-sum-exp is stored for the
// backward. Packed varlen: blockIdx.z is the sequence, its offsets come from cu_q/cu_k.
#include <cfloat>

#include "flash_common.cuh"

namespace deepscale {
namespace flash {

template <class T, int D>
__global__ void __launch_bounds__(kWarps * 32) forward_kernel(Params p) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    constexpr int S = Tile<D>::kStride;
    T* qs = reinterpret_cast<T*>(smem_raw);
    T* ks = qs + kBlockM * S;
    T* vs = ks + kBlockN * S;

    const int b = blockIdx.z, h = blockIdx.y, i0 = blockIdx.x * kBlockM;
    const int q0 = p.cu_q[b], sq = p.cu_q[b + 1] - q0;
    const int k0 = p.cu_k[b], sk = p.cu_k[b + 1] - k0;
    if (i0 >= sq) return;
    const int kvh = h / (p.num_heads / p.num_kv_heads), off = sk - sq;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int64_t q_row = static_cast<int64_t>(p.num_heads) * D, kv_row = static_cast<int64_t>(p.num_kv_heads) * D;
    const T* qg = static_cast<const T*>(p.q) + (q0 + i0) * q_row + h * D;
    load_tile<T, D, kBlockM>(qs, qg, q_row, sq - i0);

    // Key range of the block (as the CPU kernel: start rounded down to a key block).
    int lo = p.left < 0 ? 0 : max(0, i0 + off - p.left);
    lo = lo / kBlockN * kBlockN;
    const int i_last = min(sq, i0 + kBlockM) - 1;
    const int hi = p.right < 0 ? sk : min(sk, i_last + off + p.right + 1);

    float o[D / 8][4];
#pragma unroll
    for (int x = 0; x < D / 8; ++x) o[x][0] = o[x][1] = o[x][2] = o[x][3] = 0.0f;
    float m[2] = {-FLT_MAX, -FLT_MAX}, l[2] = {0.0f, 0.0f};
    const int row_a = i0 + warp * 16 + g;  // this lane's rows: row_a and row_a + 8

    for (int j0 = lo; j0 < hi; j0 += kBlockN) {
        __syncthreads();  // previous tiles consumed
        const int64_t kv_off = (k0 + j0) * kv_row + kvh * D;
        load_tile<T, D, kBlockN>(ks, static_cast<const T*>(p.k) + kv_off, kv_row, sk - j0);
        load_tile<T, D, kBlockN>(vs, static_cast<const T*>(p.v) + kv_off, kv_row, sk - j0);
        __syncthreads();

        float s[kBlockN / 8][4];
#pragma unroll
        for (int n = 0; n < kBlockN / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D; kk += 16) {
            uint32_t a[4];
            ld_a(a, qs, S, warp * 16, kk, lane);
#pragma unroll
            for (int n = 0; n < kBlockN / 8; ++n) {
                uint32_t b0, b1;
                ld_b_trans(b0, b1, ks, S, n * 8, kk, lane);
                mma<T>(s[n], a, b0, b1);
            }
        }
        float mx[2] = {m[0], m[1]};
#pragma unroll
        for (int n = 0; n < kBlockN / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = row_a + (e >= 2 ? 8 : 0), j = j0 + n * 8 + 2 * t + (e & 1);
                float th;
                float x = log2_score(s[n][e], p.scale, p.softcap, &th);
                if (j >= sk || !visible(i, j, off, p.left, p.right)) x = -INFINITY;
                s[n][e] = x;
                mx[e >> 1] = fmaxf(mx[e >> 1], x);
            }
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            alpha[r] = exp2f(m[r] - mx[r]);  // m starts at -FLT_MAX (not -inf): no inf - inf
            m[r] = mx[r];
            l[r] *= alpha[r];
        }
#pragma unroll
        for (int n = 0; n < kBlockN / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float pe = exp2f(s[n][e] - m[e >> 1]);  // -inf scores give 0
                s[n][e] = pe;
                l[e >> 1] += pe;
            }
#pragma unroll
        for (int x = 0; x < D / 8; ++x) {
            o[x][0] *= alpha[0];
            o[x][1] *= alpha[0];
            o[x][2] *= alpha[1];
            o[x][3] *= alpha[1];
        }
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
            uint32_t a[4];
            a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
            a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
            a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int x = 0; x < D / 8; ++x) {
                uint32_t b0, b1;
                ld_b(b0, b1, vs, S, kk * 16, x * 8, lane);
                mma<T>(o[x], a, b0, b1);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
    const int total_q = p.cu_q[p.batch];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int i = row_a + 8 * r;
        if (i >= sq) continue;
        // A row that saw no key keeps l == 0 (every p was exp2(-inf)): zeros and lse -inf.
        const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        T* og = static_cast<T*>(p.out) + (q0 + i) * q_row + h * D;
#pragma unroll
        for (int x = 0; x < D / 8; ++x)
            *reinterpret_cast<uint32_t*>(og + x * 8 + 2 * t) = pack2<T>(o[x][2 * r] * inv, o[x][2 * r + 1] * inv);
        if (t == 0)
            p.lse[static_cast<int64_t>(h) * total_q + q0 + i] =
                l[r] > 0.0f ? (m[r] + log2f(l[r])) * 0.6931471805599453f : -INFINITY;
    }
}

template <class T, int D>
cudaError_t launch_forward(const Params& p, cudaStream_t stream) {
    constexpr int kSmem = (kBlockM + 2 * kBlockN) * Tile<D>::kStride * sizeof(T);
    auto kernel = forward_kernel<T, D>;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    if (err != cudaSuccess) return err;
    dim3 grid((p.max_q + kBlockM - 1) / kBlockM, p.num_heads, p.batch);
    if (grid.x == 0) return cudaSuccess;
    kernel<<<grid, kWarps * 32, kSmem, stream>>>(p);
    return cudaGetLastError();
}

template <class T>
cudaError_t forward_dims(const Params& p, cudaStream_t stream) {
#ifdef DEEPSCALE_FLASH_ONE_HEAD_DIM  // a quicker compile check: one instantiation
    if (p.head_dim == DEEPSCALE_FLASH_ONE_HEAD_DIM) return launch_forward<T, DEEPSCALE_FLASH_ONE_HEAD_DIM>(p, stream);
    return cudaErrorInvalidValue;
#else
    switch (p.head_dim) {
        case 64: return launch_forward<T, 64>(p, stream);
        case 96: return launch_forward<T, 96>(p, stream);
        case 128: return launch_forward<T, 128>(p, stream);
        case 256: return launch_forward<T, 256>(p, stream);
        default: return cudaErrorInvalidValue;
    }
#endif
}

cudaError_t run_forward(const Params& p, cudaStream_t stream) {
    return p.dtype == DType::kBFloat16 ? forward_dims<__nv_bfloat16>(p, stream) : forward_dims<__half>(p, stream);
}

}  // namespace flash
}  // namespace deepscale
