// Asynchronous file I/O with a pool of worker threads, over libaio or io_uring (aio_queue.h).
//
// A request (read or write of one host buffer at one file offset) is cut into blocks of
// `block_size` bytes; the blocks are split into contiguous runs, one per worker, and each
// worker keeps up to `queue_depth` of them in flight on its own kernel queue (an AIO
// context or an io_uring ring, whichever implementation of IoQueue the library links).
// Files are opened with O_DIRECT. O_DIRECT needs 4 KiB-aligned addresses, lengths and
// offsets: aligned full blocks go straight between the caller's buffer and the disk, while an
// unaligned buffer and a partial last block pass through per-worker aligned bounce buffers
// (the copy runs on the worker while other blocks are in flight, so it costs little).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "aio_queue.h"

namespace deepscale {
namespace aio {

constexpr int64_t kAlign = 4096;

struct Request {
    int fd = -1;
    bool is_read = false;
    bool direct = false;        // fd opened with O_DIRECT
    char* buffer = nullptr;
    int64_t nbytes = 0;
    int64_t file_offset = 0;
    int64_t original_size = 0;  // file size before a write, to decide truncation
    std::string path;
    std::atomic<int> pending_jobs{0};
    std::atomic<int> error{0};
    std::atomic<bool> padded_tail{false};
    std::mutex mutex;
    std::condition_variable done_cv;
    bool done = false;
};

struct Job {
    std::shared_ptr<Request> request;
    int64_t first_block = 0;
    int64_t num_blocks = 0;
};

class Worker {
public:
    Worker(int64_t block_size, int queue_depth, bool single_submit);
    ~Worker();
    void enqueue(Job job);

private:
    struct Slot {
        int64_t offset = 0;   // byte offset of the block inside the request
        int64_t length = 0;   // bytes of the caller's buffer this block covers
        bool bounced = false;
        char* bounce = nullptr;
    };
    void loop();
    void run_job(const Job& job);
    IoOp prepare_block(const Job& job, int64_t block, Slot* slot);
    void complete(const Job& job, Slot* slot, long result);

    int64_t block_size_;
    int queue_depth_;
    bool single_submit_;
    std::unique_ptr<IoQueue> io_;
    std::vector<char*> bounce_;   // queue_depth_ blocks inside one mapping
    char* bounce_base_ = nullptr;
    size_t bounce_len_ = 0;
    std::deque<Job> queue_;
    std::mutex mutex_;
    std::condition_variable cv_;
    bool stop_ = false;
    std::thread thread_;
};

class Engine {
public:
    Engine(int64_t block_size, int queue_depth, bool single_submit, bool overlap_events, int num_threads,
           bool use_direct);
    ~Engine();
    // Opens the file and queues the request; returns its id, or -errno if the file cannot be opened.
    int64_t submit(bool is_read, int64_t buffer, int64_t nbytes, const std::string& path, int64_t file_offset);
    // Blocks until request `id` completes; returns its errno (0 on success).
    int wait(int64_t id);
    int64_t block_size() const { return block_size_; }
    int queue_depth() const { return queue_depth_; }
    bool single_submit() const { return single_submit_; }
    bool overlap_events() const { return overlap_events_; }
    int num_threads() const { return static_cast<int>(workers_.size()); }

private:
    int64_t block_size_;
    int queue_depth_;
    bool single_submit_, overlap_events_, use_direct_;
    std::vector<std::unique_ptr<Worker>> workers_;
    std::map<int64_t, std::shared_ptr<Request>> requests_;
    std::mutex mutex_;
    int64_t next_id_ = 1;
    size_t next_worker_ = 0;
};

}  // namespace aio
}  // namespace deepscale
