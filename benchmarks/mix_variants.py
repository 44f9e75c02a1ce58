#!/usr/bin/env python
"""A few loaders on one mix cell, many rounds: the cell's ratios without the rest of the matrix.

``bench_mixes.py`` runs 15 entries x 5 rounds per cell; on this project's VM a cold cell's ratio
moves by more between such runs than its distance to issue 15's targets (NOTES.md 28, 38).  This
runs only the variants named, as many rounds as asked, each load in a fresh process (the
harness's child, importing the build named and no other), the files evicted before each cold
load or read back before each warm one, one variant further on each round.  Prints each
variant's median (min-max) and its ratio to the first variant within each round.

A variant is ``NAME=LOADER[#FORMAT][:ENV=VALUE,...][@BUILD]``: a loader of the harness
(``gemma_stream.benchmark.child.LOADERS``), the cell's format it reads (default ``--format``),
environment for the child (e.g. ``GEMMA_STREAM_PREFETCH=off``) and a folder holding another
build of gemma_stream (``pip install --no-deps --target DIR .``)::

    python benchmarks/mix_variants.py --mix few_large --format sharded --rounds 12 \\
        bound=pread_2t_4k gs=gs_native raoff=gs_native:GEMMA_STREAM_PREFETCH=off
    python benchmarks/mix_variants.py --mix gemma7b --rounds 10 \\
        torch=torch_load_mmap_assign#zip gs=gs_mmap gs_zip=gs_mmap#zip
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

try:
    import gemma_stream  # noqa: F401
except ImportError:   # running from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "python"))

from gemma_stream.benchmark import matrix  # noqa: E402
from gemma_stream.benchmark.mixes import mix_specs, parse_mix_size, size_name  # noqa: E402
from gemma_stream.benchmark.runner import run_child  # noqa: E402


def parse_variant(text: str, fmt: str) -> dict:
    """``NAME=LOADER[#FORMAT][:ENV=VALUE,...][@BUILD]`` -> its parts (the loader and format checked)."""
    name, eq, rest = text.partition("=")
    if not eq or not name or not rest:
        raise SystemExit(f"mix_variants: {text!r} is not NAME=LOADER[#FORMAT][:ENV=VALUE,...][@BUILD]")
    rest, _, build = rest.partition("@")
    loader, _, envs = rest.partition(":")
    loader, _, vfmt = loader.partition("#")
    entry = matrix.Entry.parse(f"{loader}@{vfmt or fmt}")
    env = {}
    for item in filter(None, envs.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"mix_variants: {text!r}: {item!r} is not ENV=VALUE")
        env[key] = value
    return {"name": name, "entry": entry, "env": env, "build": os.path.abspath(build) if build else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", nargs="+", help="NAME=LOADER[#FORMAT][:ENV=VALUE,...][@BUILD]")
    parser.add_argument("--mix", default="few_large", help="the mix (benchmark.mixes)")
    parser.add_argument("--size", default="1", help="GiB, or tiny (default 1)")
    parser.add_argument("--format", default="safetensors", choices=matrix.FORMATS)
    parser.add_argument("--state", default="cold", choices=("cold", "warm"))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--workdir", default="/tmp/gs_mixes", help="where the cell's files are (or go)")
    parser.add_argument("--json", help="write every round's seconds here")
    args = parser.parse_args(argv)
    variants = [parse_variant(v, args.format) for v in args.variants]
    if len({v["name"] for v in variants}) != len(variants):
        raise SystemExit("mix_variants: two variants share a name")
    nbytes = parse_mix_size(args.size)
    formats = matrix.write_cell_files(os.path.join(args.workdir, f"{args.mix}-{size_name(nbytes)}"), args.mix, nbytes)
    every_file = [f for e in formats.values() for f in e["data"]]
    checks = matrix.fingerprint_names(mix_specs(args.mix, nbytes))
    seconds: dict[str, list[float]] = {v["name"]: [] for v in variants}
    for r in range(args.rounds):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            matrix.set_cache_state(args.state, every_file, formats[v["entry"].fmt]["data"])
            spec = matrix.entry_spec(v["entry"], args.mix, nbytes, formats, None, checks)
            spec["env"] = v["env"]
            seconds[v["name"]].append(run_child(spec, 1800.0, v["build"])["seconds"])
        print(f"round {r + 1}: " + "  ".join(f"{n} {s[-1]:.3f}" for n, s in seconds.items()), flush=True)
    first = variants[0]["name"]
    print(f"{args.mix} {size_name(nbytes)} {args.format} {args.state}, {args.rounds} rounds: median (min-max) s; "
          f"{first}'s s / the variant's in the same round (above 1: the variant was faster)")
    for name, values in seconds.items():
        ratios = [a / b for a, b in zip(seconds[first], values)]
        print(f"  {name:<16} {statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f}) s   "
              f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mix": args.mix, "size": size_name(nbytes), "format": args.format, "state": args.state,
                       "variants": [dict(v, entry=v["entry"].key) for v in variants], "seconds": seconds}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
