// One section per platform: the POSIX one (Linux, macOS, BSD) and the Windows
// one. Each defines File, PageCacheProbe and populate_writable; the helpers at the
// end are shared. A function that needs to know more about an open file (its
// identity, say) goes next to the constructor of each section, which is where
// fstat / GetFileInformationByHandle already run.
#include "file.h"

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <vector>

#ifdef _WIN32
#ifndef NOMINMAX
#define NOMINMAX
#endif
#ifndef WIN32_LEAN_AND_MEAN
#define WIN32_LEAN_AND_MEAN
#endif
#include <malloc.h>
#include <windows.h>
#else
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__) || defined(_M_IX86)
#define GS_X86 1
#if defined(_MSC_VER) && !defined(__clang__)
#include <intrin.h>
#else
#include <cpuid.h>
#endif
#endif

namespace gs {

const char* cache_drop_name(CacheDrop how) noexcept {
  switch (how) {
    case CacheDrop::AfterRead: return "fadvise_dontneed";
    case CacheDrop::Bypass: return "f_nocache";
    case CacheDrop::None: break;
  }
  return "none";
}

#ifdef _WIN32
// ------------------------------------------------------------------- Windows

namespace {

std::string last_error_text(DWORD err) {
  char* text = nullptr;
  const DWORD n = FormatMessageA(FORMAT_MESSAGE_ALLOCATE_BUFFER | FORMAT_MESSAGE_FROM_SYSTEM |
                                     FORMAT_MESSAGE_IGNORE_INSERTS,
                                 nullptr, err, 0, reinterpret_cast<char*>(&text), 0, nullptr);
  std::string out = n && text ? std::string(text, n) : "Windows error " + std::to_string(err);
  if (text) LocalFree(text);
  while (!out.empty() && (out.back() == '\n' || out.back() == '\r' || out.back() == '.')) out.pop_back();
  return out;
}

// Paths arrive as UTF-8 (pybind11 encodes str that way); Windows wants UTF-16.
std::wstring widen(const std::string& path) {
  if (path.empty()) return std::wstring();
  const int n = MultiByteToWideChar(CP_UTF8, 0, path.data(), static_cast<int>(path.size()), nullptr, 0);
  if (n <= 0) throw IoError(path + ": cannot open: the path is not valid UTF-8");
  std::wstring wide(static_cast<std::size_t>(n), L'\0');
  MultiByteToWideChar(CP_UTF8, 0, path.data(), static_cast<int>(path.size()), &wide[0], n);
  return wide;
}

}  // namespace

CacheDrop cache_drop_support() noexcept { return CacheDrop::None; }

File::File(const std::string& path) : path_(path) {
  // Every reader here reads in file order: the sequential hint is an open flag
  // on Windows. Sharing delete/write like POSIX, where an open file may be
  // renamed or replaced under the reader.
  HANDLE h = CreateFileW(widen(path).c_str(), GENERIC_READ, FILE_SHARE_READ | FILE_SHARE_WRITE | FILE_SHARE_DELETE,
                         nullptr, OPEN_EXISTING, FILE_ATTRIBUTE_NORMAL | FILE_FLAG_SEQUENTIAL_SCAN, nullptr);
  if (h == INVALID_HANDLE_VALUE) throw IoError(path + ": cannot open: " + last_error_text(GetLastError()));
  BY_HANDLE_FILE_INFORMATION info;
  if (!GetFileInformationByHandle(h, &info)) {
    const DWORD err = GetLastError();
    CloseHandle(h);
    throw IoError(path + ": cannot stat: " + last_error_text(err));
  }
  handle_ = h;
  size_ = (static_cast<uint64_t>(info.nFileSizeHigh) << 32) | info.nFileSizeLow;
}

File::File(File&& other) noexcept : path_(std::move(other.path_)), handle_(other.handle_), size_(other.size_) {
  other.handle_ = nullptr;
}

File::~File() noexcept {
  if (handle_) CloseHandle(static_cast<HANDLE>(handle_));
}

void File::read_exact(void* dst, std::size_t n, uint64_t offset) const {
  char* out = static_cast<char*>(dst);
  std::size_t done = 0;
  while (done < n) {
    // ReadFile counts in DWORDs; the OVERLAPPED offset makes it positional
    // (a synchronous handle still waits for the read).
    const DWORD want = static_cast<DWORD>(std::min<std::size_t>(n - done, std::size_t(1) << 30));
    const uint64_t at = offset + done;
    OVERLAPPED where = {};
    where.Offset = static_cast<DWORD>(at & 0xFFFFFFFFu);
    where.OffsetHigh = static_cast<DWORD>(at >> 32);
    DWORD got = 0;
    if (!ReadFile(static_cast<HANDLE>(handle_), out + done, want, &got, &where)) {
      const DWORD err = GetLastError();
      if (err != ERROR_HANDLE_EOF)
        throw IoError(path_ + ": read of " + std::to_string(n - done) + " bytes at offset " + std::to_string(at) +
                      " failed: " + last_error_text(err));
      got = 0;
    }
    if (got == 0) {
      throw IoError(path_ + ": unexpected end of file at offset " + std::to_string(at) +
                    " (file shrank to fewer than " + std::to_string(offset + n) + " bytes?)");
    }
    done += got;
  }
}

void File::check_identity(const FileIdentity& expected) const {
  // Python's os.stat on Windows reports the same facts: st_dev is the volume serial number,
  // st_ino the file index, st_mtime_ns the last write time.
  BY_HANDLE_FILE_INFORMATION info;
  if (!GetFileInformationByHandle(handle_, &info))
    throw IoError(path_ + ": cannot stat: " + last_error_text(GetLastError()));
  const uint64_t inode = (static_cast<uint64_t>(info.nFileIndexHigh) << 32) | info.nFileIndexLow;
  const uint64_t size = (static_cast<uint64_t>(info.nFileSizeHigh) << 32) | info.nFileSizeLow;
  const uint64_t ticks = (static_cast<uint64_t>(info.ftLastWriteTime.dwHighDateTime) << 32) |
                         info.ftLastWriteTime.dwLowDateTime;  // 100 ns since 1601-01-01
  const int64_t mtime_ns = (static_cast<int64_t>(ticks) - 116444736000000000LL) * 100;
  if (info.dwVolumeSerialNumber != expected.device || inode != expected.inode || size != expected.size ||
      mtime_ns != expected.mtime_ns)
    throw IoError(path_ + ": the file changed after its header was read (size " + std::to_string(expected.size) +
                  " -> " + std::to_string(size) + "); it was replaced or rewritten during the load: load it again");
}

void File::drop_cache(uint64_t, std::size_t) const noexcept {}
void File::bypass_cache() const noexcept {}
void File::advise_sequential() const noexcept {}

void File::advise_willneed(uint64_t, std::size_t) const noexcept {}

PageCacheProbe::PageCacheProbe(const File&) {}
PageCacheProbe::~PageCacheProbe() noexcept {}
bool PageCacheProbe::cached(uint64_t, std::size_t) const { return false; }
uint64_t PageCacheProbe::resident_pages() const { return 0; }
void drop_settled(const File&, const PageCacheProbe&) noexcept {}

void populate_writable(void*, std::size_t) noexcept {}

void* allocate_aligned(std::size_t alignment, std::size_t bytes) noexcept {
  const std::size_t rounded = (std::max<std::size_t>(bytes, 1) + alignment - 1) & ~(alignment - 1);
  return _aligned_malloc(rounded, alignment);
}

void free_aligned(void* p) noexcept { _aligned_free(p); }

#else
// --------------------------------------------------------------------- POSIX

namespace {

std::string errno_text(int err) { return std::strerror(err); }

}  // namespace

CacheDrop cache_drop_support() noexcept {
#if defined(POSIX_FADV_DONTNEED) && !defined(__APPLE__)
  return CacheDrop::AfterRead;
#elif defined(F_NOCACHE)
  return CacheDrop::Bypass;
#else
  return CacheDrop::None;
#endif
}

File::File(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) throw IoError(path + ": cannot open: " + errno_text(errno));
  struct stat st;
  if (::fstat(fd_, &st) != 0) {
    const int err = errno;
    ::close(fd_);
    fd_ = -1;
    throw IoError(path + ": cannot stat: " + errno_text(err));
  }
  size_ = static_cast<uint64_t>(st.st_size);
}

