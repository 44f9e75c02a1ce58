"""GPU check: gemma_stream into an accelerator through the staging ring, against the usual GPU loaders.

Cases, each in a fresh process: gemma_stream bf16 -> bf16, f32 -> bf16 and bf16 -> int8 (quantize on
read), ``safetensors.torch.load_file(device=...)`` + ``load_state_dict``, and transformers
``from_pretrained(device_map=...)``.  Each gemma_stream result is compared, tensor by tensor, with a
CPU load moved to the device.  Figures: seconds, GB/s of the file against min(file read, pinned
host-to-device copy), host peak RSS over the process's baseline, and the ring's report
(staging bytes, uploads, overlap).  Without CUDA the same cases run into the CPU with
``GEMMA_STREAM_FORCE_STAGING=1`` (the ring's CPU path) and the output says so.

    python benchmarks/gpu_check.py --size 2b            # on a CUDA machine (writes ~15 GB of checkpoints)
    python benchmarks/gpu_check.py --size 0.25 --cold   # the CPU part, small
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import torch

from .shapes import GemmaShape, GemmaShaped, parse_size
from .writers import evict, warm_up, write_config, write_safetensors

__all__ = ["main"]

RESULT = "GPU_CHECK_RESULT "
CASES = ("gs_bf16", "gs_f32_bf16", "gs_int8", "gs_bf16_cpu", "safetensors_bf16", "transformers_bf16")
MiB = 1 << 20


# ---------------------------------------------------------------- the child: one load in a fresh process

def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _compare_with_cpu_load(model: torch.nn.Module, spec: dict, device: torch.device) -> dict:
    """Every tensor of ``model`` against the same load into the CPU (direct, unstaged), moved to ``device``."""
    import gemma_stream as gs
    os.environ.pop("GEMMA_STREAM_FORCE_STAGING", None)
    with torch.device("meta"):
        reference = GemmaShaped(GemmaShape(**spec["shape"]), torch.bfloat16)
    gs.load_into(reference, spec["file"], device="cpu", quantize=spec.get("quantize"))
    got, want = model.state_dict(), reference.state_dict()
    bad = [name for name, t in want.items() if name not in got or not torch.equal(got[name], t.to(device))]
    return {"tensors": len(want), "mismatched": bad[:10], "equal": not bad and got.keys() == want.keys()}


def _transformers_load(directory: str, device: torch.device) -> tuple[torch.nn.Module, str]:
    from transformers import AutoModelForCausalLM
    try:
        return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, device_map=str(device)), ""
    except ValueError as e:  # transformers wants accelerate for device_map; without it: load, then .to()
        if "accelerate" not in str(e):
            raise
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    return model.to(device), "no accelerate: from_pretrained() then .to(device)"


def _host_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model that live in host memory (a CPU destination's own size is not the loader's)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.state_dict().values()
                if t.device.type == "cpu"}
    return sum(storages.values())


def _child(spec: dict) -> dict:
    import gemma_stream as gs
    device = torch.device(spec["device"])
    case = spec["case"]
    if case.startswith("safetensors"):
        from safetensors.torch import load_file
    if case.startswith("transformers"):
        import transformers  # noqa: F401  (imported before the baseline)
    if device.type == "cuda":
        torch.empty(1, device=device)  # the CUDA context (hundreds of MB of host memory) before the baseline
        _sync(device)
    with torch.device("meta"):
        model = GemmaShaped(GemmaShape(**spec["shape"]), torch.bfloat16)
    before = _status("VmRSS")
    _reset_peak()
    report, note = None, ""
    start = time.perf_counter()
    if case.startswith("gs_"):
        report = gs.load_into(model, spec["file"], device=device, quantize=spec.get("quantize"))
    elif case.startswith("safetensors"):
        model.to_empty(device=device)
        model.load_state_dict(load_file(spec["file"], device=str(device)))
    else:
        model, note = _transformers_load(spec["dir"], device)
    _sync(device)
    seconds = time.perf_counter() - start
    out = {"case": case, "seconds": seconds, "host_peak": _status("VmHWM") - before,
           "host_model_bytes": _host_bytes(model), "device": str(device), "note": note}
    if report is not None:
        out.update(staging_bytes=report.staging_bytes, uploads=report.uploads, overlap=report.overlap,
                   bytes_read=report.bytes_read, backend=report.backend)
        if spec.get("verify"):
            out["verify"] = _compare_with_cpu_load(model, spec, device)
    return out


# ---------------------------------------------------------------- bounds, measured in the parent

def _read_bound(path: str, threads: int) -> float:
    """GB/s of reading ``path`` by ``threads`` threads (contiguous parts, 64 MiB calls) into reused buffers."""
    size = os.path.getsize(path)
    part = -(-size // threads)

    def read(lo: int) -> None:
        buf = bytearray(64 * MiB)
        view = memoryview(buf)
        fd = os.open(path, os.O_RDONLY)
        try:
            offset, end = lo, min(size, lo + part)
            while offset < end:
                n = os.preadv(fd, [view[:min(len(buf), end - offset)]], offset)
                if n == 0:
                    break
                offset += n
        finally:
            os.close(fd)
    start = time.perf_counter()
    workers = [threading.Thread(target=read, args=(i * part,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return size / (time.perf_counter() - start) / 1e9


def _copy_bound(device: torch.device, nbytes: int = 1 << 30) -> float:
    """GB/s of one pinned host buffer copied to ``device`` (a plain CPU memcpy without an accelerator)."""
    pinned = device.type == "cuda"
    src = torch.ones(nbytes, dtype=torch.uint8, pin_memory=pinned)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(3):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src, non_blocking=pinned)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


# ---------------------------------------------------------------- the parent

def _files(directory: str, shape: GemmaShape, durable: bool) -> dict:
    os.makedirs(os.path.join(directory, "hf"), exist_ok=True)
    bf16 = os.path.join(directory, "hf", "model.safetensors")
    f32 = os.path.join(directory, "model_f32.safetensors")
    tag = os.path.join(directory, "shape.json")
    same = os.path.exists(tag) and json.load(open(tag)) == shape.as_dict()
    if not same or not os.path.exists(bf16):
        write_safetensors(bf16, shape, torch.bfloat16, durable=durable)
        write_config(os.path.join(directory, "hf"), shape, torch.bfloat16)
    if not same or not os.path.exists(f32):
        write_safetensors(f32, shape, torch.float32, durable=durable)
    with open(tag, "w") as f:
        json.dump(shape.as_dict(), f)
    return {"bf16": bf16, "f32": f32, "dir": os.path.dirname(bf16)}


def _spec(case: str, files: dict, shape: GemmaShape, device: str, verify: bool) -> dict:
    if case == "gs_bf16_cpu":  # the direct CPU load (no staging), for reference
        device = "cpu"
    spec = {"case": case, "device": device, "shape": shape.as_dict(), "file": files["bf16"], "dir": files["dir"],
            "verify": verify}
    if case == "gs_f32_bf16":
        spec["file"] = files["f32"]
    if case == "gs_int8":
        spec["quantize"] = "int8"
    return spec


def _run_child(spec: dict, force_staging: bool) -> dict:
    env = dict(os.environ)
    if force_staging:
        env["GEMMA_STREAM_FORCE_STAGING"] = "1"
    from .runner import ensure_bytecode, package_root

    ensure_bytecode(package_root())   # no module compiled inside a timed load (NOTES.md 38)
    proc = subprocess.run([sys.executable, "-m", "gemma_stream.benchmark.gpu", "--child", json.dumps(spec)],
                          env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"case": spec["case"], "error": " | ".join(tail) or f"exit status {proc.returncode}"}


def _table(rows: list[dict], bound: dict) -> str:
    lines = [f"{'case':<19}{'cache':<6}{'s':>8}{'GB/s':>8}{'/bound':>8}{'host MiB':>10}{'ring MiB':>10}"
             f"{'uploads':>9}{'overlap':>9}  verify"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['case']:<19}{r['cache']:<6}  failed: {r['error'][:160]}")
            continue
        gbs = r["file_bytes"] / r["seconds"] / 1e9
        ratio = gbs / bound[r["cache"]]
        verify = r.get("verify")
        check = "" if verify is None else ("equal" if verify["equal"] else f"MISMATCH {verify['mismatched']}")
        check += r.get("note", "")
        ring = f"{r['staging_bytes'] / MiB:.0f}" if "staging_bytes" in r else "-"
        lines.append(f"{r['case']:<19}{r['cache']:<6}{r['seconds']:>8.2f}{gbs:>8.2f}{ratio:>8.2f}"
                     f"{r['host_peak'] / MiB:>10.0f}{ring:>10}{r.get('uploads', '-'):>9}"
                     f"{r.get('overlap', float('nan')):>9.2f}  {check}")
    return "\n".join(lines)


def _targets(rows: list[dict]) -> list[str]:
    """The issue's targets, as measured (each line says met or missed)."""
    out = []
    by = {(r["case"], r["cache"]): r for r in rows if "error" not in r}
    for cache in ("warm", "cold"):
        gs_row, st_row = by.get(("gs_bf16", cache)), by.get(("safetensors_bf16", cache))
        if gs_row:
            ratio = gs_row["file_bytes"] / gs_row["seconds"] / 1e9 / gs_row["bound"]
            out.append(f"{cache}: gs bf16 at {ratio:.2f} of min(read, copy) (target >= 0.9): "
                       f"{'met' if ratio >= 0.9 else 'MISSED'}")
        if gs_row and st_row:
            speedup = st_row["seconds"] / gs_row["seconds"]
            out.append(f"{cache}: gs bf16 {speedup:.2f}x safetensors load_file (target >= 2x): "
                       f"{'met' if speedup >= 2 else 'MISSED'}")
    for r in rows:
        if r["case"].startswith("gs_") and "error" not in r:
            limit = r["staging_bytes"] + 64 * MiB
            extra = r["host_peak"] - r["host_model_bytes"]  # a CPU destination is host memory by itself
            out.append(f"{r['case']} {r['cache']}: host peak over the model {extra / MiB:.0f} MiB, ring + 64 MiB = "
                       f"{limit / MiB:.0f} MiB: {'met' if extra <= limit else 'MISSED'}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="2b", help="tiny|1b|2b|7b or GiB of bf16 (default 2b)")
    parser.add_argument("--dir", default=None, help="where the checkpoints are written (default: a temp dir)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--cold", action="store_true", help="also run each case after evicting its file")
    parser.add_argument("--no-verify", action="store_true", help="skip the tensor-by-tensor comparison")
    parser.add_argument("--json", default=None, help="write the rows and bounds here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(RESULT + json.dumps(_child(json.loads(args.child))), flush=True)
        return 0
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    print("device:", torch.cuda.get_device_name(device) if cuda else
          "no CUDA device: running the CPU part (forced staging into CPU memory); GPU figures NOT measured")
    shape = parse_size(args.size)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases: {', '.join(unknown)}")
    scratch = None if args.dir else tempfile.TemporaryDirectory(prefix="gpu_check_")
    directory = args.dir or scratch.name
    try:
        files = _files(directory, shape, durable=args.cold)
        threads = min(len(os.sched_getaffinity(0)), 8)
        warm_up([files["bf16"]])
        copy = _copy_bound(device, min(1 << 30, os.path.getsize(files["bf16"])))
        bound = {"warm": min(_read_bound(files["bf16"], threads), copy)}
        if args.cold:
            evict([files["bf16"]])
            bound["cold"] = min(_read_bound(files["bf16"], threads), copy)
        print(f"bounds: host-to-device copy {copy:.2f} GB/s, min(read, copy) warm {bound['warm']:.2f} GB/s"
              + (f", cold {bound['cold']:.2f} GB/s" if args.cold else ""))
        rows = []
        for case in cases:
            spec = _spec(case, files, shape, str(device), verify=not args.no_verify)
            used = [spec["file"]] if not case.startswith("transformers") else [files["bf16"]]
            for cache in ("warm", "cold") if args.cold else ("warm",):
                (evict if cache == "cold" else warm_up)(used)
                row = _run_child(spec, force_staging=not cuda and case.startswith("gs_") and case != "gs_bf16_cpu")
                row.update(cache=cache, file_bytes=sum(os.path.getsize(f) for f in used), bound=bound[cache])
                rows.append(row)
                print(_table([row], bound).splitlines()[-1], flush=True)
        print()
        print(_table(rows, bound))
        print()
        if not cuda:
            print("targets (GPU targets; these CPU figures only show the ring's own cost on this machine):")
        print("\n".join(_targets(rows)))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": str(device), "cuda": cuda, "shape": shape.as_dict(), "bound": bound,
                           "copy_bound": copy, "rows": rows}, f, indent=2)
        # a competitor that cannot run here (transformers without accelerate, say) is reported, not fatal
        bad = [r for r in rows if r["case"].startswith("gs_")
               and ("error" in r or not r.get("verify", {"equal": True})["equal"])]
        return 1 if bad else 0
    finally:
        if scratch is not None:
            scratch.cleanup()


if __name__ == "__main__":
    sys.exit(main())
