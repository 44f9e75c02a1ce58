"""``iter_tensors``: a checkpoint as a stream of ``(name, tensor)`` with bounded memory.

The same pipeline as ``load_state_dict`` (format reader -> plan -> executor),
run one *window* at a time: a background thread plans and reads the next
window of tensors on the engine's threads while the caller consumes the
current one (the native engine releases the GIL while it copies; the Python
executor's reads and conversions release it too).  This is what an engine with
a ``load_weights(iterable)`` API (vLLM, SGLang) consumes.

With ``mode="mmap"`` a window of tensors that need no conversion is instead
a private (copy-on-write) mapping of its bytes in the file, faulted in by the
reader thread (``MADV_POPULATE_READ``) and unmapped when its last tensor is
freed: gemma_stream copies nothing, and the caller's own copy (vLLM's weight
loaders copy every tensor into its parameter) is the only pass over the bytes.

Memory: the tensors of a window are views of one buffer of half of
``window_bytes`` (or of one mapping of at most that size), counted from the
moment it is taken until the last of its tensors is freed (a finalizer), so tensors the caller drops promptly give the
buffer back at once (it is reused for a later window, without fresh page
faults) and tensors the caller keeps stall the read-ahead.  One window is read
while the previous one is consumed.  A tensor larger than half the window is
read alone, into its own buffer, once everything before it has been freed.
When the caller waits for the next tensor while holding on to earlier ones
(``list(gs.iter_tensors(...))``), the reader goes on regardless: the memory
the caller keeps is the caller's.
"""

from __future__ import annotations

import mmap
import os
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from . import pagecache
from .config import config, mem_available
from .deprecation import renamed_argument
from .dtypes import CONVERTIBLE, FLOAT_DTYPES
from .errors import CheckpointError, GemmaStreamError, UsageError
from .fileio import close as close_fd
from .fileio import platform_cache_policy
from .executors import get_executor, run_plan_jobs
from .formats import Checkpoint, TensorRecord, open_checkpoint
from .formats.records import open_validated
from .plan import Rename, choose_cache, make_plan
from .stream_budget import ALIGN, WindowBudget, aligned

__all__ = ["iter_tensors", "stream_checkpoint", "TensorStream", "DEFAULT_WINDOW_BYTES"]

#: 256 MiB: two 128 MiB reads in flight keep 2 engine threads busy (16 MiB chunks) and stay small
#: next to any model worth streaming
DEFAULT_WINDOW_BYTES = 256 << 20


@dataclass(frozen=True)
class _Item:
    record: TensorRecord
    name: str
    dtype: torch.dtype
    mapped: bool = False   # served as a view of a private mapping of the file (mode="mmap")

    @property
    def nbytes(self) -> int:
        return self.record.numel * self.dtype.itemsize


@dataclass(frozen=True)
class _Totals:
    """What ``choose_cache`` weighs: bytes read and bytes held (here at most one window)."""

    nbytes: int
    dst_nbytes: int


def _windows(items: list[_Item], slab_bytes: int) -> list[list[_Item]]:
    """Consecutive items that fit one slab each (a larger item is a window of its own).  A mapped
    window holds mapped items of one file only, and its size is the span of the file it maps."""
    out: list[list[_Item]] = []
    size = end = 0       # bytes of the current window; for a mapped one, the file offset where it ends
    for item in items:
        item_end = item.record.byte_offset + item.nbytes
        if out and item.mapped and out[-1][0].mapped and out[-1][0].record.file == item.record.file:
            # items come by offset, but a torch zip view may end before the storage that precedes it
            if max(end, item_end) - out[-1][0].record.byte_offset <= slab_bytes:
                out[-1].append(item)
                end = max(end, item_end)
                continue
        elif out and not item.mapped and not out[-1][0].mapped and size + aligned(item.nbytes) <= slab_bytes:
            out[-1].append(item)
            size += aligned(item.nbytes)
            continue
        out.append([item])
        size, end = aligned(item.nbytes), item_end
    return out


def _span(window: list[_Item]) -> tuple[int, int]:
    """The file bytes ``[start, end)`` a mapped window covers (its items are in offset order)."""
    return window[0].record.byte_offset, max(item.record.byte_offset + item.nbytes for item in window)


def _items(ckpt: Checkpoint, *, dtype: torch.dtype | None, keys, rename: Rename, mapped: bool) -> list[_Item]:
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
        out = dtype if dtype is not None and record.dtype.name in CONVERTIBLE else record.dtype.torch
        # a view needs the stored dtype, contiguous bytes, an aligned start and some bytes to map
        as_view = mapped and out == record.dtype.torch and record.is_contiguous and record.numel > 0 and \
            record.byte_offset % record.dtype.itemsize == 0
        items.append(_Item(record, name, out, as_view))
    return items


