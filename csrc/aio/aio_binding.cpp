// C entry points of the async I/O engine (loaded with ctypes; no Python headers). Buffers
// cross as raw host addresses; deepscale.ops.aio checks tensors and turns error codes into
// OSError with the path. ctypes releases the GIL during each call, so waits do not block
// other Python threads.
#include <exception>
#include <string>

#include "aio_engine.h"

using deepscale::aio::Engine;

namespace {
std::string& last_error() {
    static thread_local std::string message;
    return message;
}
}  // namespace

extern "C" {

const char* ds_last_error() { return last_error().c_str(); }

// "libaio" or "io_uring": the kernel interface this build of the engine uses.
const char* ds_aio_backend() { return deepscale::aio::io_backend_name(); }

void* ds_aio_create(int64_t block_size, int queue_depth, int single_submit, int overlap_events, int num_threads,
                    int use_direct) {
    try {
        return new Engine(block_size, queue_depth, single_submit != 0, overlap_events != 0, num_threads, use_direct != 0);
    } catch (const std::exception& e) {
        last_error() = e.what();
        return nullptr;
    }
}

void ds_aio_destroy(void* engine) { delete static_cast<Engine*>(engine); }

// A request id (> 0), or -errno when the file cannot be opened.
int64_t ds_aio_submit(void* engine, int is_read, int64_t buffer, int64_t nbytes, const char* path, int64_t file_offset) {
    return static_cast<Engine*>(engine)->submit(is_read != 0, buffer, nbytes, path, file_offset);
}

// The request's errno (0 on success), or -1 for an unknown id (message in ds_last_error).
int ds_aio_wait(void* engine, int64_t request_id) {
    try {
        return static_cast<Engine*>(engine)->wait(request_id);
    } catch (const std::exception& e) {
        last_error() = e.what();
        return -1;
    }
}

}  // extern "C"
