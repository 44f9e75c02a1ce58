"""Engine probe: gemma_stream's copy engine against the machine's own bounds.

Quick measurement tool for the I/O engine (not the full side-by-side table:
that is bench_load.py). Makes a Gemma-2B-shaped checkpoint once, then times
each case in a fresh subprocess, warm (file in the page cache) and cold
(evicted with posix_fadvise DONTNEED), with the peak RSS over the baseline.

Bounds, in the same run:
  bound      two threads, each pread()ing half of the file into fresh,
             untouched anonymous memory in 64 MiB calls
  bound_odirect  the same with O_DIRECT (cold only: it bypasses the cache)

Cases: bound, bound_odirect, gs_native, gs_python, torch_mmap (torch.load(mmap=True)
+ meta + assign, on a .pt copy made once), each with optional suffixes: @drop
(cache="drop"), @mmap (mode="mmap"), @sd (load_state_dict), @tN (threads), @cN
(GEMMA_STREAM_CHUNK_MB), @f32 (the same shapes stored as float32), @touch (then
touch every weight page). alt_<case> runs it against the package at --alt-path
(another build: before/after). Runs are interleaved, each after the cores go
quiet (other work shares the machine); best and median are printed.

    PYTHONPATH=python python benchmarks/engine_probe.py --dir /tmp/gs_engine \\
        --cases bound,bound_odirect,gs_native,gs_native@drop --states warm,cold --repeat 8
    python benchmarks/engine_probe.py --dir /tmp/gs_engine --clean   # remove the files
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import struct
import subprocess
import sys
import threading
import time

# Page-cache control is the harness's. Appended, not prepended: an alt_<case> child must keep
# importing the package that its PYTHONPATH names.
sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
from gemma_stream.benchmark.writers import cached_fraction, evict, warm_up  # noqa: E402

MiB = 1 << 20
CALL_BYTES = 64 * MiB

# (vocab, hidden, intermediate, layers, heads, kv_heads, head_dim)
SHAPES = {
    "tiny": (4096, 256, 1024, 2, 4, 1, 64),
    "1b": (256000, 1152, 6912, 26, 4, 1, 256),
    "2b": (256000, 2048, 16384, 18, 8, 1, 256),
    "7b": (256000, 3072, 24576, 28, 16, 16, 256),
}


def tensor_shapes(size: str) -> dict[str, tuple[int, ...]]:
    vocab, hidden, inter, layers, heads, kv, head_dim = SHAPES[size]
    out = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = (heads * head_dim, hidden)
        out[p + "self_attn.k_proj.weight"] = (kv * head_dim, hidden)
        out[p + "self_attn.v_proj.weight"] = (kv * head_dim, hidden)
        out[p + "self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        out[p + "mlp.gate_proj.weight"] = (inter, hidden)
        out[p + "mlp.up_proj.weight"] = (inter, hidden)
        out[p + "mlp.down_proj.weight"] = (hidden, inter)
        out[p + "input_layernorm.weight"] = (hidden,)
        out[p + "post_attention_layernorm.weight"] = (hidden,)
    out["model.norm.weight"] = (hidden,)
    return out


def make_checkpoint(path: str, size: str, dtype_name: str) -> None:
    """Write a safetensors file tensor by tensor (bounded memory), then fsync."""
    import torch
    dtype = getattr(torch, dtype_name)
    code = {"bfloat16": "BF16", "float32": "F32", "float16": "F16"}[dtype_name]
    item = torch.empty((), dtype=dtype).element_size()
    header, offset = {}, 0
    shapes = tensor_shapes(size)
    for name, shape in shapes.items():
        n = 1
        for s in shape:
            n *= s
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n * item]}
        offset += n * item
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator().manual_seed(0)
    tmp = path + ".part"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shapes.items():
            rows = shape[0]
            per = max(1, (64 * MiB // item) // max(1, (shape[1] if len(shape) > 1 else 1)))
            for r in range(0, rows, per):
                block = torch.randn((min(per, rows - r), *shape[1:]), generator=gen).to(dtype)
                f.write(block.view(torch.uint8).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def make_torch_zip(st_path: str, pt_path: str) -> None:
    import torch
    from safetensors.torch import load_file
    torch.save(load_file(st_path), pt_path)
    fd = os.open(pt_path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


# ----------------------------------------------------------------- child side

def _status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> int:
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return base


def _bound(path: str, threads: int, odirect: bool) -> float:
    size = os.path.getsize(path)
    page = 4096
    alloc = (size + page - 1) // page * page
    # fresh, untouched, page-aligned private memory (what malloc hands out for big blocks)
    dest = mmap.mmap(-1, alloc, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = memoryview(dest)
    flags = os.O_RDONLY | (os.O_DIRECT if odirect else 0)
    fd = os.open(path, flags)
    # split on a 64 MiB boundary so every O_DIRECT call stays aligned
    half = (alloc // threads + CALL_BYTES - 1) // CALL_BYTES * CALL_BYTES
    errors = []

    def work(lo: int, hi: int) -> None:
        try:
            off = lo
            while off < hi:
                n = min(CALL_BYTES, hi - off)
                got = os.preadv(fd, [view[off:off + n]], off)
                if got <= 0:
                    break
                off += got
        except BaseException as e:  # pragma: no cover - reported
            errors.append(e)

    start = time.perf_counter()
    ts = [threading.Thread(target=work, args=(i * half, min(alloc, (i + 1) * half))) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    seconds = time.perf_counter() - start
    os.close(fd)
    if errors:
        raise errors[0]
    return seconds


def _meta_model(size: str, dtype):
    import torch
    from torch import nn
    shapes = tensor_shapes(size)
    root = nn.Module()
    with torch.device("meta"):
        for name, shape in shapes.items():
            *mods, leaf = name.split(".")
            m = root
            for part in mods:
                if not hasattr(m, part):
                    m.add_module(part, nn.Module())
                m = getattr(m, part)
            m.register_parameter(leaf, nn.Parameter(torch.empty(shape, dtype=dtype)))
    return root


def _cpu_seconds() -> float:
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child(args) -> dict:
    import torch
    out: dict = {}
    base = _reset_peak()
    cpu0 = _cpu_seconds()
    if args.case.startswith("bound"):
        out["seconds"] = _bound(args.path, args.threads or 2, args.case == "bound_odirect")
        if args.cache == "drop":
            evict([args.path])
    elif args.case.startswith("gs_"):
        import gemma_stream as gs
        kwargs = {}
        if args.threads:
            kwargs["threads"] = args.threads
        if args.mode != "copy":
            kwargs["mode"] = args.mode
        if args.cache != "keep":
            kwargs["cache"] = args.cache
        backend = args.case.split("_", 1)[1]
        dtype = getattr(torch, args.model_dtype)
        model = _meta_model(args.size, dtype)
        base = _reset_peak()
        cpu0 = _cpu_seconds()
        start = time.perf_counter()
        if args.api == "sd":
            sd = gs.load_state_dict(args.path, backend=backend, dtype=dtype, **kwargs)
            out["seconds"] = time.perf_counter() - start
            del sd
        else:
            report = gs.load_into(model, args.path, backend=backend, **kwargs)
            out["seconds"] = time.perf_counter() - start
            out["engine_seconds"] = report.seconds
    elif args.case == "torch_mmap":
        model = _meta_model(args.size, torch.bfloat16)
        base = _reset_peak()
        cpu0 = _cpu_seconds()
        start = time.perf_counter()
        sd = torch.load(args.path, mmap=True, weights_only=True)
        model.load_state_dict(sd, assign=True)
        out["seconds"] = time.perf_counter() - start
    else:
        raise SystemExit(f"unknown case {args.case}")
    out["cpu_s"] = _cpu_seconds() - cpu0
    if args.touch:  # then read one byte of every page of every weight: what a first forward pass pays
        start = time.perf_counter()
        for p in model.parameters():
            p.detach().reshape(-1).view(torch.uint8)[::4096].sum()
        out["touch_s"] = time.perf_counter() - start
    out["peak"] = _status("VmHWM") - base
    out["anon"] = _status("RssAnon")
    out["file_rss"] = _status("RssFile")
    return out


# ----------------------------------------------------------------- parent side

def _cpu_busy(seconds: float = 0.5) -> float:
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)
    i0, t0 = sample()
    time.sleep(seconds)
    i1, t1 = sample()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_quiet(limit_s: float = 120.0) -> float:
    """Other work shares these 2 cores: wait (bounded) until they are nearly idle."""
    start = time.perf_counter()
    busy = _cpu_busy()
    while busy > 0.10 and time.perf_counter() - start < limit_s:
        busy = _cpu_busy()
    return busy


def run_case(args, case: str, path: str, state: str) -> dict:
    if state == "cold":
        evict([path])
    else:
        warm_up([path])
    busy = wait_quiet()
    env = dict(os.environ)
    if case.startswith("alt_"):  # the same case against another build of the package (before/after)
        case = case[4:]
        env["PYTHONPATH"] = args.alt_path
    # per-case options: gs_native@drop@mmap@sd@t3@c64 (cache, mode, api, threads, chunk MiB)
    name, *opts = case.split("@")
    cache, mode, api, threads, touch = args.cache, args.mode, args.api, args.threads, False
    for opt in opts:
        if opt in ("drop", "keep"):
            cache = opt
        elif opt in ("mmap", "copy"):
            mode = opt
        elif opt in ("sd", "into"):
            api = opt
        elif opt == "f32":
            pass  # the file, chosen by main()
        elif opt == "touch":
            touch = True
        elif opt[0] == "t":
            threads = int(opt[1:])
        elif opt[0] == "c":
            env["GEMMA_STREAM_CHUNK_MB"] = opt[1:]
    cmd = [sys.executable, __file__, "--child", "--case", name, "--path", path, "--size", args.size,
           "--model-dtype", args.model_dtype, "--mode", mode, "--cache", cache, "--api", api]
    if threads:
        cmd += ["--threads", str(threads)]
    if touch:
        cmd += ["--touch"]
    env.setdefault("PYTHONPATH", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{case} failed:\n{res.stderr}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["busy_before"] = busy
    out["cached_after"] = cached_fraction([path])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/gs_engine")
    ap.add_argument("--size", default="2b", choices=sorted(SHAPES))
    ap.add_argument("--file-dtype", default="bfloat16")
    ap.add_argument("--model-dtype", default="bfloat16")
    ap.add_argument("--cases", default="bound,bound_odirect,gs_native")
    ap.add_argument("--states", default="warm,cold")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--mode", default="copy")
    ap.add_argument("--cache", default="keep")
    ap.add_argument("--api", default="into", choices=["into", "sd"])
    ap.add_argument("--json", default="")
    ap.add_argument("--touch", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--alt-path", default="", help="PYTHONPATH for cases named alt_<case>")
    ap.add_argument("--clean", action="store_true")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--case", default="")
    ap.add_argument("--path", default="")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.clean:
        for name in os.listdir(args.dir):
            os.remove(os.path.join(args.dir, name))
        os.rmdir(args.dir)
        return
    os.makedirs(args.dir, exist_ok=True)
    st = os.path.join(args.dir, f"{args.size}-{args.file_dtype}.safetensors")
    if not os.path.exists(st):
        t = time.perf_counter()
        make_checkpoint(st, args.size, args.file_dtype)
        print(f"# wrote {st} in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    cases = []
    for case in args.cases.split(","):
        path = st
        if "@f32" in case:  # the same shapes stored as float32 (into the --model-dtype model)
            path = os.path.join(args.dir, f"{args.size}-float32.safetensors")
            if not os.path.exists(path):
                make_checkpoint(path, args.size, "float32")
        if case.startswith("torch_mmap"):
            path = os.path.join(args.dir, f"{args.size}-{args.file_dtype}.pt")
            if not os.path.exists(path):
                make_torch_zip(st, path)
        for state in args.states.split(","):
            if not (case == "bound_odirect" and state == "warm"):
                cases.append((case, path, state))
    results: dict = {(c, s): [] for c, _, s in cases}
    for _ in range(args.repeat):  # interleaved, so slow drift hits every case alike
        for case, path, state in cases:
            results[(case, state)].append(run_case(args, case, path, state))
    rows = []
    for case, path, state in cases:
        runs = results[(case, state)]
        secs = [r["seconds"] for r in runs]
        best = min(secs)
        size = os.path.getsize(path)
        row = {"case": case, "state": state, "best_s": best, "median_s": statistics.median(secs),
               "gb_s": size / best / 1e9, "peak_over_model": runs[0]["peak"] / size,
               "peak_mib_over_model": (runs[0]["peak"] - size) / MiB, "runs": secs,
               "file_rss_mib": runs[0]["file_rss"] / MiB, "busy_before": [r["busy_before"] for r in runs],
               "cpu_s": [r["cpu_s"] for r in runs], "min_cpu_s": min(r["cpu_s"] for r in runs),
               "touch_s": min((r["touch_s"] for r in runs if "touch_s" in r), default=None),
               "cached_after": max(r["cached_after"] for r in runs)}
        rows.append(row)
        print(f"{case:14s} {state:5s} best {best:6.3f}s median {row['median_s']:6.3f}s "
              f"{row['gb_s']:5.2f} GB/s  peak {row['peak_over_model']:.3f}x "
              f"({row['peak_mib_over_model']:+.0f} MiB) fileRSS {row['file_rss_mib']:.0f} MiB  "
              f"cpu {row['min_cpu_s']:.2f}s  cached after {row['cached_after']:.1%}  " + (f"touch {row['touch_s']:.3f}s  " if row["touch_s"] else "") + "runs "
              f"{' '.join(f'{s:.3f}' for s in secs)}", flush=True)
    by = {(r["case"], r["state"]): r["best_s"] for r in rows}
    for (case, state), s in by.items():
        if case.startswith("gs_") or case == "torch_mmap":
            ref = by.get(("bound", state))
            ref_od = by.get(("bound_odirect", state))
            parts = []
            if ref:
                parts.append(f"{ref / s:.3f}x of bound")
            if ref_od:
                parts.append(f"{ref_od / s:.3f}x of O_DIRECT bound")
            print(f"# {case} {state}: " + ", ".join(parts))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "file_bytes": size, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
