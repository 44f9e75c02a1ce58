#!/usr/bin/env python
"""Cold ``mode="mmap"`` read-ahead variants on a few_large checkpoint (issue 15; NOTES.md section 18).

Writes the few_large mix with ``safetensors.save_file`` (tensors sorted by name, as Hugging Face
files are) and ``torch.save`` (the model's order), then loads it cold in rounds: before each load
every file's pages are dropped (``posix_fadvise(DONTNEED)``), each load runs in a fresh process
and ends after one byte of every 4 KiB page of every weight was read.  Variants::

    torch        torch.load(mmap=True) of the zip, touch in file order
    torchassign  torch.load(mmap=True) + load_state_dict(assign=True) into a meta model, touch in model order
    on, off      gs.load_state_dict(mode="mmap") with read-ahead on / off, touch in file order
    t1, t4       read-ahead with 1 / 4 threads          step2, step32   fault steps of 2 / 32 MiB
    willneed     posix_fadvise(WILLNEED) in 64 MiB steps  willneed1      one WILLNEED for everything
    lin_on, lin_off  gs.load_into a meta model, touch in model order
    old.<variant>    the same with PYTHONPATH=$OLD_PYTHONPATH (an older checkout's python/ folder)

    python benchmarks/mmap_variants.py make --gib 2 --dir /tmp/gs_mmap
    python benchmarks/mmap_variants.py run --dir /tmp/gs_mmap --variants torchassign,lin_on,lin_off --rounds 5
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

try:
    import gemma_stream  # noqa: F401
except ImportError:   # running from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "python"))
from gemma_stream.benchmark.runner import child_command, package_root  # noqa: E402

_RUN_THIS_FILE = "import runpy\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"


def _paths(directory: str) -> tuple[str, str]:
    return os.path.join(directory, "few_large.safetensors"), os.path.join(directory, "few_large.pt")


def _specs(gib: float):
    import torch
    from gemma_stream.benchmark.mixes import mix_specs
    return [(n, s, torch.bfloat16) for n, s in mix_specs("few_large", int(gib * (1 << 30)))]


def make(directory: str, gib: float) -> None:
    import torch
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    state = {n: torch.zeros(s, dtype=d) for n, s, d in _specs(gib)}
    st, pt = _paths(directory)
    save_file(state, st)
    torch.save(state, pt)
    with open(os.path.join(directory, "gib"), "w") as f:
        f.write(str(gib))
    print(f"{len(state)} tensors, {os.path.getsize(st) >> 20} MiB in {directory}")


def _drop(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def child(directory: str, variant: str) -> None:
    import torch
    st, pt = _paths(directory)
    variant = variant.split(".")[-1]
    model = None
    if variant.startswith("lin") or variant == "torchassign":
        from gemma_stream.benchmark.shapes import module_from_specs
        with open(os.path.join(directory, "gib")) as f:
            gib = float(f.read())
        with torch.device("meta"):
            model = module_from_specs(_specs(gib))
    start = time.perf_counter()
    if variant in ("torch", "torchassign"):
        state = torch.load(pt, mmap=True, weights_only=True, map_location="cpu")
        if model is not None:
            model.load_state_dict(state, assign=True)
            state = dict(model.state_dict())
    else:
        import gemma_stream as gs
        from gemma_stream import mapped
        threads = None
        if variant in ("t1", "t4"):
            threads = int(variant[1:])
        elif variant.startswith("step"):
            mapped._FAULT_STEP_MAX = int(variant[4:]) << 20
        elif variant.startswith("willneed"):
            mapped.readahead_window = lambda path: None     # the WILLNEED path
            if variant == "willneed1":
                mapped.Prefetch.STEP = 1 << 50
        os.environ["GEMMA_STREAM_PREFETCH"] = "off" if variant.endswith("off") else "on"
        if model is not None:
            gs.load_into(model, st, mode="mmap")
            state = dict(model.state_dict())
        else:
            state = gs.load_state_dict(st, mode="mmap", threads=threads)
    for tensor in state.values():
        flat = tensor.reshape(-1).view(torch.uint8)
        int(flat[::4096].sum()) + int(flat[-1])
    print(json.dumps({"variant": variant, "seconds": time.perf_counter() - start}))


def run(directory: str, variants: list[str], rounds: int) -> None:
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(rounds):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:   # a different first each round
            for path in _paths(directory):
                _drop(path)
            env = dict(os.environ)
            root = package_root()
            if v.startswith("old."):
                env["PYTHONPATH"] = root = os.path.abspath(os.environ["OLD_PYTHONPATH"])
            # the child imports gemma_stream from root and nowhere else (runner.CHILD_BOOT, NOTES.md 38)
            proc = subprocess.run(child_command(root, _RUN_THIS_FILE, os.path.abspath(__file__), "child", "--dir",
                                                directory, "--variants", v), capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.exit(f"{v}: {proc.stderr[-2000:]}")
            seconds[v].append(json.loads(proc.stdout.strip().splitlines()[-1])["seconds"])
    base = seconds.get("torchassign") or seconds.get("torch")
    for v, xs in seconds.items():
        ratio = f"  torch/this, per round: {statistics.median(b / x for b, x in zip(base, xs)):.2f}" if base else ""
        print(f"{v:12s} {statistics.median(xs):7.3f} s ({min(xs):.3f}-{max(xs):.3f}){ratio}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["make", "run", "child"])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--variants", default="torchassign,lin_on,lin_off")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.action == "make":
        make(args.dir, args.gib)
    elif args.action == "child":
        child(args.dir, args.variants)
    else:
        run(args.dir, args.variants.split(","), args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
