// A persistent pool that runs `fn(task)` for task in [0, n) on all cores, the caller included.
// Tasks write disjoint outputs, so results never depend on which thread ran what.
// Idle workers spin a while before sleeping: a decode step issues dozens of parallel_for calls with
// Python work between them, and waking a sleeping thread costs tens of microseconds each time on
// a VM (measured: 2-thread expert decode 18.5 -> 21 GB/s; gpt-oss-20b decode 7.3 -> 7.7 tok/s when
// the spin outlasts the gaps of a whole token). A caller about to wait on something else (the
// network) parks them instead, so they do not take cores from processes it is waiting for.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace moemesh {

class ThreadPool {
public:
    explicit ThreadPool(int n_threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    int size() const { return int(workers_.size()) + 1; }
    void parallel_for(int64_t n_tasks, const std::function<void(int64_t)>& fn);
    // Idle workers stop spinning and sleep until the next parallel_for.
    void park() { parks_.fetch_add(1, std::memory_order_release); }

private:
    void worker_loop();
    void run_tasks();

    bool wait_for_work(uint64_t seen, uint64_t parks);

    std::vector<std::thread> workers_;
    std::mutex run_mu_;  // one parallel_for at a time (callers on several Python threads)
    std::mutex mu_;      // guards sleeping on wake_
    std::condition_variable wake_;
    const std::function<void(int64_t)>* fn_ = nullptr;
    int64_t n_tasks_ = 0;
    std::atomic<int64_t> next_{0};
    std::atomic<size_t> finished_{0};
    std::atomic<uint64_t> generation_{0};
    std::atomic<uint64_t> parks_{0};
    std::atomic<bool> stop_{false};
};

// The process-wide pool, sized by MOEMESH_THREADS or the core count; resizable for tests.
ThreadPool& global_pool();
void set_global_threads(int n_threads);

}  // namespace moemesh
