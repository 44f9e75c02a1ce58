"""Where a ``gs.load_into`` spends its time, phase by phase, one fresh process per load (NOTES.md 37).

Each load builds the mix's model on ``meta`` (``benchmark.mixes``), then times ``load_into`` with
every phase wrapped: opening the checkpoint (and, for a torch zip, its directory, pickle walk and
local headers), the module walk, quantized targets, planning, meta tensors, the cache decision,
the read-ahead, allocation, the executor (and the engine call inside it) and the post-load hooks.
Files alternate within rounds; medians and spreads in milliseconds::

    python benchmarks/load_phases.py --mix many_small --rounds 5 --idle 3 \\
        /work/exp/mix1/many_small-1gib/model.safetensors /work/exp/mix1/many_small-1gib/model.pt

``--idle S`` sleeps S seconds before each load (this VM's host takes back the memory of page-cache
pages left alone for seconds, NOTES.md 35); ``--rewarm`` evicts every file given and reads the
next one back in before each load, as ``bench_mixes.py``'s warm state does; ``--cold`` evicts every
file given before each load, as its cold state does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
from contextlib import ExitStack
import torch
import gemma_stream as gs
from gemma_stream import api
from gemma_stream.benchmark.job_overhead import timed_calls
from gemma_stream.benchmark.mixes import mix_specs
from gemma_stream.benchmark.shapes import module_from_specs
from gemma_stream.formats import torchzip, zip_archive

seconds = {}
stack = ExitStack()

def wrap(owner, name, label=None):
    stack.enter_context(timed_calls(owner, name, seconds, label or name, clock=time.perf_counter))

for name in ("_open", "module_walk", "quant_targets", "make_plan", "meta_tensors", "_unfilled_meta",
             "_resolve_cache", "_read_ahead", "materialize", "_execute", "run_post_load_hooks"):
    wrap(api, name)
for name in ("read_zip_directory", "walk_pickle", "_storage_ranges"):
    wrap(torchzip, name, "zip." + name)
wrap(zip_archive.LocalHeaderReads, "headers", "zip.wait_for_headers")
if gs.native_available():   # the native executor's encoding and the engine call inside _execute
    from gemma_stream.executors import native
    wrap(native, "encode", "engine.encode")
    wrap(native, "_native_run", "engine.run")
mix, nbytes, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with torch.device("meta"):
    model = module_from_specs([(n, s, torch.bfloat16) for n, s in mix_specs(mix, nbytes)])
start = time.perf_counter()
gs.load_into(model, path, progress=False)
seconds["total"] = time.perf_counter() - start
print(json.dumps(seconds))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", help="checkpoints of the mix (a file or a sharded directory)")
    parser.add_argument("--mix", default="many_small", help="the mix the files hold (benchmark.mixes)")
    parser.add_argument("--size", default="1", help="the mix's size: GiB or tiny, as bench_mixes.py (default 1)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--idle", type=float, default=0.0, help="seconds of sleep before each load")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--rewarm", action="store_true", help="evict every file, then read the next one in")
    group.add_argument("--cold", action="store_true", help="evict every file before each load")
    args = parser.parse_args(argv)
    from gemma_stream.benchmark.mixes import parse_mix_size
    from gemma_stream.benchmark.runner import child_command, package_root
    from gemma_stream.benchmark.writers import evict, warm_up
    nbytes = parse_mix_size(args.size)

    def files_of(path: str) -> list[str]:
        return [os.path.join(path, n) for n in sorted(os.listdir(path))] if os.path.isdir(path) else [path]

    rows: dict[str, list[dict]] = {path: [] for path in args.files}
    for r in range(args.rounds):
        for path in args.files if r % 2 == 0 else args.files[::-1]:
            if args.rewarm or args.cold:
                evict([f for p in args.files for f in files_of(p)])
            if args.rewarm:
                warm_up(files_of(path))
            time.sleep(args.idle)
            # the build this process imports, with its bytecode compiled (runner.child_command: a lazy
            # import compiled inside the timed load cost a many-tensor zip's _open 5-10 ms)
            out = subprocess.run(child_command(package_root(), CHILD, args.mix, str(nbytes), path),
                                 capture_output=True, text=True)
            if out.returncode:
                print(out.stderr, file=sys.stderr)
                return 1
            rows[path].append(json.loads(out.stdout.strip().splitlines()[-1]))
    for path, runs in rows.items():
        print(path)
        names = sorted({k for run in runs for k in run}, key=lambda k: -statistics.median(r.get(k, 0) for r in runs))
        for name in names:
            values = sorted(1000 * run.get(name, 0.0) for run in runs)
            print(f"  {name:22s} {statistics.median(values):8.2f} ms ({values[0]:.2f}-{values[-1]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
