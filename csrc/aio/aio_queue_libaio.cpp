// IoQueue over Linux kernel AIO (libaio): io_submit / io_getevents on one io_context.
#include <libaio.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "aio_queue.h"

namespace deepscale {
namespace aio {

namespace {

class LibaioQueue final : public IoQueue {
public:
    explicit LibaioQueue(int depth) : cbs_(static_cast<size_t>(depth)), ptrs_(static_cast<size_t>(depth)),
                                      events_(static_cast<size_t>(depth)) {
        int rc = io_setup(depth, &ctx_);
        if (rc < 0) throw std::runtime_error(std::string("io_setup failed: ") + std::strerror(-rc));
    }
    ~LibaioQueue() override { io_destroy(ctx_); }

    int submit(const IoOp* ops, int count) override {
        // The kernel copies each iocb during io_submit, so the array is reused per call.
        for (int i = 0; i < count; ++i) {
            const IoOp& op = ops[i];
            struct iocb* cb = &cbs_[static_cast<size_t>(i)];
            if (op.is_read)
                io_prep_pread(cb, op.fd, op.buffer, static_cast<size_t>(op.length), op.offset);
            else
                io_prep_pwrite(cb, op.fd, op.buffer, static_cast<size_t>(op.length), op.offset);
            cb->data = op.tag;
            ptrs_[static_cast<size_t>(i)] = cb;
        }
        return io_submit(ctx_, count, ptrs_.data());
    }

    int reap(IoCompletion* out, int max) override {
        int got = io_getevents(ctx_, 1, max, events_.data(), nullptr);
        for (int i = 0; i < got; ++i) {
            out[i].tag = events_[static_cast<size_t>(i)].data;
            out[i].result = static_cast<long>(events_[static_cast<size_t>(i)].res);
        }
        return got;
    }

private:
    io_context_t ctx_ = 0;
    std::vector<struct iocb> cbs_;
    std::vector<struct iocb*> ptrs_;
    std::vector<struct io_event> events_;
};

}  // namespace

std::unique_ptr<IoQueue> make_io_queue(int depth) { return std::unique_ptr<IoQueue>(new LibaioQueue(depth)); }

const char* io_backend_name() { return "libaio"; }

}  // namespace aio
}  // namespace deepscale
