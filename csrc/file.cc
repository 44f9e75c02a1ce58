#include "file.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <vector>

namespace gs {

static std::string errno_text(int err) { return std::strerror(err); }

static constexpr uint64_t kPage = 4096;

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
  const int64_t mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  if (static_cast<uint64_t>(st.st_dev) != expected.device || static_cast<uint64_t>(st.st_ino) != expected.inode ||
      static_cast<uint64_t>(st.st_size) != expected.size || mtime_ns != expected.mtime_ns)
    throw IoError(path_ + ": the file changed after its header was read (size " + std::to_string(expected.size) +
                  " -> " + std::to_string(st.st_size) + ", inode " + std::to_string(expected.inode) + " -> " +
                  std::to_string(st.st_ino) + "); it was replaced or rewritten during the load: load it again");
}

void File::drop_cache(uint64_t offset, std::size_t n) const noexcept {
  ::posix_fadvise(fd_, static_cast<off_t>(offset), static_cast<off_t>(n), POSIX_FADV_DONTNEED);
}

void File::advise_sequential() const noexcept {
  ::posix_fadvise(fd_, 0, 0, POSIX_FADV_SEQUENTIAL);
}

Mapping::Mapping(const File& file) {
  if (file.size() == 0) return;
  void* p = ::mmap(nullptr, file.size(), PROT_READ, MAP_SHARED, file.fd(), 0);
  if (p == MAP_FAILED) return;
  addr_ = p;
  length_ = file.size();
}

Mapping::~Mapping() noexcept {
  if (addr_) ::munmap(addr_, length_);
}

bool Mapping::cached(uint64_t offset, std::size_t n) const {
  if (!addr_ || offset >= length_) return false;
  const uint64_t first = offset / kPage * kPage;
  const uint64_t end = std::min<uint64_t>(offset + n, length_);
  std::vector<unsigned char> pages((end - first + kPage - 1) / kPage);
  if (pages.empty()) return true;
  if (::mincore(static_cast<char*>(addr_) + first, end - first, pages.data()) != 0) return false;
  for (unsigned char p : pages)
    if (!(p & 1)) return false;
  return true;
}

void populate_writable(void* addr, std::size_t n) noexcept {
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(addr) + kPage - 1) / kPage * kPage;
  const uintptr_t end = (reinterpret_cast<uintptr_t>(addr) + n) / kPage * kPage;
  if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_POPULATE_WRITE);
}

}  // namespace gs
