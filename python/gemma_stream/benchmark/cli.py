"""``bench`` and ``demo``: argument parsers and entry points shared by the CLI and benchmarks/bench_load.py."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

from ..cli_text import human_bytes, human_count
from .child import LOADERS
from .report import (evaluate_targets, format_table, format_targets, machine_info, memory_measurable, memory_note,
                     write_json, write_plot)
from .runner import CLEAN_OTHERS_CPU, Row, Workload, mem_available, run_loaders, synthetic_workload, user_workload
from .shapes import SIZES, parse_size
from .writers import evict

__all__ = ["add_bench_arguments", "run_bench", "add_demo_arguments", "run_demo", "check_disk", "default_loaders",
           "demo_verdict"]

_BOUNDS = ["read_1t", "memcpy_1t", "mmap_copy_2t", "pread_2t", "pread_2t_thp", "odirect_2t"]
_GIB = 2**30


def default_loaders(fmt: str, quantize: str | None) -> list[str]:
    if quantize:
        return ["gs_native", "gs_python", "gs_plain", "twostep_torch", "twostep_torchao", "pread_2t"]
    if fmt == "ckpt":
        return ["gs_native", "gs_python", "gs_mmap", "torch_load", "torch_load_mmap", "torch_load_mmap_assign",
                *_BOUNDS]
    if fmt == "hf":
        return ["gs_hf", "gs_hf_mmap", "gs_native", "transformers", "safetensors", *_BOUNDS]
    return ["gs_native", "gs_python", "gs_mmap", "torch_load", "torch_load_mmap", "torch_load_mmap_assign",
            "safetensors", "transformers", "gs_hf", *_BOUNDS]


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``gemma-stream bench`` / ``benchmarks/bench_load.py``."""
    parser.add_argument("path", nargs="?", help="benchmark this checkpoint (or give --synthetic SIZE)")
    parser.add_argument("--synthetic", "--size", dest="size", default=None,
                        help=f"write and benchmark a synthetic Gemma shape: {', '.join(SIZES)} or a size in GiB "
                             "such as 1.5 (tiny: a quick check; 2b: 5 GB of disk and about 9.3 GiB of memory)")
    parser.add_argument("--dtype", choices=["bf16", "f16", "f32"], default="bf16", help="checkpoint dtype")
    parser.add_argument("--model-dtype", choices=["bf16", "f16", "f32"], default=None,
                        help="destination dtype (default: the checkpoint's), e.g. --dtype f32 --model-dtype bf16")
    parser.add_argument("--format", dest="fmt", choices=["safetensors", "sharded", "ckpt", "hf"],
                        default="safetensors", help="synthetic checkpoint format (hf = config.json + shards)")
    parser.add_argument("--hf", action="store_true", help="shorthand for --format hf")
    parser.add_argument("--loaders", default=None,
                        help=f"comma-separated subset of: {', '.join(LOADERS)} (default depends on the format)")
    parser.add_argument("--cold", action="store_true", help="evict the files from the page cache before each load")
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None)
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size (default 128)")
    parser.add_argument("--repeat", type=int, default=1, help="loads per loader; the table shows the median")
    parser.add_argument("--threads", type=int, default=None, help="gemma_stream threads (default: its own)")
    parser.add_argument("--key", default=None, help="state-dict key inside a torch zip checkpoint")
    parser.add_argument("--json", dest="json_path", default=None, metavar="FILE", help="write the results as JSON")
    parser.add_argument("--plot", dest="plot_path", default=None, metavar="FILE.png",
                        help="bar chart of time and peak memory (needs matplotlib)")
    parser.add_argument("--workdir", default=None,
                        help="where synthetic checkpoints go; kept and reused (default: a temporary folder, removed)")
    parser.add_argument("--scaling", action="store_true",
                        help="gemma_stream only, on several sizes (--scaling-sizes): GB/s per size, warm and cold")
    parser.add_argument("--scaling-sizes", default="1b,2b,7b")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per load before it counts as failed")
    parser.add_argument("--render", metavar="FILE.json", default=None,
                        help="print the table (and --plot) again from a --json file, without loading anything "
                             "(--loaders: only those rows)")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each load, wait up to SECONDS for the CPUs to be idle (shared machines)")
    parser.add_argument("--targets", action="store_true",
                        help="also print the gemma_stream project's own issue targets as MET/MISS lines")
    return parser


