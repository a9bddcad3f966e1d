// Backward kernels of the CUDA attention op: FlashAttention-2's backward with mma.sync.
//
// delta_kernel: delta = rowsum(dO * O) per (query, head), one warp per row.
// backward_kernel: one CTA of four warps per (key block of 64, query head, sequence); each
// warp owns 16 keys and keeps their dK and dV rows in fp32 registers. For every query block
// that can see the keys it recomputes, transposed so the warp's keys are the accumulator rows,
//   S^T = K Q^T, P^T = exp2(S^T - lse), dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta),
//   dK += dS^T Q,
// stores dS in shared memory and then computes dQ += dS K for the block (warp w: queries
// 16w..16w+15, 64 columns at a time) with fp32 atomics into the global dQ. dK/dV are written
// per query head (fp32); the caller sums each GQA group.
#include <cfloat>

#include "flash_common.cuh"

namespace deepscale {
namespace flash {

template <class T, int D>
__global__ void delta_kernel(BackwardParams p) {
    const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);  // token * heads + head
    const int lane = threadIdx.x & 31;
    if (row >= static_cast<int64_t>(p.total_q) * p.num_heads) return;
    const T* o = static_cast<const T*>(p.out) + row * D;
    const T* d = static_cast<const T*>(p.dout) + row * D;
    float acc = 0.0f;
    for (int x = lane; x < D; x += 32) acc += to_float(o[x]) * to_float(d[x]);
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, s);
    if (lane == 0) {
        const int64_t tok = row / p.num_heads, h = row % p.num_heads;
        p.delta[h * p.total_q + tok] = acc;
    }
}

template <class T, int D>
__global__ void __launch_bounds__(kWarps * 32) backward_kernel(BackwardParams p) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    constexpr int S = Tile<D>::kStride, SD = kBlockN + 8;  // dS tile: [query][key]
    T* ks = reinterpret_cast<T*>(smem_raw);
    T* vs = ks + kBlockN * S;
    T* qs = vs + kBlockN * S;
    T* dos = qs + kBlockM * S;
    T* dss = dos + kBlockM * S;
    float* lse2 = reinterpret_cast<float*>(dss + kBlockM * SD);
    float* dlt = lse2 + kBlockM;

    const int b = blockIdx.z, h = blockIdx.y, j0 = blockIdx.x * kBlockN;
    const int q0 = p.cu_q[b], sq = p.cu_q[b + 1] - q0;
    const int k0 = p.cu_k[b], sk = p.cu_k[b + 1] - k0;
    if (j0 >= sk || sq == 0) return;
    const int kvh = h / (p.num_heads / p.num_kv_heads), off = sk - sq;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int64_t q_row = static_cast<int64_t>(p.num_heads) * D, kv_row = static_cast<int64_t>(p.num_kv_heads) * D;
    const int64_t kv_off = (k0 + j0) * kv_row + kvh * D;
    load_tile<T, D, kBlockN>(ks, static_cast<const T*>(p.k) + kv_off, kv_row, sk - j0);
    load_tile<T, D, kBlockN>(vs, static_cast<const T*>(p.v) + kv_off, kv_row, sk - j0);

    // Queries that can see a key of [j0, j_last]: the inverse of the forward's key range.
    const int j_last = min(sk, j0 + kBlockN) - 1;
    int lo = p.right < 0 ? 0 : max(0, j0 - off - p.right);
    lo = lo / kBlockM * kBlockM;
    const int hi = p.left < 0 ? sq : min(sq, j_last - off + p.left + 1);

    float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
    for (int x = 0; x < D / 8; ++x)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[x][e] = dv[x][e] = 0.0f;
    const int key_a = j0 + warp * 16 + g;  // this lane's keys: key_a and key_a + 8

    for (int i0 = lo; i0 < hi; i0 += kBlockM) {
        __syncthreads();
        const int64_t q_off = (q0 + i0) * q_row + h * D;
        load_tile<T, D, kBlockM>(qs, static_cast<const T*>(p.q) + q_off, q_row, sq - i0);
        load_tile<T, D, kBlockM>(dos, static_cast<const T*>(p.dout) + q_off, q_row, sq - i0);
        for (int r = threadIdx.x; r < kBlockM; r += blockDim.x) {
            const int i = i0 + r;
            const float l = i < sq ? p.lse[static_cast<int64_t>(h) * p.total_q + q0 + i] : -INFINITY;
            lse2[r] = isinf(l) ? INFINITY : l * kLog2e;  // a row that saw nothing: every p is 0
            dlt[r] = i < sq ? p.delta[static_cast<int64_t>(h) * p.total_q + q0 + i] : 0.0f;
        }
        __syncthreads();

        // S^T = K Q^T: rows are this warp's 16 keys, columns the 64 queries.
        float s[kBlockM / 8][4], th[kBlockM / 8][4];
#pragma unroll
        for (int n = 0; n < kBlockM / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D; kk += 16) {
            uint32_t a[4];
            ld_a(a, ks, S, warp * 16, kk, lane);
#pragma unroll
            for (int n = 0; n < kBlockM / 8; ++n) {
                uint32_t b0, b1;
                ld_b_trans(b0, b1, qs, S, n * 8, kk, lane);
                mma<T>(s[n], a, b0, b1);
            }
        }
#pragma unroll
        for (int n = 0; n < kBlockM / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = key_a + (e >= 2 ? 8 : 0), c = n * 8 + 2 * t + (e & 1), i = i0 + c;
                const float x = log2_score(s[n][e], p.scale, p.softcap, &th[n][e]);
                const bool ok = i < sq && j < sk && visible(i, j, off, p.left, p.right);
                s[n][e] = ok ? exp2f(x - lse2[c]) : 0.0f;  // P^T
            }
        // dV += P^T dO
#pragma unroll
        for (int kk = 0; kk < kBlockM / 16; ++kk) {
            uint32_t a[4];
            a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
            a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
            a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int x = 0; x < D / 8; ++x) {
                uint32_t b0, b1;
                ld_b(b0, b1, dos, S, kk * 16, x * 8, lane);
                mma<T>(dv[x], a, b0, b1);
            }
        }
        // dP^T = V dO^T
        float dp[kBlockM / 8][4];
