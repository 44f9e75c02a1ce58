// Micro-benchmark of ways to move a file into fresh anonymous memory, without
// gemma_stream: the experiments behind benchmarks/NOTES.md.
//
//   g++ -O2 -std=c++17 -pthread benchmarks/engine_micro.cc -o /tmp/engine_micro
//   (or: cmake -S . -B build -DGEMMA_STREAM_BENCH_MICRO=ON && cmake --build build --target engine_micro)
//   /tmp/engine_micro FILE METHOD THREADS CHUNK_MIB [--huge] [--cold] [--offset N] [--shared-fd] [--interleave]
//
// METHOD: pread | populate_pread (MADV_POPULATE_WRITE, then pread) | pread_drop
// (pread, then DONTNEED) | odirect (O_DIRECT straight into page-aligned memory) |
// odirect_bounce (O_DIRECT into an aligned per-thread buffer, then memcpy) |
// mmap | mmap_seq | mmap_populate | mmap_dontneed (mmap the file, memcpy out) |
// touch (fault the destination only, no file).
// By default each thread reads its own contiguous part of the file through its
// own descriptor; --interleave hands out chunks round-robin instead, and
// --shared-fd makes all threads share one descriptor. --offset N starts the
// destination N bytes into a page; --huge madvises it MADV_HUGEPAGE; --cold
// evicts the file first.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

void read_all(int fd, char* dst, size_t n, size_t off) {
  size_t done = 0;
  while (done < n) {
    const ssize_t got = pread(fd, dst + done, n - done, static_cast<off_t>(off + done));
    if (got < 0) { perror("pread"); std::exit(1); }
    if (got == 0) return;  // O_DIRECT: the last block rounds up past the end of the file
    done += static_cast<size_t>(got);
  }
}

void populate(char* p, size_t n) {
  const uintptr_t a = (reinterpret_cast<uintptr_t>(p) + 4095) & ~uintptr_t(4095);
  const uintptr_t b = (reinterpret_cast<uintptr_t>(p) + n) & ~uintptr_t(4095);
  if (b > a) madvise(reinterpret_cast<void*>(a), b - a, 23 /* MADV_POPULATE_WRITE */);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: %s FILE METHOD THREADS CHUNK_MIB [--huge] [--cold] [--offset N] "
                 "[--shared-fd] [--interleave]\n", argv[0]);
    return 2;
  }
  const std::string path = argv[1], method = argv[2];
  const int threads = std::atoi(argv[3]);
  const size_t chunk = static_cast<size_t>(std::atof(argv[4]) * (1 << 20));
  bool huge = false, cold = false, shared_fd = false, interleave = false;
  size_t offset = 0;
  for (int i = 5; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--huge") huge = true;
    else if (a == "--cold") cold = true;
    else if (a == "--shared-fd") shared_fd = true;
    else if (a == "--interleave") interleave = true;
    else if (a == "--offset" && i + 1 < argc) offset = std::strtoul(argv[++i], nullptr, 10);
  }
  const int fd0 = open(path.c_str(), O_RDONLY);
  if (fd0 < 0) { perror("open"); return 1; }
  struct stat st;
  fstat(fd0, &st);
  const size_t size = static_cast<size_t>(st.st_size);
  if (cold) posix_fadvise(fd0, 0, 0, POSIX_FADV_DONTNEED);
  const size_t huge_page = 2u << 20;
  const size_t alloc = (size + 2 * huge_page) & ~(huge_page - 1);

  struct rusage r0;
  getrusage(RUSAGE_SELF, &r0);
  const double t0 = now();
  char* base = static_cast<char*>(mmap(nullptr, alloc + huge_page, PROT_READ | PROT_WRITE,
                                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  char* dst = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(base) + huge_page - 1) & ~uintptr_t(huge_page - 1));
  if (huge) madvise(dst, alloc, MADV_HUGEPAGE);
  dst += offset;
  char* map = nullptr;
  if (method.rfind("mmap", 0) == 0) {
    map = static_cast<char*>(mmap(nullptr, size, PROT_READ, MAP_PRIVATE | (method == "mmap_populate" ? MAP_POPULATE : 0),
                                  fd0, 0));
    if (method == "mmap_seq") madvise(map, size, MADV_SEQUENTIAL);
  }
  std::atomic<size_t> next{0};
  const size_t share = (size / threads + chunk - 1) / chunk * chunk;
  auto work = [&](int me) {
    const bool direct = method.rfind("odirect", 0) == 0;
    const int fd = shared_fd && !direct ? fd0 : open(path.c_str(), O_RDONLY | (direct ? O_DIRECT : 0));
    char* bounce = method == "odirect_bounce" ? static_cast<char*>(std::aligned_alloc(4096, chunk + 8192)) : nullptr;
    size_t mine = static_cast<size_t>(me) * share;
    const size_t my_end = std::min(size, (static_cast<size_t>(me) + 1) * share);
    while (true) {
      size_t off, n;
      if (interleave) {
        off = next.fetch_add(chunk);
        if (off >= size) break;
        n = std::min(chunk, size - off);
      } else {
        off = mine;
        if (off >= my_end) break;
        n = std::min(chunk, my_end - off);
        mine += n;
      }
      if (method == "pread") {
        read_all(fd, dst + off, n, off);
      } else if (method == "populate_pread") {
        populate(dst + off, n);
        read_all(fd, dst + off, n, off);
      } else if (method == "pread_drop") {
        read_all(fd, dst + off, n, off);
        posix_fadvise(fd, static_cast<off_t>(off), static_cast<off_t>(n), POSIX_FADV_DONTNEED);
      } else if (method == "odirect") {
        read_all(fd, dst + off, (n + 4095) & ~size_t(4095), off);  // needs --offset 0
      } else if (method == "odirect_bounce") {
        // a tensor at an odd file offset: read the aligned cover, copy the middle out
        const size_t lo = off & ~size_t(4095), hi = (off + n + 4095) & ~size_t(4095);
        read_all(fd, bounce, hi - lo, lo);
        std::memcpy(dst + off, bounce + (off - lo), n);
      } else if (method == "touch") {
        for (size_t i = 0; i < n; i += 4096) dst[off + i] = 1;
      } else if (map) {
        std::memcpy(dst + off, map + off, n);
        if (method == "mmap_dontneed") madvise(map + (off & ~size_t(4095)), n, MADV_DONTNEED);
      } else {
        std::fprintf(stderr, "unknown method %s\n", method.c_str());
        std::exit(2);
      }
    }
    std::free(bounce);
    if (fd != fd0) close(fd);
  };
  std::vector<std::thread> pool;
  for (int i = 0; i < threads; ++i) pool.emplace_back(work, i);
  for (auto& t : pool) t.join();
  const double seconds = now() - t0;
  struct rusage r1;
  getrusage(RUSAGE_SELF, &r1);
  const double user = (r1.ru_utime.tv_sec - r0.ru_utime.tv_sec) + 1e-6 * (r1.ru_utime.tv_usec - r0.ru_utime.tv_usec);
  const double sys = (r1.ru_stime.tv_sec - r0.ru_stime.tv_sec) + 1e-6 * (r1.ru_stime.tv_usec - r0.ru_stime.tv_usec);
  std::printf("%-15s threads %d chunk %5.1f MiB%s%s offset %zu: %.3f s  %.2f GB/s  user %.2f s  sys %.2f s  "
              "minor faults %ld\n", method.c_str(), threads, chunk / 1048576.0, huge ? " huge" : "", cold ? " cold" : "",
              offset, seconds, size / seconds / 1e9, user, sys, r1.ru_minflt - r0.ru_minflt);
  return 0;
}
