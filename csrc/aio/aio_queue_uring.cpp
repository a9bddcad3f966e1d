// IoQueue over io_uring (liburing): one ring per worker, reads and writes prepared as SQEs.
#include <liburing.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "aio_queue.h"

namespace deepscale {
namespace aio {

namespace {

bool transient(int err) { return err == EINTR || err == EAGAIN || err == EBUSY; }

class UringQueue final : public IoQueue {
public:
    explicit UringQueue(int depth) : cqes_(static_cast<size_t>(depth)) {
        // The SQ ring holds a whole batch (at most `depth`); the CQ ring is twice that, so
        // completions never overflow while at most `depth` transfers are in flight.
        int rc = io_uring_queue_init(static_cast<unsigned>(depth), &ring_, 0);
        if (rc < 0) throw std::runtime_error(std::string("io_uring_queue_init failed: ") + std::strerror(-rc));
    }
    ~UringQueue() override { io_uring_queue_exit(&ring_); }

    int submit(const IoOp* ops, int count) override {
        if (broken_) return -broken_;
        int prepared = 0;
        for (; prepared < count; ++prepared) {
            struct io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
            if (sqe == nullptr) break;  // ring full: the caller retries the rest later
            const IoOp& op = ops[prepared];
            const auto length = static_cast<unsigned>(op.length);
            const auto offset = static_cast<__u64>(op.offset);
            if (op.is_read)
                io_uring_prep_read(sqe, op.fd, op.buffer, length, offset);
            else
                io_uring_prep_write(sqe, op.fd, op.buffer, length, offset);
            io_uring_sqe_set_data(sqe, op.tag);
        }
        if (prepared == 0) return 0;  // not expected: the ring has room for `depth` transfers
        int rc = io_uring_submit(&ring_);
        // SQEs the kernel did not consume stay in the ring and go in with the next enter
        // (reap), so all prepared transfers count as taken unless the ring itself failed.
        // A failed ring cannot take its SQEs back: it refuses all further work.
        if (rc < 0 && !transient(-rc)) {
            broken_ = -rc;
            return rc;
        }
        return prepared;
    }

    int reap(IoCompletion* out, int max) override {
        for (;;) {
            int rc;
            if (!broken_ && io_uring_sq_ready(&ring_) > 0) {
                rc = io_uring_submit_and_wait(&ring_, 1);  // SQEs left over by submit go in now
                if (rc < 0 && !transient(-rc)) {
                    broken_ = -rc;  // the left-over SQEs will never complete: give up on them
                    return rc;
                }
            } else {
                struct io_uring_cqe* cqe = nullptr;
                rc = io_uring_wait_cqe(&ring_, &cqe);
                if (rc < 0 && !transient(-rc)) return rc;
            }
            unsigned got = io_uring_peek_batch_cqe(&ring_, cqes_.data(), static_cast<unsigned>(max));
            for (unsigned i = 0; i < got; ++i) {
                out[i].tag = io_uring_cqe_get_data(cqes_[i]);
                out[i].result = cqes_[i]->res;
            }
            io_uring_cq_advance(&ring_, got);
            if (got > 0) return static_cast<int>(got);
            if (rc == -EINTR) return rc;
        }
    }

private:
    struct io_uring ring_;
    std::vector<struct io_uring_cqe*> cqes_;
    int broken_ = 0;  // errno of a failed submission; the ring takes no more work
};

}  // namespace

std::unique_ptr<IoQueue> make_io_queue(int depth) { return std::unique_ptr<IoQueue>(new UringQueue(depth)); }

const char* io_backend_name() { return "io_uring"; }

}  // namespace aio
}  // namespace deepscale
