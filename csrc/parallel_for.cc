#include "parallel_for.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>

namespace gs {
namespace {

// Contiguous item ranges, one per worker, split in half when a worker steals.
class Shares {
 public:
  Shares(const std::vector<uint64_t>& weights, int workers) : weights_(weights), ranges_(workers) {
    uint64_t total = 0;
    for (uint64_t w : weights) total += w;
    std::size_t item = 0;
    uint64_t seen = 0;
    for (int k = 0; k < workers; ++k) {
      const std::size_t begin = item;
      const uint64_t goal = total / static_cast<uint64_t>(workers) * static_cast<uint64_t>(k + 1);
      while (item < weights.size() && (k == workers - 1 || seen + weights[item] / 2 < goal)) seen += weights[item++];
      ranges_[static_cast<std::size_t>(k)] = {begin, item};
    }
  }

  // The next item for `worker`, or false when every share is empty.
  bool next(int worker, std::size_t* item) {
    std::lock_guard<std::mutex> lock(mu_);
    Range& own = ranges_[static_cast<std::size_t>(worker)];
    if (own.begin == own.end && !steal(own)) return false;
    *item = own.begin++;
    return true;
  }

 private:
  struct Range { std::size_t begin = 0, end = 0; };

  uint64_t weight(const Range& r) const {
    uint64_t w = 0;
    for (std::size_t i = r.begin; i < r.end; ++i) w += weights_[i];
    return w;
  }

  bool steal(Range& own) {
    Range* victim = nullptr;
    uint64_t most = 0;
    for (Range& r : ranges_) {
      const uint64_t w = weight(r);
      if (r.end > r.begin && (victim == nullptr || w > most)) { victim = &r; most = w; }
    }
    if (!victim) return false;
    // back half by weight; a single item left goes to the thief whole
    std::size_t mid = victim->begin + 1;
    uint64_t front = weights_[victim->begin];
    while (mid < victim->end && front + weights_[mid] / 2 < most / 2) front += weights_[mid++];
    if (mid == victim->end) mid = victim->end - 1;
    if (victim->end - victim->begin == 1) mid = victim->begin;
    own = {mid, victim->end};
    victim->end = mid;
    return own.end > own.begin;
  }

  const std::vector<uint64_t>& weights_;
  std::vector<Range> ranges_;
  std::mutex mu_;
};

}  // namespace

bool weighted_parallel_for(const std::vector<uint64_t>& item_weights, int threads,
                           const std::function<void(int, std::size_t)>& work,
                           const std::function<bool()>& on_wait, int wait_ms) {
  const std::size_t n_items = item_weights.size();
  if (threads < 1) threads = 1;
  if (static_cast<std::size_t>(threads) > n_items) threads = static_cast<int>(n_items > 0 ? n_items : 1);
  Shares shares(item_weights, threads);
  std::atomic<bool> cancelled{false};
  std::exception_ptr first_error;
  std::mutex mu;
  std::condition_variable done_cv;
  int running = threads;

  auto worker = [&](int id) {
    try {
      std::size_t item;
      while (!cancelled.load(std::memory_order_relaxed) && shares.next(id, &item)) work(id, item);
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
