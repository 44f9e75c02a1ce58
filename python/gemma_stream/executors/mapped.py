"""Zero-copy views for ``mode="mmap"``: tensors that live in a private mapping of the file.

Each file is mapped once, copy-on-write (``MAP_PRIVATE``, as ``torch.load(mmap=True)``
does): a write to a tensor gives that page a private copy and never reaches the
file. Every view holds a reference to its file's storage, so the mapping lives
exactly as long as some tensor uses it. Nothing is read here; pages come in
from the page cache when first touched.

Touching mapped weights in the model's order reads the file out of order,
one fault-around window at a time; cold, that took 4.8 s for a 5 GB file
that reads sequentially in 2-3 s (benchmarks/NOTES.md, section 13).
``Prefetch`` asks the kernel for the mapped ranges in file order, on a
background thread, so the pages are on their way before they are touched.
"""

from __future__ import annotations

import os
import threading

import torch

from ..config import mem_available
from ..formats.records import contiguous_strides

__all__ = ["FileViews", "Prefetch"]


class Prefetch:
    """Readahead of byte ranges of files, in file order, on a daemon thread.

    ``posix_fadvise(WILLNEED)`` in 64 MiB steps: the kernel queues the reads and
    returns, so the thread costs no CPU to speak of and never holds the GIL
    while the disk works; a page that is touched before its read completes
    waits for that read instead of starting a small one of its own.  A hint
    only: errors are ignored and nothing is allocated in the process.
    """

    STEP = 64 << 20

    def __init__(self, ranges: list[tuple[str, int, int]]):
        self.ranges = ranges                       # (path, start, end), in the order to read
        self.nbytes = sum(end - start for _, start, end in ranges)
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gemma_stream_prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for path, start, end in self.ranges:
            if self._cancel.is_set():
                return
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                continue
            try:
                pos = start
                while pos < end and not self._cancel.is_set():
                    step = min(self.STEP, end - pos)
                    os.posix_fadvise(fd, pos, step, os.POSIX_FADV_WILLNEED)
                    pos += step
            except OSError:
                pass
            finally:
                os.close(fd)

    @property
    def done(self) -> bool:
        """True once every read has been asked for (not necessarily completed)."""
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every read has been asked for (or ``timeout`` seconds); returns ``done``."""
        self._thread.join(timeout)
        return self.done

    def cancel(self) -> None:
        """Ask for no more ranges (the reads already queued still complete)."""
        self._cancel.set()


class FileViews:
    """Maps files on first use and cuts tensors out of them."""

    def __init__(self, files: list[str]):
        self.files = files
        self._storages: dict[int, torch.UntypedStorage] = {}
        self._extents: list[tuple[int, int, int]] = []   # (file index, first byte, end) of every view

    def _storage(self, file_index: int) -> torch.UntypedStorage:
        storage = self._storages.get(file_index)
        if storage is None:
            path = self.files[file_index]
            storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=os.path.getsize(path))
            self._storages[file_index] = storage
        return storage

    def view(self, file_index: int, byte_offset: int, dtype: torch.dtype, shape: tuple[int, ...],
             strides: tuple[int, ...] | None) -> torch.Tensor:
        """The tensor at ``byte_offset`` (a multiple of the item size) of one file."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        assert byte_offset % itemsize == 0, "the planner maps only aligned tensors"
        storage = self._storage(file_index)
        strides = strides if strides is not None else contiguous_strides(shape)
        if all(shape):
            span = 1 + sum((n - 1) * s for n, s in zip(shape, strides))
            self._extents.append((file_index, byte_offset, byte_offset + span * itemsize))
        return torch.empty(0, dtype=dtype).set_(storage, byte_offset // itemsize, shape, strides)

    def _merged(self) -> list[tuple[str, int, int]]:
        """The views' byte ranges in file order, overlaps and neighbours joined."""
        merged: list[tuple[int, int, int]] = []
        for index, start, end in sorted(self._extents):
            if merged and merged[-1][0] == index and start <= merged[-1][2]:
                merged[-1] = (index, merged[-1][1], max(merged[-1][2], end))
            else:
                merged.append((index, start, end))
        return [(self.files[index], start, end) for index, start, end in merged]

    def prefetch(self, policy: str = "auto") -> Prefetch | None:
        """Start reading what the views cover, in file order, in the background.

        ``policy="auto"`` does so only when it fits in ``MemAvailable`` with a
        fifth to spare (otherwise the read-ahead would push out its own first
        pages, or the rest of the system's, before they are used); ``"on"``
        always, ``"off"`` never."""
        ranges = self._merged()
        if policy == "off" or not ranges or not hasattr(os, "posix_fadvise"):   # (macOS has none)
            return None
        if policy == "auto":
            available = mem_available()
            if available is None or sum(end - start for _, start, end in ranges) > 0.8 * available:
                return None
        return Prefetch(ranges)