File::File(File&& other) noexcept : path_(std::move(other.path_)), fd_(other.fd_), size_(other.size_) {
  other.fd_ = -1;
}

File::~File() noexcept {
  if (fd_ >= 0) ::close(fd_);
}

void File::read_exact(void* dst, std::size_t n, uint64_t offset) const {
  char* out = static_cast<char*>(dst);
  std::size_t done = 0;
  while (done < n) {
    const ssize_t got = ::pread(fd_, out + done, n - done, static_cast<off_t>(offset + done));
    if (got < 0) {
      if (errno == EINTR) continue;
      throw IoError(path_ + ": read of " + std::to_string(n - done) + " bytes at offset " +
                    std::to_string(offset + done) + " failed: " + errno_text(errno));
    }
    if (got == 0) {
      throw IoError(path_ + ": unexpected end of file at offset " + std::to_string(offset + done) +
                    " (file shrank to fewer than " + std::to_string(offset + n) + " bytes?)");
    }
    done += static_cast<std::size_t>(got);
  }
}

void File::check_identity(const FileIdentity& expected) const {
  struct stat st;
  if (::fstat(fd_, &st) != 0) throw IoError(path_ + ": cannot stat: " + errno_text(errno));
#ifdef __APPLE__
  const struct timespec& mtime = st.st_mtimespec;
#else
  const struct timespec& mtime = st.st_mtim;
#endif
  const int64_t mtime_ns = static_cast<int64_t>(mtime.tv_sec) * 1000000000 + mtime.tv_nsec;
  if (static_cast<uint64_t>(st.st_dev) != expected.device || static_cast<uint64_t>(st.st_ino) != expected.inode ||
      static_cast<uint64_t>(st.st_size) != expected.size || mtime_ns != expected.mtime_ns)
    throw IoError(path_ + ": the file changed after its header was read (size " + std::to_string(expected.size) +
                  " -> " + std::to_string(st.st_size) + ", inode " + std::to_string(expected.inode) + " -> " +
                  std::to_string(st.st_ino) + "); it was replaced or rewritten during the load: load it again");
}

