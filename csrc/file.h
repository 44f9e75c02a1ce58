// The platform layer: everything that differs between Linux, macOS and Windows
// lives here (and in file.cc), never in the engine's loops.
//  - File: a read-only handle with positional reads (pread / ReadFile with an
//    OVERLAPPED offset), its size, and page-cache advice where the OS has it.
//  - PageCacheProbe: tells which pages of a file are in the page cache, through
//    a never-touched mapping (mincore; nothing on Windows).
//  - populate_writable: prefaults a destination before a read (Linux).
//  - Portable helpers the engine needs: aligned allocation, overflow-checked
//    arithmetic, and which CPU features the quantizer may use.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace gs {

// The page and the largest page-cache folio (x86-64's PMD size) the engine
// rounds to: page-aligned buffers and cache drops, folio-aligned per-chunk
// drops. The one statement of each on the C++ side; Python's are in
// fileio.py (PAGE_BYTES, FOLIO_BYTES), checked equal by the tests.
constexpr uint64_t kPageBytes = 4096;
constexpr uint64_t kFolioBytes = 2u << 20;

// An I/O failure: carries the path, offset and errno text in its message.
class IoError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// How this platform takes a file's pages out of the page cache.
enum class CacheDrop {
  None,       // no way (Windows): cache="drop" keeps the pages, and says so
  AfterRead,  // posix_fadvise(POSIX_FADV_DONTNEED) on ranges already read (Linux, BSD)
  Bypass,     // fcntl(F_NOCACHE) before reading: pages are not kept (macOS)
};
CacheDrop cache_drop_support() noexcept;
const char* cache_drop_name(CacheDrop how) noexcept;  // "fadvise_dontneed", "f_nocache", "none"

// What identifies the file a header was validated from: a path renamed over
// (a checkpoint sync) or a file rewritten in place changes one of these.
struct FileIdentity {
  uint64_t device = 0, inode = 0, size = 0;
  int64_t mtime_ns = 0;
};

class PageCacheProbe;

class File {
 public:
  explicit File(const std::string& path);
  ~File() noexcept;
  File(const File&) = delete;
  File& operator=(const File&) = delete;
  File(File&& other) noexcept;
  File& operator=(File&&) = delete;

  // Reads exactly n bytes at offset into dst, retrying short reads and EINTR.
  // Safe to call from several threads at once (no shared file position).
  void read_exact(void* dst, std::size_t n, uint64_t offset) const;
  // Tells the kernel the range is no longer needed in the page cache. Only
  // whole pages inside the range are dropped; pass page-aligned ranges. A
  // no-op unless cache_drop_support() is AfterRead.
  void drop_cache(uint64_t offset, std::size_t n) const noexcept;
  // Asks the OS not to keep what this handle reads from now on (macOS
  // F_NOCACHE). A no-op unless cache_drop_support() is Bypass.
  void bypass_cache() const noexcept;
  // Tells the kernel the whole file will be read sequentially (POSIX_FADV_SEQUENTIAL,
  // macOS F_RDAHEAD; Windows gets FILE_FLAG_SEQUENTIAL_SCAN at open instead).
  void advise_sequential() const noexcept;
  // Asks the kernel to start reading [offset, offset + n) into the page cache and returns at
  // once (POSIX_FADV_WILLNEED); a no-op where there is no such advice (macOS, Windows).
  void advise_willneed(uint64_t offset, std::size_t n) const noexcept;

  // Throws IoError unless the open file is the one `expected` describes.
  void check_identity(const FileIdentity& expected) const;

  uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  friend class PageCacheProbe;
  friend void drop_settled(const File& file, const PageCacheProbe& probe) noexcept;
  std::string path_;
#ifdef _WIN32
  void* handle_ = nullptr;  // HANDLE; nullptr when moved from
#else
  int fd_ = -1;
#endif
  uint64_t size_ = 0;
};

// Which pages of a file are in the page cache. Holds a read-only shared
// mapping of the whole file that is never read through: it only answers
// mincore() questions, which costs no I/O and no memory. On Windows nothing
// is mapped and every range reads as not cached.
class PageCacheProbe {
 public:
  explicit PageCacheProbe(const File& file);  // an empty or unmappable file maps nothing
  ~PageCacheProbe() noexcept;
  PageCacheProbe(const PageCacheProbe&) = delete;
  PageCacheProbe& operator=(const PageCacheProbe&) = delete;

  // True when every page of [offset, offset + n) is in the page cache; false
  // when some page is not or the file could not be mapped.
  bool cached(uint64_t offset, std::size_t n) const;
  // Pages of the file in the page cache and readable (mincore).
  uint64_t resident_pages() const;

 private:
  void* addr_ = nullptr;
  std::size_t length_ = 0;
};

// Drops the whole file from the page cache, then again, 1 ms apart, while
// pages of it remain (for at most ~20 ms): a DONTNEED skips the pages a
// readahead still in flight holds locked, and they land afterwards. Pages
// someone has mapped stay: they are theirs. `probe` (of this file) counts them
// where the kernel has no cachestat.
void drop_settled(const File& file, const PageCacheProbe& probe) noexcept;

// Faults in the whole pages inside [addr, addr + n) as writable before a
// read lands there (MADV_POPULATE_WRITE, Linux 5.14+; a no-op elsewhere).
// pread() into untouched memory otherwise takes each page fault in the middle
// of the kernel's copy, which costs 15% of a warm load when the destination
// and the file are not page-aligned alike (torch memory sits 64 bytes into a
// page). Pages only partly inside the range are left alone: they may belong
// to someone else.
void populate_writable(void* addr, std::size_t n) noexcept;

// `bytes` rounded up to a multiple of `alignment` (a power of two), aligned to
// it; nullptr when out of memory. Release with free_aligned.
void* allocate_aligned(std::size_t alignment, std::size_t bytes) noexcept;
void free_aligned(void* p) noexcept;

// a * b and a + b; false (and *out untouched) when the result overflows 64 bits.
inline bool checked_mul_u64(uint64_t a, uint64_t b, uint64_t* out) {
  if (b != 0 && a > UINT64_MAX / b) return false;
  *out = a * b;
  return true;
}
inline bool checked_add_u64(uint64_t a, uint64_t b, uint64_t* out) {
  if (a > UINT64_MAX - b) return false;
  *out = a + b;
  return true;
}

// True when the CPU and the OS both support AVX2 (x86-64: CPUID leaf 7 and the
// YMM state enabled in XCR0); false on every other architecture.
bool cpu_has_avx2() noexcept;

}  // namespace gs
