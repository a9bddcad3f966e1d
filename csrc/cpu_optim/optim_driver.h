// The loop shared by every CPU optimizer: split the tensors into tiles, hand contiguous runs
// of tiles to OpenMP threads, and run one fused pass per element (load param, grad, states;
// update; store param, states and the optional half-precision copy).
//
// An optimizer supplies a struct with `kStates` (1 or 2), a `Coef` type and
//   template <class V> static void apply(V& p, V g, V& s1, V& s2, const Coef& c);
// written once for both the SIMD register type and float.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace deepscale {

enum DType : int64_t { kNone = -1, kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// One parameter tensor and its companions; pointers are host addresses passed from Python.
struct TensorSlot {
    void* param;
    const void* grad;
    void* state1;
    void* state2;
    void* out;
    int64_t numel;
    int64_t param_dtype, grad_dtype, state_dtype, out_dtype;
};
constexpr int kSlotFields = 10;

// Tiles of 32K elements: large enough that OpenMP scheduling costs nothing, small enough that
// 2 threads stay balanced on the 100-tensor case.
constexpr int64_t kTileElems = 1 << 15;
// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelThreshold = 1 << 16;

// The copy-out buffer is written with non-temporal stores when a step moves more data than
// the caches hold (nothing of it would still be cached when it is read) and it is aligned to
// the vector's half-precision width. That saves the read-for-ownership of every copy-out line:
// 2 of 32 bytes per fp32 parameter with a bf16 copy.
constexpr int64_t kStreamOutThreshold = 1 << 21;

template <class Op, class P, class G, class S, class O>
void run_tile(const TensorSlot& t, int64_t begin, int64_t n, const typename Op::Coef& coef, bool stream_out) {
    using namespace simd;
    // A local copy: the stores through float* below could alias `coef`, which would make the
    // compiler reload and re-broadcast every coefficient each iteration (9 extra loads per
    // vector, measured 4-6% of the single-thread step).
    const typename Op::Coef c = coef;
    auto* p = static_cast<typename P::T*>(t.param) + begin;
    auto* g = static_cast<const typename G::T*>(t.grad) + begin;
    auto* s1 = static_cast<typename S::T*>(t.state1) + begin;
    auto* s2 = Op::kStates > 1 ? static_cast<typename S::T*>(t.state2) + begin : nullptr;
    auto* out = static_cast<typename O::T*>(t.out) + (t.out ? begin : 0);
    constexpr bool kCopyOut = !std::is_same<O, NoOut>::value;
    int64_t i = 0;
#ifndef DEEPSCALE_SIMD_SCALAR_ONLY
    auto vector_loop = [&](auto streaming) {
        for (; i + kWidth <= n; i += kWidth) {
            Vec vp = loadv(P{}, p + i), vg = loadv(G{}, g + i), v1 = loadv(S{}, s1 + i);
            Vec v2 = Op::kStates > 1 ? loadv(S{}, s2 + i) : vg;
            Op::apply(vp, vg, v1, v2, c);
            storev(P{}, p + i, vp);
            storev(S{}, s1 + i, v1);
            if (Op::kStates > 1) storev(S{}, s2 + i, v2);
            if (!kCopyOut) continue;
            if (decltype(streaming)::value) streamv(O{}, out + i, vp);
            else storev(O{}, out + i, vp);
        }
    };
    if (kCopyOut && stream_out && reinterpret_cast<uintptr_t>(out) % sizeof(Half) == 0) {
        vector_loop(std::true_type{});
        stream_fence();  // order the streamed stores before anything this thread does next
    } else {
        vector_loop(std::false_type{});
    }
#else
#pragma omp simd
#endif
    for (int64_t j = i; j < n; ++j) {
        float fp = load1(P{}, p + j), fg = load1(G{}, g + j), f1 = load1(S{}, s1 + j);
        float f2 = Op::kStates > 1 ? load1(S{}, s2 + j) : 0.0f;
        Op::apply(fp, fg, f1, f2, c);
        store1(P{}, p + j, fp);
        store1(S{}, s1 + j, f1);
        if (Op::kStates > 1) store1(S{}, s2 + j, f2);
        if (kCopyOut) store1(O{}, out + j, fp);
    }
}

template <class Op, class P, class G, class S>
void dispatch_out(const TensorSlot& t, int64_t b, int64_t n, const typename Op::Coef& c, bool stream) {
    using namespace simd;
    switch (t.out_dtype) {
        case kNone: return run_tile<Op, P, G, S, NoOut>(t, b, n, c, stream);
        case kBFloat16: return run_tile<Op, P, G, S, BF16>(t, b, n, c, stream);
        case kFloat16: return run_tile<Op, P, G, S, F16>(t, b, n, c, stream);
        default: throw std::invalid_argument("unsupported output dtype code " + std::to_string(t.out_dtype));
    }
}

// Grads and states are either fp32 or the parameter's own dtype; that keeps the number of
// instantiations (and the compile time) small while covering fp32, mixed and pure half runs.
template <class Op, class P>
void dispatch_grad_state(const TensorSlot& t, int64_t b, int64_t n, const typename Op::Coef& c, bool stream) {
    using namespace simd;
    const bool grad32 = t.grad_dtype == kFloat32, state32 = t.state_dtype == kFloat32;
    if (grad32 && state32) return dispatch_out<Op, P, F32, F32>(t, b, n, c, stream);
    if (grad32) return dispatch_out<Op, P, F32, P>(t, b, n, c, stream);
    if (state32) return dispatch_out<Op, P, P, F32>(t, b, n, c, stream);
    return dispatch_out<Op, P, P, P>(t, b, n, c, stream);
}

template <class Op>
void dispatch_tile(const TensorSlot& t, int64_t b, int64_t n, const typename Op::Coef& c, bool stream) {
    using namespace simd;
    switch (t.param_dtype) {
        case kFloat32: return dispatch_out<Op, F32, F32, F32>(t, b, n, c, stream);
        case kBFloat16: return dispatch_grad_state<Op, BF16>(t, b, n, c, stream);
        case kFloat16: return dispatch_grad_state<Op, F16>(t, b, n, c, stream);
        default: throw std::invalid_argument("unsupported parameter dtype code " + std::to_string(t.param_dtype));
    }
}

inline void check_slot(const TensorSlot& t) {
    auto ok = [](int64_t d, int64_t param) { return d == kFloat32 || d == param; };
    if (t.param_dtype != kFloat32 && t.param_dtype != kBFloat16 && t.param_dtype != kFloat16)
        throw std::invalid_argument("parameter dtype must be float32, bfloat16 or float16");
    if (!ok(t.grad_dtype, t.param_dtype) || !ok(t.state_dtype, t.param_dtype))
        throw std::invalid_argument("grad and state dtypes must be float32 or the parameter's dtype");
    if (t.out_dtype != kNone && t.out_dtype != kBFloat16 && t.out_dtype != kFloat16)
        throw std::invalid_argument("the copy-out buffer must be bfloat16 or float16");
}

// Runs `Op` over all slots. Slots are validated before any element is touched so a bad call
// leaves every tensor unchanged.
template <class Op>
void run_optimizer(const std::vector<TensorSlot>& slots, const typename Op::Coef& c, int num_threads) {
    struct Tile { int64_t slot, begin, len; };
    std::vector<Tile> tiles;
    int64_t total = 0;
    for (size_t s = 0; s < slots.size(); ++s) {
        check_slot(slots[s]);
        for (int64_t b = 0; b < slots[s].numel; b += kTileElems)
            tiles.push_back({static_cast<int64_t>(s), b, std::min(kTileElems, slots[s].numel - b)});
        total += slots[s].numel;
    }
    const int64_t num_tiles = static_cast<int64_t>(tiles.size());
    const int threads = std::max(1, num_threads);
    const bool stream_out = total >= kStreamOutThreshold;
    // schedule(static) gives each thread one contiguous run of tiles: sequential streams that
    // the hardware prefetchers follow.
#pragma omp parallel for schedule(static) num_threads(threads) if (total >= kParallelThreshold && threads > 1)
    for (int64_t k = 0; k < num_tiles; ++k) {
        const Tile& tile = tiles[k];
        dispatch_tile<Op>(slots[tile.slot], tile.begin, tile.len, c, stream_out);
    }
}

// Unpacks the flat int64 list Python passes (kSlotFields entries per tensor).
inline std::vector<TensorSlot> unpack_slots(const std::vector<int64_t>& flat) {
    if (flat.size() % kSlotFields != 0)
        throw std::invalid_argument("slot list length must be a multiple of " + std::to_string(kSlotFields));
    std::vector<TensorSlot> slots(flat.size() / kSlotFields);
    for (size_t i = 0; i < slots.size(); ++i) {
        const int64_t* f = flat.data() + i * kSlotFields;
        slots[i] = TensorSlot{reinterpret_cast<void*>(f[0]), reinterpret_cast<const void*>(f[1]),
                              reinterpret_cast<void*>(f[2]), reinterpret_cast<void*>(f[3]),
                              reinterpret_cast<void*>(f[4]), f[5], f[6], f[7], f[8], f[9]};
    }
    return slots;
}

}  // namespace deepscale
