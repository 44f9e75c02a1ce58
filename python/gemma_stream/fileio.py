"""Positional file I/O for the pure-Python paths, on Linux, macOS and Windows.

The fallback executor reads one file from several threads at once, so every
read names its offset: ``os.preadv`` (Linux, BSD, macOS 11+ with Python 3.7+),
else ``os.pread`` (other POSIX systems), else a handle of the calling thread's
own, positioned with ``seek`` (Windows has neither call). Descriptors come from
:func:`open_read`, which remembers each file's path for those per-thread
handles, and go back through :func:`close`. Page-cache advice is given where
the OS has it and is a no-op elsewhere.

Example::

    fd = open_read("model.safetensors")
    try:
        (header_len,) = struct.unpack("<Q", pread(fd, 8, 0))
    finally:
        close(fd)
"""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from .errors import InternalError

__all__ = ["open_read", "close", "read_into", "pread", "write_at", "open_flags", "drop_cache",
           "advise_sequential", "advise_willneed", "advise_ranges", "bypass_cache", "cache_drop_support",
           "platform_cache_policy", "PAGE_BYTES", "FOLIO_BYTES"]

#: The page the executors round cache drops and buffers to, and the largest page-cache folio
#: (x86-64's PMD size; DONTNEED keeps a folio a range only partly covers). Stated once here; the
#: C++ engine's are csrc/file.h's kPageBytes / kFolioBytes (_native.PAGE_BYTES, FOLIO_BYTES),
#: checked equal by tests/test_native_binding.py.
PAGE_BYTES = 4096
FOLIO_BYTES = 2 << 20

# The os functions are looked up at call time (getattr), not at import: tests
# remove them to run the fallback as it runs on Windows and macOS.


def open_flags(flags: int) -> int:
    """``flags`` plus binary mode (Windows opens text mode otherwise) and close-on-exec where they exist."""
    return flags | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOINHERIT", 0)


class _OpenFile:
    """A descriptor's path, and the handles threads opened on it for seek + readinto."""

    def __init__(self, path: str):
        self.path = path
        self.local = threading.local()
        self.handles: list = []
        self.lock = threading.Lock()

    def thread_handle(self):
        handle = getattr(self.local, "handle", None)
        if handle is None:
            handle = open(self.path, "rb", buffering=0)
            with self.lock:
                self.handles.append(handle)
            self.local.handle = handle
        return handle

    def close(self) -> None:
        with self.lock:
            handles, self.handles = self.handles, []
        for handle in handles:
            handle.close()


_open: dict[int, _OpenFile] = {}
_open_lock = threading.Lock()
_write_lock = threading.Lock()


def open_read(path: str | os.PathLike) -> int:
    """Open ``path`` read-only for :func:`read_into` / :func:`pread`; release it with :func:`close`."""
    path = os.fspath(path)
    fd = os.open(path, open_flags(os.O_RDONLY))
    with _open_lock:
        _open[fd] = _OpenFile(path)
    return fd


def close(fd: int) -> None:
    """Close a descriptor from :func:`open_read`, and the per-thread handles opened on it."""
    with _open_lock:
        entry = _open.pop(fd, None)
    try:
        if entry is not None:
            entry.close()
    finally:
        os.close(fd)


def _entry(fd: int) -> _OpenFile:
    entry = _open.get(fd)
    if entry is None:
        raise InternalError(f"descriptor {fd} was not opened by gemma_stream.fileio.open_read")
    return entry


def read_into(fd: int, view: memoryview, offset: int) -> int:
    """Read up to ``len(view)`` bytes at ``offset`` into ``view``; returns the count (0 at end of file).

    Safe from several threads at once: no read moves a position another one uses.
    """
    preadv = getattr(os, "preadv", None)
    if preadv is not None:
        return preadv(fd, [view], offset)
    pread_ = getattr(os, "pread", None)
    if pread_ is not None:
        data = pread_(fd, len(view), offset)
        view[:len(data)] = data
        return len(data)
    handle = _entry(fd).thread_handle()
    handle.seek(offset)
    return handle.readinto(view) or 0


def pread(fd: int, n: int, offset: int) -> bytes:
    """Up to ``n`` bytes at ``offset`` (fewer at end of file), like ``os.pread``, on every OS."""
    pread_ = getattr(os, "pread", None)
    if pread_ is not None:
        return pread_(fd, n, offset)
    return _pread_portable(fd, n, offset)


#: below this many reads, :func:`pread_many` stays on the calling thread (starting threads costs more)
PARALLEL_READS = 256


