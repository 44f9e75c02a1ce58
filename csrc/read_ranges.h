// Many small reads of one file in one call: a torch zip's local headers
// (thousands of 30-100 byte records between the storages). Python's
// fileio.pread_many does the same one pread at a time, taking the GIL back
// between reads; here the whole batch runs without it, so the format reader's
// pickle walk can go on meanwhile (formats/torchzip.py).
#pragma once

#include <cstdint>
#include <string>
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

}  // namespace gs
