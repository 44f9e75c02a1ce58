"""Executors run copy jobs; this module picks one and drives staged jobs.

``native`` is the C++ engine (``gemma_stream._native``); ``python`` is the
pure-Python fallback.  Both take the same jobs and write the same bytes.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Protocol

import torch

from ..config import config
from ..errors import GemmaStreamError, UsageError
from ..plan import CopyJob

__all__ = ["Executor", "get_executor", "native_available", "run_plan_jobs", "BACKEND"]

try:
    from .. import _native  # noqa: F401
    _NATIVE_ERROR: ImportError | None = None
except ImportError as e:  # the fallback is only for a missing extension
    _native = None
    _NATIVE_ERROR = e

#: the backend ``backend="auto"`` resolves to in this process
BACKEND = "native" if _native is not None else "python"
_warned = False

#: budget for CPU staging buffers of jobs whose destination is not contiguous CPU memory
STAGING_BYTES = 256 << 20


class Executor(Protocol):
    name: str

    def run(self, files: list[str], jobs: list[CopyJob], *, threads: int, chunk_bytes: int,
            drop_cache: bool, progress: Callable[[int], bool] | None) -> tuple[int, bool]:
        """Run the jobs; returns (bytes_read, completed)."""


def native_available() -> bool:
    """True when the compiled extension imported."""
    return _native is not None


def get_executor(backend: str = "auto") -> Executor:
    global _warned
    if backend not in ("auto", "native", "python"):
        raise UsageError(f"backend must be 'auto', 'native' or 'python', not {backend!r}")
    if backend == "auto":
        backend = config().backend or "auto"
    if backend == "python":
        from .python import PythonExecutor
        return PythonExecutor()
    if _native is None:
        if backend == "native":
            raise GemmaStreamError(f"the native backend was requested but gemma_stream._native did not import: "
                                   f"{_NATIVE_ERROR}")
        if not _warned:
            _warned = True
            warnings.warn(f"gemma_stream: C++ extension unavailable ({_NATIVE_ERROR}); using the slower "
                          f"pure-Python executor", RuntimeWarning, stacklevel=3)
        from .python import PythonExecutor
        return PythonExecutor()
    from .native import NativeExecutor
    return NativeExecutor()


def _stage(job: CopyJob) -> tuple[CopyJob, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Give a job contiguous CPU buffers; return it with (buffer, final region) pairs."""
    pairs = []

    def buffer(region: torch.Tensor | None) -> torch.Tensor | None:
        if region is None:
            return None
        staging = torch.empty(region.shape, dtype=region.dtype, device="cpu")
        pairs.append((staging, region))
        return staging

    staged = dataclasses.replace(job, dst=buffer(job.dst), scale=buffer(job.scale), zero=buffer(job.zero),
                                 staged=False)
    return staged, pairs


def run_plan_jobs(executor: Executor, files: list[str], jobs: list[CopyJob], *, threads: int, chunk_bytes: int,
                  drop_cache: bool, progress: Callable[[int], bool] | None) -> int:
    """Run direct jobs in one batch, then staged jobs in batches of bounded staging memory."""
    direct = [j for j in jobs if not j.staged]
    staged = [j for j in jobs if j.staged]
    done = 0

    def offset_progress(base: int):
        if progress is None:
            return None
        return lambda n: progress(base + n)

    def run(batch: list[CopyJob]) -> None:
        nonlocal done
        if not batch:
            return
        read, completed = executor.run(files, batch, threads=threads, chunk_bytes=chunk_bytes,
                                       drop_cache=drop_cache, progress=offset_progress(done))
        done += read
        if not completed:
            raise GemmaStreamError(f"load cancelled by the progress callback after {done} bytes; "
                                   f"the destination is only partly written")

    run(direct)
    while staged:
        batch, pairs, size = [], [], 0
        while staged and (not batch or size + staged[0].dst.nbytes <= STAGING_BYTES):
            job, job_pairs = _stage(staged.pop(0))
            batch.append(job)
            pairs.extend(job_pairs)
            size += job.dst.nbytes
        run(batch)
        for buffer, region in pairs:
            region.copy_(buffer)
    return done