void File::drop_cache(uint64_t offset, std::size_t n) const noexcept {
#if defined(POSIX_FADV_DONTNEED) && !defined(__APPLE__)
  ::posix_fadvise(fd_, static_cast<off_t>(offset), static_cast<off_t>(n), POSIX_FADV_DONTNEED);
#else
  (void)offset;
  (void)n;
#endif
}

void File::bypass_cache() const noexcept {
#if defined(F_NOCACHE) && !(defined(POSIX_FADV_DONTNEED) && !defined(__APPLE__))
  ::fcntl(fd_, F_NOCACHE, 1);
#endif
}

void File::advise_sequential() const noexcept {
#if defined(POSIX_FADV_SEQUENTIAL) && !defined(__APPLE__)
  ::posix_fadvise(fd_, 0, 0, POSIX_FADV_SEQUENTIAL);
#elif defined(F_RDAHEAD)
  ::fcntl(fd_, F_RDAHEAD, 1);
#endif
}

void File::advise_willneed(uint64_t offset, std::size_t n) const noexcept {
#if defined(POSIX_FADV_WILLNEED) && !defined(__APPLE__)
  ::posix_fadvise(fd_, static_cast<off_t>(offset), static_cast<off_t>(n), POSIX_FADV_WILLNEED);
#else
  (void)offset;
  (void)n;
#endif
}

PageCacheProbe::PageCacheProbe(const File& file) {
  if (file.size() == 0) return;
  void* p = ::mmap(nullptr, file.size(), PROT_READ, MAP_SHARED, file.fd_, 0);
  if (p == MAP_FAILED) return;
  addr_ = p;
  length_ = file.size();
}

PageCacheProbe::~PageCacheProbe() noexcept {
  if (addr_) ::munmap(addr_, length_);
}

namespace {

#ifdef __APPLE__
using PageState = char;  // Apple's mincore takes char *, Linux's unsigned char *
#else
using PageState = unsigned char;
#endif

// mincore of the mapping's bytes [first, end), `first` page-aligned: one entry
// per page, bit 0 set when the page is in the page cache; false when it fails.
bool residency(void* addr, uint64_t first, uint64_t end, std::vector<PageState>* pages) {
  pages->assign((end - first + kPageBytes - 1) / kPageBytes, 0);
  return pages->empty() || ::mincore(static_cast<char*>(addr) + first, end - first, pages->data()) == 0;
}

}  // namespace

