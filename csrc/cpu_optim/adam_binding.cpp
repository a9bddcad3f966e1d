// C entry point of the fused CPU Adam/AdamW pass (loaded with ctypes).
#include <cmath>

#include "binding_common.h"

extern "C" int ds_adam_step(const int64_t* slots, int64_t num_values, int64_t step, double lr, double beta1,
                            double beta2, double eps, double weight_decay, int bias_correction, int adamw_mode,
                            int num_threads) {
    using namespace deepscale;
    return guarded([&] {
        check_common(step, num_threads, num_values);
        const double bias1 = bias_correction ? 1.0 - std::pow(beta1, static_cast<double>(step)) : 1.0;
        const double bias2 = bias_correction ? 1.0 - std::pow(beta2, static_cast<double>(step)) : 1.0;
        AdamOp::Coef c{};
        c.beta1 = static_cast<float>(beta1);
        c.one_minus_beta1 = static_cast<float>(1.0 - beta1);
        c.beta2 = static_cast<float>(beta2);
        c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
        c.eps = static_cast<float>(eps);
        c.step_size = static_cast<float>(lr / bias1);
        c.inv_sqrt_bias2 = static_cast<float>(1.0 / std::sqrt(bias2));
        c.decay = adamw_mode ? static_cast<float>(1.0 - lr * weight_decay) : 1.0f;
        c.l2 = adamw_mode ? 0.0f : static_cast<float>(weight_decay);
        adam_run(slots_from(slots, num_values), c, num_threads);
    });
}
