// Update rules of the CPU optimizers, each written once for SIMD registers and floats.
//
//  Adam / AdamW: Kingma & Ba, "Adam: A Method for Stochastic Optimization" (2015), with the
//    decoupled weight decay of Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (2019).
//  Adagrad: Duchi, Hazan & Singer, "Adaptive Subgradient Methods" (2011).
//  Lion: Chen et al., "Symbolic Discovery of Optimization Algorithms" (2023).
// The step-dependent scalars (bias corrections, decay factors) are folded into Coef on the
// host so the per-element work is a handful of multiply-adds, one sqrt and one divide.
#pragma once

#include <cstdint>
#include <vector>

#include "optim_driver.h"

namespace deepscale {

struct AdamOp {
    static constexpr int kStates = 2;
    struct Coef {
        float beta1, one_minus_beta1, beta2, one_minus_beta2;
        float eps, step_size, inv_sqrt_bias2, decay, l2;
    };
    template <class V>
    static inline void apply(V& p, V g, V& m, V& v, const Coef& c) {
        using simd::splat;
        if (c.l2 != 0.0f) g = g + splat(g, c.l2) * p;  // classic Adam: L2 folded into the gradient
        m = splat(g, c.beta1) * m + splat(g, c.one_minus_beta1) * g;
        v = splat(g, c.beta2) * v + splat(g, c.one_minus_beta2) * (g * g);
        V denom = simd::vsqrt(v) * splat(g, c.inv_sqrt_bias2) + splat(g, c.eps);
        p = p * splat(g, c.decay) - splat(g, c.step_size) * (m / denom);
    }
};

struct AdagradOp {
    static constexpr int kStates = 1;
    struct Coef { float lr, eps, weight_decay; };
    template <class V>
    static inline void apply(V& p, V g, V& sum, V& /*unused*/, const Coef& c) {
        using simd::splat;
        if (c.weight_decay != 0.0f) g = g + splat(g, c.weight_decay) * p;
        sum = sum + g * g;
        p = p - splat(g, c.lr) * (g / (simd::vsqrt(sum) + splat(g, c.eps)));
    }
};

struct LionOp {
    static constexpr int kStates = 1;
    struct Coef { float lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay; };
    template <class V>
    static inline void apply(V& p, V g, V& m, V& /*unused*/, const Coef& c) {
        using simd::splat;
        V direction = splat(g, c.beta1) * m + splat(g, c.one_minus_beta1) * g;
        p = p * splat(g, c.decay) - splat(g, c.lr) * simd::vsign(direction);
        m = splat(g, c.beta2) * m + splat(g, c.one_minus_beta2) * g;
    }
};

// Entry points, one per kernel translation unit.
void adam_run(const std::vector<TensorSlot>& slots, const AdamOp::Coef& c, int num_threads);
void adagrad_run(const std::vector<TensorSlot>& slots, const AdagradOp::Coef& c, int num_threads);
void lion_run(const std::vector<TensorSlot>& slots, const LionOp::Coef& c, int num_threads);

}  // namespace deepscale
