#include "threadpool.h"

#include <cstdlib>
#include <memory>

namespace moemesh {

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

void ThreadPool::worker_loop() {
    uint64_t seen = 0;
    for (;;) {
        {
            std::unique_lock<std::mutex> lock(mu_);
            wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
            if (stop_) return;
            seen = generation_;
        }
        run_tasks();
        {
            std::lock_guard<std::mutex> lock(mu_);
            ++finished_;
        }
        done_.notify_all();
    }
}

void ThreadPool::parallel_for(int64_t n_tasks, const std::function<void(int64_t)>& fn) {
    if (n_tasks <= 0) return;
    std::lock_guard<std::mutex> run_lock(run_mu_);
    if (workers_.empty() || n_tasks == 1) {
        for (int64_t t = 0; t < n_tasks; ++t) fn(t);
        return;
    }
    {
        std::lock_guard<std::mutex> lock(mu_);
        fn_ = &fn;
        n_tasks_ = n_tasks;
        next_.store(0);
        finished_ = 0;
        ++generation_;
    }
    wake_.notify_all();
    run_tasks();
    std::unique_lock<std::mutex> lock(mu_);
    // Every worker takes part in every generation, so none can wake late into the next one.
    done_.wait(lock, [&] { return finished_ == workers_.size(); });
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
