"""The one ctypes door to the page cache (madvise, MADV_POPULATE_READ, mincore), on a real file."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from gemma_stream import fileio, pagecache
from gemma_stream.benchmark.writers import evict

MiB = 1 << 20

pytestmark = pytest.mark.skipif(not pagecache.has_madvise() or not hasattr(os, "posix_fadvise"),
                                reason="no madvise/mincore through libc here")


@pytest.fixture
def cold_file(tmp_path):
    path = tmp_path / "pages.bin"
    path.write_bytes(os.urandom(8 * MiB + 100))
    evict([path])
    if pagecache.resident_bytes(path) > MiB:
        pytest.skip("this file system keeps pages after POSIX_FADV_DONTNEED (tmpfs?)")
    return path


def test_resident_bytes_follow_reads_and_drops(cold_file, tmp_path):
    size = os.path.getsize(cold_file)
    with open(cold_file, "rb") as f:
        f.read(2 * MiB)
    assert pagecache.resident_bytes(cold_file) >= 2 * MiB            # what was read (and its readahead)
    with open(cold_file, "rb") as f:
        while f.read(MiB):
            pass
    assert pagecache.resident_bytes(cold_file) == size               # whole pages, capped at the file size
    assert pagecache.resident_fraction([cold_file]) == 1.0
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert pagecache.resident_bytes(empty) == 0 and pagecache.resident_fraction([empty]) == 1.0
    evict([cold_file])
    assert pagecache.resident_fraction([cold_file, empty]) < 0.2
    with pytest.raises(FileNotFoundError):
        pagecache.resident_bytes(tmp_path / "absent.bin")


def test_sampled_residency_tells_warm_from_cold_and_half(cold_file):
    """``samples=``: a few pages spread over the file estimate the fraction (the read-ahead's
    warm-or-cold check), within a sample's resolution of the full count."""
    assert pagecache.resident_fraction([cold_file], samples=64) < 0.1
    with open(cold_file, "rb") as f:
        while f.read(MiB):
            pass
    assert pagecache.resident_fraction([cold_file], samples=64) == 1.0
    size = os.path.getsize(cold_file)
    fd = os.open(cold_file, os.O_RDONLY)
    try:
        fileio.drop_cache(fd, size // 2, size - size // 2)       # the second half leaves the cache
    finally:
        os.close(fd)
    full = pagecache.resident_fraction([cold_file])
    assert 0.4 < full < 0.6
    assert abs(pagecache.resident_fraction([cold_file], samples=64) - full) <= 2 / 64
    assert pagecache.resident_fraction([cold_file], samples=10**9) == full   # more samples than pages: all
    # half cached is neither warm nor cold: "auto" neither skips the read-ahead nor drops its pages
    assert not pagecache.is_warm([cold_file], 64) and not pagecache.is_cold([cold_file], 64)
    evict([cold_file])
    assert pagecache.is_cold([cold_file], 64) and not pagecache.is_warm([cold_file], 64)
    assert not pagecache.is_cold([cold_file.parent / "absent.bin"])   # unknown: not cold


def test_populate_read_brings_mapped_pages_in_without_touching_them(cold_file):
    """One call faults in the range and returns once it is read; nothing is read from Python."""
    size = os.path.getsize(cold_file)
    storage = torch.UntypedStorage.from_file(str(cold_file), shared=False, nbytes=size)
    before = pagecache.resident_bytes(cold_file)
    result = pagecache.populate_read(storage.data_ptr() + 4 * MiB + 123, 2 * MiB)   # unaligned start
    if result == errno.EINVAL:
        pytest.skip("kernel before 5.14: no MADV_POPULATE_READ")
    assert result == 0
    assert pagecache.resident_bytes(cold_file) >= before + 2 * MiB
    del storage


def test_madvise_reports_errno_instead_of_raising(cold_file):
    storage = torch.UntypedStorage.from_file(str(cold_file), shared=False, nbytes=os.path.getsize(cold_file))
    assert pagecache.madvise(storage.data_ptr() + 1, pagecache.KERNEL_PAGE_BYTES, 4) == 0    # MADV_DONTNEED, rounded
    assert pagecache.madvise(storage.data_ptr(), pagecache.KERNEL_PAGE_BYTES, 12345) == errno.EINVAL
    assert pagecache.KERNEL_PAGE_BYTES > 0 and fileio.FOLIO_BYTES % pagecache.KERNEL_PAGE_BYTES == 0


def test_pages_in_cache_and_drop_settled(cold_file):
    """The settled drop's question (cachestat, or mincore) sees reads, and the drop leaves nothing."""
    fd = os.open(cold_file, os.O_RDONLY)
    try:
        assert pagecache.pages_in_cache(fd, str(cold_file)) * pagecache.KERNEL_PAGE_BYTES <= MiB
        os.pread(fd, 3 * MiB, MiB)
        assert pagecache.pages_in_cache(fd, str(cold_file)) * pagecache.KERNEL_PAGE_BYTES >= 3 * MiB
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)     # a readahead of the whole file, in flight
        fileio.drop_settled(fd, str(cold_file))
        assert pagecache.pages_in_cache(fd, str(cold_file)) == 0
        assert pagecache.resident_bytes(cold_file) == 0
    finally:
        os.close(fd)
