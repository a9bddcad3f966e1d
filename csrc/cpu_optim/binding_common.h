// Helpers shared by the Python bindings of the CPU optimizers.
//
// Tensors cross the boundary as raw addresses plus dtype codes (see TensorSlot): the Python
// side has already checked devices, shapes and contiguity, and avoiding torch headers here
// cuts the cold build of each op from ~40 s to a few seconds.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "optimizers.h"

namespace deepscale {

inline void check_common(int64_t step, int num_threads) {
    if (step < 1) throw std::invalid_argument("step must be >= 1, got " + std::to_string(step));
    if (num_threads < 1) throw std::invalid_argument("num_threads must be >= 1, got " + std::to_string(num_threads));
}

inline void add_info_functions(pybind11::module_& m) {
    m.def("simd_level", []() { return std::string(simd::level_name()); }, "SIMD level this module was built for.");
    m.def("simd_width", []() { return simd::kWidth; }, "fp32 lanes per SIMD register in this build.");
}

}  // namespace deepscale
