"""What the ``gemma-stream`` commands print: tables, the ``inspect`` report, ``verify``'s verdicts.

Pure functions of checkpoint records and comparison results; ``cli`` parses arguments,
runs the commands and decides the exit status.
"""

from __future__ import annotations

import os
import re
import sys
from collections import Counter, defaultdict

from .formats import Checkpoint, TensorRecord, resolve_path

__all__ = ["format_table", "human_bytes", "human_count", "inspect_report", "format_inspect", "format_comparison"]

MIB = 1 << 20

#: dtypes worth a warning in ``inspect``, and why
UNUSUAL_DTYPES = {
    "f64": "float64 doubles the bytes of float32 and is rarely what a model computes in",
    "c64": "complex; gemma_pytorch's freqs_cis is recomputed at init, so loaders usually skip it",
    "c128": "complex; loaded as stored, never converted",
    "f8_e4m3": "float8; loaded as stored, never converted on read",
    "f8_e5m2": "float8; loaded as stored, never converted on read",
    "u16": "unsigned 16-bit; few torch ops accept it",
    "u32": "unsigned 32-bit; few torch ops accept it",
    "u64": "unsigned 64-bit; few torch ops accept it",
}


# ---------------------------------------------------------------- tables and units

def format_table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> list[str]:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return [line(headers)] + [line(r) for r in rows]


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def human_count(n: int) -> str:
    """A count in the unit that fits: ``2.51B``, ``3.67M``, ``45.1K``, ``512``."""
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}" if n < 100 * scale else f"{n / scale:.0f}{unit}"
    return str(n)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _names(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _display_path(path: str) -> str:
    """Relative to the working directory when below it, so ``sha256sum -c`` accepts our output."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _bar(args, total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False,
                file=sys.stderr, disable=not args.progress)


# ---------------------------------------------------------------- inspect

def _warnings(records: list[TensorRecord], base: str) -> list[str]:
    out = []
    strided = [r for r in records if r.strides is not None]
    if strided:
        first = strided[0]
        out.append(f"{_count(len(strided), 'non-contiguous view')}, loaded by strided copies: "
                   f"{_names([r.name for r in strided])} (e.g. shape {list(first.shape)}, strides {list(first.strides)})")
    shared = defaultdict(list)
    for r in records:
        if r.storage is not None:
            shared[(r.file, r.storage)].append(r.name)
    for (file, storage), names in shared.items():
        if len(names) > 1:
            out.append(f"{len(names)} tensors share storage {storage!r} of {os.path.relpath(file, base)} "
                       f"(tied weights or views; the totals count each name): {_names(names)}")
    by_dtype = defaultdict(list)
    for r in records:
        if r.dtype.name in UNUSUAL_DTYPES:
            by_dtype[r.dtype.name].append(r.name)
    for dtype, names in by_dtype.items():
        out.append(f"{_count(len(names), 'tensor')} in {dtype} ({UNUSUAL_DTYPES[dtype]}): {_names(names)}")
    return out


def inspect_report(path: str, ckpt: Checkpoint, pattern: re.Pattern | None = None) -> dict:
    """The JSON-ready description ``inspect`` prints (schema ``gemma_stream.inspect/1``)."""
    base = os.path.dirname(ckpt.files[0]) if ckpt.files else os.getcwd()
    records = [r for r in ckpt.records if pattern is None or pattern.search(r.name)]
    totals: dict[str, dict[str, int]] = {}
    for r in records:
        row = totals.setdefault(r.dtype.name, {"tensors": 0, "params": 0, "nbytes": 0})
        row["tensors"] += 1
        row["params"] += r.numel
        row["nbytes"] += r.nbytes
    counts = Counter(r.file for r in ckpt.records)
    return {
        "schema": "gemma_stream.inspect/1",
        "path": resolve_path(path),
        "format": ckpt.format,
        "files": [{"path": f, "bytes": os.path.getsize(f), "tensors": counts[f]} for f in ckpt.files],
        "filter": pattern.pattern if pattern is not None else None,
        "total_tensors": len(ckpt.records),
        "tensors": [{"name": r.name, "dtype": r.dtype.name, "shape": list(r.shape), "nbytes": r.nbytes,
                     "file": r.file, "offset": r.byte_offset,
                     "strides": list(r.strides) if r.strides is not None else None, "storage": r.storage}
                    for r in records],
        "totals": {"tensors": len(records), "params": sum(r.numel for r in records),
                   "nbytes": sum(r.nbytes for r in records),
                   "by_dtype": dict(sorted(totals.items(), key=lambda kv: -kv[1]["nbytes"]))},
        "metadata": dict(ckpt.metadata),
        "extras": dict(ckpt.extras),
        "warnings": _warnings(records, base),
    }


def format_inspect(report: dict) -> str:
    base = os.path.dirname(report["files"][0]["path"]) if report["files"] else ""
    files, totals = report["files"], report["totals"]
    size = sum(f["bytes"] for f in files)
    lines = [f"checkpoint  {report['path']}",
             f"format      {report['format']}, {_count(len(files), 'file')}, {human_bytes(size)}, "
             f"{_count(report['total_tensors'], 'tensor')}"]
    if report["filter"] is not None:
        lines.append(f"filter      {report['filter']!r}: {totals['tensors']} of {report['total_tensors']} tensors match")
    if len(files) > 1:
        lines += ["", *format_table(["file", "size", "tensors"],
                                    [[os.path.relpath(f["path"], base), human_bytes(f["bytes"]), str(f["tensors"])]
                                     for f in files], right={1, 2})]
    rows = [[t["name"], t["dtype"], str(t["shape"]), f"{t['nbytes'] / MIB:.2f}", os.path.relpath(t["file"], base),
             str(t["offset"])] for t in report["tensors"]]
    lines += ["", *format_table(["name", "dtype", "shape", "MiB", "file", "offset"], rows, right={3, 5})]
    dtype_rows = [[d, str(v["tensors"]), f"{v['params']:,}", f"{v['nbytes'] / MIB:.2f}"]
                  for d, v in totals["by_dtype"].items()]
    dtype_rows.append(["total", str(totals["tensors"]), f"{totals['params']:,}", f"{totals['nbytes'] / MIB:.2f}"])
    lines += ["", *format_table(["dtype", "tensors", "params", "MiB"], dtype_rows, right={1, 2, 3})]
    for title, entries in (("metadata", report["metadata"]), ("non-tensor entries", report["extras"])):
        if entries:
            lines += ["", f"{title}:"] + [f"  {k}: {v}" for k, v in entries.items()]
    if report["warnings"]:
        lines += ["", "warnings:"] + [f"  - {w}" for w in report["warnings"]]
    return "\n".join(lines)


# ---------------------------------------------------------------- verify

def _format_figure(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def format_comparison(comparison) -> list[str]:
    rows = [[t.name, t.a or "-", t.b or "-", str(t.shape), t.status,
             _format_figure(t.max_abs_err if t.status != "equal" else None, ".3g"),
             _format_figure(t.rel_err if t.status != "equal" else None, ".3g"),
             _format_figure(t.sqnr_db, ".1f") if t.status != "equal" else "", t.note]
            for t in comparison.tensors]
    return format_table(["name", "A", "B", "shape", "result", "max abs err", "rel err", "SQNR dB", "note"],
                        rows, right={5, 6, 7})


def _comparison_verdict(comparison) -> str:
    where = f"{_display_path(comparison.path_a)} vs {_display_path(comparison.path_b)}"
    counts = ", ".join(f"{n} {status}" for status, n in comparison.counts().most_common())
    total = len(comparison.tensors)
    if comparison.ok:
        sqnrs = [t.sqnr_db for t in comparison.tensors if t.sqnr_db is not None]
        lowest = f" (lowest SQNR {min(sqnrs):.1f} dB)" if sqnrs else ""
        return f"OK: {where}: {total} tensors: {counts}{lowest}"
    bad = [t for t in comparison.tensors if not t.ok]
    return f"FAILED: {where}: {len(bad)} of {total} tensors disagree ({counts}); first: {bad[0].name!r} {bad[0].status}"


def _checkpoint_summary(ckpt: Checkpoint) -> str:
    size = sum(os.path.getsize(f) for f in ckpt.files)
    return f"{ckpt.format}, {_count(len(ckpt.files), 'file')}, {_count(len(ckpt.records), 'tensor')}, {human_bytes(size)}"
