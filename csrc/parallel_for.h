// A weighted parallel-for with work stealing: runs one indexed batch of work
// items on a few threads started for the batch, captures the first error,
// cancels the rest and rethrows on the caller.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

namespace gs {

// Runs work(worker, item) for every item on `threads` workers. Items are
// ordered (by file offset, for the executor) and weighted (bytes): worker w
// walks its own contiguous share of the total weight front to back, so each
// thread reads one stretch of the file sequentially, as the kernel's
// per-descriptor readahead wants; a worker that runs dry takes the back half
// of the largest share left, so a stalled thread does not stall the batch.
// While they run, the calling thread calls `on_wait()` about every
// `wait_ms` milliseconds; returning false cancels the batch. The first
// exception a worker throws cancels the rest and is rethrown here after all
// workers have stopped. Returns false when cancelled by on_wait.
bool weighted_parallel_for(const std::vector<uint64_t>& item_weights, int threads,
                           const std::function<void(int worker, std::size_t item)>& work,
                           const std::function<bool()>& on_wait, int wait_ms = 100);

}  // namespace gs