class _Reader(threading.Thread):
    """Plans and reads one window after the other into ``ready`` (None ends the stream)."""

    def __init__(self, ckpt: Checkpoint, windows: list[list[_Item]], budget: WindowBudget, *, backend: str,
                 threads: int, drop_cache: bool, prefault: bool | Callable[[], bool] = True):
        super().__init__(name="gemma_stream_iter", daemon=True)
        #: asked before each mapped window: fault its pages in ahead?
        self.prefault: Callable[[], bool] = prefault if callable(prefault) else (lambda: prefault)
        self.ckpt, self.windows, self.budget = ckpt, windows, budget
        self.executor = get_executor(backend)
        self.threads, self.drop_cache = threads, drop_cache

    def run(self) -> None:
        window: list[_Item] = []
        try:
            for window in self.windows:
                if window[0].mapped:
                    tensors = self._map(window)
                    if tensors is None:
                        return
                    self.budget.put(tensors)
                    del tensors
                    continue
                buffer = self.budget.buffer(sum(aligned(item.nbytes) for item in window))
                if buffer is None:
                    return
                tensors = self._read(window, buffer)
                del buffer   # from here the window's tensors alone keep its buffer alive
                self.budget.put(tensors)
                del tensors
            self.budget.put(None)
        except BaseException as e:  # re-raised on the caller's thread
            self.budget.put(_naming_tensor(e, window))

    def _map(self, window: list[_Item]) -> list[tuple[str, torch.Tensor]] | None:
        """The window's tensors as views of one private mapping of their bytes (None when closed)."""
        path = window[0].record.file
        start, end = _span(window)
        base = start - start % mmap.ALLOCATIONGRANULARITY
        fd = open_validated(path)     # the validated file, not one renamed over it since
        try:
            mapping = mmap.mmap(fd, end - base, access=mmap.ACCESS_COPY, offset=base)
        except (OSError, ValueError) as e:   # ValueError: the file is shorter than its header says now
            raise CheckpointError(f"{path}: cannot map bytes [{base}, {end}) of tensor "
                                  f"{window[-1].record.name!r}: {e}", path=path) from e
        finally:
            close_fd(fd)
        array = np.frombuffer(mapping, dtype=np.uint8)   # keeps the mapping open, and unmaps it when freed
        del mapping
        if not self.budget.reserve_mapped(array):
            return None
        # fault the pages in here, on the reader's thread (reading them from disk if they are not
        # cached), while the caller consumes the previous window: its copies then find them mapped
        # (a hint: errors, such as a kernel older than 5.14, leave the faults to the caller)
        if self.prefault():
            pagecache.populate_read(array.ctypes.data, array.nbytes)
        tensors = [(item.name, _own_bytes(array, item.record.byte_offset - base, item)) for item in window]
        del array      # from here the window's tensors alone keep the mapping alive
        return tensors

    def _read(self, window: list[_Item], buffer: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        tensors, offset, whole = {}, 0, buffer.numpy()
        for item in window:
            tensors[item.record.name] = _own_bytes(whole, offset, item)
            offset += aligned(item.nbytes)
        del whole, buffer
        part = Checkpoint(self.ckpt.format, self.ckpt.files, [item.record for item in window])
        plan = make_plan(part, tensors, strict=True)
        keep_going = lambda _done: not self.budget.stopped   # closing the iterator cancels the read
        run_plan_jobs(self.executor, plan.files, plan.jobs, threads=self.threads,
                      chunk_bytes=config().chunk_bytes, drop_cache=self.drop_cache, progress=keep_going)
        return [(item.name, tensors[item.record.name]) for item in window]


def _own_bytes(window: np.ndarray, offset: int, item: _Item) -> torch.Tensor:
    """``item``'s tensor over its bytes of a window's buffer or mapping, with a storage of its own:
    views of one shared storage would make a caller's ``torch.save`` write the whole window, and
    refuse it outright when the window holds two dtypes.  The array keeps ``window`` alive, so the
    window's memory is released (its finalizer runs) only when its last tensor is freed."""
    own = np.ndarray((item.nbytes,), dtype=np.uint8, buffer=window, offset=offset)
    return torch.from_numpy(own).view(item.dtype).view(item.record.shape)


def _naming_tensor(error: BaseException, window: list[_Item]) -> BaseException:
    """A file error that names no tensor (the file changed or was cut short under the read), with the
    tensors of the window being read."""
    if not isinstance(error, CheckpointError) or error.tensor is not None or not window:
        return error
    first = window[0].record.name
    more = f" and {len(window) - 1} more" if len(window) > 1 else ""
    named = CheckpointError(f"{error} (while reading tensor {first!r}{more})", path=error.path, tensor=first,
                            row=error.row)
    named.__cause__ = error
    return named


def iter_tensors(path: str | os.PathLike, *, dtype: torch.dtype | None = None, keys=None, rename: Rename = None,
                 window_bytes: int = DEFAULT_WINDOW_BYTES, threads: int | None = None, backend: str = "auto",
                 cache: str = "auto", state_dict_key: str | None = None, mode: str = "copy",
                 key: str | None = None) -> "TensorStream":
    """Yield ``(name, tensor)`` for each tensor of a checkpoint, in file order, reading ahead.

    At most ``window_bytes`` of tensors are allocated and not yet freed at any
    time: the next window is read on the engine's threads while the caller
    works on the current one.  A tensor larger than half the window is read on
    its own.  ``dtype`` converts floating-point tensors (f16/bf16/f32),
    ``keys`` selects tensors, ``rename`` (dict or callable, a name or None to
    skip) renames them; ``cache``, ``threads``, ``backend`` and ``state_dict_key`` as in
    ``load_state_dict``, except that ``cache="auto"`` drops only when the file and a window cannot
    both stay in memory (a large cold file is kept: the rule that drops it was measured on whole
    loads, NOTES.md 41).  The tensors are new CPU tensors the caller owns;
    breaking out of the loop stops the read-ahead.

    ``mode="mmap"``: a tensor that needs no conversion is a view of a private
    (copy-on-write) mapping of the file instead of a copy, its pages faulted in
    ahead by the reader; a write to it stays in this process.  For a caller
    that copies each tensor anyway (``load_weights`` of an inference engine),
    this saves one pass over the checkpoint.  The window bound holds the same
    way: a window's mapping is unmapped when its last tensor is freed.

    The returned :class:`TensorStream` also says, as ``waited_seconds``, how
    long the caller waited for reads (what the read-ahead did not hide).

    >>> for name, tensor in gs.iter_tensors("model.safetensors", dtype=torch.bfloat16):
    ...     print(name, tensor.shape)
    >>> total = sum(t.numel() for _, t in gs.iter_tensors("model.safetensors", mode="mmap"))
    """
    state_dict_key = renamed_argument(state_dict_key, key, old="key", new="state_dict_key", where="gs.iter_tensors")
    return stream_checkpoint(open_checkpoint(path, key=state_dict_key), dtype=dtype, keys=keys, rename=rename,
                             window_bytes=window_bytes, threads=threads, backend=backend, cache=cache, mode=mode)


def stream_checkpoint(ckpt: Checkpoint, *, dtype: torch.dtype | None = None, keys=None, rename: Rename = None,
                      window_bytes: int = DEFAULT_WINDOW_BYTES, threads: int | None = None, backend: str = "auto",
                      cache: str = "auto", mode: str = "copy",
                      prefault: bool | Callable[[], bool] = True) -> "TensorStream":
    """``iter_tensors`` of a checkpoint already opened (and validated) by ``open_checkpoint``.
    ``prefault=False`` (``mode="mmap"``): the reader maps windows without faulting their pages in, for
    a caller that mostly hands the tensors on unread (:mod:`gemma_stream.capture`); a callable is
    asked before each window."""
    from .api import _check_mode

    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise UsageError(f"dtype must be float16, bfloat16 or float32, not {dtype}")
    if not isinstance(window_bytes, int) or window_bytes <= 0:
        raise UsageError(f"window_bytes must be a positive number of bytes, not {window_bytes!r}")
    cache = _check_mode(mode, cache)     # mode="mmap": the copied tensors keep the page cache too
    items = _items(ckpt, dtype=dtype, keys=keys, rename=rename, mapped=mode == "mmap")
    total = sum(item.record.nbytes for item in items)
    policy = platform_cache_policy(
        choose_cache(_Totals(total, min(window_bytes, total)), cache,  # type: ignore[arg-type]
                     mem_available() if cache == "auto" else None), explicit=cache == "drop")
    budget = WindowBudget(window_bytes)
    windows = _windows(items, budget.slab_bytes)
    # slabs no larger than the largest window they hold: a small checkpoint's tensors are not views of
    # a half-window buffer (torch.save of such a view writes the whole buffer: 128 MiB for a few bytes)
    budget.slab_bytes = max([ALIGN] + [n for w in windows if not w[0].mapped and
                                       (n := sum(aligned(item.nbytes) for item in w)) <= budget.slab_bytes])
    reader = _Reader(ckpt, windows, budget, backend=backend,
                     threads=threads or config().default_threads, drop_cache=policy == "drop", prefault=prefault)
    return TensorStream(reader, budget)


class TensorStream:
    """The iterator ``iter_tensors`` returns; ``waited_seconds`` says how long the caller waited for
    reads (the part of the stream's time its read-ahead did not hide).

    >>> stream = gs.iter_tensors("model.safetensors")
    >>> model.load_weights(stream)
    >>> print(f"waited {stream.waited_seconds:.2f} s for reads")
    """

    def __init__(self, reader: _Reader, budget: WindowBudget):
        self._budget = budget
        self._tensors = _consume(reader, budget)

    def __iter__(self) -> "TensorStream":
        return self

    def __next__(self) -> tuple[str, torch.Tensor]:
        return next(self._tensors)

    def close(self) -> None:
        """Stop the read-ahead (as breaking out of a ``for`` loop over the stream does)."""
        self._tensors.close()

    @property
    def waited_seconds(self) -> float:
        return self._budget.waited_seconds


def _consume(reader: _Reader, budget: WindowBudget) -> Iterator[tuple[str, torch.Tensor]]:
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
