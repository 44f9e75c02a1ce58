"""Cold loads with their CPU bill: the 2-thread pread bound against ``load_into`` with ``cache="keep"``
and ``cache="drop"``, each in a fresh process, with the child's user and system seconds and page
faults (``os.wait4``), rounds rotating the order (NOTES.md 40)::

    python benchmarks/cold_cpu_probe.py /work/exp/mix5/gemma7b-5gib/model.safetensors --mix gemma7b --size 5 --rounds 3

The file is evicted (``writers.evict``) before each load. Each child imports this process's build,
compiled to bytecode first (``runner.child_command``). The seconds are ``load_into``'s (the bound's
read) alone; the CPU seconds and faults are the whole child's, imports included.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

GS = r"""
import time, torch, gemma_stream as gs
from gemma_stream.benchmark.mixes import mix_specs, parse_mix_size
from gemma_stream.benchmark.shapes import module_from_specs
path, mix, size, cache = sys.argv[1:5]
with torch.device("meta"):
    model = module_from_specs([(n, s, torch.bfloat16) for n, s in mix_specs(mix, parse_mix_size(size))])
start = time.perf_counter()
gs.load_into(model, path, progress=False, cache=cache)
print(time.perf_counter() - start)
"""

BOUND = r"""
import time, types
from gemma_stream.benchmark.bounds import pread_bound
run = pread_bound(2, huge_pages=False)(types.SimpleNamespace(files={"data": [sys.argv[1]]}))
start = time.perf_counter()
kept = run()
print(time.perf_counter() - start)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("file", help="one safetensors file of the mix (bench_mixes.py --keep writes them)")
    parser.add_argument("--mix", default="gemma7b")
    parser.add_argument("--size", default="5", help="the mix's size in GiB, as bench_mixes.py")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle", type=float, default=1.0, help="seconds of sleep after each eviction")
    args = parser.parse_args(argv)
    from gemma_stream.benchmark.runner import child_command, package_root
    from gemma_stream.benchmark.writers import evict
    loads = [("bound", [BOUND, args.file]),
             ("keep", [GS, args.file, args.mix, args.size, "keep"]),
             ("drop", [GS, args.file, args.mix, args.size, "drop"])]
    for r in range(args.rounds):
        for name, child in loads[r % 3:] + loads[:r % 3]:
            evict([args.file])
            time.sleep(args.idle)
            proc = subprocess.Popen(child_command(package_root(), *child), stdout=subprocess.PIPE, text=True)
            out = proc.stdout.read()
            _, status, usage = os.wait4(proc.pid, 0)
            if status:
                print(f"{name}: the child failed ({status})", file=sys.stderr)
                return 1
            print(f"round {r + 1} {name:5s} {float(out.strip().splitlines()[-1]):6.2f} s  user {usage.ru_utime:5.2f} s"
                  f"  sys {usage.ru_stime:5.2f} s  minor faults {usage.ru_minflt}  major {usage.ru_majflt}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
