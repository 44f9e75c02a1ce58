// RAII owners of a read-only file descriptor (pread loops, size, page-cache
// advice) and of a never-touched mapping that tells which pages are cached;
// and the madvise that prefaults a destination before a read.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace gs {

// An I/O failure: carries the path, offset and errno text in its message.
class IoError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// What identifies the file a header was validated from: a path renamed over
// (a checkpoint sync) or a file rewritten in place changes one of these.
struct FileIdentity {
  uint64_t device = 0, inode = 0, size = 0;
  int64_t mtime_ns = 0;
};

class File {
 public:
  explicit File(const std::string& path);
  ~File() noexcept;
  File(const File&) = delete;
  File& operator=(const File&) = delete;
  File(File&& other) noexcept;
  File& operator=(File&&) = delete;

  // Reads exactly n bytes at offset into dst, retrying short reads and EINTR.
  void read_exact(void* dst, std::size_t n, uint64_t offset) const;
  // Tells the kernel the range is no longer needed in the page cache. Only
  // whole pages inside the range are dropped; pass page-aligned ranges.
  void drop_cache(uint64_t offset, std::size_t n) const noexcept;
  // Tells the kernel the whole file will be read sequentially.
  void advise_sequential() const noexcept;

  // Throws IoError unless the open file is the one `expected` describes.
  void check_identity(const FileIdentity& expected) const;

  uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }
  int fd() const { return fd_; }

 private:
  std::string path_;
  int fd_ = -1;
  uint64_t size_ = 0;
};

// A read-only shared mapping of a whole file that is never read through: it
// only answers mincore() questions, which costs no I/O and no memory.
class Mapping {
 public:
  explicit Mapping(const File& file);  // an empty or unmappable file maps nothing
  ~Mapping() noexcept;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;

  // True when every page of [offset, offset + n) is in the page cache; false
  // when some page is not or the file could not be mapped.
  bool cached(uint64_t offset, std::size_t n) const;

 private:
  void* addr_ = nullptr;
  std::size_t length_ = 0;
};

// Faults in the whole pages inside [addr, addr + n) as writable before a
// read lands there (MADV_POPULATE_WRITE, Linux 5.14+; a no-op elsewhere).
// pread() into untouched memory otherwise takes each page fault in the middle
// of the kernel's copy, which costs 15% of a warm load when the destination
// and the file are not page-aligned alike (torch memory sits 64 bytes into a
// page). Pages only partly inside the range are left alone: they may belong
// to someone else.
void populate_writable(void* addr, std::size_t n) noexcept;

}  // namespace gs
