// A fixed set of worker threads that runs one indexed batch of work items,
// captures the first error, cancels the rest and rethrows on the caller.
#pragma once

#include <atomic>
#include <cstddef>
#include <exception>
#include <functional>

namespace gs {

class ThreadPool {
 public:
  // Runs work(worker, item) for item in [0, n_items) on `threads` workers.
  // While they run, the calling thread calls `on_wait()` about every
  // `wait_ms` milliseconds; returning false cancels the batch. The first
  // exception a worker throws cancels the rest and is rethrown here after all
  // workers have stopped. Returns false when cancelled by on_wait.
  static bool run(std::size_t n_items, int threads,
                  const std::function<void(int worker, std::size_t item)>& work,
                  const std::function<bool()>& on_wait, int wait_ms = 100);
};

}  // namespace gs
