"""The one place that reads ``GEMMA_STREAM_*`` environment variables (and the machine's cores and free memory)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import UsageError

__all__ = ["Config", "config", "mem_available", "meminfo"]


@dataclass(frozen=True)
class Config:
    backend: str | None      # GEMMA_STREAM_BACKEND: "native" | "python" (overrides backend="auto")
    threads: int | None      # GEMMA_STREAM_THREADS
    chunk_bytes: int         # GEMMA_STREAM_CHUNK_MB (MiB)
    prefetch: str = "auto"   # GEMMA_STREAM_PREFETCH: "auto" | "on" | "off" (the read-ahead, both modes)
    staging_bytes: int | None = None  # GEMMA_STREAM_STAGING_MB: the staging ring (default 4 x chunk x threads)
    force_staging: bool = False       # GEMMA_STREAM_FORCE_STAGING=1: stage contiguous CPU destinations too (tests)
    avx2: bool = True        # GEMMA_STREAM_NO_AVX2=1 sets False: the engine's quantizers use their portable loops

    @property
    def default_threads(self) -> int:
        """One worker per usable core, at most 8 (benchmarks/NOTES.md: on 2 cores, 2 threads reach
        the warm bound and 3-4 gain nothing cold; a warm load is CPU-bound page faults and copies)."""
        if self.threads:
            return self.threads
        try:
            cores = len(os.sched_getaffinity(0))  # the cores this process may run on (taskset, cpusets)
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
        return max(1, min(cores, 8))


#: /proc/meminfo fields and the psutil.virtual_memory() attribute that stands for each where
#: there is no /proc (macOS, Windows)
_PSUTIL_MEMINFO = {"MemAvailable": "available", "MemTotal": "total", "MemFree": "free", "Cached": "cached",
                   "Buffers": "buffers", "Active": "active", "Inactive": "inactive"}


def meminfo(field: str) -> int | None:
    """One field of /proc/meminfo (``"MemAvailable"``, ``"MemFree"``, ...) in bytes; None where there is none.

    Without /proc, the same figure from psutil when it is installed (``MemAvailable`` is
    psutil's ``available``); None otherwise.
    """
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        return None
    except FileNotFoundError:
        pass
    except (OSError, ValueError, IndexError):
        return None
    try:
        import psutil
        value = getattr(psutil.virtual_memory(), _PSUTIL_MEMINFO.get(field, ""), None)
    except (ImportError, OSError, AttributeError):
        return None
    return int(value) if value is not None else None


def mem_available() -> int | None:
    """``MemAvailable`` in bytes (None where there is none)."""
    return meminfo("MemAvailable")


def _int_env(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{name}={value!r} is not an integer") from None


def config() -> Config:
    """Read the environment now (cheap; not cached, so tests can monkeypatch)."""
    backend = os.environ.get("GEMMA_STREAM_BACKEND", "").strip().lower() or None
    if backend not in (None, "auto", "native", "python"):
        raise UsageError(f"GEMMA_STREAM_BACKEND={backend!r}: expected native, python or auto")
    # 16 MiB: 4 MiB reads were 25% slower cold, 64 MiB no faster (benchmarks/NOTES.md)
    chunk_mb = _int_env("GEMMA_STREAM_CHUNK_MB") or 16
    prefetch = os.environ.get("GEMMA_STREAM_PREFETCH", "").strip().lower() or "auto"
    aliases = {"1": "on", "true": "on", "yes": "on", "0": "off", "false": "off", "no": "off"}
    prefetch = aliases.get(prefetch, prefetch)
    if prefetch not in ("auto", "on", "off"):
        raise UsageError(f"GEMMA_STREAM_PREFETCH={prefetch!r}: expected auto, on or off")
    staging_mb = _int_env("GEMMA_STREAM_STAGING_MB")
    if staging_mb is not None and staging_mb <= 0:
        raise UsageError(f"GEMMA_STREAM_STAGING_MB={staging_mb}: expected a positive number of MiB")
    force = os.environ.get("GEMMA_STREAM_FORCE_STAGING", "").strip().lower() in ("1", "true", "yes", "on")
    # set to anything but 0/false/no/off (the driver, tests/native/driver.cc, reads it the same way)
    no_avx2 = os.environ.get("GEMMA_STREAM_NO_AVX2", "").strip().lower() not in ("", "0", "false", "no", "off")
    return Config(backend=None if backend == "auto" else backend, threads=_int_env("GEMMA_STREAM_THREADS"),
                  chunk_bytes=chunk_mb << 20, prefetch=prefetch,
                  staging_bytes=staging_mb << 20 if staging_mb else None, force_staging=force, avx2=not no_avx2)
