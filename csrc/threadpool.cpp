#include "threadpool.h"

#include <chrono>
#include <cstdlib>
#include <memory>

namespace moemesh {

namespace {
// How long an idle worker spins before sleeping: longer than the gaps between the native calls
// of a decoded token (5 ms measured best), short next to a person's typing.
constexpr auto kSpin = std::chrono::microseconds(5000);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}
}  // namespace

ThreadPool::ThreadPool(int n_threads) {
    for (int i = 1; i < n_threads; ++i) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
    {
        std::lock_guard<std::mutex> lock(mu_);
        stop_ = true;
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
}

void ThreadPool::run_tasks() {
    for (int64_t t = next_.fetch_add(1); t < n_tasks_; t = next_.fetch_add(1)) (*fn_)(t);
}

// Returns false when the pool is stopping.
bool ThreadPool::wait_for_work(uint64_t seen, uint64_t parks) {
    const auto until = std::chrono::steady_clock::now() + kSpin;
    for (int i = 0;; ++i) {
        if (generation_.load(std::memory_order_acquire) != seen) return true;
        if (stop_.load()) return false;
        if (parks_.load(std::memory_order_acquire) != parks) break;
        if ((i & 63) == 63) {
            if (std::chrono::steady_clock::now() > until) break;
            // A spinner that shares its core (more runnable threads than cores) must not hold it
            // for a whole time slice while the thread it waits for is queued behind it.
            std::this_thread::yield();
        }
        cpu_relax();
    }
    std::unique_lock<std::mutex> lock(mu_);
    wake_.wait(lock, [&] { return stop_.load() || generation_.load(std::memory_order_acquire) != seen; });
    return !stop_.load();
}

void ThreadPool::worker_loop() {
    uint64_t seen = 0, parks = parks_.load(std::memory_order_acquire);
    while (wait_for_work(seen, parks)) {
        seen = generation_.load(std::memory_order_acquire);
        run_tasks();
        // Read before reporting done: a park() after the caller returns is then always seen.
        parks = parks_.load(std::memory_order_acquire);
        finished_.fetch_add(1, std::memory_order_acq_rel);
    }
}

void ThreadPool::parallel_for(int64_t n_tasks, const std::function<void(int64_t)>& fn) {
    if (n_tasks <= 0) return;
    std::lock_guard<std::mutex> run_lock(run_mu_);
    if (workers_.empty() || n_tasks == 1) {
        for (int64_t t = 0; t < n_tasks; ++t) fn(t);
        return;
    }
    fn_ = &fn;
    n_tasks_ = n_tasks;
    next_.store(0);
    finished_.store(0);
    generation_.fetch_add(1, std::memory_order_acq_rel);
    { std::lock_guard<std::mutex> lock(mu_); }  // a worker between its check and its wait sees the bump
    wake_.notify_all();
    run_tasks();
    // Every worker takes part in every generation, so none can wake late into the next one.
    for (int i = 0; finished_.load(std::memory_order_acquire) != workers_.size(); ++i) {
        if (i < 4096) cpu_relax();
        else std::this_thread::yield();
    }
    fn_ = nullptr;
}

namespace {
std::mutex g_pool_mu;
std::unique_ptr<ThreadPool> g_pool;

int default_threads() {
    if (const char* env = std::getenv("MOEMESH_THREADS")) {
        int n = std::atoi(env);
        if (n > 0) return n;
    }
    unsigned hw = std::thread::hardware_concurrency();
    return hw ? int(hw) : 1;
}
}  // namespace

ThreadPool& global_pool() {
    std::lock_guard<std::mutex> lock(g_pool_mu);
    if (!g_pool) g_pool = std::make_unique<ThreadPool>(default_threads());
    return *g_pool;
}

void set_global_threads(int n_threads) {
    std::lock_guard<std::mutex> lock(g_pool_mu);
    g_pool = std::make_unique<ThreadPool>(n_threads > 0 ? n_threads : default_threads());
}

}  // namespace moemesh
