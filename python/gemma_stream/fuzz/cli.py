"""``python -m gemma_stream.fuzz`` / ``benchmarks/fuzz.py``: options, the run, the tables, the exit status."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .mutators import FORMATS
from .report import bomb_table, format_table
from .runner import child_cases, fuzz

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """The command line; returns 1 when any case gave wrong data, leaked a type, crashed or hung."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        fmt, seed, first, last, backends, case_seconds = argv[1:7]
        child_cases(fmt, int(seed), int(first), int(last), tuple(backends.split(",")), int(case_seconds))
        return 0
    parser = argparse.ArgumentParser(prog="python -m gemma_stream.fuzz",
                                     description="A seeded, differential mutation fuzzer for the checkpoint readers.")
    parser.add_argument("--cases", type=int, default=1000, help="cases per format (default 1000)")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated subset of " + ",".join(FORMATS))
    parser.add_argument("--backends", default="native,python")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=500, help="cases per child process")
    parser.add_argument("--jobs", type=int, default=1, help="child processes at once")
    parser.add_argument("--case-seconds", type=int, default=20, help="alarm per case in the child")
    parser.add_argument("--memory-gb", type=float, default=8.0, help="RLIMIT_AS of each child")
    parser.add_argument("--json", help="write the results here (also every 1,000 cases)")
    parser.add_argument("--bombs", action="store_true", help="only measure the pickle bombs (memory, MB/s)")
    parser.add_argument("--bomb-mib", type=int, help="bomb size (default: the 256 MiB pickle limit)")
    args = parser.parse_args(argv)
    if args.bombs:
        print(bomb_table(args.bomb_mib << 20 if args.bomb_mib else None))
        return 0
    def save(results: dict) -> None:
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump(results, f, indent=1)
            os.replace(args.json + ".tmp", args.json)
    results = fuzz(args.cases, tuple(args.formats.split(",")), tuple(args.backends.split(",")), args.seed,
                   args.batch, args.case_seconds, int(args.memory_gb * (1 << 30)), args.jobs, progress=save)
    print(format_table(results))
    for fmt, r in results.items():
        for category, reasons in r["reasons"].items():
            print(f"\n{fmt} / {category}:")
            for why, n in reasons.items():
                print(f"  {n:7d}  {why}")
        if r["examples"]:
            print(f"{fmt} examples (replay with make_case('{fmt}', {args.seed}, i)): {r['examples']}")
    save(results)
    bad = sum(r["wrong_data"] + r["leaked"] + r["crash"] + r["hang"] + r["backends_disagree"]
              for r in results.values())
    return 1 if bad else 0

