"""Engine probe: gemma_stream's copy engine against the machine's own bounds, case by case.

A quick measurement tool for the I/O engine (the side-by-side table is bench_load.py). Makes a
Gemma-shaped checkpoint once, then times each case in a fresh process (the harness's child),
warm (file in the page cache) and cold (evicted), with the peak RSS over the baseline.

Cases: bound (2 threads pread()ing halves of the file into fresh anonymous memory), bound_odirect
(the same with O_DIRECT; cold only), gs_native, gs_python, torch_mmap (torch.load(mmap=True) + meta +
assign, on a torch zip of the same tensors made once), each with optional suffixes: @drop / @keep
(cache=), @mmap (mode="mmap"), @sd (load_state_dict), @tN (threads), @cN (GEMMA_STREAM_CHUNK_MB),
@f32 (the same shapes stored as float32), @touch (read one byte per page of every weight inside the
timing). alt_<case> runs it against the gemma_stream at --alt-path (another checkout with this
harness: before/after). Runs are interleaved, each after the cores go quiet; best and median printed.

    PYTHONPATH=python python benchmarks/engine_probe.py --dir /tmp/gs_engine \\
        --cases bound,bound_odirect,gs_native,gs_native@drop --states warm,cold --repeat 8
    python benchmarks/engine_probe.py --dir /tmp/gs_engine --clean   # remove the files

Shapes, writers, page-cache control, idle waiting, the child process (its /proc readers) and the
pread bound are gemma_stream.benchmark's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

try:
    import gemma_stream  # noqa: F401
except ImportError:   # running from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "python"))

from gemma_stream.benchmark import writers  # noqa: E402
from gemma_stream.benchmark.runner import run_child, wait_for_idle  # noqa: E402
from gemma_stream.benchmark.shapes import SIZES  # noqa: E402

MiB = 1 << 20
_SHORT = {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}
_LOADERS = {"bound": "pread_2t", "bound_odirect": "odirect_2t", "torch_mmap": "torch_load_mmap_assign",
            "gs_native": "gs_options", "gs_python": "gs_options"}


def checkpoint(args, dtype_name: str, zipped: bool = False) -> str:
    """The probe's file for a stored dtype (written once, HF names)."""
    stem = os.path.join(args.dir, f"{args.size}-{dtype_name}")
    path = stem + (".pt" if zipped else ".safetensors")
    if not os.path.exists(path):
        started = time.perf_counter()
        dtype, part = writers.DTYPES[_SHORT[dtype_name]], path + ".part"
        if zipped:
            writers.write_ckpt(part, SIZES[args.size], dtype, naming="hf", key=None)
        else:
            writers.write_safetensors(part, SIZES[args.size], dtype, naming="hf")
        os.replace(part, path)
        print(f"# wrote {path} in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return path


def case_spec(args, case: str, path: str) -> tuple[dict, str | None]:
    """The harness child's spec for one case, and the PYTHONPATH of an alt_ case."""
    pythonpath = None
    if case.startswith("alt_"):
        case, pythonpath = case[4:], args.alt_path
    name, *opts = case.split("@")
    if name not in _LOADERS:
        raise SystemExit(f"unknown case {name!r}; choose from {', '.join(_LOADERS)}")
    options = {"backend": name[3:] if name.startswith("gs_") else None, "mode": args.mode, "cache": args.cache,
               "api": "load_state_dict" if args.api == "sd" else "load_into"}
    threads, env, touch = args.threads or None, {}, False
    for opt in opts:
        if opt in ("drop", "keep"):
            options["cache"] = opt
        elif opt in ("mmap", "copy"):
            options["mode"] = opt
        elif opt in ("sd", "into"):
            options["api"] = "load_state_dict" if opt == "sd" else "load_into"
        elif opt == "touch":
            touch = True
        elif opt == "f32":
            pass   # the file, chosen by main()
        elif opt[0] == "t" and opt[1:].isdigit():
            threads = int(opt[1:])
        elif opt[0] == "c" and opt[1:].isdigit():
            env["GEMMA_STREAM_CHUNK_MB"] = opt[1:]
        else:
            raise SystemExit(f"case {case!r}: unknown suffix @{opt}")
    spec = {"loader": _LOADERS[name], "options": options, "env": env, "touch": touch, "threads": threads,
            "model": {"kind": "gemma", "shape": SIZES[args.size].as_dict(), "naming": "hf"},
            "model_dtype": args.model_dtype, "key": None, "quantize": None, "check_names": [], "sqnr_names": [],
            "files": {"primary": path, "data": [path], "ckpt": path, "safetensors": [path], "hf": args.dir}}
    return spec, pythonpath


def run_case(args, case: str, path: str, state: str) -> dict:
    if state == "cold":
        writers.evict([path])
    else:
        writers.warm_up([path])
    busy = wait_for_idle(args.wait_idle, busy_max=0.10)
    spec, pythonpath = case_spec(args, case, path)
    try:
        out = run_child(spec, timeout=1800.0, pythonpath=pythonpath)
    except RuntimeError as e:
        raise SystemExit(f"{case} failed: {e}") from None
    out["busy_before"] = busy
    out["cached_after"] = writers.cached_fraction([path])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/gs_engine")
    ap.add_argument("--size", default="2b", choices=sorted(SIZES))
    ap.add_argument("--file-dtype", default="bfloat16", choices=sorted(_SHORT))
    ap.add_argument("--model-dtype", default="bfloat16", choices=sorted(_SHORT))
    ap.add_argument("--cases", default="bound,bound_odirect,gs_native")
    ap.add_argument("--states", default="warm,cold")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--mode", default="copy")
    ap.add_argument("--cache", default="auto", choices=["auto", "keep", "drop"])
    ap.add_argument("--api", default="into", choices=["into", "sd"])
    ap.add_argument("--json", default="")
    ap.add_argument("--alt-path", default="", help="PYTHONPATH for cases named alt_<case>")
    ap.add_argument("--wait-idle", type=float, default=120.0, metavar="SECONDS",
                    help="before each run, wait up to SECONDS for the cores to go quiet (default 120)")
    ap.add_argument("--clean", action="store_true")
    args = ap.parse_args()
    if args.clean:
        shutil.rmtree(args.dir, ignore_errors=True)
        return
    os.makedirs(args.dir, exist_ok=True)
    cases = []
    for case in args.cases.split(","):
        dtype_name = "float32" if "@f32" in case else args.file_dtype
        path = checkpoint(args, dtype_name, zipped=case.split("@")[0].endswith("torch_mmap"))
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
        best, size = min(secs), os.path.getsize(path)
        row = {"case": case, "state": state, "best_s": best, "median_s": statistics.median(secs),
               "gb_s": size / best / 1e9, "peak_over_model": runs[0]["peak_bytes"] / size,
               "peak_mib_over_model": (runs[0]["peak_bytes"] - size) / MiB, "runs": secs,
               "file_rss_mib": runs[0]["file_bytes"] / MiB, "busy_before": [r["busy_before"] for r in runs],
               "cpu_s": [r["cpu_seconds"] for r in runs], "min_cpu_s": min(r["cpu_seconds"] for r in runs),
               "others_cpu": [r["others_cpu"] for r in runs], "cached_after": max(r["cached_after"] for r in runs)}
        rows.append(row)
        print(f"{case:14s} {state:5s} best {best:6.3f}s median {row['median_s']:6.3f}s "
              f"{row['gb_s']:5.2f} GB/s  peak {row['peak_over_model']:.3f}x "
              f"({row['peak_mib_over_model']:+.0f} MiB) fileRSS {row['file_rss_mib']:.0f} MiB  "
              f"cpu {row['min_cpu_s']:.2f}s  cached after {row['cached_after']:.1%}  runs "
              f"{' '.join(f'{s:.3f}' for s in secs)}", flush=True)
    by = {(r["case"], r["state"]): r["best_s"] for r in rows}
    for (case, state), s in by.items():
        if case.startswith(("gs_", "alt_", "torch_mmap")):
            parts = [f"{ref / s:.3f}x of {label}" for ref, label in
                     ((by.get(("bound", state)), "bound"), (by.get(("bound_odirect", state)), "O_DIRECT bound")) if ref]
            print(f"# {case} {state}: " + ", ".join(parts))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
