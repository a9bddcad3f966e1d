// C entry points shared by the CPU optimizer libraries.
//
// The ops are plain shared libraries loaded with ctypes: no Python or torch headers, so a
// cold build compiles one small kernel file (a few seconds instead of ~40 s for a
// torch/extension.h binding). Tensors cross as raw addresses plus dtype codes (TensorSlot);
// the Python side has already checked devices, shapes and contiguity. ctypes releases the GIL
// for the duration of each call. Errors come back as -1 with the message in ds_last_error().
#pragma once

#include <exception>
#include <string>

#include "optimizers.h"

namespace deepscale {

inline std::string& last_error() {
    static thread_local std::string message;
    return message;
}

template <class F>
int guarded(F&& body) {
    try {
        body();
        return 0;
    } catch (const std::exception& e) {
        last_error() = e.what();
        return -1;
    }
}

inline void check_common(int64_t step, int num_threads, int64_t num_values) {
    if (step < 1) throw std::invalid_argument("step must be >= 1, got " + std::to_string(step));
    if (num_threads < 1) throw std::invalid_argument("num_threads must be >= 1, got " + std::to_string(num_threads));
    if (num_values < 0 || num_values % kSlotFields != 0)
        throw std::invalid_argument("slot list length must be a multiple of " + std::to_string(kSlotFields));
}

inline std::vector<TensorSlot> slots_from(const int64_t* values, int64_t num_values) {
    return unpack_slots(std::vector<int64_t>(values, values + num_values));
}

}  // namespace deepscale

extern "C" {
const char* ds_last_error() { return deepscale::last_error().c_str(); }
const char* ds_simd_level() { return deepscale::simd::level_name(); }
int ds_simd_width() { return deepscale::simd::kWidth; }
}