bool PageCacheProbe::cached(uint64_t offset, std::size_t n) const {
  if (!addr_ || offset >= length_) return false;
  std::vector<PageState> pages;
  if (!residency(addr_, offset / kPageBytes * kPageBytes, std::min<uint64_t>(offset + n, length_), &pages))
    return false;
  for (PageState p : pages)
    if (!(p & 1)) return false;
  return true;
}

uint64_t PageCacheProbe::resident_pages() const {
  std::vector<PageState> pages;
  if (!addr_ || !residency(addr_, 0, length_, &pages)) return 0;
  uint64_t n = 0;
  for (PageState p : pages) n += p & 1;
  return n;
}

namespace {

// Pages of the file in the page cache, counting those still being read
// (cachestat, Linux 6.5+), which mincore does not show; -1 where the kernel
// has no cachestat.
int64_t pages_in_cache(int fd) noexcept {
#if defined(__linux__)
  struct {
    uint64_t off, len;
  } range{0, 0};  // len 0: to the end of the file
  struct {
    uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted;
  } stat{};
  if (::syscall(451 /* cachestat, one number on every architecture */, fd, &range, &stat, 0) != 0) return -1;
  return static_cast<int64_t>(stat.nr_cache);
#else
  (void)fd;
  return -1;
#endif
}

}  // namespace

void drop_settled(const File& file, const PageCacheProbe& probe) noexcept {
  file.drop_cache(0, 0);  // length 0: to the end of the file
  if (cache_drop_support() != CacheDrop::AfterRead) return;
  try {
    for (int i = 0; i < 20; ++i) {
      const int64_t present = pages_in_cache(file.fd_);
      if ((present < 0 ? probe.resident_pages() : static_cast<uint64_t>(present)) == 0) break;
      ::usleep(1000);
      file.drop_cache(0, 0);
    }
  } catch (const std::exception&) {
    // out of memory for the residency vector: the one drop above stands
  }
}

void populate_writable(void* addr, std::size_t n) noexcept {
#ifdef __linux__
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(addr) + kPageBytes - 1) / kPageBytes * kPageBytes;
  const uintptr_t end = (reinterpret_cast<uintptr_t>(addr) + n) / kPageBytes * kPageBytes;
  if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_POPULATE_WRITE);
#else
  (void)addr;
  (void)n;
#endif
}

void* allocate_aligned(std::size_t alignment, std::size_t bytes) noexcept {
  // posix_memalign rather than std::aligned_alloc: the latter is missing from
  // macOS before 10.15 and from MSVC.
  const std::size_t rounded = (std::max<std::size_t>(bytes, 1) + alignment - 1) & ~(alignment - 1);
  void* p = nullptr;
  return ::posix_memalign(&p, alignment, rounded) == 0 ? p : nullptr;
}

void free_aligned(void* p) noexcept { std::free(p); }

#endif
// ------------------------------------------------------------------- shared

#ifdef GS_X86
namespace {

void cpuid(unsigned leaf, unsigned sub, unsigned regs[4]) {
#if defined(_MSC_VER) && !defined(__clang__)
  int r[4];
  __cpuidex(r, static_cast<int>(leaf), static_cast<int>(sub));
  for (int i = 0; i < 4; ++i) regs[i] = static_cast<unsigned>(r[i]);
#else
  __cpuid_count(leaf, sub, regs[0], regs[1], regs[2], regs[3]);
#endif
}

uint64_t enabled_register_state() {  // XCR0
#if defined(_MSC_VER) && !defined(__clang__)
  return _xgetbv(0);
#else
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
#endif
}

}  // namespace
#endif

bool cpu_has_avx2() noexcept {
#ifdef GS_X86
  unsigned r[4];
  cpuid(0, 0, r);
  if (r[0] < 7) return false;
  cpuid(1, 0, r);
  const bool osxsave = r[2] & (1u << 27), avx = r[2] & (1u << 28);
  if (!osxsave || !avx) return false;
  if ((enabled_register_state() & 6) != 6) return false;  // XMM and YMM state saved by the OS
  cpuid(7, 0, r);
  return (r[1] & (1u << 5)) != 0;
#else
  return false;
#endif
}

}  // namespace gs
