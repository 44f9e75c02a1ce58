"""The benchmark's readers of the machine: /proc (status, stat, meminfo) and rusage, for both sides.

The child measures itself (``proc_status``, ``reset_peak``, ``cpu_seconds``); the parent measures the
rest of the machine (``cpu_times``, ``cpu_busy``, ``wait_for_idle``, ``mem_available``). These are the
only places the benchmark reads /proc or resource: a port to another OS replaces them (psutil
stands in where there is no /proc).
"""

from __future__ import annotations

import os
import time

from ..config import meminfo

__all__ = ["proc_status", "reset_peak", "cpu_seconds", "cpu_times", "children_cpu_seconds", "cpu_busy",
           "wait_for_idle", "meminfo_bytes", "mem_available"]

try:
    import resource
except ImportError:  # Windows
    resource = None


# ---------------------------------------------------------------- the child: /proc/self/status and rusage

def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM (peak), RssAnon, RssFile, RssShmem of this process, in bytes."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(rest.split()[0]) * 1024
    except FileNotFoundError:
        return _status_without_proc()
    return out


def _status_without_proc() -> dict[str, int]:
    """macOS and Windows: RSS and its peak from psutil / getrusage; no anonymous/file split
    (all of RSS counts as anonymous) and no peak reset."""
    import psutil
    info = psutil.Process().memory_info()
    peak = getattr(info, "peak_wset", None)  # Windows
    if peak is None:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
    return {"VmRSS": info.rss, "VmHWM": max(peak, info.rss), "RssAnon": info.rss, "RssFile": 0, "RssShmem": 0}


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (clear_refs "5"); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all its threads; on every OS)."""
    return time.process_time()



# ---------------------------------------------------------------- the machine: /proc/stat, meminfo and rusage

def cpu_times() -> tuple[float, float]:
    """(busy, total) CPU seconds of all CPUs since boot: /proc/stat, else psutil (macOS, Windows)."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except FileNotFoundError:
        import psutil
        times = psutil.cpu_times()
        total = sum(times)
        return total - times.idle - getattr(times, "iowait", 0.0), total
    ticks = os.sysconf("SC_CLK_TCK")
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values) - idle) / ticks, sum(values) / ticks


def children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's finished children; 0 where there is no getrusage
    (Windows: the others_cpu figure then includes the child's own time)."""
    if resource is None:
        return 0.0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_busy(seconds: float = 0.5) -> float:
    """Fraction of all CPUs busy over ``seconds``: other work skews timings."""
    busy0, total0 = cpu_times()
    time.sleep(seconds)
    busy1, total1 = cpu_times()
    # psutil's times are float sums: an idle interval can come out a rounding error below zero
    return min(1.0, max(0.0, (busy1 - busy0) / max(total1 - total0, 1e-9)))


def wait_for_idle(limit_seconds: float, busy_max: float = 0.15) -> float:
    """Wait (up to ``limit_seconds``) until the machine is quiet; returns the last busy fraction."""
    deadline = time.monotonic() + limit_seconds
    busy = cpu_busy()
    while busy > busy_max and time.monotonic() < deadline:
        time.sleep(2.0)
        busy = cpu_busy()
    return busy


def meminfo_bytes(field: str) -> int:
    """A /proc/meminfo field in bytes (0 when unknown)."""
    return meminfo(field) or 0


def mem_available() -> int:
    return meminfo_bytes("MemAvailable")
