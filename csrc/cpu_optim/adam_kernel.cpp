// Instantiates the fused CPU adam pass; kept apart from the Python binding so the two
// translation units compile in parallel and this one needs no Python or torch headers.
#include "optimizers.h"

namespace deepscale {

void adam_run(const std::vector<TensorSlot>& slots, const AdamOp::Coef& c, int num_threads) {
    run_optimizer<AdamOp>(slots, c, num_threads);
}

}  // namespace deepscale
