#include "thread_pool.h"

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace gs {

bool ThreadPool::run(std::size_t n_items, int threads,
                     const std::function<void(int, std::size_t)>& work,
                     const std::function<bool()>& on_wait, int wait_ms) {
  if (threads < 1) threads = 1;
  if (static_cast<std::size_t>(threads) > n_items) threads = static_cast<int>(n_items > 0 ? n_items : 1);
  std::atomic<std::size_t> next{0};
  std::atomic<bool> cancelled{false};
  std::exception_ptr first_error;
  std::mutex mu;
  std::condition_variable done_cv;
  int running = threads;

  auto worker = [&](int id) {
    try {
      while (!cancelled.load(std::memory_order_relaxed)) {
        const std::size_t item = next.fetch_add(1);
        if (item >= n_items) break;
        work(id, item);
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu);
      if (!first_error) first_error = std::current_exception();
      cancelled = true;
    }
    std::lock_guard<std::mutex> lock(mu);
    if (--running == 0) done_cv.notify_all();
  };

  std::vector<std::thread> pool;
  pool.reserve(static_cast<std::size_t>(threads));
  for (int i = 0; i < threads; ++i) pool.emplace_back(worker, i);

  bool user_cancelled = false;
  {
    std::unique_lock<std::mutex> lock(mu);
    while (running > 0) {
      done_cv.wait_for(lock, std::chrono::milliseconds(wait_ms));
      if (running == 0) break;
      lock.unlock();
      bool keep_going = true;
      try {
        keep_going = on_wait();
      } catch (...) {
        lock.lock();
        if (!first_error) first_error = std::current_exception();
        cancelled = true;
        continue;
      }
      lock.lock();
      if (!keep_going) { user_cancelled = true; cancelled = true; }
    }
  }
  for (auto& t : pool) t.join();
  if (first_error) std::rethrow_exception(first_error);
  return !user_cancelled;
}

}  // namespace gs
