"""Tensor-parallel loads on torch.distributed (gloo, CPU): per-rank bytes, peak memory, wall time.

One command:

    python benchmarks/dist_bench.py --size small --worlds 1 2 4 --out /tmp/dist_bench.json

``--rounds N`` repeats the whole matrix N times, interleaved (round 1 runs every
world and loader, then round 2 ...); the table gives each round's wall time and
the median.

For each world size, each loader runs in a fresh group of ranks (spawned on
127.0.0.1), cold (the files evicted from the page cache) then warm, on a
Gemma-shaped model (hf names) built on meta and tensor-parallelized
(Colwise q/k/v/gate/up, Rowwise o/down, Rowwise embedding: Shard(0) of the
vocabulary; norms replicated):

  gs-own     gs.load_into(model, file)                each rank reads its own bytes
  gs-coalesced  gs-own with every column block read as one strided job, gaps included
             (plan.COALESCE_WASTE = inf: the rule before NOTES.md section 18)
  gs-int8    gs.load_into(model, file, quantize="int8")  each rank quantizes its own slice on read
             (Rowwise weights: the row absmax all-reduced); shard MB counts the int8 shard
  gs-once    gs.load_into(model, file, read="once")   each byte read by one rank, sent to the ranks
             that need it (all_to_all of each rank's blocks; replicated tensors broadcast)
  full-slice every rank loads the whole file (safetensors.torch.load_file) and keeps its slice
  dcp        torch.distributed.checkpoint.load from DCP's own format (converted once; time reported)

Per rank: bytes read (the loader's report for gs; /proc/self/io rchar for all,
which misses mmap reads, so full-slice is given the file size), peak RSS over
the RSS before the load (VmHWM, reset before each load), the rank's shard bytes, wall time (the
slowest rank), CPU seconds (process time, threads included; the table sums the ranks: other
sessions' load distorts it less than wall time).  Sizes: "tiny" (a few MB), "small" (2 layers of Gemma-2B,
32000-token vocabulary, ~0.56 GB bf16), "2b" (Gemma-2B, 5.0 GB bf16: needs
world x 5 GB for full-slice).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gemma_stream as gs
from gemma_stream.benchmark.shapes import SIZES, GemmaShaped
from gemma_stream.benchmark.writers import evict, write_safetensors

LOADERS = ("gs-own", "gs-coalesced", "gs-int8", "gs-once", "full-slice", "dcp")


def shape_of(size: str):
    if size == "small":
        return replace(SIZES["2b"], name="small", vocab=32000, layers=2)
    return SIZES[size]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> None:
    """Restart VmHWM at the current RSS (ru_maxrss would keep the spawning parent's peak: it survives exec)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) * 1024


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


def tp_model(shape, mesh):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    with torch.device("meta"):
        model = GemmaShaped(shape, torch.bfloat16)
    plan = {"model.embed_tokens": RowwiseParallel()}
    for i in range(shape.layers):
        p = f"model.layers.{i}"
        plan.update({f"{p}.self_attn.{n}": ColwiseParallel() for n in ("q_proj", "k_proj", "v_proj")})
        plan.update({f"{p}.mlp.{n}": ColwiseParallel() for n in ("gate_proj", "up_proj")})
        plan.update({f"{p}.self_attn.o_proj": RowwiseParallel(), f"{p}.mlp.down_proj": RowwiseParallel()})
    return parallelize_module(model, mesh, plan)


def shard_bytes(model) -> int:
    from torch.distributed.tensor import DTensor
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in model.state_dict().values())


def full_slice(model, path: str) -> None:
    """What users do today: every rank reads the whole file, then keeps its slice."""
    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor, distribute_tensor
    model.to_empty(device="cpu")
    full = load_file(path)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if isinstance(t, DTensor):
                # src_data_rank=None: every rank slices its own copy, no communication
                t.to_local().copy_(distribute_tensor(full[name], t.device_mesh, t.placements,
                                                     src_data_rank=None).to_local())
            else:
                t.copy_(full[name])
    del full


def dcp_load(model, directory: str) -> None:
    import torch.distributed.checkpoint as dcp
    model.to_empty(device="cpu")
    dcp.load(model.state_dict(), checkpoint_id=directory)


