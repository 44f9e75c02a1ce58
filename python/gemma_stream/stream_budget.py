"""The memory of ``iter_tensors``' windows: buffers handed out, recycled and counted until freed.

See :mod:`gemma_stream.stream` for the bound this keeps (``window_bytes``).
"""

from __future__ import annotations

import collections
import threading
import time
import weakref

import numpy as np
import torch

__all__ = ["ALIGN", "WindowBudget", "aligned"]

ALIGN = 64   # each tensor of a window starts on a cache line of the window's buffer


class WindowBudget:
    """Buffers for windows (``slab_bytes`` each, recycled), and the windows handed from reader to caller.

    A window's tensors are views of one buffer.  The buffer comes back when the
    last of them is freed (a finalizer on the array the storage holds, run in
    whichever thread drops the last reference, usually the caller's) and is
    kept for the next window while buffers in use and kept fit in ``limit``:
    reused pages need no fresh page faults, which cost as much as the copy on
    a busy machine.  The lock is reentrant because a finalizer may run while
    this thread already holds it; the caller takes windows under the same lock,
    so "the caller is waiting and nothing is ready" is seen atomically.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.slab_bytes = max(ALIGN, limit // 2 // ALIGN * ALIGN)
        self.alive = 0                 # bytes of buffers with live tensors
        self.free: list[np.ndarray] = []
        self.ready: collections.deque = collections.deque()
        self.consumer_waiting = False
        self.waited_seconds = 0.0      # the caller's time blocked in take(): reads it did not overlap
        self.stopped = False
        self.cond = threading.Condition(threading.RLock())

    def _release_mapped(self, nbytes: int) -> None:
        with self.cond:
            self.alive -= nbytes
            self.cond.notify_all()

    def reserve_mapped(self, array: np.ndarray) -> bool:
        """Count a window's mapping (``array`` views it) once it fits, as ``buffer`` does; the count
        drops when the array, kept alive by the window's tensors alone, is freed.  False when closed."""
        with self.cond:
            while not self.stopped and self.alive and self.alive + array.nbytes > self.limit and \
                    not self._starving():
                self.cond.wait()
            if self.stopped:
                return False
            if self.alive + len(self.free) * self.slab_bytes + array.nbytes > self.limit:
                self.free.clear()
            self.alive += array.nbytes
        weakref.finalize(array, self._release_mapped, array.nbytes)
        return True

    def _release(self, buffer: np.ndarray) -> None:
        with self.cond:
            self.alive -= buffer.nbytes
            if buffer.nbytes == self.slab_bytes and self.alive + (len(self.free) + 1) * self.slab_bytes <= self.limit:
                self.free.append(buffer)
            self.cond.notify_all()

    def _starving(self) -> bool:
        return self.consumer_waiting and not self.ready

    def buffer(self, nbytes: int) -> torch.Tensor | None:
        """A uint8 tensor of at least ``nbytes`` (a slab, or its own buffer when larger), once it fits:
        a free slab, room under ``limit``, nothing of ours alive (a larger tensor is read alone), or
        the caller waiting for a window while it holds all that is alive.  None when closed."""
        size = self.slab_bytes if nbytes <= self.slab_bytes else nbytes
        with self.cond:
            while not self.stopped and not (size == self.slab_bytes and self.free) and self.alive and \
                    self.alive + len(self.free) * self.slab_bytes + size > self.limit and not self._starving():
                self.cond.wait()
            if self.stopped:
                return None
            if size == self.slab_bytes and self.free:
                slab = self.free.pop()
            else:
                self.free.clear()      # over the limit (a large tensor, a caller keeping tensors): no spares
                slab = np.empty(size, dtype=np.uint8)
            self.alive += slab.nbytes
        # the storage holds the only reference to this view of the slab: its finalizer says when the
        # window's last tensor is gone, and the slab itself lives on in the callback's arguments
        view = slab[:]
        weakref.finalize(view, self._release, slab)
        return torch.from_numpy(view)

    def put(self, window) -> None:
        with self.cond:
            self.ready.append(window)
            self.cond.notify_all()

    def take(self):
        with self.cond:
            self.consumer_waiting = True
            self.cond.notify_all()
            if not self.ready:
                start = time.perf_counter()
                while not self.ready:
                    self.cond.wait()
                self.waited_seconds += time.perf_counter() - start
            self.consumer_waiting = False
            return self.ready.popleft()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.ready.clear()
            self.free.clear()
            self.cond.notify_all()


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN
