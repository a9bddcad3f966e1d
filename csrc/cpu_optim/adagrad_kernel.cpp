// Instantiates the fused CPU adagrad pass; kept apart from the Python binding so the two
// translation units compile in parallel and this one needs no Python or torch headers.
#include "optimizers.h"

namespace deepscale {

void adagrad_run(const std::vector<TensorSlot>& slots, const AdagradOp::Coef& c, int num_threads) {
    run_optimizer<AdagradOp>(slots, c, num_threads);
}

}  // namespace deepscale