#pragma unroll
        for (int n = 0; n < kBlockM / 8; ++n) dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D; kk += 16) {
            uint32_t a[4];
            ld_a(a, vs, S, warp * 16, kk, lane);
#pragma unroll
            for (int n = 0; n < kBlockM / 8; ++n) {
                uint32_t b0, b1;
                ld_b_trans(b0, b1, dos, S, n * 8, kk, lane);
                mma<T>(dp[n], a, b0, b1);
            }
        }
        // dS^T (with respect to the raw dot product: softcap derivative and scale folded in),
        // kept in s and stored as dS [query][key] for the dQ product.
#pragma unroll
        for (int n = 0; n < kBlockM / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int c = n * 8 + 2 * t + (e & 1);
                float ds = s[n][e] * (dp[n][e] - dlt[c]) * p.scale;
                if (p.softcap > 0.0f) ds *= 1.0f - th[n][e] * th[n][e];
                s[n][e] = ds;
                const int key = warp * 16 + g + (e >= 2 ? 8 : 0);
                dss[c * SD + key] = from_float<T>(ds);
            }
        // dK += dS^T Q
#pragma unroll
        for (int kk = 0; kk < kBlockM / 16; ++kk) {
            uint32_t a[4];
            a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
            a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
            a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int x = 0; x < D / 8; ++x) {
                uint32_t b0, b1;
                ld_b(b0, b1, qs, S, kk * 16, x * 8, lane);
                mma<T>(dk[x], a, b0, b1);
            }
        }
        __syncthreads();  // dS complete
        // dQ[16w .. 16w + 16) += dS K, 64 columns at a time, atomically into fp32 global memory.
        for (int c0 = 0; c0 < D; c0 += 64) {
            constexpr int kCols = 64;
            float acc[kCols / 8][4];
#pragma unroll
            for (int x = 0; x < kCols / 8; ++x) acc[x][0] = acc[x][1] = acc[x][2] = acc[x][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < kBlockN; kk += 16) {
                uint32_t a[4];
                ld_a(a, dss, SD, warp * 16, kk, lane);
#pragma unroll
                for (int x = 0; x < kCols / 8; ++x) {
                    if (c0 + x * 8 >= D) break;
                    uint32_t b0, b1;
                    ld_b(b0, b1, ks, S, kk, c0 + x * 8, lane);
                    mma<T>(acc[x], a, b0, b1);
                }
            }
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int i = i0 + warp * 16 + g + 8 * r;
                if (i >= sq) continue;
                float* dqg = p.dq + (q0 + i) * q_row + h * D + c0;
#pragma unroll
                for (int x = 0; x < kCols / 8; ++x) {
                    if (c0 + x * 8 >= D) break;
                    atomicAdd(dqg + x * 8 + 2 * t, acc[x][2 * r]);
                    atomicAdd(dqg + x * 8 + 2 * t + 1, acc[x][2 * r + 1]);
                }
            }
        }
    }
    // dK, dV of this query head, fp32 [total_k, heads, d].
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int j = key_a + 8 * r;
        if (j >= sk) continue;
        const int64_t at = (static_cast<int64_t>(k0 + j) * p.num_heads + h) * D;
