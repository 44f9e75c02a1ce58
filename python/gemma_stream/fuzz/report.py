"""The fuzzer's tables: the RELIABILITY.md results table and the pickle bombs (memory, MB/s)."""

from __future__ import annotations

import os
import subprocess
import sys

from .runner import PACKAGE_PARENT

__all__ = ["format_table", "BOMBS", "rss_kib", "bomb_table"]


def format_table(results: dict) -> str:
    """The RELIABILITY.md table: one row per format (counts are case x backend)."""
    head = ["format", "cases", "backends", "both reject", "both accept, equal", "accepted only by us",
            "rejected only by us", "wrong data", "leaked types", "crashes/hangs", "backends disagree", "seconds"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for fmt, r in results.items():
        rows.append("| " + " | ".join(str(v) for v in (
            fmt, r["cases"], "+".join(r["backends"]), r["both_reject"], r["both_accept_equal"], r["ours_only_accept"],
            r["ours_only_reject"], r["wrong_data"], r["leaked"], r["crash"] + r["hang"], r["backends_disagree"],
            r["seconds"])) + " |")
    return "\n".join(rows)


BOMBS = {   # data.pkl bodies that allocate per opcode byte; each is grown to the pickle size limit
    "MARK": b"(",
    "EMPTY_LIST": b"]",
    "MEMOIZE": b"\x94",
    "DUP": b"2",
    "TUPLE1": b"\x85",
    "MARK+POP_MARK": b"(1",
    "SHORT_BINUNICODE": b"\x8c\x05hello",
    "LONG1": b"\x8a\x08" + b"\x7f" * 8,
}


def rss_kib(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` (peak, reset by writing 5 to /proc/self/clear_refs) in KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def bomb_table(size: int | None = None) -> str:
    """Each bomb walked in a fresh child: its size, seconds, MB/s and extra peak RSS (MiB)."""
    from ..formats.torchzip import MAX_PICKLE_BYTES
    size = size or MAX_PICKLE_BYTES
    code = ("import sys,time\n"
            "from gemma_stream.errors import CheckpointError\n"
            "from gemma_stream.formats.pickle_walker import walk_pickle\n"
            "from gemma_stream.fuzz import rss_kib\n"
            "unit=bytes.fromhex(sys.argv[1]); n=int(sys.argv[2])\n"
            "data=bytearray(b'\\x80\\x02N'); data+=unit*((n-3)//len(unit)); data=bytes(data)\n"
            "open('/proc/self/clear_refs','w').write('5')\n"   # resets the peak (VmHWM) to the current RSS
            "before=rss_kib('VmRSS'); t=time.perf_counter(); c=time.process_time()\n"
            "try:\n    walk_pickle(data); verdict='parsed'\n"
            "except CheckpointError as e:\n    verdict=str(e).split(': ',1)[1][:60]\n"
            "dt=time.perf_counter()-t; cpu=time.process_time()-c\n"
            "print(len(data), dt, cpu, (rss_kib('VmHWM')-before)/1024, verdict)\n")
    env = dict(os.environ, PYTHONPATH=PACKAGE_PARENT)
    rows = ["| bomb | data.pkl bytes | seconds | CPU seconds | MB/s (CPU) | extra peak RSS (MiB) | verdict |",
            "|---|---|---|---|---|---|---|"]
    for name, unit in BOMBS.items():
        out = subprocess.run([sys.executable, "-c", code, unit.hex(), str(size)], env=env, capture_output=True,
                             text=True, timeout=600).stdout.split(" ", 4)
        n, seconds, cpu, extra, verdict = int(out[0]), float(out[1]), float(out[2]), float(out[3]), out[4].strip()
        rows.append(f"| {name} | {n} | {seconds:.2f} | {cpu:.2f} | {n / cpu / 1e6:.0f} | {extra:.1f} | {verdict} |")
    return "\n".join(rows)

