"""The page cache from Python: ``madvise``, ``MADV_POPULATE_READ`` and ``mincore`` in one place.

The Python side calls libc through ctypes here and nowhere else (a ctypes call
releases the GIL, so read-ahead threads run beside the loader): the mmap
read-ahead (:mod:`gemma_stream.mapped`), the benchmark's cache probe
(:mod:`gemma_stream.benchmark.writers`) and the tests.  The C++ file layer
(``csrc/file.h``/``file.cc``: ``PageCacheProbe``, its ``madvise`` and residency probe)
is the native counterpart; the engine never comes through here.  Where libc
has no such call (Windows) the functions say so (``None``) instead of raising.

>>> from gemma_stream import pagecache
>>> pagecache.resident_bytes("model.safetensors")   # bytes of the file in the page cache, or None
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys

__all__ = ["KERNEL_PAGE_BYTES", "MADV_POPULATE_READ", "has_madvise", "is_cold", "is_warm", "madvise",
           "pages_in_cache", "populate_read", "resident_bytes", "resident_fraction", "WARM_FRACTION",
           "COLD_FRACTION", "RESIDENCY_SAMPLES"]

#: the kernel's page, as this process sees it: madvise and mincore work in whole pages from an
#: address aligned to it.  The engine's page and folio (``fileio.PAGE_BYTES`` / ``FOLIO_BYTES``, equal
#: to csrc/file.h's) are fixed numbers; this one is the running kernel's (16 KiB on Apple silicon).
KERNEL_PAGE_BYTES = mmap.PAGESIZE
#: ``madvise`` advice that faults the range in and returns once it is read (Linux 5.14+; older: EINVAL)
MADV_POPULATE_READ = 22

_UNLOADED = object()
_libc = _UNLOADED


def _load():
    """libc with ``madvise``, ``mincore``, ``mmap`` and ``munmap`` typed, or None (Windows)."""
    global _libc
    if _libc is _UNLOADED:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            libc.madvise.restype = ctypes.c_int
            libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
            libc.mincore.restype = ctypes.c_int
            libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_long]
            libc.mmap.restype = ctypes.c_void_p
            libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            libc.munmap.restype = ctypes.c_int
        except (OSError, AttributeError, TypeError):  # Windows: no CDLL(None), no madvise
            libc = None
        _libc = libc
    return _libc


def has_madvise() -> bool:
    """True where libc has ``madvise`` (not on Windows)."""
    return _load() is not None


def madvise(address: int, nbytes: int, advice: int) -> int | None:
    """``madvise(address, nbytes, advice)``: 0, the ``errno`` it failed with, or None where libc has none.

    ``address`` is rounded down to its page (madvise refuses an unaligned start).
    """
    libc = _load()
    if libc is None:
        return None
    start = address - address % KERNEL_PAGE_BYTES
    if libc.madvise(start, nbytes + (address - start), advice) == 0:
        return 0
    return ctypes.get_errno() or errno.EIO


def populate_read(address: int, nbytes: int = KERNEL_PAGE_BYTES) -> int | None:
    """Fault in the mapped pages of ``[address, address + nbytes)`` and return once they are read.

    The kernel reads its readahead window around a faulting page, so one page per
    window brings a whole file in.  Returns 0, the ``errno`` (``EINVAL``: a kernel
    before 5.14), or None where there is no ``madvise``.

    >>> populate_read(storage.data_ptr() + offset)   # 0 once that page is in memory
    """
    return madvise(address, nbytes, MADV_POPULATE_READ)


#: a file this much in the page cache counts as warm: nothing to read ahead (the copy and mmap
#: read-aheads, ``plan.choose_readahead``) and no local headers to ask for (the torch zip reader)
WARM_FRACTION = 0.95
#: a file at most this much in the page cache counts as cold (``is_cold``: ``cache="auto"`` may drop
#: a large one, ``api._resolve_cache``); between the two, a file partly cached by another reader
COLD_FRACTION = 0.05

#: pages per file sampled to decide warm or cold (``is_warm``): a whole-file ``mincore`` costs
#: 4-15 ms per GiB on this project's VM, 256 pages a fraction of a millisecond
RESIDENCY_SAMPLES = 256

#: mincore's vector byte -> its residency bit (the other bits are reserved)
_LOW_BIT = bytes(i & 1 for i in range(256))


def _resident_pages(libc, path: str, samples: int | None = None) -> tuple[int, int]:
    """(resident pages, pages) of one file, from ``mincore`` on a mapping that is never touched;
    with ``samples``, of that many pages spread evenly over the file (the kernel's ``mincore``
    walk costs ~4 ms per GiB; a sample of 256 pages, a fraction of a millisecond)."""
    size = os.path.getsize(path)
    if size == 0:
        return 0, 0
    pages = (size + KERNEL_PAGE_BYTES - 1) // KERNEL_PAGE_BYTES
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            error = ctypes.get_errno()
            raise OSError(error, f"mmap {path}: {os.strerror(error)}")
        try:
            if samples is None or samples >= pages:
                vector = (ctypes.c_ubyte * pages)()
                _mincore(libc, path, address, size, vector)
                return bytes(vector).translate(_LOW_BIT).count(1), pages   # in C: 0.3 ms for 1 GiB, not 10
            one = (ctypes.c_ubyte * 1)()
            resident = 0
            for k in range(samples):
                page = (2 * k + 1) * pages // (2 * samples)   # the middle of each of ``samples`` stretches
                _mincore(libc, path, address + page * KERNEL_PAGE_BYTES, KERNEL_PAGE_BYTES, one)
                resident += one[0] & 1
            return resident, samples
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)


def _mincore(libc, path: str, address: int, nbytes: int, vector) -> None:
    if libc.mincore(address, nbytes, vector) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"mincore {path}: {os.strerror(error)}")


def resident_bytes(path: str) -> int | None:
    """Bytes of the file now in the page cache (whole pages; None where there is no ``mincore``).

    >>> resident_bytes("model.safetensors") >= os.path.getsize("model.safetensors") - KERNEL_PAGE_BYTES  # warm
    """
    libc = _load()
    if libc is None:
        return None
    resident, _ = _resident_pages(libc, path)
    return min(resident * KERNEL_PAGE_BYTES, os.path.getsize(path))


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


def pages_in_cache(fd: int, path: str) -> int | None:
    """Pages of the file in the page cache, those still being read included; None without ``mincore``.

    ``cachestat`` (Linux 6.5+) counts the pages a readahead in flight holds,
    ``mincore`` (the fallback) does not.
    """
    libc = _load()
    if libc is None:
        return None
    if sys.platform.startswith("linux"):
        stat = _Cachestat()
        if libc.syscall(451, ctypes.c_int(fd), ctypes.byref(_CachestatRange(0, 0)), ctypes.byref(stat),  # cachestat
                        ctypes.c_uint(0)) == 0:
            return stat.nr_cache
    return _resident_pages(libc, path)[0]


def _known_fraction(paths, samples: int | None) -> float | None:
    """``resident_fraction``, or None where it cannot be known (no ``mincore``, or a file system
    that cannot map the files)."""
    try:
        return resident_fraction(paths, samples)
    except OSError:
        return None


def is_warm(paths, samples: int | None = None) -> bool | None:
    """Whether the files are in the page cache: at least ``WARM_FRACTION`` of their pages (of
    ``samples`` pages per file, when given); None where that cannot be known (no ``mincore``, or a
    file system that cannot map the files)."""
    fraction = _known_fraction(paths, samples)
    return None if fraction is None else fraction >= WARM_FRACTION


def is_cold(paths, samples: int | None = None) -> bool:
    """Whether the files are out of the page cache: at most ``COLD_FRACTION`` of their pages (of
    ``samples`` pages per file, when given); False where that cannot be known."""
    fraction = _known_fraction(paths, samples)
    return fraction is not None and fraction <= COLD_FRACTION


def resident_fraction(paths, samples: int | None = None) -> float | None:
    """Fraction of the files' pages in the page cache (1.0 for no pages; None without ``mincore``);
    ``samples``: estimated from at most that many pages per file, evenly spread (cheap, for a
    warm-or-cold decision; the files' sizes do not weigh the estimate then).

    >>> resident_fraction(["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    """
    libc = _load()
    if libc is None:
        return None
    resident = total = 0
    for path in paths:
        r, n = _resident_pages(libc, path, samples)
        resident, total = resident + r, total + n
    return resident / total if total else 1.0