def _workdir(args) -> tuple[str, bool]:
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        return args.workdir, False
    return tempfile.mkdtemp(prefix="gemma_stream_bench_", dir="/tmp" if os.path.isdir("/tmp") else None), True


def check_disk(folder: str, nbytes: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < nbytes * 1.05:
        raise SystemExit(f"bench: {folder} has {free / _GIB:.1f} GiB free, the checkpoints need about "
                         f"{nbytes / _GIB:.1f} GiB (use --workdir elsewhere)")


def _loader_list(text: str | None, fmt: str, quantize: str | None) -> list[str]:
    if not text:
        return default_loaders(fmt, quantize)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in LOADERS]
    if unknown:
        raise SystemExit(f"bench: unknown loader(s) {', '.join(unknown)}; choose from {', '.join(LOADERS)}")
    return names


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark the parsed arguments describe; print the table; 1 if a load failed."""
    if args.repeat < 1:
        raise SystemExit("bench: --repeat must be at least 1")
    fmt = "hf" if args.hf else args.fmt
    if args.render:
        return _render(args)
    if args.scaling:
        return _run_scaling(args)
    if args.path and args.size:
        raise SystemExit("bench: give a PATH or --synthetic, not both")
    if not args.path and not args.size:
        args.size = _ask_size()
    workdir, temporary = (None, False) if args.path else _workdir(args)
    try:
        if args.path:
            workload = user_workload(args.path, key=args.key, model_dtype=args.model_dtype)
        else:
            shape = parse_size(args.size, itemsize=2)
            workload = synthetic_workload(shape, args.dtype, fmt, workdir, model_dtype=args.model_dtype)
        loaders = _loader_list(args.loaders, workload.fmt, args.quantize)
        sets = {workload.reads(x) for x in loaders if workload.reads(x)} | {"primary"}
        _say_size(workload, loaders, args.repeat, None if args.path else (workdir, len(sets)))
        if not args.path:
            check_disk(workdir, workload.data_bytes * len(sets))
        started = time.time()
        rows = run_loaders(workload, loaders, cold=args.cold, repeat=args.repeat, quantize=args.quantize,
                           group_size=args.group_size, threads=args.threads, timeout=args.timeout,
                           wait_idle=args.wait_idle)
        _report(args, workload, rows, started)
        return 1 if any(r.status == "error" for r in rows) else 0
    finally:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)


def _ask_size() -> str:
    """No PATH and no --synthetic: ask on a terminal (saying what the default costs), refuse otherwise."""
    two_b = parse_size("2b", itemsize=2)
    cost = (f"the 2b shape writes {human_bytes(two_b.nbytes(2))} to disk and its loads need up to "
            f"{human_bytes(2 * two_b.nbytes(2))} of memory")
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise SystemExit(f"bench: name what to benchmark: a checkpoint PATH, or --synthetic SIZE "
                         f"({', '.join(SIZES)} or GiB; 'tiny' is a quick check, {cost})")
    print(f"bench: no checkpoint given. Benchmark a synthetic Gemma shape? {cost}.", flush=True)
    try:
        answer = input(f"size ({', '.join(SIZES)}, GiB such as 1.5; empty to cancel): ").strip()
    except EOFError:
        answer = ""
    if not answer:
        raise SystemExit("bench: cancelled; give a checkpoint PATH or --synthetic SIZE")
    parse_size(answer)   # a bad size is refused here, before anything is written
    return answer


def _say_size(workload: Workload, loaders: list[str], repeat: int, written: tuple[str, int] | None) -> None:
    """Before anything is written or loaded: how big, where, and how much memory the loads take."""
    memory = max((workload.data_bytes + workload.model_bytes if LOADERS[x].doubles_memory else workload.model_bytes)
                 for x in loaders) if loaders else workload.model_bytes
    where = (f"{human_bytes(workload.data_bytes * written[1])} written to {written[0]}" if written
             else f"{human_bytes(workload.data_bytes)} read")
    print(f"bench: {workload.title}: {where}; a load needs up to {human_bytes(memory)} of memory; "
          f"{len(loaders)} loaders x {repeat} run{'s' if repeat != 1 else ''}, each in a fresh process",
          file=sys.stderr, flush=True)


def _render(args) -> int:
    """Table, targets and chart again from a JSON file (e.g. after changing how they are computed)."""
    with open(args.render) as f:
        doc = json.load(f)
    if "scaling" in doc:
        print(_scaling_table(doc["scaling"], targets=args.targets))
        return 0
    if "rows" not in doc:
        raise SystemExit(f"bench: {args.render} is not a bench --json file with rows")
    w = doc["workload"]
    workload = Workload(title=w["title"], fmt=w["format"], model=w["model"], model_dtype=w["model_dtype"],
                        stored_dtype=None, data_bytes=w["data_bytes"], model_bytes=w["model_bytes"])
    keep = set(_loader_list(args.loaders, w["format"], doc["quantize"])) if args.loaders else None
    rows = [Row(r["loader"], r["label"], r["kind"], r["status"], r["message"], r["runs"], r["reads"],
                r.get("errors", [])) for r in doc["rows"] if keep is None or r["loader"] in keep]
    args.cold, args.quantize, args.group_size = doc["mode"] == "cold", doc["quantize"], doc["group_size"]
    args.json_path = None
    _report(args, workload, rows, doc.get("started", 0.0))
    return 0


def _report(args, workload: Workload, rows: list[Row], started: float) -> None:
    table = format_table(workload, rows, cold=args.cold, quantize=args.quantize)
    targets = evaluate_targets(workload, rows, cold=args.cold, quantize=args.quantize, group_size=args.group_size)
    print(table)
    if targets and getattr(args, "targets", False):
        print(format_targets(targets))
    checks = {r.loader: r.last("check") for r in rows if r.runs and r.last("check") is not None}
    if len({round(v, 3) for v in checks.values()}) > 1:
        print(f"WARNING: loaders disagree about the weights (fingerprints {checks})")
    if args.json_path:
        write_json(args.json_path, {
            "schema": 1, "command": [os.path.basename(sys.argv[0]), *sys.argv[1:]], "started": started,
            "machine": machine_info(), "workload": {"title": workload.title, "format": workload.fmt,
                                                    "model": workload.model, "model_dtype": workload.model_dtype,
                                                    "data_bytes": workload.data_bytes,
                                                    "model_bytes": workload.model_bytes},
            "mode": "cold" if args.cold else "warm", "quantize": args.quantize, "group_size": args.group_size,
            "repeat": args.repeat, "rows": [r.as_dict(workload.data_bytes) for r in rows],
            "targets": [t.__dict__ for t in targets], "table": table})
        print(f"wrote {args.json_path}")
    if args.plot_path:
        mode = "cold" if args.cold else "warm"
        if write_plot(args.plot_path, workload, rows, title=f"{workload.title}, {mode}"):
            print(f"wrote {args.plot_path}")


def _run_scaling(args) -> int:
    """gemma_stream native and the 2-thread pread bound per size, warm then cold: is GB/s flat?"""
    workdir, temporary = _workdir(args)
    loaders = _loader_list(args.loaders, "safetensors", None) if args.loaders else ["gs_native", "pread_2t"]
    results = []
    failed = False
    earlier: list[Workload] = []
    try:
        for size in [s.strip() for s in args.scaling_sizes.split(",") if s.strip()]:
            shape = parse_size(size)
            workload = synthetic_workload(shape, args.dtype, "safetensors", workdir, model_dtype=args.model_dtype)
            check_disk(workdir, workload.data_bytes)
            for other in earlier:   # each size starts with no other size's file in the page cache
                evict([f for f in other.all_files() if os.path.exists(f)])
            earlier.append(workload)
            entry = {"size": size, "model_bytes": workload.model_bytes, "data_bytes": workload.data_bytes}
            # Warm means the whole file cached *and* the model allocated: at 7b on a 24 GiB
            # machine (17 GB + 17 GB) that cannot be, and a "warm" run would half read the disk.
            fits = workload.data_bytes + workload.model_bytes + (1 << 30) <= mem_available()
            if not fits:
                entry["warm_skipped"] = (f"file + model ({(workload.data_bytes + workload.model_bytes) / _GIB:.1f}"
                                         f" GiB) exceed MemAvailable ({mem_available() / _GIB:.1f} GiB)")
            for cold in (False, True) if fits else (True,):
                rows = run_loaders(workload, loaders, cold=cold, repeat=args.repeat, threads=args.threads,
                                   timeout=args.timeout, wait_idle=args.wait_idle)
                failed |= any(r.status == "error" for r in rows)
                entry["cold" if cold else "warm"] = [r.as_dict(workload.data_bytes) for r in rows]
            results.append(entry)
            if temporary or size not in ("1b", "2b"):   # a 17 GB 7b file is not worth keeping around
                shutil.rmtree(workload.directory, ignore_errors=True)
    finally:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)
    table = _scaling_table(results, targets=args.targets)
    print(table)
    if args.json_path:
        write_json(args.json_path, {"schema": 1, "command": [os.path.basename(sys.argv[0]), *sys.argv[1:]],
                                    "machine": machine_info(), "scaling": results, "table": table})
        print(f"wrote {args.json_path}")
    return 1 if failed else 0


def _scaling_table(results: list[dict], targets: bool = False) -> str:
    """GB/s per size: median of the quiet runs and the fastest run, warm and cold; the spread across sizes.

    ``targets``: flag each gemma_stream spread against the project's issue-7 target (<= 10%).
    """
    lines = ["size    GiB  loader                              warm s  GB/s  best GB/s   cold s  GB/s  best GB/s"
             "  peak/model"]
    speeds: dict[tuple[str, str], list[float]] = {}
    for entry in results:
        for i, cold in enumerate(entry["cold"]):
            warm = entry["warm"][i] if "warm" in entry else None
            if (warm and (warm["status"] != "ok" or not warm["seconds"])) or cold["status"] != "ok" \
                    or not cold["seconds"]:
                bad = warm if warm and warm["status"] != "ok" else cold
                lines.append(f"{entry['size']:<6} {bad['label']}: {bad['status']} {bad['message']}")
                continue
            cells = [f"{'n/a':>7} {'':5} {'':10}"] if warm is None else []
            for mode, row in (("warm", warm), ("cold", cold)):
                if row is None:
                    continue
                best = entry["data_bytes"] / row["min_seconds"] / 1e9
                speeds.setdefault((row["loader"], mode), []).append(row["gb_per_s"])
                speeds.setdefault((row["loader"], mode + ", fastest runs"), []).append(best)
                cells.append(f"{row['seconds']:7.2f} {row['gb_per_s']:5.2f} {best:10.2f}")
            peak = max(row["peak_over_model"] for row in (warm, cold) if row)
            lines.append(f"{entry['size']:<6}{entry['model_bytes'] / _GIB:5.2f}  {cold['label']:<35}{cells[0]}  "
                         f"{cells[1]}  {peak:9.2f}x")
        if entry.get("warm_skipped"):
            lines.append(f"{entry['size']:<6} warm: not measured, {entry['warm_skipped']}")
    lines.append("spread of GB/s across sizes ((max - min) / max" +
                 ("; issue 7 target for gemma_stream: <= 10%):" if targets else "):"))
    for (loader, mode), values in speeds.items():
        if len(values) > 1:
            spread = (max(values) - min(values)) / max(values)
            flag = ("MET " if spread <= 0.10 else "MISS") if loader.startswith("gs") else "    "
            lines.append(f"  {f'[{flag}] ' if targets else ''}{LOADERS[loader].label}, {mode}: {spread:.0%}")
    return "\n".join(lines)


# ---------------------------------------------------------------- demo

def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``gemma-stream demo``."""
    parser.add_argument("--size", default="1", help="checkpoint size in GiB (default 1), or tiny/1b/2b/7b")
    parser.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    parser.add_argument("--repeat", type=int, default=3, help="loads per loader; the median counts (default 3)")
    parser.add_argument("--workdir", default=None, help="parent folder of the temporary checkpoint (default /tmp)")
    return parser


