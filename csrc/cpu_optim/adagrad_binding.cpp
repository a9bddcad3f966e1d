// C entry point of the fused CPU Adagrad pass (loaded with ctypes).
#include "binding_common.h"

extern "C" int ds_adagrad_step(const int64_t* slots, int64_t num_values, int64_t step, double lr, double eps,
                               double weight_decay, int num_threads) {
    using namespace deepscale;
    return guarded([&] {
        check_common(step, num_threads, num_values);
        AdagradOp::Coef c{static_cast<float>(lr), static_cast<float>(eps), static_cast<float>(weight_decay)};
        adagrad_run(slots_from(slots, num_values), c, num_threads);
    });
}
