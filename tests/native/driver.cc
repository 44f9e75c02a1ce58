// The engine's test driver, without Python: runs copy, f32 -> bf16, int8 and
// int4 jobs on a generated file and checks the bytes against expected.h
// (computed by torch and the reference quantizers; tests/native/make_expected.py)
// and the int4 kernel-layout round trip, then checks the errors for a truncated
// file, a missing file and a NaN row. GEMMA_STREAM_NO_AVX2=1 runs the
// quantizers' portable loops (read here and passed in, as config.py does).
// Built with -DGEMMA_STREAM_DRIVER=ON, natively or cross-compiled for Windows:
//
//   cmake -S . -B build-driver -DGEMMA_STREAM_PYTHON_MODULE=OFF -DGEMMA_STREAM_DRIVER=ON
//   cmake --build build-driver && build-driver/gemma_stream_driver [WORK_DIR]
//
// Exit status 0 when every check passed; one line per check on stdout.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "executor.h"
#include "expected.h"
#include "file.h"
#include "int4_layout.h"
#include "quant.h"
#include "read_ranges.h"

namespace {

int failures = 0;

// GEMMA_STREAM_NO_AVX2 set (to anything but 0/false/no/off) turns the quantizers'
// AVX2 loops off, as python/gemma_stream/config.py reads it for the package;
// the engine itself reads no environment.
bool allow_avx2() {
  const char* v = std::getenv("GEMMA_STREAM_NO_AVX2");
  if (!v || !*v) return true;
  for (const char* off : {"0", "false", "no", "off"})
    if (std::strcmp(v, off) == 0) return true;
  return false;
}

gs::Options driver_options() {
  gs::Options options;
  options.allow_avx2 = allow_avx2();
  return options;
}

void report(const std::string& check, bool ok, const std::string& detail = "") {
  std::printf("%s %s%s%s\n", ok ? "ok  " : "FAIL", check.c_str(), detail.empty() ? "" : ": ", detail.c_str());
  if (!ok) ++failures;
}

// Compares n bytes; names the first byte that differs.
void check_bytes(const std::string& check, const void* got, const void* want, std::size_t n) {
  const auto* g = static_cast<const uint8_t*>(got);
  const auto* w = static_cast<const uint8_t*>(want);
  for (std::size_t i = 0; i < n; ++i) {
    if (g[i] != w[i]) {
      char detail[96];
      std::snprintf(detail, sizeof detail, "byte %zu of %zu is 0x%02x, expected 0x%02x", i, n, g[i], w[i]);
      report(check, false, detail);
      return;
    }
  }
  report(check, true, std::to_string(n) + " bytes as expected");
}

void write_file(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error(path + ": cannot write the driver's input file");
}

template <typename T>
void append(std::vector<uint8_t>& out, const T* data, std::size_t n) {
  const auto* p = reinterpret_cast<const uint8_t*>(data);
  out.insert(out.end(), p, p + n * sizeof(T));
}

std::vector<float> matrix() {  // the formula make_expected.py uses
  std::vector<float> w(static_cast<std::size_t>(kRows * kK));
  for (int i = 0; i < kRows * kK; ++i) w[static_cast<std::size_t>(i)] = static_cast<float>((i * 37) % 251 - 125) / 16.0f;
  return w;
}

uint8_t pattern_byte(std::size_t i) { return static_cast<uint8_t>(i * 131 + i / 251); }

gs::CopyJob job(gs::Op op, uint64_t offset, gs::DType src, std::vector<int64_t> shape, void* dst, gs::DType dst_dtype,
                const std::string& name) {
  gs::CopyJob j;
  j.op = op;
  j.src_offset = offset;
  j.src_dtype = src;
  j.shape = std::move(shape);
  j.dst = dst;
  j.dst_dtype = dst_dtype;
  j.name = name;
  return j;
}

// Runs the jobs and expects an exception of type E whose message holds `needle`.
template <typename E>
void expect_error(const std::string& check, const std::vector<std::string>& files, const std::vector<gs::CopyJob>& jobs,
                  const std::string& needle) {
  gs::Options options = driver_options();
  try {
    gs::run_jobs(files, jobs, options, nullptr);
    report(check, false, "no error raised");
  } catch (const E& e) {
    const std::string what = e.what();
    report(check, what.find(needle) != std::string::npos, what);
  } catch (const std::exception& e) {
    report(check, false, std::string("wrong error type: ") + e.what());
  }
}

}  // namespace

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? std::string(argv[1]) + "/" : std::string();
  const std::string input = dir + "gemma_stream_driver_input.bin";
  const std::string truncated = dir + "gemma_stream_driver_truncated.bin";
  std::printf("quantizer loops: %s; page-cache drop: %s\n", gs::quant_kernels(allow_avx2()),
              gs::cache_drop_name(gs::cache_drop_support()));

  // Layout: 8 bytes of header, the special f32 values, the [kRows, kK] f32
  // matrix, then 256 KiB of byte pattern for the multi-threaded copy.
  const std::vector<float> w = matrix();
  const std::size_t n_special = sizeof kSpecialBits / sizeof kSpecialBits[0];
  const std::size_t pattern_bytes = 256u << 10;
  std::vector<uint8_t> bytes = {'g', 's', 'd', 'r', 'i', 'v', 'e', 'r'};
  const uint64_t special_at = bytes.size();
  append(bytes, kSpecialBits, n_special);
  const uint64_t matrix_at = bytes.size();
  append(bytes, w.data(), w.size());
  const uint64_t pattern_at = bytes.size();
  for (std::size_t i = 0; i < pattern_bytes; ++i) bytes.push_back(pattern_byte(i));
  write_file(input, bytes);
  const std::vector<std::string> files = {input};

  try {
    // Same-dtype copy in 4 KiB chunks on 2 threads, then again dropping the cache.
    std::vector<uint8_t> expected_pattern(bytes.begin() + static_cast<std::ptrdiff_t>(pattern_at), bytes.end());
    for (bool drop : {false, true}) {
      std::vector<uint8_t> out(pattern_bytes);
      gs::Options options = driver_options();
      options.threads = 2;
      options.chunk_bytes = 4096;
      options.drop_cache = drop;
      uint64_t last_progress = 0;
      const gs::RunResult r = gs::run_jobs(
          files, {job(gs::Op::Copy, pattern_at, gs::DType::U8, {static_cast<int64_t>(pattern_bytes)}, out.data(),
                      gs::DType::U8, "pattern")},
          options, [&](uint64_t done) { last_progress = done; return true; });
      const std::string name = drop ? "copy u8, 2 threads, cache drop" : "copy u8, 2 threads";
      report(name + ": bytes read", r.completed && r.bytes_read == pattern_bytes && last_progress == pattern_bytes,
             std::to_string(r.bytes_read) + " read, progress " + std::to_string(last_progress));
      check_bytes(name, out.data(), expected_pattern.data(), pattern_bytes);
    }

    gs::Options options = driver_options();
    {
      std::vector<uint16_t> out(n_special);
      gs::run_jobs(files, {job(gs::Op::Copy, special_at, gs::DType::F32, {static_cast<int64_t>(n_special)}, out.data(),
                               gs::DType::BF16, "special")},
                   options, nullptr);
      check_bytes("f32 -> bf16 (ties, inf, NaN, subnormals)", out.data(), kSpecialBf16, sizeof kSpecialBf16);
    }
    {  // a transposed (strided) view: expected straight from the formula
      std::vector<float> out(w.size()), want(w.size());
      for (int k = 0; k < kK; ++k)
        for (int r = 0; r < kRows; ++r) want[static_cast<std::size_t>(k * kRows + r)] = w[static_cast<std::size_t>(r * kK + k)];
      gs::CopyJob t = job(gs::Op::Copy, matrix_at, gs::DType::F32, {kK, kRows}, out.data(), gs::DType::F32, "transposed");
      t.src_strides = {1, kK};
      gs::run_jobs(files, {t}, options, nullptr);
      check_bytes("strided f32 copy (transpose)", out.data(), want.data(), want.size() * sizeof(float));
    }
    {
      std::vector<int8_t> q(static_cast<std::size_t>(kRows * kK));
      std::vector<uint16_t> scale(kRows);
      gs::CopyJob q8 = job(gs::Op::QuantInt8, matrix_at, gs::DType::F32, {kRows, kK}, q.data(), gs::DType::I8, "w8");
      q8.scale = scale.data();
      q8.scale_dtype = gs::DType::BF16;
      gs::run_jobs(files, {q8}, options, nullptr);
      check_bytes("int8 weights", q.data(), kInt8Q, sizeof kInt8Q);
      check_bytes("int8 scales (bf16)", scale.data(), kInt8ScaleBf16, sizeof kInt8ScaleBf16);
    }
    {
      std::vector<uint8_t> q(static_cast<std::size_t>(kRows * kK / 2));
      std::vector<float> scale(static_cast<std::size_t>(kRows * kK / kGroup)), zero(scale.size());
      gs::CopyJob q4 = job(gs::Op::QuantInt4, matrix_at, gs::DType::F32, {kRows, kK}, q.data(), gs::DType::U8, "w4");
      q4.scale = scale.data();
      q4.zero = zero.data();
      q4.scale_dtype = gs::DType::F32;
      q4.group_size = kGroup;
      gs::run_jobs(files, {q4}, options, nullptr);
      check_bytes("int4 weights", q.data(), kInt4Q, sizeof kInt4Q);
      check_bytes("int4 scales (f32)", scale.data(), kInt4ScaleF32, sizeof kInt4ScaleF32);
      check_bytes("int4 zero points (f32)", zero.data(), kInt4ZeroF32, sizeof kInt4ZeroF32);
      // torch's CPU kernel layout and back (int4_layout.h) gives the stored bytes again
      const bool packed = gs::int4_to_cpu_kernel_layout(q.data(), kRows, kK, 4, true);
      report("int4 kernel layout repacks", packed && std::memcmp(q.data(), kInt4Q, sizeof kInt4Q) != 0);
      const bool unpacked = gs::int4_from_cpu_kernel_layout(q.data(), kRows, kK, 4, true);
      report("int4 kernel layout unpacks", unpacked);
      check_bytes("int4 kernel layout round trip", q.data(), kInt4Q, sizeof kInt4Q);
    }

    // Errors: a file cut short, a file that is not there, a row holding NaN.
    std::vector<uint8_t> cut(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(matrix_at + 100));
    write_file(truncated, cut);
    std::vector<int8_t> q(static_cast<std::size_t>(kRows * kK));
    std::vector<float> scale(kRows);
    gs::CopyJob q8 = job(gs::Op::QuantInt8, matrix_at, gs::DType::F32, {kRows, kK}, q.data(), gs::DType::I8, "w8");
    q8.scale = scale.data();
    expect_error<gs::DataError>("truncated file", {truncated}, {q8}, "lie beyond the end of the file (" +
                               std::to_string(cut.size()) + " bytes)");
    expect_error<gs::IoError>("missing file", {dir + "gemma_stream_driver_missing.bin"}, {q8}, "cannot open");
    gs::CopyJob nan_row = job(gs::Op::QuantInt8, special_at, gs::DType::F32, {1, static_cast<int64_t>(n_special)},
                              q.data(), gs::DType::I8, "specials");
    nan_row.scale = scale.data();
    expect_error<gs::DataError>("NaN row", files, {nan_row}, "row 0 holds NaN or infinity");

    // Many small reads in one call (a torch zip's local headers): back to back, the last one cut at
    // the end of the file with its unread tail zeroed, one past the end reading nothing.
    {
      std::vector<uint64_t> offsets, lengths;
      for (uint64_t i = 0; i < 300; ++i) {
        offsets.push_back(pattern_at + (i * 997) % (pattern_bytes - 64));
        lengths.push_back(1 + i % 60);
      }
      offsets.push_back(bytes.size() - 5);
      lengths.push_back(12);
      offsets.push_back(bytes.size() + 10);
      lengths.push_back(4);
      uint64_t total = 0;
      for (uint64_t n : lengths) total += n;
      std::vector<char> got_bytes(static_cast<std::size_t>(total), 'x');
      const std::vector<uint64_t> got = gs::read_ranges(input, nullptr, offsets, lengths, 3, got_bytes.data());
      bool ok = got.size() == offsets.size();
      uint64_t at = 0;
      for (std::size_t i = 0; ok && i < offsets.size(); ++i) {
        const uint64_t want = offsets[i] >= bytes.size() ? 0 : std::min<uint64_t>(lengths[i], bytes.size() - offsets[i]);
        ok = got[i] == want && std::memcmp(got_bytes.data() + at, bytes.data() + offsets[i], want) == 0;
        for (uint64_t k = want; ok && k < lengths[i]; ++k) ok = got_bytes[at + k] == 0;
        at += lengths[i];
      }
      report("read_ranges: many small reads, cut at the end", ok);
    }
  } catch (const std::exception& e) {
    report("unexpected exception", false, e.what());
  }
  std::remove(input.c_str());
  std::remove(truncated.c_str());
  std::printf("%s: %d check(s) failed\n", failures ? "FAILED" : "PASSED", failures);
  return failures ? 1 : 0;
}
