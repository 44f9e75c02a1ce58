"""``iter_tensors``: a checkpoint as a stream of ``(name, tensor)`` with bounded memory.

The same pipeline as ``load_state_dict`` (format reader -> plan -> executor),
run one *window* at a time: a background thread plans and reads the next
window of tensors on the engine's threads while the caller consumes the
current one (the native engine releases the GIL while it copies; the Python
executor's reads and conversions release it too).  This is what an engine with
a ``load_weights(iterable)`` API (vLLM, SGLang) consumes.

Memory: the tensors of a window are views of one buffer of half of
``window_bytes``, counted from the moment it is taken until the last of its
tensors is freed (a finalizer), so tensors the caller drops promptly give the
buffer back at once (it is reused for a later window, without fresh page
faults) and tensors the caller keeps stall the read-ahead.  One window is read
while the previous one is consumed.  A tensor larger than half the window is
read alone, into its own buffer, once everything before it has been freed.
When the caller waits for the next tensor while holding on to earlier ones
(``list(gs.iter_tensors(...))``), the reader goes on regardless: the memory
the caller keeps is the caller's.
"""

from __future__ import annotations

import collections
import os
import threading
import weakref
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .config import config, mem_available
from .dtypes import FLOAT_DTYPES
from .errors import GemmaStreamError, UsageError
from .fileio import platform_cache_policy
from .executors import get_executor, run_plan_jobs
from .formats import Checkpoint, TensorRecord, open_checkpoint
from .plan import CACHE_POLICIES, Rename, choose_cache, make_plan

__all__ = ["iter_tensors", "stream_checkpoint", "DEFAULT_WINDOW_BYTES"]

#: 256 MiB: two 128 MiB reads in flight keep 2 engine threads busy (16 MiB chunks) and stay small
#: next to any model worth streaming
DEFAULT_WINDOW_BYTES = 256 << 20
_FLOATS = ("f16", "bf16", "f32")
_ALIGN = 64   # each tensor of a window starts on a cache line of the window's buffer


@dataclass(frozen=True)
class _Item:
    record: TensorRecord
    name: str
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.record.numel * self.dtype.itemsize


@dataclass(frozen=True)
class _Totals:
    """What ``choose_cache`` weighs: bytes read and bytes held (here at most one window)."""

    nbytes: int
    dst_nbytes: int


