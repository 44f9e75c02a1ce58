"""The checkpoint-mix matrix (issue 15): every loader on every mix, size and format, warm and cold.

One cell is a (mix, size, state).  Its checkpoint is written once in three formats (one
safetensors file, a sharded Hugging Face directory of 3+ files, a torch zip of the same tensors);
then each round loads every entry (a loader on one of those formats) once, each in a fresh
process, starting one entry further on each round.  Ratios are taken within a round (the entries
of one round share the machine's state) and reported as median, min and max over the rounds::

    python benchmarks/bench_mixes.py --sizes 1,2,5 --rounds 5 --json benchmarks/out/mixes.json
    python benchmarks/bench_mixes.py --render benchmarks/out/mixes.json --markdown   # the README table

``matrix_report`` turns the JSON into text (``format_cells``) and the README's table (``render_markdown``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

from ..cli_text import human_bytes
from . import writers
from .child import LOADERS
from .mixes import ITEMSIZE, MIXES, mix_specs, parse_mix_size, size_name
from .matrix_report import format_cells, render_markdown
from .report import machine_info, write_json
from .runner import cpu_busy, mem_available, run_child, wait_for_idle

__all__ = ["ENTRIES", "RATIOS", "Entry", "Ratio", "add_matrix_arguments", "entry_spec", "fingerprint_names", "run_cell",
           "run_matrix", "set_cache_state", "shard_limit", "summarize", "write_cell_files"]

FORMATS = ("safetensors", "sharded", "zip")
_FORMAT_OF = {"safetensors": "safetensors", "sharded": "safetensors", "zip": "ckpt"}
#: shards per Hugging Face directory: at least this many files whatever the mix
_MIN_SHARDS = 3


@dataclass(frozen=True)
class Entry:
    """A loader reading one of the cell's formats, e.g. ``gs_native@zip``."""

    loader: str
    fmt: str

    @property
    def key(self) -> str:
        return f"{self.loader}@{self.fmt}"

    @staticmethod
    def parse(text: str) -> "Entry":
        loader, _, fmt = text.strip().partition("@")
        if loader not in LOADERS:
            raise SystemExit(f"bench_mixes: unknown loader {loader!r}; choose from {', '.join(LOADERS)}")
        if fmt not in FORMATS:
            raise SystemExit(f"bench_mixes: {text!r}: the format after @ is one of {', '.join(FORMATS)}")
        wants = LOADERS[loader].reads
        if wants in ("ckpt", "safetensors") and _FORMAT_OF[fmt] != wants:
            raise SystemExit(f"bench_mixes: {loader} reads {wants} files, not {fmt}")
        if wants == "hf":
            raise SystemExit(f"bench_mixes: {loader} needs a transformers config; the mixes have none")
        return Entry(loader, fmt)


ENTRIES = [Entry(*e.split("@")) for e in (
    "gs_native@safetensors", "gs_native@sharded", "gs_native@zip",
    "gs_native_ra_off@safetensors", "gs_native_ra_off@sharded", "gs_native_ra_off@zip",
    "gs_mmap_ra_on@safetensors", "gs_mmap_ra_off@safetensors", "gs_mmap_ra_on@zip", "gs_mmap_ra_off@zip",
    "torch_load_mmap_assign@zip", "safetensors@safetensors",
    "pread_2t_4k@safetensors", "pread_2t_4k@sharded", "pread_2t_4k@zip")]


@dataclass(frozen=True)
class Ratio:
    """``reference`` seconds / ``entry`` seconds in one round: above 1 means ``entry`` was faster."""

    name: str
    entry: str
    reference: str
    target: float | None = None   # issue 15's threshold for the median (None: informative)
    states: tuple[str, ...] = ("warm", "cold")


