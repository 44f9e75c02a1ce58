"""CPU cost of the format readers on many-tensor checkpoints (issue 15: torch zip vs safetensors).

Writes one checkpoint of ``tensors`` small bf16 tensors as a safetensors file and as a torch
zip (``torch.save``), then measures, in this process, CPU seconds (``time.process_time``: other
processes on the machine do not count) of ``open_checkpoint`` on each and of the pickle walk
alone, best of ``repeat``; optionally ``load_state_dict`` too.  The figures are the readers'
Python work, which the warm many_small loads pay before any byte is copied::

    python benchmarks/bench_readers.py --tensors 8000 --repeat 5 --json out.json
    run_readers(tensors=2000, repeat=3)["zip_over_safetensors"]   # -> about 4 on the project's VM
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


def _write(directory: str, tensors: int) -> tuple[str, str]:
    import torch
    from safetensors.torch import save_file

    # many_small's names and sizes, shrunk: the readers' cost is per tensor, not per byte
    state = {f"model.layers.{i // 40}.mlp.experts.{i % 40}.w{i % 3 + 1}.weight":
             torch.zeros((16, 8) if i % 3 else (8,), dtype=torch.bfloat16) for i in range(tensors)}
    st, pt = os.path.join(directory, "model.safetensors"), os.path.join(directory, "model.pt")
    save_file(state, st)
    torch.save(state, pt)
    return st, pt


def run_readers(tensors: int = 8000, repeat: int = 5, load: bool = False) -> dict[str, Any]:
    """Measure the readers on a fresh ``tensors``-tensor checkpoint; returns the figures as a dict."""
    import gemma_stream as gs
    from gemma_stream.formats import open_checkpoint
    from gemma_stream.formats.pickle_walker import walk_pickle

    with tempfile.TemporaryDirectory(prefix="gs_readers_") as directory:
        st, pt = _write(directory, tensors)
        with zipfile.ZipFile(pt) as archive:
            pkl = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
        out: dict[str, Any] = {"tensors": tensors, "repeat": repeat, "data_pkl_bytes": len(pkl)}
        out["walk_seconds"] = _best_cpu_seconds(lambda: walk_pickle(pkl), repeat)
        out["walk_mb_per_s"] = len(pkl) / out["walk_seconds"] / 1e6
        out["open_safetensors_seconds"] = _best_cpu_seconds(lambda: open_checkpoint(st), repeat)
        out["open_zip_seconds"] = _best_cpu_seconds(lambda: open_checkpoint(pt), repeat)
        out["zip_over_safetensors"] = out["open_zip_seconds"] / out["open_safetensors_seconds"]
        if load:
            out["load_safetensors_seconds"] = _best_cpu_seconds(lambda: gs.load_state_dict(st), repeat)
            out["load_zip_seconds"] = _best_cpu_seconds(lambda: gs.load_state_dict(pt), repeat)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_readers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=8000, help="tensors in the checkpoint (default 8000)")
    parser.add_argument("--repeat", type=int, default=5, help="best of this many (default 5)")
    parser.add_argument("--load", action="store_true", help="also time load_state_dict on each format")
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    args = parser.parse_args(argv)
    out = run_readers(args.tensors, args.repeat, args.load)
    print(f"{out['tensors']} tensors, CPU seconds, best of {out['repeat']}:")
    print(f"  pickle walk        {out['walk_seconds'] * 1e3:8.1f} ms  ({out['walk_mb_per_s']:.1f} MB/s of "
          f"{out['data_pkl_bytes']} bytes)")
    print(f"  open safetensors   {out['open_safetensors_seconds'] * 1e3:8.1f} ms")
    print(f"  open torch zip     {out['open_zip_seconds'] * 1e3:8.1f} ms  ({out['zip_over_safetensors']:.2f}x)")
    if args.load:
        print(f"  load safetensors   {out['load_safetensors_seconds'] * 1e3:8.1f} ms")
        print(f"  load torch zip     {out['load_zip_seconds'] * 1e3:8.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0
