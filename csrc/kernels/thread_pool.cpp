#include "thread_pool.hpp"

#include <cstdlib>
#include <memory>
#include <stdexcept>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define DLLAMA_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define DLLAMA_PAUSE() asm volatile("yield")
#else
#define DLLAMA_PAUSE() ((void)0)
#endif

namespace dllama {

namespace {
// Spin this many polls before sleeping: long enough to bridge the gap between two ops of a
// forward pass (a few microseconds of Python), short enough not to burn an idle core.
constexpr int kSpinPolls = 20000;
}  // namespace

ThreadPool::ThreadPool(int n_threads) : n_threads_(n_threads < 1 ? 1 : n_threads) {
    for (int i = 1; i < n_threads_; i++) workers_.emplace_back([this, i] { worker_loop(i); });
}

ThreadPool::~ThreadPool() {
    {
        std::lock_guard<std::mutex> lock(sleep_mutex_);
        stop_.store(true);
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
}

void ThreadPool::worker_loop(int index) {
    uint64_t seen = 0;
    for (;;) {
        int polls = 0;
        uint64_t gen;
        while ((gen = generation_.load(std::memory_order_acquire)) == seen && !stop_.load()) {
            if (++polls < kSpinPolls) {
                if (polls % 64 == 0) std::this_thread::yield();  // give way on an oversubscribed machine
                else DLLAMA_PAUSE();
                continue;
            }
            std::unique_lock<std::mutex> lock(sleep_mutex_);
            sleeping_.fetch_add(1);
            wake_.wait(lock, [&] { return generation_.load() != seen || stop_.load(); });
            sleeping_.fetch_sub(1);
        }
        if (stop_.load()) return;
        seen = gen;
        (*job_)(index, n_threads_);
        pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
}

void ThreadPool::run(const std::function<void(int, int)>& fn) {
    if (n_threads_ == 1) {
        fn(0, 1);
        return;
    }
    std::lock_guard<std::mutex> run_lock(run_mutex_);
    job_ = &fn;
    pending_.store(n_threads_ - 1, std::memory_order_relaxed);
    {
        std::lock_guard<std::mutex> lock(sleep_mutex_);
        generation_.fetch_add(1, std::memory_order_acq_rel);
    }
    if (sleeping_.load() > 0) wake_.notify_all();
    fn(0, n_threads_);
    // Spin briefly (the others usually finish within microseconds), then yield so that a worker
    // thread the OS preempted can run on this core when the machine is oversubscribed.
    for (int polls = 0; pending_.load(std::memory_order_acquire) != 0; polls++) {
        if (polls < kSpinPolls / 8) DLLAMA_PAUSE();
        else std::this_thread::yield();
    }
    job_ = nullptr;
}

namespace {
std::mutex g_pool_mutex;
std::unique_ptr<ThreadPool> g_pool;

int default_threads() {
    if (const char* env = std::getenv("DLLAMA_NTHREADS")) {
        const int n = std::atoi(env);
        if (n > 0) return n;
    }
    return hardware_threads();
}
}  // namespace

int hardware_threads() {
    const unsigned n = std::thread::hardware_concurrency();
    return n == 0 ? 1 : static_cast<int>(n);
}

ThreadPool& global_pool() {
    std::lock_guard<std::mutex> lock(g_pool_mutex);
    if (!g_pool) g_pool = std::make_unique<ThreadPool>(default_threads());
    return *g_pool;
}

void set_num_threads(int n) {
    if (n < 1 || n > 1024) throw std::invalid_argument("number of threads must be between 1 and 1024");
    std::lock_guard<std::mutex> lock(g_pool_mutex);
    if (g_pool && g_pool->size() == n) return;
    g_pool.reset();
    g_pool = std::make_unique<ThreadPool>(n);
}

int get_num_threads() { return global_pool().size(); }

}  // namespace dllama
