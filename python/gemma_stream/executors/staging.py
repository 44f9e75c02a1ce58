"""The staging pipeline: destinations the engine cannot write through a raw pointer.

Accelerator memory, a non-contiguous CPU view (and, with
``GEMMA_STREAM_FORCE_STAGING=1``, any CPU tensor) is filled through a ring of
``SLOTS`` host buffers.  The engine's threads read, convert and quantize into
slots i and i+1 (two engine runs in flight, each on half the threads, so that
a run's slowest chunk and its start-up need not idle the disk), all on
the host, so the bus carries the final bytes; meanwhile the copies of the slots
filled before them run; a slot is refilled only once its copy has completed.
Host memory is the ring, whatever the model's size.

- Slots are pinned (``pin_memory=True``) when the destination is this
  machine's accelerator, plain memory otherwise.
- Where the device has streams (``torch.cuda``; the generic ``torch.Stream`` /
  ``torch.Event`` of xpu and others) each slot is shipped with
  ``copy_(non_blocking=True)`` on a dedicated stream and an event marks its end.
  Elsewhere (the CPU, devices without streams) one uploader thread runs the
  copies synchronously, which still overlap with the next fill.
- Jobs larger than the room left in a slot are split by rows (``slots.py``): a
  row range of a source is a job at a later offset; quantized jobs keep whole
  rows, so their scales (and int4 groups) are those of the unsplit tensor.

Example (what ``run_plan_jobs`` does with the jobs it cannot run directly)::

    result = run_staged(executor, plan.files, staged_jobs, threads=4, chunk_bytes=16 << 20,
                        drop_cache=False, progress=None)
    result.uploads, result.staging_bytes, result.overlap
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from ..config import config
from ..errors import CheckpointError, GemmaStreamError
from ..plan import CopyJob
from .slots import carve, need, pack, row_count

__all__ = ["SLOTS", "RunResult", "cancelled", "overlap", "pack", "ring_bytes", "run_staged"]

#: staging slots in the ring: two filling, the others uploading
SLOTS = 4
FILLS = 2
_MIN_SLOT_BYTES = 64 << 10

#: tests set this to ``hook(event, slot, seq)``: "fill" (the engine starts writing slot ``slot`` for
#: batch ``seq``), "copy" (its upload starts), "complete" (its upload is known to have finished)
debug_hook: Callable[[str, int, int], None] | None = None


@dataclass
class RunResult:
    """What ``run_plan_jobs`` did: bytes read, and what the staging pipeline did."""

    bytes_read: int = 0
    staging_bytes: int = 0   # host bytes the ring held at its largest (0: nothing was staged)
    uploads: int = 0         # slots shipped to their destinations
    overlap: float = 0.0     # share of the shorter of filling and uploading hidden behind the other (0 to 1)
    upload_seconds: float = 0.0


def cancelled(done: int) -> GemmaStreamError:
    return GemmaStreamError(f"load cancelled by the progress callback after {done} bytes; "
                            f"the destination is only partly written")


def ring_bytes(chunk_bytes: int, threads: int) -> int:
    """The ring's budget: ``GEMMA_STREAM_STAGING_MB``, or 4 x chunk x threads (each slot one chunk per thread)."""
    return config().staging_bytes or SLOTS * chunk_bytes * max(1, threads)


def _note(event: str, slot: int, seq: int) -> None:
    hook = debug_hook
    if hook is not None:
        hook(event, slot, seq)


# ---------------------------------------------------------------- host buffers

def _can_pin(device: torch.device) -> bool:
    """Pinned memory helps only copies to this machine's accelerator (and needs its allocator)."""
    if device.type in ("cpu", "meta"):
        return False
    try:
        accelerator = torch.accelerator.current_accelerator()
    except (AttributeError, RuntimeError):
        return False
    return accelerator is not None and accelerator.type == device.type


class _Ring:
    def __init__(self, count: int, slot_bytes: int, pin: bool):
        self.buffers: list[torch.Tensor | None] = [None] * count
        self.slot_bytes = slot_bytes
        self.pin = pin
        self.peak_bytes = 0

    def buffer(self, slot: int, nbytes: int) -> torch.Tensor:
        buf = self.buffers[slot]
        if buf is None or buf.numel() < nbytes:
            self.buffers[slot] = None
            buf = self.buffers[slot] = self._allocate(max(nbytes, self.slot_bytes))
            self.peak_bytes = max(self.peak_bytes, sum(b.numel() for b in self.buffers if b is not None))
        return buf

    def _allocate(self, nbytes: int) -> torch.Tensor:
        if self.pin:
            try:
                return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            except RuntimeError:
                self.pin = False  # no pinned allocator after all: plain memory still works
        return torch.empty(nbytes, dtype=torch.uint8)

    def release(self) -> None:
        self.buffers = [None] * len(self.buffers)
        if self.pin:
            try:  # the host caching allocator keeps freed pinned blocks; the ring's are no use after the load
                torch.accelerator.empty_host_cache()
            except (AttributeError, RuntimeError):
                pass


