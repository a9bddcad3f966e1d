// Python binding of the fused CPU Adagrad pass.
#include "binding_common.h"

namespace py = pybind11;

namespace deepscale {

static void adagrad_step(const std::vector<int64_t>& flat_slots, int64_t step, double lr, double eps,
                         double weight_decay, int num_threads) {
    check_common(step, num_threads);
    AdagradOp::Coef c{static_cast<float>(lr), static_cast<float>(eps), static_cast<float>(weight_decay)};
    adagrad_run(unpack_slots(flat_slots), c, num_threads);
}

}  // namespace deepscale

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "deepscale fused CPU Adagrad";
    m.def("adagrad_step", &deepscale::adagrad_step, py::call_guard<py::gil_scoped_release>(), py::arg("slots"),
          py::arg("step"), py::arg("lr"), py::arg("eps"), py::arg("weight_decay"), py::arg("num_threads"),
          "One Adagrad step over every tensor in `slots` (10 int64 fields per tensor).");
    deepscale::add_info_functions(m);
}
