#include "executor.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "file.h"
#include "quant.h"
#include "strided.h"
#include "parallel_for.h"

namespace gs {
namespace {

struct AlignedDeleter { void operator()(void* p) const noexcept { free_aligned(p); } };
using Buffer = std::unique_ptr<char, AlignedDeleter>;

Buffer allocate(std::size_t bytes) {
  void* p = allocate_aligned(kPageBytes, bytes);
  if (!p) throw std::bad_alloc();
  return Buffer(static_cast<char*>(p));
}

uint64_t checked_mul(uint64_t a, uint64_t b, const CopyJob& job) {
  uint64_t out;
  if (!checked_mul_u64(a, b, &out)) throw JobError("tensor '" + job.name + "': size overflows 64 bits");
  return out;
}

uint64_t checked_add(uint64_t a, uint64_t b, const CopyJob& job) {
  uint64_t out;
  if (!checked_add_u64(a, b, &out)) throw JobError("tensor '" + job.name + "': offset overflows 64 bits");
  return out;
}

struct Item {
  std::size_t job;
  uint64_t begin, end;  // elements (copy), rows (quant) or blocks (strided)
  uint64_t bytes;       // source bytes the item reads (its scheduling weight)
};

// Conversions read the source in pieces this size, so the bounce buffer stays
// in L2 between the read and the conversion (one DRAM pass fewer per byte).
constexpr std::size_t kStageBytes = 512u << 10;
// Copies smaller than this go without the page-cache probe and the prefault:
// 8,000 tensors of 4-128 KiB loaded 2.5-3.5 us a job faster (benchmarks/NOTES.md,
// "Per-job cost").
constexpr uint64_t kPrefaultMinBytes = 64u << 10;

struct Batch {
  const std::vector<CopyJob>& jobs;
  const Options& options;
  std::vector<File> files;
  std::vector<bool> read_from;  // per file: whether a job reads it, for the final drop
  std::vector<std::unique_ptr<PageCacheProbe>> probes;  // per file: which pages are in the page cache
  std::vector<StridedLayout> strided;  // per job; empty shape when contiguous
  std::vector<Item> items;
  std::size_t bounce_bytes = 0;
  int64_t max_row = 0;
  std::atomic<uint64_t> bytes_done{0};
};

// What one thread owns: its own descriptor per file (so the kernel keeps one
// readahead state per sequential stream), a bounce buffer for conversions and
// quantization, and the quantizers' scratch row.
struct Worker {
  std::vector<std::unique_ptr<File>> files;
  Buffer bounce;
  std::vector<float> scratch;
};

int64_t numel(const CopyJob& job) {
  int64_t n = 1;
  for (int64_t s : job.shape) n *= s;
  return n;
}

void validate(const CopyJob& job, Batch& batch) {
  const std::string where = "tensor '" + job.name + "'";
  if (job.file < 0 || static_cast<std::size_t>(job.file) >= batch.files.size())
    throw JobError(where + ": file index out of range");
  for (int64_t s : job.shape) if (s < 0) throw JobError(where + ": negative dimension");
  for (int64_t s : job.src_strides) if (s < 0) throw JobError(where + ": negative stride");
  if (!job.src_strides.empty() && job.src_strides.size() != job.shape.size())
    throw JobError(where + ": strides and shape differ in rank");
  const File& file = batch.files[static_cast<std::size_t>(job.file)];
  const uint64_t item = itemsize(job.src_dtype);
  const int64_t n = numel(job);
  if (n == 0) return;
  if (!job.dst) throw JobError(where + ": null destination");
  // last byte touched by the view
  uint64_t last = 0;
  if (job.src_strides.empty()) {
    last = static_cast<uint64_t>(n) - 1;
  } else {
    for (std::size_t d = 0; d < job.shape.size(); ++d)
      last = checked_add(last, checked_mul(static_cast<uint64_t>(job.shape[d] - 1),
                                           static_cast<uint64_t>(job.src_strides[d]), job), job);
  }
  const uint64_t end = checked_add(job.src_offset, checked_mul(last + 1, item, job), job);
  if (end > file.size())
    throw DataError(file.path() + ": " + where + ": bytes [" + std::to_string(job.src_offset) + ", " +
                        std::to_string(end) + ") lie beyond the end of the file (" + std::to_string(file.size()) +
                        " bytes)",
                    file.path(), job.name);
  if (end > job.src_offset) batch.read_from[static_cast<std::size_t>(job.file)] = true;
  if (job.op == Op::Copy) {
    if (!can_convert(job.src_dtype, job.dst_dtype))
      throw JobError(where + ": cannot convert " + dtype_name(job.src_dtype) + " to " + dtype_name(job.dst_dtype));
    return;
  }
  const bool float_src = job.src_dtype == DType::F16 || job.src_dtype == DType::BF16 || job.src_dtype == DType::F32;
  const bool float_scale = job.scale_dtype == DType::F16 || job.scale_dtype == DType::BF16 || job.scale_dtype == DType::F32;
  if (!float_src || !float_scale) throw JobError(where + ": quantization needs f16/bf16/f32 source and scales");
  if (job.shape.size() != 2 || !job.src_strides.empty())
    throw JobError(where + ": quantization needs a contiguous 2-D source");
  if (!job.scale) throw JobError(where + ": null scale");
  if (job.op == Op::QuantInt4) {
    const int64_t K = job.shape[1];
    if (job.group_size <= 0 || K % job.group_size != 0 || job.group_size % 2 != 0 || !job.zero)
      throw JobError(where + ": int4 needs an even group size dividing K and a zero-point buffer");
  }
}

const File& buffered_file(Batch& batch, Worker& worker, int index) {
  const auto i = static_cast<std::size_t>(index);
  std::unique_ptr<File>& slot = worker.files[i];
  if (!slot) {
    const File& shared = batch.files[i];
    slot.reset(new File(shared.path()));
    if (!batch.options.identities.empty()) slot->check_identity(batch.options.identities[i]);
    if (slot->size() != shared.size())
      throw IoError(shared.path() + ": file changed size during the load (" + std::to_string(shared.size()) +
                    " -> " + std::to_string(slot->size()) + " bytes)");
    slot->advise_sequential();
    if (batch.options.drop_cache) slot->bypass_cache();  // macOS: F_NOCACHE (drop_cache is a no-op there)
  }
  return *slot;
}

// Reads source bytes [offset, offset + n) into `dst`, or into the worker's
// bounce buffer when `dst` is null; returns where the first byte is. In drop
// mode the range leaves the page cache as soon as it is copied.
const char* read_source(Batch& batch, Worker& worker, int index, uint64_t offset, std::size_t n, char* dst) {
  const File& file = buffered_file(batch, worker, index);
  char* out = dst ? dst : worker.bounce.get();
  file.read_exact(out, n, offset);
  if (batch.options.drop_cache) {
    // The page cache holds large folios (up to 2 MiB, naturally aligned) and
    // DONTNEED keeps any folio the range only partly covers: dropping exactly
    // the bytes read kept 57% of a file read in 1 MiB chunks. Drop between
    // 2 MiB boundaries instead; the stretch before the first boundary was read
    // by the previous chunk, the one after the last goes with the next chunk
    // (or the final drop).
    const uint64_t lo = offset / kFolioBytes * kFolioBytes;
    const uint64_t hi = (offset + n) / kFolioBytes * kFolioBytes;
    if (hi > lo) file.drop_cache(lo, static_cast<std::size_t>(hi - lo));
  }
  return out;
}

void run_strided(Batch& batch, Worker& worker, const CopyJob& job, const StridedLayout& L, uint64_t block) {
  const std::size_t si = itemsize(job.src_dtype), di = itemsize(job.dst_dtype);
  const std::size_t nd = L.shape.size();
  int64_t src_base = 0, dst_base = 0;
  std::vector<int64_t> extent(L.shape);
  int first_dim = 0;
  if (L.split > 0) {
    // decode the block number into fixed indices of dims [0, split-1) and a group
    int64_t outer_index = static_cast<int64_t>(block) / L.groups;
    const int64_t g = static_cast<int64_t>(block) % L.groups;
    for (int d = L.split - 2; d >= 0; --d) {
      const int64_t i = outer_index % L.shape[d];
      outer_index /= L.shape[d];
      src_base += i * L.src_strides[d];
      dst_base += i * L.dst_strides[d];
    }
    const int64_t first = g * L.group;
    src_base += first * L.src_strides[L.split - 1];
    dst_base += first * L.dst_strides[L.split - 1];
    extent[L.split - 1] = std::min(L.group, L.shape[L.split - 1] - first);
    first_dim = L.split - 1;
  }
  int64_t span = 1, count = 1;
  for (std::size_t d = static_cast<std::size_t>(first_dim); d < nd; ++d) {
    span += (extent[d] - 1) * L.src_strides[d];
    count *= extent[d];
  }
  const uint64_t offset = job.src_offset + static_cast<uint64_t>(src_base) * si;
  const char* src = read_source(batch, worker, job.file, offset, static_cast<std::size_t>(span) * si, nullptr);
  scatter(src, job.src_dtype, static_cast<char*>(job.dst) + dst_base * static_cast<int64_t>(di), job.dst_dtype,
          L, first_dim, extent);
  batch.bytes_done += static_cast<uint64_t>(count) * si;
}

void run_copy(Batch& batch, Worker& worker, const CopyJob& job, const Item& item) {
  const std::size_t si = itemsize(job.src_dtype), di = itemsize(job.dst_dtype);
  const uint64_t n = item.end - item.begin;
  const uint64_t offset = job.src_offset + item.begin * si;
  char* dst = static_cast<char*>(job.dst) + item.begin * di;
  if (job.src_dtype == job.dst_dtype) {
    // Prefault only when the bytes are cached (a CPU-bound copy): on a cold
    // chunk the pages zeroed ahead go cold in the CPU caches during the device
    // wait, and cold loads measured 20% slower with it. Small pieces skip both
    // syscalls (mincore, madvise): they cost more than the few faults they save.
    if (n * si >= kPrefaultMinBytes && batch.probes[static_cast<std::size_t>(job.file)]->cached(offset, n * si))
      populate_writable(dst, n * si);
    read_source(batch, worker, job.file, offset, n * si, dst);  // straight into the parameter
  } else {
    const uint64_t per = std::max<uint64_t>(1, kStageBytes / si);  // L2-sized pieces
    for (uint64_t b = 0; b < n; b += per) {
      const uint64_t m = std::min(per, n - b);
      const char* src = read_source(batch, worker, job.file, offset + b * si, m * si, nullptr);
      convert(src, job.src_dtype, dst + b * di, job.dst_dtype, m);
    }
  }
  if (job.dst_dtype == DType::Bool) normalize_bool(dst, n);  // (only a same-dtype copy reaches a bool)
  batch.bytes_done += n * si;
}

// The one place the engine words a row that cannot be quantized (errors.nan_row in Python).
[[noreturn]] void throw_bad_row(const std::string& path, const CopyJob& job, int64_t row) {
  throw DataError(path + ": tensor '" + job.name + "': row " + std::to_string(row) +
                      " holds NaN or infinity; it cannot be quantized",
                  path, job.name, row);
}

// Quantizes rows [item.begin, item.end), reading them in L2-sized pieces of
// whole rows (the bounce buffer is then still cached when the kernel reads it).
void run_quant(Batch& batch, Worker& worker, const CopyJob& job, const Item& item) {
  const std::size_t si = itemsize(job.src_dtype);
  const int64_t K = job.shape[1];
  const uint64_t row_bytes = static_cast<uint64_t>(K) * si;
  const uint64_t per = std::max<uint64_t>(1, kStageBytes / row_bytes);
  float* scratch = worker.scratch.data();
  for (uint64_t first = item.begin; first < item.end; first += per) {
    const uint64_t rows = std::min(per, item.end - first);
    const char* src = read_source(batch, worker, job.file, job.src_offset + first * row_bytes, rows * row_bytes,
                                  nullptr);
    const int64_t r0 = static_cast<int64_t>(first);
    int64_t bad;
    if (job.op == Op::QuantInt8) {
      bad = quantize_int8_rows(src, job.src_dtype, static_cast<int64_t>(rows), K,
                               static_cast<int8_t*>(job.dst) + r0 * K,
                               static_cast<char*>(job.scale) + r0 * static_cast<int64_t>(itemsize(job.scale_dtype)),
                               job.scale_dtype, scratch, batch.options.allow_avx2);
    } else {
      const int64_t groups = K / job.group_size;
      const int64_t scale_row = groups * static_cast<int64_t>(itemsize(job.scale_dtype));
      bad = quantize_int4_rows(src, job.src_dtype, static_cast<int64_t>(rows), K, job.group_size,
                               static_cast<uint8_t*>(job.dst) + r0 * (K / 2),
                               static_cast<char*>(job.scale) + r0 * scale_row,
                               static_cast<char*>(job.zero) + r0 * scale_row, job.scale_dtype, scratch,
                               batch.options.allow_avx2);
    }
    if (bad >= 0) throw_bad_row(batch.files[static_cast<std::size_t>(job.file)].path(), job, job.first_row + r0 + bad);
    batch.bytes_done += rows * row_bytes;
  }
}

void run_item(Batch& batch, Worker& worker, const Item& item) {
  const CopyJob& job = batch.jobs[item.job];
  if (!batch.strided[item.job].shape.empty()) {
    run_strided(batch, worker, job, batch.strided[item.job], item.begin);
    return;
  }
  if (job.op == Op::Copy) {
    run_copy(batch, worker, job, item);
    return;
  }
  run_quant(batch, worker, job, item);
}

void plan_items(Batch& batch) {
  const std::size_t chunk = std::max<std::size_t>(batch.options.chunk_bytes, kPageBytes);
  batch.bounce_bytes = 0;
  for (std::size_t j = 0; j < batch.jobs.size(); ++j) {
    const CopyJob& job = batch.jobs[j];
    const int64_t n = numel(job);
    if (n == 0) continue;
    const std::size_t si = itemsize(job.src_dtype);
    bool contiguous = job.src_strides.empty();
    if (contiguous && job.op == Op::Copy) {
      const uint64_t per = std::max<uint64_t>(1, chunk / si);
      for (uint64_t b = 0; b < static_cast<uint64_t>(n); b += per) {
        const uint64_t e = std::min<uint64_t>(static_cast<uint64_t>(n), b + per);
        batch.items.push_back({j, b, e, (e - b) * si});
      }
      if (job.src_dtype != job.dst_dtype)
        batch.bounce_bytes = std::max<std::size_t>(batch.bounce_bytes, std::min<uint64_t>(per * si, kStageBytes));
    } else if (contiguous) {
      const int64_t rows = job.shape[0], K = job.shape[1];
      const uint64_t row_bytes = static_cast<uint64_t>(K) * si;
      const uint64_t per = std::max<uint64_t>(1, chunk / row_bytes);
      for (uint64_t b = 0; b < static_cast<uint64_t>(rows); b += per) {
        const uint64_t e = std::min<uint64_t>(static_cast<uint64_t>(rows), b + per);
        batch.items.push_back({j, b, e, (e - b) * row_bytes});
      }
      const uint64_t staged = std::max<uint64_t>(1, kStageBytes / row_bytes);  // run_quant's pieces
      batch.bounce_bytes = std::max<std::size_t>(batch.bounce_bytes, std::min<uint64_t>(staged, rows) * row_bytes);
      batch.max_row = std::max(batch.max_row, K);
    } else {
      batch.strided[j] = make_strided(job, std::max<std::size_t>(1, chunk / si));
      const StridedLayout& L = batch.strided[j];
      const uint64_t blocks = static_cast<uint64_t>(L.outer * L.groups);
      int64_t span = L.inner_span;
      if (L.split > 0) span += (L.group - 1) * L.src_strides[L.split - 1];
      for (uint64_t b = 0; b < blocks; ++b) batch.items.push_back({j, b, b + 1, static_cast<uint64_t>(span) * si});
      batch.bounce_bytes = std::max<std::size_t>(batch.bounce_bytes, static_cast<std::size_t>(span) * si);
    }
  }
  // Read each file front to back: the kernel's readahead then works for us.
  std::stable_sort(batch.items.begin(), batch.items.end(), [&](const Item& a, const Item& b) {
    const CopyJob& ja = batch.jobs[a.job];
    const CopyJob& jb = batch.jobs[b.job];
    if (ja.file != jb.file) return ja.file < jb.file;
    if (ja.src_offset != jb.src_offset) return ja.src_offset < jb.src_offset;
    return a.begin < b.begin;
  });
}

}  // namespace

RunResult run_jobs(const std::vector<std::string>& paths, const std::vector<CopyJob>& jobs,
                   const Options& options, const std::function<bool(uint64_t)>& progress) {
  Batch batch{jobs, options, {}, {}, {}, {}, {}, 0, 0, {}};
  batch.files.reserve(paths.size());
  if (!options.identities.empty() && options.identities.size() != paths.size())
    throw JobError("one file identity per file is needed");
  for (const auto& p : paths) {
    batch.files.emplace_back(p);
    if (!options.identities.empty()) batch.files.back().check_identity(options.identities[batch.files.size() - 1]);
  }
  batch.read_from.assign(paths.size(), false);
  for (const auto& job : jobs) validate(job, batch);
  for (const File& f : batch.files) batch.probes.emplace_back(new PageCacheProbe(f));
  batch.strided.resize(jobs.size());
  plan_items(batch);

  const int threads = std::max(1, options.threads);
  std::vector<Worker> workers(static_cast<std::size_t>(threads));
  for (Worker& w : workers) w.files.resize(paths.size());
  auto work = [&](int id, std::size_t i) {
    Worker& w = workers[static_cast<std::size_t>(id)];
    if (!w.bounce && batch.bounce_bytes > 0) w.bounce = allocate(batch.bounce_bytes);
    if (w.scratch.size() < static_cast<std::size_t>(batch.max_row))
      w.scratch.resize(static_cast<std::size_t>(batch.max_row));
    run_item(batch, w, batch.items[i]);
  };
  auto on_wait = [&]() { return progress ? progress(batch.bytes_done.load()) : true; };
  RunResult result;
  if (progress && !progress(0)) {  // a callback that refuses at once cancels before any copy
    result.completed = false;
    return result;
  }
  std::vector<uint64_t> weights(batch.items.size());
  for (std::size_t i = 0; i < weights.size(); ++i) weights[i] = batch.items[i].bytes;
  result.completed = weighted_parallel_for(weights, threads, work, on_wait);
  result.bytes_read = batch.bytes_done.load();
  if (options.drop_cache) {
    // Per-chunk drops leave the pages that straddle chunk edges, the folio that
    // holds both the header (read by the format reader) and the first tensor,
    // and whatever readahead brought in past a thread's last chunk: drop every
    // file read from, whole, once more (drop_settled: after the reads still in flight).
    for (std::size_t f = 0; f < paths.size(); ++f) {
      if (batch.read_from[f]) drop_settled(batch.files[f], *batch.probes[f]);
    }
  }
  if (result.completed && progress) progress(result.bytes_read);
  return result;
}

}  // namespace gs
