// A persistent pool of worker threads. The calling thread works as thread 0, so a pool of
// size n starts n-1 threads once; each op hands out contiguous ranges of its rows.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace dllama {

class ThreadPool {
public:
    explicit ThreadPool(int n_threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    int size() const { return n_threads_; }
    // Runs fn(thread_index, n_threads) on every thread and returns when all have finished.
    // Calls from several caller threads are serialised.
    void run(const std::function<void(int, int)>& fn);

private:
    void worker_loop(int index);

    int n_threads_;
    std::vector<std::thread> workers_;
    std::mutex run_mutex_;  // one job at a time
    std::mutex sleep_mutex_;
    std::condition_variable wake_;
    std::atomic<uint64_t> generation_{0};
    std::atomic<int> pending_{0};
    std::atomic<int> sleeping_{0};
    std::atomic<bool> stop_{false};
    const std::function<void(int, int)>* job_ = nullptr;
};

// The process-wide pool used by every kernel.
ThreadPool& global_pool();
void set_num_threads(int n);
int get_num_threads();
int hardware_threads();

// Contiguous share [begin, end) of n items for thread t of nt, in multiples of `align` items.
inline void split_range(int64_t n, int t, int nt, int64_t align, int64_t* begin, int64_t* end) {
    const int64_t units = (n + align - 1) / align;
    const int64_t base = units / nt, extra = units % nt;
    const int64_t b = t * base + (t < extra ? t : extra);
    const int64_t e = b + base + (t < extra ? 1 : 0);
    *begin = b * align < n ? b * align : n;
    *end = e * align < n ? e * align : n;
}

}  // namespace dllama