#: within this factor either way, two loaders are "about as fast" (run-to-run noise on a quiet machine)
_SAME_SPEED = 1.05


def _factor(ours: float, theirs: float, more: str, less: str) -> str | None:
    """``2.3x faster`` / ``1.4x slower`` from two costs (seconds or bytes); None when within 5%."""
    if theirs >= ours * _SAME_SPEED:
        return f"{theirs / ours:.1f}x {more}"
    if ours >= theirs * _SAME_SPEED:
        return f"{ours / theirs:.1f}x {less}"
    return None


def demo_verdict(mine: Row, theirs: Row) -> str:
    """One line: faster or slower (medians), the memory, and on the same line whether the machine was busy.

    >>> demo_verdict(gs_row, torch_row)
    'gemma_stream: 6.9x faster than torch.load + load_state_dict (median of 3 loads each), with 2.0x less peak memory.'
    """
    other = "torch.load + load_state_dict"
    speed = _factor(mine.seconds, theirs.seconds, "faster", "slower")
    line = f"gemma_stream: {speed} than {other}" if speed else f"gemma_stream: as fast as {other} (within 5%)"
    runs = min(len(mine.runs), len(theirs.runs))
    line += f" ({'median of ' + str(runs) + ' loads each' if runs > 1 else 'one load each'})"
    if memory_measurable(mine.model_bytes):
        memory = _factor(mine.peak_bytes, theirs.peak_bytes, "less", "more")
        line += f", with {memory} peak memory" if memory else ", with the same peak memory"
    else:
        line += f"; memory not compared (a {human_bytes(mine.model_bytes)} model is too small to measure)"
    others = [r.get("others_cpu", 0.0) for row in (mine, theirs) for r in row.runs]
    if others and max(others) > CLEAN_OTHERS_CPU:
        line += (f"; the machine was busy (other processes used up to {max(others):.0%} of the CPUs during a "
                 f"load), so these timings are indicative")
    return line + "."


