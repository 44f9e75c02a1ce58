// Runs a batch of copy jobs: validates them against the files, splits them into
// chunks, and copies / converts / quantizes the chunks in parallel (parallel_for.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "convert.h"
#include "file.h"

namespace gs {

enum class Op : int { Copy = 0, QuantInt8 = 1, QuantInt4 = 2 };

// One source tensor (or row range of one) to one contiguous destination.
struct CopyJob {
  Op op = Op::Copy;
  int file = 0;                      // index into the batch's file list
  uint64_t src_offset = 0;           // file offset of element [0, ..., 0]
  DType src_dtype = DType::U8;
  std::vector<int64_t> shape;        // logical shape of the source view
  std::vector<int64_t> src_strides;  // element strides; empty = C-contiguous
  void* dst = nullptr;               // contiguous destination (q weights for quant ops)
  DType dst_dtype = DType::U8;
  void* scale = nullptr;             // quant ops: [rows] or [rows, K/G]
  void* zero = nullptr;              // int4: [rows, K/G]
  DType scale_dtype = DType::F32;
  int64_t group_size = 0;            // int4 only
  std::string name;                  // tensor name, for error messages
  int64_t first_row = 0;             // the source view's first row in its tensor (error messages)
  // Strided jobs: at most this many indices of the outermost (largest-stride) dim per read;
  // 0 = as many as a chunk holds (gaps between them read too), 1 = each row's segment alone.
  int64_t block_rows = 0;
};

struct Options {
  int threads = 2;
  std::size_t chunk_bytes = 16u << 20;
  bool drop_cache = false;  // keep the file out of the page cache (file.h: CacheDrop says how, per OS)
  bool allow_avx2 = true;   // the quantizers may use their AVX2 loops (quant.h); Python: GEMMA_STREAM_NO_AVX2
  // Per file, the identity of the file whose header was validated; every open
  // (the batch's and each worker's) is checked against it. Empty: sizes only.
  std::vector<FileIdentity> identities;
};

// A job that cannot be valid whatever the file holds (null destination, bad
// file index, dtype pair, rank): a bug of the planner, never the file's fault.
class JobError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The file's contents are at fault: a tensor's bytes lie past the end of the
// file, or a row to quantize holds NaN/inf. Carries the facts separately.
class DataError : public std::runtime_error {
 public:
  DataError(const std::string& message, std::string path_, std::string tensor_, int64_t row_ = -1)
      : std::runtime_error(message), path(std::move(path_)), tensor(std::move(tensor_)), row(row_) {}
  std::string path, tensor;
  int64_t row;  // -1 when no row is involved
};

struct RunResult {
  uint64_t bytes_read = 0;
  bool completed = true;  // false when progress() asked to cancel
};

// progress(bytes_done) is called on the calling thread about every 100 ms;
// returning false cancels the batch (remaining chunks are skipped).
RunResult run_jobs(const std::vector<std::string>& files, const std::vector<CopyJob>& jobs,
                   const Options& options, const std::function<bool(uint64_t)>& progress);

}  // namespace gs
