"""Executors run copy jobs; this module picks one and sends staged jobs through the staging ring.

``native`` is the C++ engine (``gemma_stream._native``); ``python`` is the
pure-Python fallback.  Both take the same jobs and write the same bytes.
"""

from __future__ import annotations

import warnings
from typing import Callable, Protocol

from ..config import config
from ..errors import GemmaStreamError, UsageError
from ..plan import CopyJob
from .staging import RunResult, cancelled, run_staged

__all__ = ["Executor", "get_executor", "native_available", "run_plan_jobs", "RunResult", "BACKEND"]

try:
    from .. import _native  # noqa: F401
    _NATIVE_ERROR: ImportError | None = None
except ImportError as e:  # the fallback is only for a missing extension
    from ..native_status import native_import_problem
    _native = None
    _NATIVE_ERROR = ImportError(native_import_problem(e))

#: the backend ``backend="auto"`` resolves to in this process
BACKEND = "native" if _native is not None else "python"
_warned = False

class Executor(Protocol):
    name: str

    def run(self, files: list[str], jobs: list[CopyJob], *, threads: int, chunk_bytes: int,
            drop_cache: bool, progress: Callable[[int], bool] | None) -> tuple[int, bool]:
        """Run the jobs; returns (bytes_read, completed)."""


def native_available() -> bool:
    """True when the compiled extension imported."""
    return _native is not None


def native_module():
    """``gemma_stream._native`` when it imported (the one place that imports it), else None."""
    return _native


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


def run_plan_jobs(executor: Executor, files: list[str], jobs: list[CopyJob], *, threads: int, chunk_bytes: int,
                  drop_cache: bool, progress: Callable[[int], bool] | None) -> RunResult:
    """Run direct jobs in one batch, then staged jobs through the staging ring (``staging.py``).

    ``GEMMA_STREAM_FORCE_STAGING=1`` stages contiguous CPU destinations too, so
    the pipeline that serves accelerators runs (and is tested) on any machine.
    """
    force = config().force_staging
    direct = [j for j in jobs if not (j.staged or force)]
    staged = [j for j in jobs if j.staged or force]
    done = 0
    if direct:
        done, completed = executor.run(files, direct, threads=threads, chunk_bytes=chunk_bytes, drop_cache=drop_cache,
                                       progress=progress)
        if not completed:
            raise cancelled(done)
    result = RunResult()
    if staged:
        result = run_staged(executor, files, staged, threads=threads, chunk_bytes=chunk_bytes, drop_cache=drop_cache,
                            progress=None if progress is None else lambda n: progress(done + n))
    result.bytes_read += done
    return result
