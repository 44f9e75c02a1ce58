#include "read_ranges.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "parallel_for.h"

namespace gs {

std::vector<uint64_t> read_ranges(const std::string& path, const FileIdentity* expected,
                                  const std::vector<uint64_t>& offsets, const std::vector<uint64_t>& lengths,
                                  int threads, char* out) {
  if (offsets.size() != lengths.size()) throw std::invalid_argument("read_ranges: offsets and lengths differ in length");
  File file(path);
  if (expected != nullptr) file.check_identity(*expected);
  const uint64_t size = file.size();
  std::vector<uint64_t> starts(offsets.size()), got(offsets.size());
  uint64_t at = 0;
  for (std::size_t i = 0; i < offsets.size(); ++i) {
    starts[i] = at;
    if (!checked_add_u64(at, lengths[i], &at)) throw std::invalid_argument("read_ranges: lengths overflow");
    got[i] = offsets[i] >= size ? 0 : std::min(lengths[i], size - offsets[i]);
  }
  // weight one per range plus its bytes: shares of about equal reads, each a run in file order
  std::vector<uint64_t> weights(offsets.size());
  for (std::size_t i = 0; i < offsets.size(); ++i) weights[i] = 4096 + got[i];
  auto work = [&](int, std::size_t i) {
    char* dst = out + starts[i];
    if (got[i] > 0) file.read_exact(dst, static_cast<std::size_t>(got[i]), offsets[i]);
    if (got[i] < lengths[i]) std::memset(dst + got[i], 0, static_cast<std::size_t>(lengths[i] - got[i]));
  };
  const int workers = std::max(1, std::min<int>(threads, static_cast<int>(offsets.size())));
  weighted_parallel_for(weights, workers, work, [] { return true; });
  return got;
}

BackgroundAdvice::BackgroundAdvice(std::string path, std::vector<uint64_t> offsets, std::vector<uint64_t> lengths)
    : thread_([path = std::move(path), offsets = std::move(offsets), lengths = std::move(lengths)]() noexcept {
        try {
          File file(path);
          for (std::size_t i = 0; i < offsets.size() && i < lengths.size(); ++i)
            file.advise_willneed(offsets[i], static_cast<std::size_t>(lengths[i]));
        } catch (...) {
          // a hint: the caller's own reads of these ranges report what went wrong
        }
      }) {}

BackgroundAdvice::~BackgroundAdvice() noexcept { wait(); }

void BackgroundAdvice::wait() noexcept {
  if (thread_.joinable()) thread_.join();
}

}  // namespace gs
