"""CPU cost of the format readers on many-tensor checkpoints (issue 15: torch zip vs safetensors).

Writes one checkpoint of ``tensors`` small bf16 tensors as a safetensors file, as 4 shards and
an index, and as a torch zip (``torch.save``), then measures, in this process, CPU seconds
(``time.process_time``: other processes on the machine do not count) of ``open_checkpoint`` on
each and of the pickle walk alone (with and without its fast path), best of ``repeat``;
optionally ``load_state_dict`` too.  The figures are the readers' Python work, which the warm
many_small loads pay before any byte is copied::

    python benchmarks/bench_readers.py --tensors 4172 --repeat 5 --json out.json
    run_readers(tensors=2000, repeat=3)["zip_over_safetensors"]   # -> about 3 on the project's VM
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import zipfile
from typing import Any, Callable

__all__ = ["run_readers", "main"]


def _best_cpu_seconds(fn: Callable[[], Any], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def _best_thread_seconds(path: str, repeat: int) -> float:
    """Best calling-thread CPU seconds of ``gs.load_into`` of ``path`` into a model built on meta."""
    import torch

    import gemma_stream as gs
    from gemma_stream.formats import open_checkpoint
    from .shapes import module_from_specs

    specs = [(r.name, r.shape, r.dtype.torch) for r in open_checkpoint(path).records]
    best = float("inf")
    for _ in range(repeat + 1):   # the first builds the caches of a first load
        with torch.device("meta"):
            model = module_from_specs(specs)
        start = time.thread_time()
        gs.load_into(model, path, progress=False)
        best = min(best, time.thread_time() - start)
    return best


def _write(directory: str, tensors: int) -> tuple[str, str, str]:
    import torch
    from safetensors.torch import save_file

    # many_small's names and sizes, shrunk: the readers' cost is per tensor, not per byte
    state = {f"model.layers.{i // 40}.mlp.experts.{i % 40}.w{i % 3 + 1}.weight":
             torch.zeros((16, 8) if i % 3 else (8,), dtype=torch.bfloat16) for i in range(tensors)}
    st, pt = os.path.join(directory, "model.safetensors"), os.path.join(directory, "model.pt")
    save_file(state, st)
    torch.save(state, pt)
    # the same tensors as a Hugging Face directory of 4 shards and an index
    sharded = os.path.join(directory, "hf")
    os.makedirs(sharded)
    names, weight_map = list(state), {}
    for i in range(4):
        shard = f"model-{i + 1:05d}-of-00004.safetensors"
        part = names[i * len(names) // 4:(i + 1) * len(names) // 4]
        save_file({n: state[n] for n in part}, os.path.join(sharded, shard))
        weight_map.update(dict.fromkeys(part, shard))
    with open(os.path.join(sharded, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return st, pt, sharded


def run_readers(tensors: int = 8000, repeat: int = 5, load: bool = False) -> dict[str, Any]:
    """Measure the readers on a fresh ``tensors``-tensor checkpoint; returns the figures as a dict."""
    import gemma_stream as gs
    from gemma_stream.formats import open_checkpoint
    from gemma_stream.formats.pickle_walker import _walk, walk_pickle

    with tempfile.TemporaryDirectory(prefix="gs_readers_") as directory:
        st, pt, sharded = _write(directory, tensors)
        with zipfile.ZipFile(pt) as archive:
            pkl = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
        out: dict[str, Any] = {"tensors": tensors, "repeat": repeat, "data_pkl_bytes": len(pkl)}
        out["walk_seconds"] = _best_cpu_seconds(lambda: walk_pickle(pkl), repeat)
        out["walk_mb_per_s"] = len(pkl) / out["walk_seconds"] / 1e6
        # the walk without its fast path (pickle_fast.py): every opcode one by one
        out["walk_general_seconds"] = _best_cpu_seconds(lambda: _walk(pkl, "data.pkl", fast=False), repeat)
        out["open_safetensors_seconds"] = _best_cpu_seconds(lambda: open_checkpoint(st), repeat)
        out["open_sharded_seconds"] = _best_cpu_seconds(lambda: open_checkpoint(sharded), repeat)
        out["open_zip_seconds"] = _best_cpu_seconds(lambda: open_checkpoint(pt), repeat)
        out["zip_over_safetensors"] = out["open_zip_seconds"] / out["open_safetensors_seconds"]
        if load:
            # load_into a model built on meta: the calling thread's CPU (time.thread_time) is the
            # serial Python part of a load (read, plan, allocate); the copy runs on the engine's threads
            for fmt, path in (("safetensors", st), ("sharded", sharded), ("zip", pt)):
                out[f"load_into_main_thread_{fmt}_seconds"] = _best_thread_seconds(path, repeat)
            out["load_safetensors_seconds"] = _best_cpu_seconds(lambda: gs.load_state_dict(st), repeat)
            out["load_zip_seconds"] = _best_cpu_seconds(lambda: gs.load_state_dict(pt), repeat)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_readers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=8000, help="tensors in the checkpoint (default 8000)")
    parser.add_argument("--repeat", type=int, default=5, help="best of this many (default 5)")
    parser.add_argument("--load", action="store_true",
                        help="also time load_into (calling thread) and load_state_dict on each format")
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    args = parser.parse_args(argv)
    out = run_readers(args.tensors, args.repeat, args.load)
    per_1000 = 1e6 / out["tensors"]   # seconds -> ms per 1,000 tensors
    print(f"{out['tensors']} tensors, CPU, best of {out['repeat']} (ms; ms per 1,000 tensors):")

    def row(label: str, key: str, note: str = "") -> None:
        print(f"  {label:22s} {out[key] * 1e3:8.1f} ms  {out[key] * per_1000:6.2f}{note}")
    row("pickle walk", "walk_seconds", f"  ({out['walk_mb_per_s']:.1f} MB/s of {out['data_pkl_bytes']} bytes)")
    row("pickle walk, general", "walk_general_seconds", "  (no fast path)")
    row("open safetensors", "open_safetensors_seconds")
    row("open 4 shards + index", "open_sharded_seconds")
    row("open torch zip", "open_zip_seconds", f"  ({out['zip_over_safetensors']:.2f}x safetensors)")
    if args.load:
        for fmt in ("safetensors", "sharded", "zip"):
            row(f"load_into, {fmt}", f"load_into_main_thread_{fmt}_seconds", "  (calling thread)")
        row("load safetensors", "load_safetensors_seconds")
        row("load torch zip", "load_zip_seconds")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0
