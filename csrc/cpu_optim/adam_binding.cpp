// Python binding of the fused CPU Adam/AdamW pass.
#include <cmath>

#include "binding_common.h"

namespace py = pybind11;

namespace deepscale {

static void adam_step(const std::vector<int64_t>& flat_slots, int64_t step, double lr, double beta1, double beta2,
                      double eps, double weight_decay, bool bias_correction, bool adamw_mode, int num_threads) {
    check_common(step, num_threads);
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
    adam_run(unpack_slots(flat_slots), c, num_threads);
}

}  // namespace deepscale

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "deepscale fused CPU Adam/AdamW";
    m.def("adam_step", &deepscale::adam_step, py::call_guard<py::gil_scoped_release>(), py::arg("slots"),
          py::arg("step"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
          py::arg("bias_correction"), py::arg("adamw_mode"), py::arg("num_threads"),
          "One Adam step over every tensor in `slots` (10 int64 fields per tensor).");
    deepscale::add_info_functions(m);
}
