// C entry point of the fused CPU Lion pass (loaded with ctypes).
#include "binding_common.h"

extern "C" int ds_lion_step(const int64_t* slots, int64_t num_values, int64_t step, double lr, double beta1,
                            double beta2, double weight_decay, int num_threads) {
    using namespace deepscale;
    return guarded([&] {
        check_common(step, num_threads, num_values);
        LionOp::Coef c{static_cast<float>(lr),    static_cast<float>(beta1),       static_cast<float>(1.0 - beta1),
                       static_cast<float>(beta2), static_cast<float>(1.0 - beta2), static_cast<float>(1.0 - lr * weight_decay)};
        lion_run(slots_from(slots, num_values), c, num_threads);
    });
}
