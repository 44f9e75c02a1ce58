"""Zero-copy views for ``mode="mmap"``: tensors that live in a private mapping of the file.

Each file is mapped once, copy-on-write (``MAP_PRIVATE``, as ``torch.load(mmap=True)``
does): a write to a tensor gives that page a private copy and never reaches the
file. Every view holds a reference to its file's storage, so the mapping lives
exactly as long as some tensor uses it. Nothing is read here; pages come in
from the page cache when first touched.

Touching mapped weights in the model's order reads the file piecemeal, one
fault at a time; cold, that took 4.8 s for a 5 GB file that reads sequentially
in 2-3 s (benchmarks/NOTES.md, section 13).  ``Prefetch`` walks the mapped
ranges in file order on background threads, so the pages are on their way
before they are touched.  Whether to start it is :func:`gemma_stream.plan.choose_readahead`'s
call, on the facts gathered here (the mapped bytes, ``MemAvailable``); the
``madvise`` calls go through :mod:`gemma_stream.pagecache`.
"""

from __future__ import annotations

import errno
import os
import threading
import time

import torch

from . import fileio, pagecache
from .config import mem_available
from .errors import InternalError
from .formats.records import contiguous_strides, open_validated
from .layout import span_elements
from .plan import choose_readahead

__all__ = ["FileViews", "Prefetch", "join_extents", "readahead_window"]


_FAULT_STEP_MAX = 8 << 20        # one fault per 8 MiB at most (measured: 16 and 32 MiB left gaps)
_MIN_FAULT_WINDOW = 1 << 20      # below this readahead window, faults read too little: use WILLNEED
MERGE_GAP = 1 << 20              # mapped ranges closer than this are read ahead as one


def join_extents(extents) -> list[tuple[int, int, int]]:
    """``(file index, start, end)`` byte ranges sorted, overlaps and neighbours less than
    ``MERGE_GAP`` apart joined: what a read-ahead walks, in file order."""
    merged: list[tuple[int, int, int]] = []
    for index, start, end in sorted(extents):
        if merged and merged[-1][0] == index and start <= merged[-1][2] + MERGE_GAP:
            merged[-1] = (index, merged[-1][1], max(merged[-1][2], end))
        else:
            merged.append((index, start, end))
    return merged


def readahead_window(path: str) -> int | None:
    """The kernel's readahead window for the device holding ``path`` (sysfs ``read_ahead_kb``)."""
    try:
        dev = os.stat(path).st_dev
    except OSError:
        return None
    if not hasattr(os, "major"):  # Windows: no block device numbers, no sysfs
        return None
    node = f"{os.major(dev)}:{os.minor(dev)}"
    for candidate in (f"/sys/dev/block/{node}/queue/read_ahead_kb",
                      f"/sys/dev/block/{node}/../queue/read_ahead_kb",   # a partition: its disk's queue
                      f"/sys/class/bdi/{node}/read_ahead_kb"):
        try:
            with open(candidate) as f:
                return int(f.read()) * 1024
        except (OSError, ValueError):
            continue
    return None


