// Instantiates the fused CPU lion pass; kept apart from the Python binding so the two
// translation units compile in parallel and this one needs no Python or torch headers.
#include "optimizers.h"

namespace deepscale {

void lion_run(const std::vector<TensorSlot>& slots, const LionOp::Coef& c, int num_threads) {
    run_optimizer<LionOp>(slots, c, num_threads);
}

}  // namespace deepscale
