"""Per-job cost of a load (issue 13/15): the same bytes as thousands of small tensors and as a few big ones.

Warm loads (the file in the page cache) into one model's tensors, loaded again each round, of two safetensors checkpoints of equal size, one of
``tensors`` bf16 tensors of 4 KiB to ``max_kib`` KiB (log-uniform, as MoE experts, norms and
biases), one of 8 tensors. The CPU time (``time.process_time``: every thread of the process) a
load spends beyond the big-tensor load, divided by the extra jobs, is the per-job cost; it is
split into planning (``make_plan``), the executor's Python side (checks, job encoding) and the
engine call (binding, validation, dispatch, reads). ``fresh=True`` loads into a new model on
``meta`` each round (allocated by the load); its engine column then mostly measures the allocator
(big tensors get new, unfaulted pages from mmap, small ones reuse freed, faulted heap memory).

>>> rows = measure(tmp_dir, tensors=200, max_kib=16, rounds=1)   # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from contextlib import contextmanager

import torch
from safetensors.torch import save_file

__all__ = ["measure", "main"]

_KIB = 1024


def small_shapes(tensors: int, max_kib: int) -> list[tuple[int, int]]:
    """``tensors`` bf16 shapes [rows, 1024 B] of 4 KiB .. ``max_kib`` KiB, log-uniform, deterministic."""
    shapes = []
    for i in range(tensors):
        kib = 4 * (max_kib / 4) ** ((i * 0.618034) % 1.0)   # golden-ratio walk over [0, 1)
        shapes.append((max(2, int(kib * _KIB) // 1024 // 2 * 2), 512))
    return shapes


def _write(path: str, shapes: list[tuple[int, int]]) -> None:
    save_file({f"t{i}": torch.zeros(s, dtype=torch.bfloat16) for i, s in enumerate(shapes)}, path)


class _Flat(torch.nn.Module):
    def __init__(self, shapes: list[tuple[int, int]]) -> None:
        super().__init__()
        for i, s in enumerate(shapes):
            self.register_parameter(f"t{i}", torch.nn.Parameter(torch.empty(s, dtype=torch.bfloat16),
                                                                requires_grad=False))


@contextmanager
def timed_calls(owner, attr: str, totals: dict, key: str, clock=time.process_time):
    """Accumulate the time spent in ``owner.attr`` under ``totals[key]`` while the context is open:
    CPU time by default, ``clock=time.perf_counter`` for wall time (``benchmarks/load_phases.py``)."""
    original = getattr(owner, attr)

    def wrapper(*args, **kwargs):
        start = clock()
        try:
            return original(*args, **kwargs)
        finally:
            totals[key] = totals.get(key, 0.0) + clock() - start
    setattr(owner, attr, wrapper)
    try:
        yield
    finally:
        setattr(owner, attr, original)


def _load_cpu(path: str, shapes: list[tuple[int, int]], rounds: int, threads: int, fresh: bool) -> dict:
    import gemma_stream as gs
    from gemma_stream import api
    from gemma_stream.executors import native as native_executor
    parts: dict[str, float] = {}
    best = None
    model = _Flat(shapes)
    for _ in range(rounds):
        parts_round: dict[str, float] = {}
        if fresh:   # destinations allocated by the load, as for a gs.init_empty model
            with torch.device("meta"):
                model = _Flat(shapes)
        with timed_calls(api, "make_plan", parts_round, "plan"), \
                timed_calls(native_executor.NativeExecutor, "run", parts_round, "executor"), \
                timed_calls(native_executor, "_native_run", parts_round, "engine"):
            start = time.process_time()
            gs.load_into(model, path, threads=threads, backend="native", cache="keep")
            parts_round["total"] = time.process_time() - start
        if best is None or parts_round["total"] < best["total"]:
            best = parts_round
    parts.update(best or {})
    parts["executor_python"] = parts.get("executor", 0.0) - parts.get("engine", 0.0)
    return parts


def measure(directory: str, *, tensors: int = 8000, max_kib: int = 128, rounds: int = 5,
            threads: int = 2, fresh: bool = False) -> dict:
    """Best-of-``rounds`` warm CPU seconds for both checkpoints and the per-job difference (microseconds)."""
    small = small_shapes(tensors, max_kib)
    nbytes = sum(math.prod(s) * 2 for s in small)
    big = [(nbytes // 8 // 1024 // 2 * 2, 512)] * 8
    out: dict = {"tensors": tensors, "max_kib": max_kib, "bytes": nbytes, "threads": threads, "rounds": rounds,
                 "fresh": fresh}
    for label, shapes in (("many_small", small), ("few_large", big)):
        path = os.path.join(directory, f"{label}.safetensors")
        _write(path, shapes)
        _load_cpu(path, shapes, 1, threads, fresh)   # warm the page cache
        out[label] = _load_cpu(path, shapes, rounds, threads, fresh)
        os.unlink(path)
    extra_jobs = tensors - 8
    out["per_job_us"] = {k: (out["many_small"].get(k, 0.0) - out["few_large"].get(k, 0.0)) / extra_jobs * 1e6
                         for k in ("total", "plan", "executor_python", "engine")}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tensors", type=int, default=8000)
    p.add_argument("--max-kib", type=int, default=128, help="largest small tensor (KiB); smallest is 4")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fresh", action="store_true", help="a new model on meta each round (see the module doc)")
    p.add_argument("--dir", default=None, help="where the checkpoints are written (default: a temp dir)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        out = measure(d, tensors=args.tensors, max_kib=args.max_kib, rounds=args.rounds, threads=args.threads,
                      fresh=args.fresh)
    print(f"{out['tensors']} tensors of 4-{out['max_kib']} KiB ({out['bytes'] / 2**20:.0f} MiB) vs 8 tensors, "
          f"warm, {'fresh' if out['fresh'] else 'reused'} destinations, {out['threads']} threads, "
          f"best of {out['rounds']} (CPU seconds, all threads)")
    print(f"{'':12} {'total':>8} {'plan':>8} {'exec.py':>8} {'engine':>8}")
    for label in ("many_small", "few_large"):
        r = out[label]
        print(f"{label:12} " + " ".join(f"{r.get(k, 0.0):8.3f}" for k in ("total", "plan", "executor_python", "engine")))
    print("per job (us) " + " ".join(f"{out['per_job_us'][k]:8.1f}" for k in ("total", "plan", "executor_python",
                                                                              "engine")))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
