// Many small reads of one file in one call: a torch zip's local headers
// (thousands of 30-100 byte records between the storages). Python's
// fileio.pread_many does the same one pread at a time, taking the GIL back
// between reads; here the whole batch runs without it, so the format reader's
// pickle walk can go on meanwhile (formats/torchzip.py).
#pragma once

#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include "file.h"

namespace gs {

// Reads [offsets[i], offsets[i] + lengths[i]) of `path` for every i into
// `out`, back to back (range i starts at the sum of the lengths before it), on
// up to `threads` threads, each taking a contiguous run of the ranges in the
// order given. A range is cut at the end of the file (a range past it reads
// nothing), and the bytes a cut range leaves unread are zeroed. Returns the
// bytes read for each range. `expected`, when given, must describe the file
// opened (FileIdentity): IoError otherwise, as for any open or read failure.
std::vector<uint64_t> read_ranges(const std::string& path, const FileIdentity* expected,
                                  const std::vector<uint64_t>& offsets, const std::vector<uint64_t>& lengths,
                                  int threads, char* out);

// Asks for every range [offsets[i], offsets[i] + lengths[i]) of `path` with
// File::advise_willneed, in order, on a thread of its own, and returns at once:
// a cold torch zip's thousands of local headers are queued on the disk while
// the caller walks the pickle (asked for on the caller's thread, they took it
// 15-23 ms first; from a Python thread, the asking waited for the walk's GIL).
// A hint only: a file that cannot be opened, or advice the OS refuses, asks for
// nothing, and the reads that follow say what the file holds. wait() and the
// destructor join the thread.
class BackgroundAdvice {
 public:
  BackgroundAdvice(std::string path, std::vector<uint64_t> offsets, std::vector<uint64_t> lengths);
  ~BackgroundAdvice() noexcept;
  BackgroundAdvice(const BackgroundAdvice&) = delete;
  BackgroundAdvice& operator=(const BackgroundAdvice&) = delete;

  void wait() noexcept;

 private:
  std::thread thread_;
};

}  // namespace gs