class Prefetch:
    """Reads mapped byte ranges ahead, in file order, on daemon threads.

    Where the device's readahead window is large (1 MiB or more), each of
    ``threads`` workers in turn faults in one page per window with
    ``madvise(MADV_POPULATE_READ)``: the kernel reads the whole window around
    it, the workers walk the file together, a window apart, and each call
    returns once its window is in.  Cold, on 2 cores and an 8 MiB window, all
    weights of a 5 GB model were touched 1.5-2.2x sooner than with
    ``posix_fadvise(WILLNEED)`` over the same ranges, and sooner than
    transformers (NOTES.md, section 13).  Elsewhere (small windows, no
    ``madvise`` or an older kernel) one thread asks for the ranges with
    ``posix_fadvise(WILLNEED)`` in 2 MiB steps.  A hint only: errors are
    ignored, nothing is allocated, and the mappings stay alive while it runs.
    """

    # WILLNEED steps: Linux reads at most max(io_pages, ra_pages) per call and drops the rest of
    # the range (a 64 MiB step brought in 8 of a 14 MB file here); 2 MiB is under any device's limit
    STEP = 2 << 20

    def __init__(self, ranges: list[tuple[str, int, int, int]], threads: int = 2,
                 keep_alive: tuple = ()):
        self.ranges = ranges                       # (path, start, end, address of byte 0 of the file or 0)
        self.nbytes = sum(end - start for _, start, end, _ in ranges)
        self._keep_alive = keep_alive              # the storages behind the addresses
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._fell_back = False
        steps = self._fault_steps() if pagecache.has_madvise() and all(base for *_, base in ranges) else None
        if steps is not None:
            self.method = "fault"
            n = max(1, threads)
            jobs = [(self._fault, (steps[i::n],)) for i in range(n) if steps[i::n]]
        else:
            self.method = "willneed"
            jobs = [(self._willneed, ())]
        self._running = len(jobs)
        self._threads = [threading.Thread(target=self._worker, args=job, daemon=True, name="gemma_stream_prefetch")
                         for job in jobs]
        for thread in self._threads:
            thread.start()

    def _worker(self, work, args) -> None:
        try:
            work(*args)
        finally:
            with self._lock:
                self._running -= 1
                if self._running == 0:
                    self._keep_alive = ()    # the mappings may go when the tensors go

    def _fault_steps(self) -> list[int] | None:
        """Page addresses to fault in, one per readahead window, in file order (None: use WILLNEED)."""
        windows: dict[str, int | None] = {}
        steps = []
        for path, start, end, base in self.ranges:
            if path not in windows:
                windows[path] = readahead_window(path)
            window = windows[path]
            if window is None or window < _MIN_FAULT_WINDOW:
                return None
            # the kernel reads a window centred on the faulting page: fault mid-window, then the last page
            step = min(window, _FAULT_STEP_MAX)
            offsets = list(range(start + step // 2, end, step))
            if not offsets or offsets[-1] + step // 2 < end:
                offsets.append(end - 1)
            steps += [base + offset - (base + offset) % pagecache.KERNEL_PAGE_BYTES for offset in offsets]
        return steps

    def _fault(self, addresses: list[int]) -> None:
        for address in addresses:
            if self._cancel.is_set() or self._fell_back:
                return
            if pagecache.populate_read(address) == errno.EINVAL:
                with self._lock:   # a kernel without MADV_POPULATE_READ: one worker asks with WILLNEED
                    if self._fell_back:
                        return
                    self._fell_back = True
                    self.method = "willneed"
                self._willneed()
                return

    def _willneed(self) -> None:
        fds: dict[str, int | None] = {}   # one descriptor per file, however many ranges it has
        try:
            for path, start, end, _ in self.ranges:
                if self._cancel.is_set():
                    return
                if path not in fds:
                    try:
                        fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                    except OSError:
                        fds[path] = None
                fd = fds[path]
                if fd is None:
                    continue
                try:
                    pos = start
                    while pos < end and not self._cancel.is_set():
                        step = min(self.STEP, end - pos)
                        if not fileio.advise_willneed(fd, pos, step):
                            return  # no such advice here (Windows)
                        pos += step
                except OSError:
                    pass
        finally:
            for fd in fds.values():
                if fd is not None:
                    os.close(fd)

    @property
    def done(self) -> bool:
        """True once every range has been read in (fault) or asked for (WILLNEED)."""
        return not any(t.is_alive() for t in self._threads)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until ``done`` (or ``timeout`` seconds in all); returns ``done``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return self.done

    def cancel(self) -> None:
        """Stop after the current step (reads already queued still complete)."""
        self._cancel.set()


def _map_validated(path: str) -> torch.UntypedStorage:
    """A private mapping of the very file whose header was validated (``CheckpointFile.identity``).

    Mapped through ``/proc/self/fd`` of a descriptor checked with ``fstat``, so a file
    renamed over the path since cannot be mapped instead; where there is no ``/proc``
    the path is mapped and checked again afterwards.
    """
    fd = open_validated(path)
    try:
        proc = f"/proc/self/fd/{fd}"
        target = proc if os.path.exists(proc) else path
        storage = torch.UntypedStorage.from_file(target, shared=False, nbytes=os.fstat(fd).st_size)
        if target == path:
            fileio.close(open_validated(path))
        return storage
    finally:
        fileio.close(fd)


class FileViews:
    """Maps files on first use and cuts tensors out of them."""

    def __init__(self, files: list[str]):
        self.files = files
        self._storages: dict[int, torch.UntypedStorage] = {}
        self._extents: list[tuple[int, int, int]] = []   # (file index, first byte, end) of every view

    def _storage(self, file_index: int) -> torch.UntypedStorage:
        storage = self._storages.get(file_index)
        if storage is None:
            storage = self._storages[file_index] = _map_validated(self.files[file_index])
        return storage

    def view(self, file_index: int, byte_offset: int, dtype: torch.dtype, shape: tuple[int, ...],
             strides: tuple[int, ...] | None) -> torch.Tensor:
        """The tensor at ``byte_offset`` (a multiple of the item size) of one file."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        if byte_offset % itemsize:
            raise InternalError(f"byte offset {byte_offset} is not aligned to {dtype}: the planner maps only "
                                f"aligned tensors")
        storage = self._storage(file_index)
        strides = strides if strides is not None else contiguous_strides(shape)
        span = span_elements(shape, strides)
        if span:
            self._extents.append((file_index, byte_offset, byte_offset + span * itemsize))
        return torch.empty(0, dtype=dtype).set_(storage, byte_offset // itemsize, shape, strides)

    def ranges(self) -> list[tuple[str, int, int, int]]:
        """The views' byte ranges in file order, overlaps and neighbours joined, with the address
        at which each file is mapped.

        Ranges less than ``MERGE_GAP`` apart are joined too: a torch zip puts a local header
        (and padding) between every two storages, and thousands of small ranges walked one by
        one (one fault each, at each range's end) made the read-ahead lose to none at all on a
        4,172-tensor zip, cold (NOTES.md section 17); reading the few header bytes between them
        costs nothing."""
        return [(self.files[index], start, end, self._storages[index].data_ptr())
                for index, start, end in join_extents(self._extents)]

    def prefetch(self, policy: str = "auto", threads: int = 2) -> Prefetch | None:
        """Start reading what the views cover, in file order, in the background, if
        :func:`~gemma_stream.plan.choose_readahead` says so for ``policy`` ("auto": when
        it fits in ``MemAvailable`` with a fifth to spare and is not already in the page
        cache; "on"; "off"), or None.

        Warm or cold is decided first, on a sample of each file's pages (``pagecache.is_warm``: no
        I/O; where it cannot be known, as for a cold file): a whole-file ``mincore`` took as long as
        the rest of a warm 1 GiB load (NOTES.md 38)."""
        auto = policy == "auto"
        if auto and self._extents and pagecache.is_warm(sorted({self.files[index] for index, _, _ in self._extents}),
                                                        pagecache.RESIDENCY_SAMPLES):
            return None
        ranges = self.ranges()
        mapped_bytes = sum(end - start for _, start, end, _ in ranges)
        available = mem_available() if auto and mapped_bytes else None
        if not choose_readahead(policy, mapped_bytes, available, supported=hasattr(os, "posix_fadvise")):
            return None
        return Prefetch(ranges, threads, keep_alive=tuple(self._storages.values()))