# ---------------------------------------------------------------- uploaders

def _upload(staged: torch.Tensor, region: torch.Tensor, name: str, non_blocking: bool) -> None:
    try:
        region.copy_(staged, non_blocking=non_blocking)
    except RuntimeError as e:
        raise GemmaStreamError(f"tensor {name!r}: copying its staged bytes to {region.device} failed: {e}") from e


class _ThreadUploader:
    """Synchronous copies on one background thread; they overlap with the next fill."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gemma_stream_upload")
        self.pending: dict[int, object] = {}
        self.busy_seconds = 0.0
        self.spans: list[tuple[float, float]] = []  # when each copy ran (perf_counter seconds)

    def submit(self, slot: int, seq: int, pairs: list[tuple]) -> None:
        self.pending[slot] = self.pool.submit(self._copy, slot, seq, pairs)

    def _copy(self, slot: int, seq: int, pairs: list[tuple]) -> None:
        start = time.perf_counter()
        _note("copy", slot, seq)
        with torch.no_grad():  # grad mode is per thread; destinations are often Parameters
            for staged, region, name in pairs:
                _upload(staged, region, name, non_blocking=False)
        end = time.perf_counter()
        self.busy_seconds += end - start  # one worker: no race
        self.spans.append((start, end))
        _note("complete", slot, seq)

    def wait(self, slot: int) -> None:
        future = self.pending.pop(slot, None)
        if future is not None:
            future.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _StreamUploader:
    """``copy_(non_blocking=True)`` on a dedicated stream; an event per slot says when it may be refilled.

    ``use_stream(stream)`` is the context that makes ``stream`` current (``torch.cuda.stream``, or the
    generic ``torch.Stream`` itself); ``make_event()`` a timing event.
    """

    def __init__(self, stream, current_stream, make_event: Callable, use_stream: Callable):
        self.stream = stream
        self.event = make_event
        self.use_stream = use_stream
        # the destinations were allocated on the current stream (perhaps from memory it still uses)
        self.stream.wait_stream(current_stream)
        self.pending: dict[int, tuple] = {}
        self.busy_seconds = 0.0
        self.spans: list[tuple[float, float]] = []  # when each copy ran on the device, on the host's clock
        self.zero = None  # an event recorded on the idle stream at the first submit, and the host time then

    def submit(self, slot: int, seq: int, pairs: list[tuple]) -> None:
        _note("copy", slot, seq)
        start, end = self.event(), self.event()
        with torch.no_grad(), self.use_stream(self.stream):
            if self.zero is None:
                self.zero = (self.event(), time.perf_counter())
                self.zero[0].record(self.stream)
            start.record(self.stream)
            for staged, region, name in pairs:
                _upload(staged, region, name, non_blocking=True)
            end.record(self.stream)
        self.pending[slot] = (start, end, seq)

    def wait(self, slot: int) -> None:
        entry = self.pending.pop(slot, None)
        if entry is None:
            return
        start, end, seq = entry
        end.synchronize()
        zero, t0 = self.zero
        span = (t0 + zero.elapsed_time(start) / 1e3, t0 + zero.elapsed_time(end) / 1e3)
        self.busy_seconds += span[1] - span[0]
        self.spans.append(span)
        _note("complete", slot, seq)

    def close(self) -> None:
        try:
            self.stream.synchronize()  # the ring's memory must outlive every copy that reads it
        except RuntimeError:
            pass
        self.pending.clear()


def _stream_uploader(device: torch.device) -> _StreamUploader:
    if device.type == "cuda":
        return _StreamUploader(torch.cuda.Stream(device), torch.cuda.current_stream(device),
                               lambda: torch.cuda.Event(enable_timing=True), torch.cuda.stream)
    return _StreamUploader(torch.Stream(device=device), torch.accelerator.current_stream(device),
                           lambda: torch.Event(device=device, enable_timing=True), lambda stream: stream)


def _uploader(device: torch.device):
    """A stream uploader where the device has streams and events, a thread of synchronous copies otherwise."""
    if _can_pin(device):
        try:
            return _stream_uploader(device)
        except (AttributeError, RuntimeError, TypeError):
            pass
    return _ThreadUploader()


# ---------------------------------------------------------------- the pipeline

def _with_tensors(error: CheckpointError, batch: list[CopyJob]) -> CheckpointError:
    """An engine error that names no tensor (a read cut short by a file truncated under it), with the
    tensors the failed run was reading."""
    text = str(error)
    if any(f"'{job.name}'" in text for job in batch):
        return error
    names = ", ".join(f"'{job.name}' rows [{job.first_row}, {job.first_row + row_count(job)})" for job in batch[:4])
    more = f" and {len(batch) - 4} more" if len(batch) > 4 else ""
    return CheckpointError(f"{text} (while reading tensor {names}{more})")


def _fill(executor, files: list[str], jobs: list[CopyJob], threads: int, chunk_bytes: int,
          drop_cache: bool) -> tuple[int, bool, float, float]:
    """One engine run into a slot; returns (bytes read, completed, start, end)."""
    start = time.perf_counter()
    # no progress callback here: Python is called back only from the loading thread
    read, completed = executor.run(files, jobs, threads=threads, chunk_bytes=chunk_bytes, drop_cache=drop_cache,
                                   progress=None)
    return read, completed, start, time.perf_counter()


def _merged(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def overlap(fills: list[tuple[float, float]], uploads: list[tuple[float, float]]) -> float:
    """The share of the shorter activity (filling or uploading, as time spans) that ran while
    the other ran: 1 when the pipeline hid it completely, 0 when they ran one after the other.

    >>> overlap([(0, 2), (2, 4)], [(1, 3)])
    1.0
    """
    a, b = _merged(fills), _merged(uploads)
    shorter = min(sum(e - s for s, e in a), sum(e - s for s, e in b))
    if shorter <= 0:
        return 0.0
    both, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        both += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return min(1.0, both / shorter)


def _run_device(executor, files: list[str], jobs: list[CopyJob], device: torch.device, *, threads: int,
                chunk_bytes: int, drop_cache: bool, progress: Callable[[int], bool] | None) -> RunResult:
    pin = _can_pin(device)
    slot_bytes = max(_MIN_SLOT_BYTES, ring_bytes(chunk_bytes, threads) // SLOTS)
    if pin:  # the pinned allocator rounds each block up to a power of two: stay inside the budget
        slot_bytes = 1 << (slot_bytes.bit_length() - 1)
    batches = pack(jobs, slot_bytes)
    if not batches:
        return RunResult()
    needs = [sum(need(j) for j in batch) for batch in batches]
    ring = _Ring(min(SLOTS, len(batches)), min(slot_bytes, max(needs)), pin)
    # two fills in flight, each on half the threads: while one waits for its slowest chunk (or the engine
    # starts a run), the other keeps the disk and the cores busy
    in_flight = FILLS if len(ring.buffers) > FILLS else 1
    fill_threads = max(1, threads // in_flight)
    fills = ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="gemma_stream_fill")
    uploader = _uploader(device)
    result = RunResult()
    fill_spans: list[tuple[float, float]] = []
    filling: deque[tuple[int, int, Future, list[tuple]]] = deque()

    def ship_oldest() -> None:
        seq, slot, future, pairs = filling.popleft()
        try:
            read, completed, start, end = future.result()
        except CheckpointError as e:
            raise _with_tensors(e, batches[seq]) from None
        fill_spans.append((start, end))
        result.bytes_read += read
        if not completed or (progress is not None and progress(result.bytes_read) is False):
            raise cancelled(result.bytes_read)
        uploader.submit(slot, seq, pairs)
        result.uploads += 1

    try:
        for seq, batch in enumerate(batches):
            slot = seq % len(ring.buffers)
            if len(filling) == in_flight:
                ship_oldest()
            uploader.wait(slot)  # the slot's previous copy must be over before the engine writes it again
            _note("fill", slot, seq)
            staged_jobs, pairs = carve(ring.buffer(slot, needs[seq]), batch)
            filling.append((seq, slot, fills.submit(_fill, executor, files, staged_jobs, fill_threads, chunk_bytes,
                                                     drop_cache), pairs))
        while filling:
            ship_oldest()
        for slot in range(len(ring.buffers)):
            uploader.wait(slot)
    finally:
        fills.shutdown(wait=True, cancel_futures=True)  # on an error: no engine run may still write the ring
        uploader.close()  # ... nor a copy still read it; ends the uploader thread
        ring.release()
    result.staging_bytes = ring.peak_bytes
    result.upload_seconds = uploader.busy_seconds
    result.overlap = overlap(fill_spans, uploader.spans)
    return result


def run_staged(executor, files: list[str], jobs: list[CopyJob], *, threads: int, chunk_bytes: int,
               drop_cache: bool, progress: Callable[[int], bool] | None) -> RunResult:
    """Run ``jobs`` through the staging ring, one pipeline per destination device."""
    by_device: dict[torch.device, list[CopyJob]] = {}
    for job in jobs:
        by_device.setdefault(job.dst.device, []).append(job)
    total = RunResult()
    for device, device_jobs in by_device.items():
        base = total.bytes_read
        part = _run_device(executor, files, device_jobs, device, threads=threads, chunk_bytes=chunk_bytes,
                           drop_cache=drop_cache,
                           progress=None if progress is None else lambda n, base=base: progress(base + n))
        hidden = total.overlap * total.upload_seconds + part.overlap * part.upload_seconds
        total.bytes_read += part.bytes_read
        total.staging_bytes = max(total.staging_bytes, part.staging_bytes)
        total.uploads += part.uploads
        total.upload_seconds += part.upload_seconds
        total.overlap = hidden / total.upload_seconds if total.upload_seconds > 0 else 0.0
    return total