def pread_many(fd: int, ranges: list[tuple[int, int]], threads: int = 1, advise: bool = False) -> list[bytes]:
    """``pread(fd, n, offset)`` of every ``(n, offset)``, in order, on up to ``threads`` threads.

    For thousands of small reads scattered over a file (a torch zip's local headers): each thread
    takes one contiguous run of the ranges, so its reads stay in file order, and the page faults
    or disk reads behind them overlap instead of queueing on one thread (on a VM whose host had
    reclaimed the cached pages, 2,065 headers took 55 ms on one thread and 32 ms on two).
    ``advise``: for a file that is not cached, first ask for every range with
    ``posix_fadvise(WILLNEED)``, so the disk has them all queued at once rather than ``threads``
    at a time (a cold zip's 2,065 headers: 140-177 ms, then 53-84 ms)."""
    if advise:
        advise_ranges(fd, ranges)
    pread_ = getattr(os, "pread", None) or _pread_portable
    if threads <= 1 or len(ranges) < PARALLEL_READS:
        return [pread_(fd, n, offset) for n, offset in ranges]
    threads = min(threads, len(ranges) // (PARALLEL_READS // 2))
    step = -(-len(ranges) // threads)

    def part(first: int) -> list[bytes]:
        return [pread_(fd, n, offset) for n, offset in ranges[first:first + step]]

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gemma_stream_pread") as pool:
        parts = list(pool.map(part, range(0, len(ranges), step)))
    return [data for chunk in parts for data in chunk]


def advise_ranges(fd: int, ranges: list[tuple[int, int]]) -> None:
    """``posix_fadvise(WILLNEED)`` on every ``(n, offset)``: a hint, so refusals are ignored (the
    reads that follow say what the file holds); nothing where the OS has no such advice."""
    try:
        for n, offset in ranges:
            if not advise_willneed(fd, offset, n):
                break   # no such advice here
    except OSError:
        pass


def _pread_portable(fd: int, n: int, offset: int) -> bytes:
    buffer = bytearray(n)
    view = memoryview(buffer)
    done = 0
    while done < n:
        got = read_into(fd, view[done:], offset + done)
        if got == 0:
            break
        done += got
    del view
    return bytes(buffer[:done])


def write_at(fd: int, data: memoryview | bytes, offset: int) -> int:
    """Write ``data`` at ``offset`` (``os.pwrite``; seek + write under a lock where it is missing)."""
    pwrite = getattr(os, "pwrite", None)
    if pwrite is not None:
        return pwrite(fd, data, offset)
    with _write_lock:
        os.lseek(fd, offset, os.SEEK_SET)
        return os.write(fd, data)


def cache_drop_support() -> str:
    """How this OS drops a file from the page cache, named as ``_native.cache_drop()`` names it.

    ``"fadvise_dontneed"`` (Linux, BSD: after reading), ``"f_nocache"`` (macOS:
    reads bypass the cache) or ``"none"`` (Windows: ``cache="drop"`` keeps pages).
    """
    if hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_DONTNEED"):
        return "fadvise_dontneed"
    if sys.platform == "darwin":
        return "f_nocache"
    return "none"


def drop_cache(fd: int, offset: int, nbytes: int) -> bool:
    """Drop the whole pages of a range already read from the page cache; False where the OS cannot."""
    fadvise = getattr(os, "posix_fadvise", None)
    if fadvise is None or not hasattr(os, "POSIX_FADV_DONTNEED"):
        return False
    fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
    return True


def drop_settled(fd: int, path: str) -> None:
    """Drop the whole file from the page cache, then again, 1 ms apart, while pages of it remain.

    A ``DONTNEED`` skips the pages a readahead still in flight holds locked, and
    they land afterwards; retries for at most ~20 ms (pages someone has mapped
    stay).  The C++ engine's ``drop_settled`` (csrc/file.cc).
    """
    if not drop_cache(fd, 0, 0) or cache_drop_support() != "fadvise_dontneed":
        return
    from .pagecache import pages_in_cache

    for _ in range(20):
        if not pages_in_cache(fd, path):
            return
        time.sleep(0.001)
        drop_cache(fd, 0, 0)


def bypass_cache(fd: int) -> bool:
    """macOS: ask the OS not to keep what ``fd`` reads from now on (``F_NOCACHE``); False elsewhere."""
    if cache_drop_support() != "f_nocache":
        return False
    import fcntl
    fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", 48), 1)
    return True


def advise_sequential(fd: int) -> None:
    """Tell the OS ``fd`` will be read front to back (a no-op where there is no such advice)."""
    fadvise = getattr(os, "posix_fadvise", None)
    if fadvise is not None and hasattr(os, "POSIX_FADV_SEQUENTIAL"):
        fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)


def advise_willneed(fd: int, offset: int, nbytes: int) -> bool:
    """Start reading a range into the page cache in the background; False where the OS has no such advice."""
    fadvise = getattr(os, "posix_fadvise", None)
    if fadvise is None or not hasattr(os, "POSIX_FADV_WILLNEED"):
        return False
    fadvise(fd, offset, nbytes, os.POSIX_FADV_WILLNEED)
    return True


_warned_no_drop = False


def platform_cache_policy(cache: str, *, explicit: bool) -> str:
    """``cache`` ("keep"/"drop") as this OS can honour it: "keep" where nothing drops pages (Windows).

    An explicit ``cache="drop"`` that cannot be honoured warns once per process;
    ``cache="auto"`` falls back to "keep" silently. The load report then says "keep".
    """
    global _warned_no_drop
    if cache != "drop" or cache_drop_support() != "none":
        return cache
    if explicit and not _warned_no_drop:
        _warned_no_drop = True
        import warnings
        warnings.warn("gemma_stream: cache='drop' is not supported on this platform (no posix_fadvise or "
                      "F_NOCACHE); the checkpoint stays in the page cache (LoadReport.cache says 'keep')",
                      RuntimeWarning, stacklevel=4)
    return "keep"
