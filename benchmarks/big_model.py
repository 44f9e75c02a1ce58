"""Load a Gemma-7B-shaped bf16 checkpoint (17 GB) plain and as int8, and optionally a
Gemma-2-27B-shaped one (54 GB) as int4, each in a fresh process; print seconds and peak RSS.

Not run in CI: it writes tens of GB.  It never runs the torch.load / two-step baselines at
these sizes (they need 2x the model in memory and would exhaust a 24 GiB machine).

    python benchmarks/big_model.py                       # 7B: plain + int8
    python benchmarks/big_model.py --27b                 # and 27B as int4 (needs ~55 GB of disk)
    python benchmarks/big_model.py --layers 1 --27b      # quick check of the whole pipeline

The checkpoint uses HF names (model.embed_tokens tied to lm_head, model.layers.N.self_attn.
q_proj, ...), sharded like HF (model-0000i-of-0000n.safetensors + index).  Weights are
Gaussian (std 0.02) bf16 blocks written from a 64 MiB pool at varying offsets.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))

from gemma_stream.benchmark.writers import evict  # noqa: E402  (after the path fallback)


@dataclass(frozen=True)
class Shape:
    name: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    sandwich_norms: bool  # Gemma 2 adds pre/post feed-forward norms


# docs/FORMATS.md "Gemma checkpoints"
SHAPES = {
    "7b": Shape("gemma-7b", 256000, 3072, 24576, 28, 16, 16, 256, False),
    "27b": Shape("gemma-2-27b", 256000, 4608, 36864, 46, 32, 16, 128, True),
}
SHARD_BYTES = 4 << 30
POOL_BYTES = 64 << 20
MARGIN_BYTES = 2 << 30


# ---------------------------------------------------------------- the model (HF names, nn.Linear / nn.Embedding)

class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))


class DecoderLayer(nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(s.hidden, s.heads * s.head_dim, bias=False)
        self.self_attn.k_proj = nn.Linear(s.hidden, s.kv_heads * s.head_dim, bias=False)
        self.self_attn.v_proj = nn.Linear(s.hidden, s.kv_heads * s.head_dim, bias=False)
        self.self_attn.o_proj = nn.Linear(s.heads * s.head_dim, s.hidden, bias=False)
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(s.hidden, s.intermediate, bias=False)
        self.mlp.up_proj = nn.Linear(s.hidden, s.intermediate, bias=False)
        self.mlp.down_proj = nn.Linear(s.intermediate, s.hidden, bias=False)
        self.input_layernorm = RMSNorm(s.hidden)
        self.post_attention_layernorm = RMSNorm(s.hidden)
        if s.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(s.hidden)
            self.post_feedforward_layernorm = RMSNorm(s.hidden)


class GemmaShaped(nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(s.vocab, s.hidden)
        self.model.layers = nn.ModuleList([DecoderLayer(s) for _ in range(s.layers)])
        self.model.norm = RMSNorm(s.hidden)
        self.lm_head = nn.Linear(s.hidden, s.vocab, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight


def checkpoint_shapes(s: Shape) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensors: the model's state dict without the tied lm_head, in HF order."""
    with torch.device("meta"):
        model = GemmaShaped(s)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}


# ---------------------------------------------------------------- writing the checkpoint

