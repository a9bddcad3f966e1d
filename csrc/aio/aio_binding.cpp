// Python binding of the async I/O engine. Buffers cross as raw host addresses; the Python
// side (deepscale.ops.aio) checks tensors and turns error codes into OSError with the path.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "aio_engine.h"

namespace py = pybind11;
using deepscale::aio::Engine;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "deepscale async I/O engine (libaio, O_DIRECT, worker threads)";
    m.attr("backend") = "libaio";
    py::class_<Engine>(m, "Engine")
        .def(py::init<int64_t, int, bool, bool, int, bool>(), py::arg("block_size"), py::arg("queue_depth"),
             py::arg("single_submit"), py::arg("overlap_events"), py::arg("num_threads"), py::arg("use_direct"))
        .def("submit", &Engine::submit, py::call_guard<py::gil_scoped_release>(), py::arg("is_read"),
             py::arg("buffer"), py::arg("nbytes"), py::arg("path"), py::arg("file_offset"),
             "Queue a read or write; returns a request id, or -errno when the file cannot be opened.")
        .def("wait", &Engine::wait, py::call_guard<py::gil_scoped_release>(), py::arg("request_id"),
             "Block until the request completes; returns its errno (0 on success).")
        .def_property_readonly("block_size", &Engine::block_size)
        .def_property_readonly("queue_depth", &Engine::queue_depth)
        .def_property_readonly("single_submit", &Engine::single_submit)
        .def_property_readonly("overlap_events", &Engine::overlap_events)
        .def_property_readonly("num_threads", &Engine::num_threads);
}
