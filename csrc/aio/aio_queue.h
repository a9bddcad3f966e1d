// The per-worker kernel queue of the async I/O engine: the one part that differs between
// the libaio and io_uring builds. Each op library links exactly one implementation
// (aio_queue_libaio.cpp or aio_queue_uring.cpp); aio_engine.cpp keeps the request, block and
// bounce-buffer logic and talks to the kernel only through this interface.
#pragma once

#include <cstdint>
#include <memory>

namespace deepscale {
namespace aio {

// One transfer of `length` bytes between `buffer` and `fd` at `offset`; `tag` comes back
// with its completion.
struct IoOp {
    bool is_read = false;
    int fd = -1;
    char* buffer = nullptr;
    int64_t length = 0;
    int64_t offset = 0;
    void* tag = nullptr;
};

struct IoCompletion {
    void* tag = nullptr;
    int64_t result = 0;  // bytes moved, or -errno
};

class IoQueue {
public:
    virtual ~IoQueue() = default;
    // Hands `count` transfers to the kernel. Returns how many it took (the caller retries the
    // rest after reaping completions), or -errno when it took none.
    virtual int submit(const IoOp* ops, int count) = 0;
    // Waits for at least one completion and reports up to `max`; returns how many, or -errno
    // (-EINTR: call again).
    virtual int reap(IoCompletion* out, int max) = 0;
};

// A queue for up to `depth` transfers in flight; throws std::runtime_error naming the failed
// call when the kernel refuses one.
std::unique_ptr<IoQueue> make_io_queue(int depth);

// "libaio" or "io_uring": which implementation this library was built with.
const char* io_backend_name();

}  // namespace aio
}  // namespace deepscale