def run_demo(args: argparse.Namespace) -> int:
    """Write a Gemma-shaped torch zip checkpoint, load it with gemma_stream and with torch.load, compare."""
    import gemma_stream as gs

    if args.repeat < 1:
        raise SystemExit("demo: --repeat must be at least 1")
    itemsize = 4 if args.dtype == "f32" else 2
    shape = parse_size(args.size, itemsize)
    folder = tempfile.mkdtemp(prefix="gemma_stream_demo_", dir=args.workdir)
    try:
        check_disk(folder, shape.nbytes(itemsize))
        workload = synthetic_workload(shape, args.dtype, "ckpt", folder, durable=False)
        layers = f"{shape.layers} layer" + ("s" if shape.layers != 1 else "")
        print(f"Gemma-shaped checkpoint: hidden size {shape.hidden}, {layers}, vocabulary {shape.vocab}, "
              f"{human_count(shape.params())} params, {human_bytes(workload.data_bytes)} {args.dtype}, "
              f"a torch zip like gemma_pytorch's", flush=True)
        workload.ensure("primary")
        ours = "gs_native" if gs.native_available() else "gs_python"
        print(f"loading it {args.repeat} times each way, each load in a fresh process (file in the page cache) ...",
              flush=True)
        rows = run_loaders(workload, [ours, "torch_load"], cold=False, repeat=args.repeat)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print()
    print(f"{'':34}{'seconds':>8}{'peak RSS':>12}{'peak / model':>14}  weights in")
    measurable = memory_measurable(workload.model_bytes)
    for row in rows:
        if row.status != "ok" or not row.runs:
            print(f"{row.label:<34}{row.status}: {row.message}")
            continue
        ratio = f"{row.peak_bytes / row.model_bytes:13.2f}x" if measurable else f"{'-':>14}"
        print(f"{row.label:<34}{row.seconds:8.2f}{human_bytes(row.peak_bytes):>12}{ratio}  {row.resident}")
    print()
    if all(r.status == "ok" and r.runs for r in rows):
        print(demo_verdict(*rows))
    if not measurable:
        print(memory_note(workload.model_bytes))
    print(f"removed {folder}")
    return 0 if all(r.status == "ok" for r in rows) else 1
