"""The pure-Python executor: same jobs, same bytes, no compiled code.

Reads with positional reads (:mod:`gemma_stream.fileio`, on every OS) straight
into the destination when dtypes agree,
converts with ``Tensor.to`` otherwise, and quantizes with the torch reference
quantizers; chunks are bounded by ``chunk_bytes`` like the C++ engine's.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from .. import fileio
from ..errors import CheckpointError, InternalError, nan_row
from ..formats.records import open_validated
from ..layout import span_elements
from ..plan import CopyJob
from ..quant.reference import quantize_int4, quantize_int8


def _read_into(fd: int, path: str, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        try:
            got = fileio.read_into(fd, view[done:], offset + done)
        except OSError as e:
            raise CheckpointError(f"{path}: read of {len(view) - done} bytes at offset {offset + done} failed: "
                                  f"{e.strerror or e}", path=path) from e
        if got == 0:
            raise CheckpointError(f"{path}: unexpected end of file at offset {offset + done} (file shrank to fewer "
                                  f"than {offset + len(view)} bytes?)", path=path)
        done += got


_bounce = threading.local()


def _read(fd: int, path: str, nbytes: int, offset: int) -> memoryview:
    """Read into this thread's reusable bounce buffer (valid until its next call).

    Reusing one buffer per thread keeps the fallback's extra memory at
    threads x chunk, instead of leaving freed chunks in malloc arenas.
    """
    buf = getattr(_bounce, "buf", None)
    if buf is None or len(buf) < nbytes:
        buf = _bounce.buf = bytearray(max(nbytes, 1))
    view = memoryview(buf)[:nbytes]
    _read_into(fd, path, view, offset)
    return view


def _source_end(job: CopyJob) -> int:
    """One past the last source byte the job reads (its start when it reads nothing)."""
    return job.src_offset + job.src_span_bytes


def _check_range(job: CopyJob, path: str, size: int) -> None:
    end = _source_end(job)
    if end > size:
        raise CheckpointError(f"{path}: tensor '{job.name}': bytes [{job.src_offset}, {end}) lie beyond the end "
                              f"of the file ({size} bytes)", path=path, tensor=job.name)


class _Run:
    def __init__(self, files: list[str], chunk_bytes: int, drop_cache: bool):
        self.files = files
        self.fds: list[int] = []
        try:
            for f in files:
                self.fds.append(open_validated(f))
        except BaseException:
            self.close()
            raise
        if drop_cache:
            for fd in self.fds:
                fileio.bypass_cache(fd)  # macOS: F_NOCACHE; the drops below are no-ops there
        self.chunk_bytes = max(chunk_bytes, fileio.PAGE_BYTES)
        self.drop_cache = drop_cache

    def close(self) -> None:
        for fd in self.fds:
            fileio.close(fd)

    def drop_spans(self, jobs: list[CopyJob]) -> None:
        """Drop every file the jobs read from the page cache, whole, once more.

        Per-chunk drops keep the pages that straddle chunk edges (DONTNEED only
        drops whole pages and whole large folios), the folio that holds both the
        header the format reader read and the first tensor, and what readahead
        fetched past the last chunk: :func:`fileio.drop_settled` drops them all,
        after the readahead still in flight, as the C++ engine does.
        """
        for index in sorted({job.file_index for job in jobs}):
            fileio.drop_settled(self.fds[index], self.files[index])

    def _done(self, fd: int, offset: int, nbytes: int) -> None:
        if self.drop_cache:
            # between 2 MiB boundaries, as the C++ engine does: DONTNEED keeps
            # every large folio that the range only partly covers
            lo = offset - offset % fileio.FOLIO_BYTES
            hi = offset + nbytes - (offset + nbytes) % fileio.FOLIO_BYTES
            if hi > lo:
                fileio.drop_cache(fd, lo, hi - lo)

    def tasks(self, job: CopyJob) -> list[Callable[[], int]]:
        """Split a job into chunk tasks; each returns the bytes it read."""
        fd, path = self.fds[job.file_index], self.files[job.file_index]
        item = job.src_dtype.itemsize
        numel = math.prod(job.shape)
        if numel == 0:
            return []
        if job.src_strides is not None:
            return [lambda: self._strided(fd, path, job)]
        if job.op == "copy":
            per = max(1, self.chunk_bytes // item)
            return [lambda b=b: self._copy(fd, path, job, b, min(numel, b + per)) for b in range(0, numel, per)]
        rows, k = job.shape
        # the torch reference quantizers keep ~5 float32 temporaries per element:
        # size their row blocks so those stay within one chunk per thread
        per = max(1, self.chunk_bytes // (k * 20))
        return [lambda b=b: self._quant(fd, path, job, b, min(rows, b + per)) for b in range(0, rows, per)]

    def _copy(self, fd: int, path: str, job: CopyJob, begin: int, end: int) -> int:
        item = job.src_dtype.itemsize
        offset = job.src_offset + begin * item
        nbytes = (end - begin) * item
        dst = job.dst.reshape(-1)[begin:end]
        if job.src_dtype.torch == job.dst.dtype:
            raw = dst.view(torch.uint8)
            _read_into(fd, path, memoryview(raw.numpy()), offset)
            if dst.dtype == torch.bool:  # stored as 0/1 whatever the file holds, as torch's copy_ does
                raw.clamp_(max=1)
        else:
            src = torch.frombuffer(_read(fd, path, nbytes, offset), dtype=job.src_dtype.torch)
            dst.copy_(src)  # the same conversion kernel Tensor.to runs, without its temporary
        self._done(fd, offset, nbytes)
        return nbytes

    def _strided(self, fd: int, path: str, job: CopyJob) -> int:
        # Read the storage span in storage order, one group of the outermost
        # (largest-stride) dimension at a time, and scatter into the destination.
        item = job.src_dtype.itemsize
        order = sorted(range(len(job.shape)), key=lambda d: -job.src_strides[d])
        shape = [job.shape[d] for d in order]
        strides = [job.src_strides[d] for d in order]
        dst = job.dst.permute(*order) if order else job.dst
        inner = span_elements(shape[1:], strides[1:])
        per = max(1, (self.chunk_bytes // item - inner) // max(strides[0], 1) + 1) if shape else 1
        if job.block_rows:   # the planner's cap: rows read apart, the gaps between them skipped
            per = min(per, job.block_rows)
        total = 0
        for first in range(0, shape[0] if shape else 1, per):
            count = min(per, shape[0] - first) if shape else 1
            span = span_elements([count, *shape[1:]], strides) if shape else 1
            offset = job.src_offset + first * strides[0] * item if shape else job.src_offset
            raw = torch.frombuffer(_read(fd, path, span * item, offset), dtype=job.src_dtype.torch)
            view = raw.as_strided([count, *shape[1:]] if shape else [], strides)
            target = dst[first:first + count] if shape else dst
            target.copy_(view)
            self._done(fd, offset, span * item)
            total += view.numel() * item
        return total

    def _quant(self, fd: int, path: str, job: CopyJob, begin: int, end: int) -> int:
        rows, k = end - begin, job.shape[1]
        nbytes = rows * k * job.src_dtype.itemsize
        offset = job.src_offset + begin * k * job.src_dtype.itemsize
        w = torch.frombuffer(_read(fd, path, nbytes, offset), dtype=job.src_dtype.torch).reshape(rows, k)
        finite = torch.isfinite(w).all(dim=1)
        if not bool(finite.all()):
            bad = job.first_row + begin + int((~finite).nonzero()[0, 0])
            raise nan_row(path, job.name, bad)
        if job.op == "int8":
            q, s = quantize_int8(w, job.scale.dtype)
            job.dst[begin:end].copy_(q)
            job.scale[begin:end].copy_(s)
        else:
            q, s, z = quantize_int4(w, job.group_size, job.scale.dtype)
            job.dst[begin:end].copy_(q)
            job.scale[begin:end].copy_(s)
            job.zero[begin:end].copy_(z)
        self._done(fd, offset, nbytes)
        return nbytes


def _no_grad(task: Callable[[], int]) -> int:
    # grad mode is per thread: destinations are often Parameters that require grad
    with torch.no_grad():
        return task()


class PythonExecutor:
    name = "python"

    def run(self, files: list[str], jobs: list[CopyJob], *, threads: int, chunk_bytes: int,
            drop_cache: bool, progress: Callable[[int], bool] | None) -> tuple[int, bool]:
        for job in jobs:  # what the C++ engine refuses as a JobError: a planner bug, not the file's fault
            if not 0 <= job.file_index < len(files) or (math.prod(job.shape) and job.dst is None):
                raise InternalError(f"gemma_stream bug: the engine refused a job: tensor '{job.name}': file index "
                                    f"{job.file_index} of {len(files)} files or null destination")
        run = _Run(files, chunk_bytes, drop_cache)
        try:
            sizes = [os.fstat(fd).st_size for fd in run.fds]
            for job in jobs:
                _check_range(job, files[job.file_index], sizes[job.file_index])
            ordered = sorted(jobs, key=lambda j: (j.file_index, j.src_offset))
            tasks = [t for job in ordered for t in run.tasks(job)]
            done, completed = 0, True
            # positional reads and torch kernels release the GIL, so threads overlap I/O and conversion
            with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
                futures = [pool.submit(_no_grad, t) for t in tasks]
                try:
                    for future in futures:
                        done += future.result()
                        if progress is not None and progress(done) is False:
                            completed = False
                            break
                finally:
                    for f in futures:
                        f.cancel()
            if drop_cache:
                run.drop_spans(jobs)
            return done, completed
        finally:
            run.close()