RATIOS = [
    Ratio("copy, of the 2-thread bound (safetensors)", "gs_native@safetensors", "pread_2t_4k@safetensors", 0.95),
    Ratio("copy, of the 2-thread bound (sharded)", "gs_native@sharded", "pread_2t_4k@sharded", 0.95),
    Ratio("copy, of the 2-thread bound (zip)", "gs_native@zip", "pread_2t_4k@zip", 0.95),
    Ratio("copy vs safetensors load_model", "gs_native@safetensors", "safetensors@safetensors", 1.0, ("warm",)),
    Ratio("copy, zip vs safetensors (GB/s)", "gs_native@zip", "gs_native@safetensors", 0.9),
    Ratio("copy read-ahead on vs off (safetensors)", "gs_native@safetensors", "gs_native_ra_off@safetensors", 1.0),
    Ratio("copy read-ahead on vs off (sharded)", "gs_native@sharded", "gs_native_ra_off@sharded", 1.0),
    Ratio("copy read-ahead on vs off (zip)", "gs_native@zip", "gs_native_ra_off@zip", 1.0),
    Ratio("mmap read-ahead on vs torch.load(mmap)+assign", "gs_mmap_ra_on@safetensors",
          "torch_load_mmap_assign@zip", 1.0),
    Ratio("mmap read-ahead off vs torch.load(mmap)+assign", "gs_mmap_ra_off@safetensors",
          "torch_load_mmap_assign@zip", 1.0),
    Ratio("mmap read-ahead on vs off", "gs_mmap_ra_on@safetensors", "gs_mmap_ra_off@safetensors", 1.0),
    Ratio("mmap on the zip, read-ahead on vs torch.load(mmap)+assign", "gs_mmap_ra_on@zip",
          "torch_load_mmap_assign@zip", 1.0),
    Ratio("mmap on the zip, read-ahead on vs off", "gs_mmap_ra_on@zip", "gs_mmap_ra_off@zip", 1.0),
]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- files