class _Budget:
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
        self.slab_bytes = max(_ALIGN, limit // 2 // _ALIGN * _ALIGN)
        self.alive = 0                 # bytes of buffers with live tensors
        self.free: list[np.ndarray] = []
        self.ready: collections.deque = collections.deque()
        self.consumer_waiting = False
        self.stopped = False
        self.cond = threading.Condition(threading.RLock())

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
            while not self.ready:
                self.cond.wait()
            self.consumer_waiting = False
            return self.ready.popleft()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.ready.clear()
            self.free.clear()
            self.cond.notify_all()


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _windows(items: list[_Item], slab_bytes: int) -> list[list[_Item]]:
    """Consecutive items that fit one slab each (a larger item is a window of its own)."""
    out: list[list[_Item]] = []
    size = 0
    for item in items:
        if not out or size + _aligned(item.nbytes) > slab_bytes:
            out.append([])
            size = 0
        out[-1].append(item)
        size += _aligned(item.nbytes)
    return out


def _items(ckpt: Checkpoint, *, dtype: torch.dtype | None, keys, rename: Rename) -> list[_Item]:
    from .api import _select, normalize_names

    if rename is not None and not (isinstance(rename, dict) or callable(rename)):
        raise TypeError(f"rename must be a dict or a callable, not {type(rename).__name__}")
    ckpt = _select(ckpt, keys)
    names = normalize_names(ckpt, rename)
    order = {f: i for i, f in enumerate(ckpt.files)}
    items, seen = [], {}
    for record in sorted(ckpt.records, key=lambda r: (order[r.file], r.byte_offset, r.name)):
        name = names.get(record.name)
        if name is None:
            continue
        if name in seen:
            raise GemmaStreamError(f"{record.file}: rename gives {name!r} to both {seen[name]!r} and "
                                   f"{record.name!r}")
        seen[name] = record.name
        out = dtype if dtype is not None and record.dtype.name in _FLOATS else record.dtype.torch
        items.append(_Item(record, name, out))
    return items


class _Reader(threading.Thread):
    """Plans and reads one window after the other into ``ready`` (None ends the stream)."""

    def __init__(self, ckpt: Checkpoint, windows: list[list[_Item]], budget: _Budget, *, backend: str,
                 threads: int, drop_cache: bool):
        super().__init__(name="gemma_stream_iter", daemon=True)
        self.ckpt, self.windows, self.budget = ckpt, windows, budget
        self.executor = get_executor(backend)
        self.threads, self.drop_cache = threads, drop_cache

    def run(self) -> None:
        try:
            for window in self.windows:
                buffer = self.budget.buffer(sum(_aligned(item.nbytes) for item in window))
                if buffer is None:
                    return
                tensors = self._read(window, buffer)
                del buffer   # from here the window's tensors alone keep its buffer alive
                self.budget.put(tensors)
                del tensors
            self.budget.put(None)
        except BaseException as e:  # re-raised on the caller's thread
            self.budget.put(e)

    def _read(self, window: list[_Item], buffer: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        tensors, offset = {}, 0
        for item in window:
            tensors[item.record.name] = buffer[offset:offset + item.nbytes].view(item.dtype).view(item.record.shape)
            offset += _aligned(item.nbytes)
        part = Checkpoint(self.ckpt.format, self.ckpt.files, [item.record for item in window])
        plan = make_plan(part, tensors, strict=True)
        keep_going = lambda _done: not self.budget.stopped   # closing the iterator cancels the read
        run_plan_jobs(self.executor, plan.files, plan.jobs, threads=self.threads,
                      chunk_bytes=config().chunk_bytes, drop_cache=self.drop_cache, progress=keep_going)
        return [(item.name, tensors[item.record.name]) for item in window]


def iter_tensors(path: str | os.PathLike, *, dtype: torch.dtype | None = None, keys=None, rename: Rename = None,
                 window_bytes: int = DEFAULT_WINDOW_BYTES, threads: int | None = None, backend: str = "auto",
                 cache: str = "auto", key: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for each tensor of a checkpoint, in file order, reading ahead.

    At most ``window_bytes`` of tensors are allocated and not yet freed at any
    time: the next window is read on the engine's threads while the caller
    works on the current one.  A tensor larger than half the window is read on
    its own.  ``dtype`` converts floating-point tensors (f16/bf16/f32),
    ``keys`` selects tensors, ``rename`` (dict or callable, a name or None to
    skip) renames them; ``cache``, ``threads``, ``backend`` and ``key`` as in
    ``load_state_dict``.  The tensors are new CPU tensors the caller owns;
    breaking out of the loop stops the read-ahead.

    >>> for name, tensor in gs.iter_tensors("model.safetensors", dtype=torch.bfloat16):
    ...     print(name, tensor.shape)
    """
    return stream_checkpoint(open_checkpoint(path, key=key), dtype=dtype, keys=keys, rename=rename,
                             window_bytes=window_bytes, threads=threads, backend=backend, cache=cache)


def stream_checkpoint(ckpt: Checkpoint, *, dtype: torch.dtype | None = None, keys=None, rename: Rename = None,
                      window_bytes: int = DEFAULT_WINDOW_BYTES, threads: int | None = None, backend: str = "auto",
                      cache: str = "auto") -> Iterator[tuple[str, torch.Tensor]]:
    """``iter_tensors`` of a checkpoint already opened (and validated) by ``open_checkpoint``."""
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise UsageError(f"dtype must be float16, bfloat16 or float32, not {dtype}")
    if not isinstance(window_bytes, int) or window_bytes <= 0:
        raise UsageError(f"window_bytes must be a positive number of bytes, not {window_bytes!r}")
    if cache not in CACHE_POLICIES:
        raise UsageError(f"cache must be 'auto', 'keep' or 'drop', not {cache!r}")
    items = _items(ckpt, dtype=dtype, keys=keys, rename=rename)
    total = sum(item.record.nbytes for item in items)
    policy = platform_cache_policy(
        choose_cache(_Totals(total, min(window_bytes, total)), cache,  # type: ignore[arg-type]
                     mem_available() if cache == "auto" else None), explicit=cache == "drop")
    budget = _Budget(window_bytes)
    reader = _Reader(ckpt, _windows(items, budget.slab_bytes), budget, backend=backend,
                     threads=threads or config().default_threads, drop_cache=policy == "drop")
    return _consume(reader, budget)


def _consume(reader: _Reader, budget: _Budget) -> Iterator[tuple[str, torch.Tensor]]:
    reader.start()
    try:
        while True:
            window = budget.take()
            if window is None:
                return
            if isinstance(window, BaseException):
                raise window
            while window:
                # hand over the last reference: the budget comes back when the caller drops it
                yield window.pop(0)
    finally:
        budget.stop()
        reader.join()
