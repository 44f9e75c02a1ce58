"""Cold read of a checkpoint's tensors into per-tensor destinations, from Python: one pread per
tensor against one preadv per run of adjacent tensors (at most 16 MiB / 1024 pieces), 2 threads
on contiguous halves, each variant in a fresh process after evicting the file (NOTES.md 34)::

    python benchmarks/coalesce_probe.py FILE.safetensors [ROUNDS]

Caveat: the same grouping in the engine gained nothing (NOTES.md 34). This probe times the reads
alone, in Python threads; it does not predict a whole load.
"""
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

import gemma_stream as gs
from gemma_stream.benchmark import writers

path = sys.argv[1]; rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 6
infos = sorted(gs.inspect(path), key=lambda t: t.offset)
jobs = [(t.offset, t.nbytes) for t in infos if t.nbytes]
total = sum(n for _, n in jobs)

def halves(items, weight):
    tot = sum(weight(i) for i in items); out = [[], []]; done = 0
    for i in items:
        out[min(1, done * 2 // tot)].append(i); done += weight(i)
    return out

def run(variant):
    dsts = [torch.empty(n, dtype=torch.uint8) for _, n in jobs]
    fd = [os.open(path, os.O_RDONLY) for _ in range(2)]
    for f in fd: os.posix_fadvise(f, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    idx = list(range(len(jobs)))
    def per_tensor(k, part):
        for i in part:
            off, n = jobs[i]; mv = memoryview(dsts[i].numpy()); got = 0
            while got < n: got += os.preadv(fd[k], [mv[got:]], off + got)
    def coalesced(k, part):
        group, start, end = [], None, None
        def flush():
            if not group: return
            bufs = [memoryview(dsts[i].numpy()) for i in group]
            want = sum(len(b) for b in bufs); got = os.preadv(fd[k], bufs, start)
            if got != want:   # short read: finish one by one
                per_tensor(k, group)
        for i in part:
            off, n = jobs[i]
            if group and (off != end or end - start + n > (16 << 20) or len(group) >= 1024):
                flush(); group = []
            if not group: start = off
            group.append(i); end = off + n
        flush()
    parts = halves(idx, lambda i: jobs[i][1])
    fn = per_tensor if variant == "per_tensor" else coalesced
    t = time.perf_counter()
    ths = [threading.Thread(target=fn, args=(k, parts[k])) for k in range(2)]
    for th in ths: th.start()
    for th in ths: th.join()
    el = time.perf_counter() - t
    for f in fd: os.close(f)
    return el

if __name__ == "__main__" and len(sys.argv) > 3:
    print(run(sys.argv[3])); sys.exit(0)
res = {"per_tensor": [], "coalesced": []}
for r in range(rounds):
    order = ["per_tensor", "coalesced"] if r % 2 == 0 else ["coalesced", "per_tensor"]
    for v in order:
        writers.evict([path])
        out = subprocess.run([sys.executable, __file__, path, "0", v], capture_output=True, text=True)
        res[v].append(float(out.stdout.split()[-1]))
ratios = [a / b for a, b in zip(res["per_tensor"], res["coalesced"])]
for v, xs in res.items(): print(v, f"median {statistics.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})")
print("per_tensor / coalesced within rounds", f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})", len(jobs), "jobs")