def rank_main(rank: int, world: int, port: int, args: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if os.path.exists("/sys/class/net/lo"):  # gloo's own sockets on loopback too, not the host's address
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    shape = shape_of(args["size"])
    rows = []
    for temperature in ("cold", "warm"):
        model = tp_model(shape, mesh)
        if temperature == "cold" and rank == 0:
            evict([args["path"]] + [os.path.join(args["dcp"], f) for f in os.listdir(args["dcp"])])
        dist.barrier()
        _reset_peak()
        rss0, rchar0 = _rss(), _rchar()
        start, cpu0 = time.perf_counter(), time.process_time()
        report = None
        if args["loader"] == "gs-own":
            report = gs.load_into(model, args["path"], threads=args["threads"])
        elif args["loader"] == "gs-coalesced":
            from gemma_stream import plan as plan_mod
            saved, plan_mod.COALESCE_WASTE = plan_mod.COALESCE_WASTE, float("inf")
            try:
                report = gs.load_into(model, args["path"], threads=args["threads"])
            finally:
                plan_mod.COALESCE_WASTE = saved
        elif args["loader"] == "gs-int8":
            report = gs.load_into(model, args["path"], quantize="int8", threads=args["threads"])
        elif args["loader"] == "gs-once":
            report = gs.load_into(model, args["path"], read="once", threads=args["threads"])
        elif args["loader"] == "full-slice":
            full_slice(model, args["path"])
        else:
            dcp_load(model, args["dcp"])
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu0
        dist.barrier()
        wall = time.perf_counter() - start
        rows.append(dict(loader=args["loader"], world=world, rank=rank, temperature=temperature, round=args["round"],
                         seconds=seconds, wall_seconds=wall, cpu_seconds=cpu, shard_bytes=shard_bytes(model),
                         bytes_read=report.bytes_read if report else (os.path.getsize(args["path"])
                                                                      if args["loader"] == "full-slice"
                                                                      else _rchar() - rchar0),
                         bytes_received=report.bytes_received if report else 0,
                         rchar=_rchar() - rchar0, rss_before=rss0,
                         peak_rss=_peak_rss()))
        del model
    with open(os.path.join(args["out_dir"], f"{args['loader']}.{world}.{args['round']}.{rank}.json"), "w") as f:
        json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def convert_to_dcp(path: str, directory: str) -> float:
    """DCP's own format, written once from a plain state dict (single process, no group)."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    import warnings
    start = time.perf_counter()
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(load_file(path), checkpoint_id=directory, no_dist=True)
    return time.perf_counter() - start


def column_blocks(workdir: str, repeat: int) -> None:
    """One rank's column block of Gemma-2B's row-parallel weights, one job per row against one
    strided job that reads blocks of rows gaps included (plan.COALESCE_GAP_BYTES and
    plan.COALESCE_WASTE forced each way; the default rule reads these per row); single process."""
    from safetensors.torch import save_file

    from gemma_stream import plan as plan_mod
    path = os.path.join(workdir, "columns.safetensors")
    shapes = {"o_proj": (2048, 2048), "down_proj": (2048, 16384)}
    if not os.path.exists(path):
        gen = torch.Generator().manual_seed(0)
        save_file({n: torch.randn(s, generator=gen).to(torch.bfloat16) for n, s in shapes.items()}, path)
        os.sync()
    print(f"{'tensor':<10}{'world':>6}{'segment B':>10}{'mode':>10}{'temp':>6}{'best s':>8}{'read MB':>9}")
    for name, (rows, cols) in shapes.items():
        for world in (2, 4):
            width = cols // world
            for mode, gap in (("per-row", 0), ("coalesced", 1 << 40)):
                for temperature in ("cold", "warm"):
                    best, read = None, 0
                    for _ in range(repeat):
                        m = torch.nn.Module()
                        m.register_buffer(name, torch.empty(rows, width, dtype=torch.bfloat16))
                        if temperature == "cold":
                            evict([path])
                        saved, plan_mod.COALESCE_GAP_BYTES = plan_mod.COALESCE_GAP_BYTES, gap
                        saved_waste, plan_mod.COALESCE_WASTE = plan_mod.COALESCE_WASTE, float(gap > 0) * 1e9
                        try:
                            start = time.perf_counter()
                            gs.load_into(m, path, strict=False, rename=gs.PartialRoutes(
                                lambda n, w=width: gs.Route(n, src_cols=(w, 2 * w)) if n == name else None))
                            took = time.perf_counter() - start
                        finally:
                            plan_mod.COALESCE_GAP_BYTES, plan_mod.COALESCE_WASTE = saved, saved_waste
                        best = took if best is None else min(best, took)
                        read = ((rows - 1) * cols + width if mode == "coalesced" else rows * width) * 2
                    print(f"{name:<10}{world:>6}{width * 2:>10}{mode:>10}{temperature:>6}{best:>8.3f}{read / 1e6:>9.1f}")


def print_table(rows: list[dict], worlds: list[int], loaders: list[str], rounds: int) -> None:
    """One line per loader, world and temperature: the slowest rank's wall time per round and their
    median, the CPU seconds of all ranks together (median over rounds: process time, which other
    sessions' load distorts less than wall time), bytes per rank (the most), peak over shard (the most)."""
    import statistics
    width = max(18, 7 * rounds + 2)
    print(f"{'loader':<11}{'world':>6}{'temp':>6}{'wall s per round':>{width}}{'median':>8}{'cpu s':>7}"
          f"{'read/rank MB':>14}{'recv/rank MB':>14}{'shard MB':>10}{'peak/shard':>11}")
    for world in worlds:
        for loader in loaders:
            for temperature in ("cold", "warm"):
                rs = [r for r in rows if r["loader"] == loader and r["world"] == world and r["temperature"] == temperature]
                if not rs:
                    continue
                walls = [max(r["wall_seconds"] for r in rs if r["round"] == i) for i in range(rounds)]
                cpus = [sum(r["cpu_seconds"] for r in rs if r["round"] == i) for i in range(rounds)]
                peak = max((r["peak_rss"] - r["rss_before"]) / max(r["shard_bytes"], 1) for r in rs)
                print(f"{loader:<11}{world:>6}{temperature:>6}{' '.join(f'{w:6.2f}' for w in walls):>{width}}"
                      f"{statistics.median(walls):>8.2f}{statistics.median(cpus):>7.2f}"
                      f"{max(r['bytes_read'] for r in rs) / 1e6:>14.1f}{max(r['bytes_received'] for r in rs) / 1e6:>14.1f}"
                      f"{max(r['shard_bytes'] for r in rs) / 1e6:>10.1f}{peak:>11.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--columns", action="store_true",
                    help="instead: the column-block micro-benchmark behind plan.COALESCE_GAP_BYTES")
    ap.add_argument("--repeat", type=int, default=5, help="--columns: runs per cell (best reported)")
    ap.add_argument("--size", default="small", choices=["tiny", "small", "2b"])
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--loaders", nargs="+", default=list(LOADERS), choices=LOADERS)
    ap.add_argument("--threads", type=int, default=None, help="gemma_stream threads per rank (default: config)")
    ap.add_argument("--workdir", default=None, help="where the checkpoint is written (default: a temp dir)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the matrix, interleaved; median wall time")
    ap.add_argument("--out", default="dist_bench.json")
    args = ap.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="dist_bench_")
    os.makedirs(workdir, exist_ok=True)
    if args.columns:
        return column_blocks(workdir, args.repeat)
    shape = shape_of(args.size)
    path = os.path.join(workdir, f"{args.size}.safetensors")
    if not os.path.exists(path):
        write_safetensors(path, shape, torch.bfloat16)
    dcp_dir = os.path.join(workdir, f"{args.size}.dcp")
    conversion = None
    if "dcp" in args.loaders and not os.path.exists(os.path.join(dcp_dir, ".metadata")):  # not just the folder
        conversion = convert_to_dcp(path, dcp_dir)
    os.makedirs(dcp_dir, exist_ok=True)
    out_dir = tempfile.mkdtemp(prefix="dist_bench_rows_")
    rows = []
    for round_ in range(args.rounds):
        for world in args.worlds:
            for loader in args.loaders:
                spec = dict(size=args.size, path=path, dcp=dcp_dir, loader=loader, threads=args.threads,
                            out_dir=out_dir, round=round_)
                mp.spawn(rank_main, args=(world, _free_port(), spec), nprocs=world, join=True)
                for rank in range(world):
                    with open(os.path.join(out_dir, f"{loader}.{world}.{round_}.{rank}.json")) as f:
                        rows.extend(json.load(f))
    file_bytes = os.path.getsize(path)
    print(f"{args.size}: {file_bytes / 1e9:.3f} GB bf16, {os.cpu_count()} cores; "
          f"DCP conversion {conversion:.2f} s" if conversion is not None else "")
    print_table(rows, args.worlds, args.loaders, args.rounds)
    with open(args.out, "w") as f:
        json.dump(dict(size=args.size, shape=shape.as_dict(), file_bytes=file_bytes, dcp_conversion_seconds=conversion,
                       machine=dict(cpus=os.cpu_count(), python=sys.version.split()[0], torch=torch.__version__,
                                    platform=platform.platform()), rows=rows), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