#pragma unroll
        for (int x = 0; x < D / 8; ++x) {
            *reinterpret_cast<float2*>(p.dk + at + x * 8 + 2 * t) = make_float2(dk[x][2 * r], dk[x][2 * r + 1]);
            *reinterpret_cast<float2*>(p.dv + at + x * 8 + 2 * t) = make_float2(dv[x][2 * r], dv[x][2 * r + 1]);
        }
    }
}

template <class T, int D>
cudaError_t launch_backward(const BackwardParams& p, cudaStream_t stream) {
    if (p.total_q == 0) return cudaSuccess;
    const int64_t rows = static_cast<int64_t>(p.total_q) * p.num_heads;
    delta_kernel<T, D><<<static_cast<unsigned>((rows + kWarps - 1) / kWarps), kWarps * 32, 0, stream>>>(p);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    constexpr int kSmem = (2 * kBlockN + 2 * kBlockM) * Tile<D>::kStride * sizeof(T) +
                          kBlockM * (kBlockN + 8) * sizeof(T) + 2 * kBlockM * sizeof(float);
    auto kernel = backward_kernel<T, D>;
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    if (err != cudaSuccess) return err;
    dim3 grid((p.max_k + kBlockN - 1) / kBlockN, p.num_heads, p.batch);
    if (grid.x == 0) return cudaSuccess;
    kernel<<<grid, kWarps * 32, kSmem, stream>>>(p);
    return cudaGetLastError();
}

template <class T>
cudaError_t backward_dims(const BackwardParams& p, cudaStream_t stream) {
#ifdef DEEPSCALE_FLASH_ONE_HEAD_DIM  // a quicker compile check: one instantiation
    if (p.head_dim == DEEPSCALE_FLASH_ONE_HEAD_DIM) return launch_backward<T, DEEPSCALE_FLASH_ONE_HEAD_DIM>(p, stream);
    return cudaErrorInvalidValue;
#else
    switch (p.head_dim) {
        case 64: return launch_backward<T, 64>(p, stream);
        case 96: return launch_backward<T, 96>(p, stream);
        case 128: return launch_backward<T, 128>(p, stream);
        case 256: return launch_backward<T, 256>(p, stream);
        default: return cudaErrorInvalidValue;
    }
#endif
}

cudaError_t run_backward(const BackwardParams& p, cudaStream_t stream) {
    return p.dtype == DType::kBFloat16 ? backward_dims<__nv_bfloat16>(p, stream) : backward_dims<__half>(p, stream);
}

}  // namespace flash
}  // namespace deepscale