def shard_limit(specs: list) -> int:
    """Shard size for the HF directory: a quarter of the bytes, and at most half of what is left beside
    the largest tensor (a tensor is never split: one 1.5 GiB embedding in 2 GiB would leave 2 files)."""
    sizes = [math.prod(s) * ITEMSIZE for _, s in specs]
    return max(1, min(sum(sizes) // (_MIN_SHARDS + 1), (sum(sizes) - max(sizes)) // (_MIN_SHARDS - 1)))


#: the order the three formats are written in by default (``--write-order``)
WRITE_ORDER = ("safetensors", "sharded", "zip")


def write_cell_files(folder: str, mix: str, nbytes: int, order: tuple[str, ...] = WRITE_ORDER) -> dict[str, dict]:
    """The mix in every format under ``folder`` (reused when a previous run finished writing it).

    ``order`` is the order the formats are written in: on a virtual disk a file's cold speed can
    depend on where and when it was written, which ``--write-order`` lets a run tell apart from
    the format.  Returns format -> {"path": what a loader opens, "data": the files holding tensor bytes}.
    """
    if sorted(order) != sorted(WRITE_ORDER):
        raise SystemExit(f"bench_mixes: --write-order must name {', '.join(WRITE_ORDER)} once each, not {order}")
    manifest_path = os.path.join(folder, "manifest.json")
    key = {"mix": mix, "nbytes": nbytes, "schema": 1, "order": list(order)}
    try:
        with open(manifest_path) as f:
            found = json.load(f)
        if found.get("key") == key and all(os.path.exists(p) for e in found["formats"].values() for p in e["data"]):
            return found["formats"]
    except (OSError, ValueError, KeyError):
        pass
    os.makedirs(folder, exist_ok=True)
    specs = mix_specs(mix, nbytes)
    dtype = writers.DTYPES["bf16"]
    started = time.perf_counter()
    _log(f"writing {mix} at {size_name(nbytes)} ({len(specs)} tensors) in 3 formats to {folder}/ ...")
    single = os.path.join(folder, "model.safetensors")
    sharded = os.path.join(folder, "hf")
    zipped = os.path.join(folder, "model.pt")
    data_bytes = sum(math.prod(s) for _, s in specs) * ITEMSIZE
    shards: list[str] = []
    for fmt in order:
        if fmt == "safetensors":
            writers.write_safetensors(single, None, dtype, specs=specs)
        elif fmt == "sharded":
            os.makedirs(sharded, exist_ok=True)
            shards = writers.write_sharded(sharded, None, dtype, specs=specs, max_shard_bytes=shard_limit(specs))
        else:
            writers.write_ckpt(zipped, None, dtype, specs=specs, key=None)
    formats = {"safetensors": {"path": single, "data": [single]},
               "sharded": {"path": sharded, "data": shards},
               "zip": {"path": zipped, "data": [zipped]}}
    with open(manifest_path, "w") as f:
        json.dump({"key": key, "formats": formats}, f, indent=2)
    _log(f"  {len(shards)} shards; {3 * data_bytes / 2**30:.2f} GiB in {time.perf_counter() - started:.0f} s")
    return formats


def entry_spec(entry: Entry, mix: str, nbytes: int, formats: dict, threads: int | None, check_names: list[str]) -> dict:
    """The child's spec for one load of ``entry`` on the cell's ``formats``."""
    files = formats[entry.fmt]
    return {"loader": entry.loader, "model": {"kind": "mix", "mix": mix, "nbytes": nbytes, "naming": "mix"},
            "model_dtype": "bfloat16", "threads": threads, "key": None, "quantize": None,
            "files": {"primary": files["path"], "data": files["data"], "ckpt": files["path"],
                      "safetensors": files["data"], "hf": files["path"]},
            "check_names": check_names, "sqnr_names": []}


def fingerprint_names(specs: list) -> list[str]:
    """A few 2-D tensors from the start, middle and end: loaders that disagree about a value are caught."""
    matrices = [name for name, shape in specs if len(shape) == 2]
    return sorted({matrices[0], matrices[len(matrices) // 2], matrices[-1]}) if matrices else []


def set_cache_state(state: str, all_files: list[str], files: list[str]) -> float:
    """Before one load: every file of the cell evicted ("cold"), or only ``files`` cached ("warm", read
    back unless already cached); returns the fraction of ``files`` cached."""
    if state == "cold":
        writers.evict(all_files)
    else:
        writers.evict([f for f in all_files if f not in files])
        if writers.cached_fraction(files) < 0.99:
            writers.warm_up(files)
    return writers.cached_fraction(files)


# ---------------------------------------------------------------- one cell

def run_cell(mix: str, nbytes: int, state: str, formats: dict, entries: list[Entry], rounds: int, *,
             threads: int | None = None, timeout: float = 1800.0, wait_idle: float = 0.0,
             pythonpath: str | None = None) -> dict:
    """``rounds`` rounds of every entry on one (mix, size, state); the raw runs and their summary."""
    specs = mix_specs(mix, nbytes)
    data_bytes = sum(math.prod(s) for _, s in specs) * ITEMSIZE
    check_names = fingerprint_names(specs)
    all_files = [f for e in formats.values() for f in e["data"]]
    cell = {"mix": mix, "size": size_name(nbytes), "nbytes": nbytes, "state": state, "tensors": len(specs),
            "data_bytes": data_bytes, "files": {k: v["data"] for k, v in formats.items()},
            "entries": {e.key: {"loader": e.loader, "format": e.fmt, "label": LOADERS[e.loader].label,
                                "runs": [None] * rounds, "errors": [], "skipped": None} for e in entries}}
    for entry in entries:
        doubles = LOADERS[entry.loader].doubles_memory
        need = data_bytes * (2 if doubles else 1) + (data_bytes if state == "warm" else 0) + (1 << 30)
        if need > (mem_available() or 0):
            cell["entries"][entry.key]["skipped"] = (f"needs about {need / 2**30:.1f} GiB, MemAvailable "
                                                     f"{(mem_available() or 0) / 2**30:.1f} GiB")
    live = [e for e in entries if not cell["entries"][e.key]["skipped"]]
    # round -1: one discarded load, so that no entry pays for being the first process after the files were written
    for index in range(-1, rounds):
        shift = max(index, 0) % max(len(live), 1)
        order = (live[shift:] + live[:shift]) if index >= 0 else live[:1]
        for entry in order:
            cached = set_cache_state(state, all_files, formats[entry.fmt]["data"])
            busy = wait_for_idle(wait_idle) if wait_idle > 0 else cpu_busy(0.2)
            where = "warm-up, discarded" if index < 0 else f"{index + 1}/{rounds}"
            _log(f"[{mix} {size_name(nbytes)} {state} {where}] {entry.key} ({cached:.0%} cached, cpu {busy:.0%} busy) ...")
            try:
                result = run_child(entry_spec(entry, mix, nbytes, formats, threads, check_names), timeout, pythonpath)
            except Exception as exc:   # a failed load is a recorded error, never a silent gap
                cell["entries"][entry.key]["errors"].append(f"round {index + 1}: {str(exc)[-300:]}")
                _log(f"    error: {str(exc)[-300:]}")
                continue
            _log(f"    {result['seconds']:.3f} s, peak {human_bytes(result['peak_bytes'])}, "
                 f"other work {result['others_cpu']:.0%}")
            if index >= 0:
                result.update(cached_before=cached, cpu_busy_before=busy)
                cell["entries"][entry.key]["runs"][index] = result
    return summarize(cell)


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "values": values} if values else {"median": None, "min": None, "max": None, "n": 0, "values": []}


def summarize(cell: dict) -> dict:
    """Medians and spreads per entry, ratios per round, and whether all loaders saw the same weights."""
    for entry in cell["entries"].values():
        seconds = [r["seconds"] for r in entry["runs"] if r]
        entry["seconds"] = _spread(seconds)
        entry["gb_per_s"] = cell["data_bytes"] / entry["seconds"]["median"] / 1e9 if seconds else None
        entry["peak_bytes"] = max((r["peak_bytes"] for r in entry["runs"] if r), default=None)
        entry["status"] = "skipped" if entry["skipped"] else ("ok" if seconds else "error")
    ratios = {}
    for ratio in RATIOS:
        a, b = cell["entries"].get(ratio.entry), cell["entries"].get(ratio.reference)
        if a is None or b is None or cell["state"] not in ratio.states:
            continue
        per_round = [rb["seconds"] / ra["seconds"] for ra, rb in zip(a["runs"], b["runs"]) if ra and rb]
        ratios[ratio.name] = dict(_spread(per_round), entry=ratio.entry, reference=ratio.reference,
                                  target=ratio.target)
    cell["ratios"] = ratios
    checks = {key: r["check"] for key, e in cell["entries"].items() for r in e["runs"]
              if r and r.get("check") is not None}
    cell["checks_agree"] = len({round(v, 3) for v in checks.values()}) <= 1
    return cell


# ---------------------------------------------------------------- command line

def add_matrix_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--mixes", default=",".join(MIXES), help=f"comma-separated subset of {', '.join(MIXES)}")
    parser.add_argument("--sizes", default="1,2,5", help="comma-separated sizes in GiB, or tiny (default 1,2,5)")
    parser.add_argument("--states", default="warm,cold", help="warm, cold or both (default both)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per cell (default 5; medians and spreads)")
    parser.add_argument("--entries", default=",".join(e.key for e in ENTRIES),
                        help="comma-separated LOADER@FORMAT (formats: safetensors, sharded, zip)")
    parser.add_argument("--threads", type=int, default=None, help="gemma_stream threads (default: its own)")
    parser.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temporary folder)")
    parser.add_argument("--write-order", default=",".join(WRITE_ORDER),
                        help="the order the three formats are written in (default %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep each cell's files (default: removed after it)")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each load, wait up to SECONDS for the CPUs to be idle")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per load before it counts as failed")
    parser.add_argument("--json", dest="json_path", default=None, metavar="FILE", help="write the results as JSON")
    parser.add_argument("--markdown", action="store_true", help="also print the README table (markdown)")
    parser.add_argument("--render", metavar="FILE.json", default=None,
                        help="print the tables again from a --json file, without loading anything")
    return parser


def run_matrix(args: argparse.Namespace) -> int:
    """Run (or ``--render``) the matrix the parsed arguments describe; 1 if a load failed."""
    if args.render:
        with open(args.render) as f:
            doc = json.load(f)
        print(format_cells(doc["cells"]))
        if args.markdown:
            print()
            print(render_markdown(doc))
        return 0
    if args.rounds < 1:
        raise SystemExit("bench_mixes: --rounds must be at least 1")
    mixes = [m.strip() for m in args.mixes.split(",") if m.strip()]
    unknown = [m for m in mixes if m not in MIXES]
    if unknown:
        raise SystemExit(f"bench_mixes: unknown mix(es) {', '.join(unknown)}; choose from {', '.join(MIXES)}")
    try:
        sizes = [parse_mix_size(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError as e:
        raise SystemExit(f"bench_mixes: {e}") from None
    states = [s.strip() for s in args.states.split(",") if s.strip()]
    if not states or set(states) - {"warm", "cold"}:
        raise SystemExit("bench_mixes: --states takes warm, cold or warm,cold")
    entries = [Entry.parse(e) for e in args.entries.split(",") if e.strip()]
    temporary = args.workdir is None
    workdir = args.workdir or tempfile.mkdtemp(prefix="gemma_stream_mixes_")
    os.makedirs(workdir, exist_ok=True)
    need = 3 * max(sizes) * 1.05
    if shutil.disk_usage(workdir).free < need:
        raise SystemExit(f"bench_mixes: {workdir} has {shutil.disk_usage(workdir).free / 2**30:.1f} GiB free; "
                         f"one cell's three formats need about {need / 2**30:.1f} GiB")
    _log(f"bench_mixes: {len(mixes)} mixes x {len(sizes)} sizes x {len(states)} states, {len(entries)} entries x "
         f"{args.rounds} rounds each ({len(mixes) * len(sizes) * len(states) * len(entries) * args.rounds} loads); "
         f"up to {human_bytes(int(need))} of files in {workdir}")
    doc = {"schema": "gemma_stream.bench_mixes/1", "command": [os.path.basename(sys.argv[0]), *sys.argv[1:]],
           "started": time.time(), "machine": machine_info(), "rounds": args.rounds,
           "ratios": [r.__dict__ for r in RATIOS], "cells": []}
    try:
        for mix in mixes:
            for nbytes in sizes:
                folder = os.path.join(workdir, f"{mix}-{size_name(nbytes)}")
                formats = write_cell_files(folder, mix, nbytes, tuple(args.write_order.split(",")))
                for state in states:
                    doc["cells"].append(run_cell(mix, nbytes, state, formats, entries, args.rounds,
                                                 threads=args.threads, timeout=args.timeout,
                                                 wait_idle=args.wait_idle))
                    if args.json_path:   # after every cell: a long run that stops keeps what it measured
                        write_json(args.json_path, doc)
                if not args.keep:
                    shutil.rmtree(folder, ignore_errors=True)
    finally:
        if temporary and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(format_cells(doc["cells"]))
    if args.markdown:
        print()
        print(render_markdown(doc))
    if args.json_path:
        write_json(args.json_path, doc)
        print(f"wrote {args.json_path}")
    failed = any(e["status"] == "error" or e["errors"] for c in doc["cells"] for e in c["entries"].values())
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_mixes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    return run_matrix(add_matrix_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