def write_checkpoint(folder: str, s: Shape) -> tuple[list[str], int]:
    """Sharded safetensors (bf16) + model.safetensors.index.json; returns (files, bytes)."""
    shapes = checkpoint_shapes(s)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    pool = (torch.randn(POOL_BYTES // 2, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    pool_bytes = memoryview(pool.view(torch.uint8).numpy())
    files, weight_map, total, cursor = [], {}, 0, 0
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name in names:
            nbytes = math.prod(shapes[name]) * 2
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        path = os.path.join(folder, fname)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name in names:
                left = math.prod(shapes[name]) * 2
                while left:  # norms get Gaussian values too: nothing here reads them as norms
                    start = cursor % (POOL_BYTES - 2) // 2 * 2
                    piece = min(left, POOL_BYTES - start)
                    f.write(pool_bytes[start:start + piece])
                    left -= piece
                    cursor += piece + 4098  # shift the pool between tensors and pieces
        files.append(path)
        total += 8 + len(raw) + offset
        print(f"  wrote {fname} ({(8 + len(raw) + offset) / 2**30:.2f} GiB)", flush=True)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return files, total


# ---------------------------------------------------------------- one measured load (child process)

def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def unique_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def sqnr_db(model: nn.Module, folder: str, name: str, group_size: int) -> float | None:
    import gemma_stream as gs
    from gemma_stream.quant import dequantize

    module = model.get_submodule(name.rsplit(".", 1)[0])
    if not isinstance(module, (gs.QuantLinear, gs.QuantEmbedding)):
        return None
    w = gs.load_state_dict(folder, keys=[name])[name].float()
    err = (w - dequantize(module)).norm()
    return 20 * math.log10(float(w.norm() / err))


def child(spec: dict) -> None:
    import gemma_stream as gs

    shape = Shape(**spec["shape"])
    with torch.device("meta"):
        model = GemmaShaped(shape).bfloat16()
    rss_before = status_kib("VmRSS")
    start = time.perf_counter()
    report = gs.load_into(model, spec["folder"], quantize=spec["quantize"], group_size=spec["group_size"],
                          backend=spec["backend"], threads=spec["threads"])
    seconds = time.perf_counter() - start
    peak = status_kib("VmHWM")
    model_bytes = unique_bytes(model)
    probe = "model.layers.0.self_attn.q_proj.weight"
    result = {"case": spec["case"], "quantize": spec["quantize"] or "none", "seconds": seconds,
              "executor_seconds": report.seconds, "bytes_read": report.bytes_read, "backend": report.backend,
              "rss_before_bytes": rss_before * 1024, "peak_rss_bytes": peak * 1024, "model_bytes": model_bytes,
              "peak_over_model": (peak - rss_before) * 1024 / model_bytes,
              "sqnr_db_q_proj": sqnr_db(model, spec["folder"], probe, spec["group_size"])}
    print("RESULT " + json.dumps(result), flush=True)


def run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{spec['case']} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(lines[-1][len("RESULT "):])


# ---------------------------------------------------------------- driver

def table(rows: list[dict]) -> str:
    head = f"{'case':<24} {'quantize':>8} {'seconds':>8} {'GB/s':>6} {'peak RSS GiB':>13} {'model GiB':>10} " \
           f"{'(peak-base)/model':>18} {'SQNR dB':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        sqnr = f"{r['sqnr_db_q_proj']:.1f}" if r["sqnr_db_q_proj"] is not None else "-"
        lines.append(f"{r['case']:<24} {r['quantize']:>8} {r['seconds']:>8.1f} {r['bytes_read'] / r['seconds'] / 1e9:>6.2f} "
                     f"{r['peak_rss_bytes'] / 2**30:>13.2f} {r['model_bytes'] / 2**30:>10.2f} "
                     f"{r['peak_over_model']:>18.3f} {sqnr:>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="where to write the checkpoints (default: a new temp dir)")
    parser.add_argument("--27b", dest="big", action="store_true", help="also write Gemma-2-27B-shaped and load it as int4")
    parser.add_argument("--layers", type=int, help="override the layer count (a quick check)")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--backend", default="native", choices=["native", "python", "auto"])
    parser.add_argument("--threads", type=int)
    parser.add_argument("--warm", action="store_true", help="keep the page cache (default: evict before each load)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint files")
    parser.add_argument("--json", default="big_model.json", help="where to write the results")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0

    plans = [("7b", [None, "int8"])] + ([("27b", ["int4"])] if args.big else [])
    shapes = {key: Shape(**{**asdict(SHAPES[key]), **({"layers": args.layers} if args.layers else {})})
              for key, _ in plans}
    sizes = [sum(math.prod(t) * 2 for t in checkpoint_shapes(s).values()) for s in shapes.values()]
    need = sum(sizes) if args.keep else max(sizes)   # without --keep, each is removed before the next
    root = args.dir or tempfile.mkdtemp(prefix="gemma_stream_big_")
    os.makedirs(root, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < need + MARGIN_BYTES:
        print(f"{root}: {free / 1e9:.1f} GB free, the checkpoints need {need / 1e9:.1f} GB "
              f"(+{MARGIN_BYTES / 1e9:.0f} GB margin); pass --dir on a larger disk or use --layers", file=sys.stderr)
        if not args.dir:
            os.rmdir(root)
        return 2

    rows = []
    try:
        for key, schemes in plans:
            shape = shapes[key]
            folder = os.path.join(root, f"{shape.name}-{shape.layers}l")
            os.makedirs(folder, exist_ok=True)
            print(f"writing {shape.name} ({shape.layers} layers) to {folder}", flush=True)
            start = time.perf_counter()
            files, nbytes = write_checkpoint(folder, shape)
            print(f"  {nbytes / 1e9:.1f} GB in {time.perf_counter() - start:.0f} s", flush=True)
            for scheme in schemes:
                if not args.warm:
                    evict(files)
                case = f"{shape.name}-{shape.layers}l"
                spec = {"case": case, "folder": folder, "quantize": scheme, "group_size": args.group_size,
                        "backend": args.backend, "threads": args.threads, "shape": asdict(shape)}
                print(f"loading {case} as {scheme or 'bf16'} ...", flush=True)
                rows.append(run_child(spec))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
            if not args.keep:
                shutil.rmtree(folder)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    print()
    print(table(rows))
    with open(args.json, "w") as f:
        json.dump({"cache": "warm" if args.warm else "cold", "rows": rows}, f, indent=1)
    print(f"\nresults: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
