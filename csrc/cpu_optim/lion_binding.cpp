// Python binding of the fused CPU Lion pass.
#include "binding_common.h"

namespace py = pybind11;

namespace deepscale {

static void lion_step(const std::vector<int64_t>& flat_slots, int64_t step, double lr, double beta1, double beta2,
                      double weight_decay, int num_threads) {
    check_common(step, num_threads);
    LionOp::Coef c{static_cast<float>(lr),    static_cast<float>(beta1),       static_cast<float>(1.0 - beta1),
                   static_cast<float>(beta2), static_cast<float>(1.0 - beta2), static_cast<float>(1.0 - lr * weight_decay)};
    lion_run(unpack_slots(flat_slots), c, num_threads);
}

}  // namespace deepscale

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "deepscale fused CPU Lion";
    m.def("lion_step", &deepscale::lion_step, py::call_guard<py::gil_scoped_release>(), py::arg("slots"),
          py::arg("step"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("weight_decay"),
          py::arg("num_threads"), "One Lion step over every tensor in `slots` (10 int64 fields per tensor).");
    deepscale::add_info_functions(m);
}
