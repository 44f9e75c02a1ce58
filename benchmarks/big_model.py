"""Load a Gemma-7B-shaped bf16 checkpoint (17 GB) plain and as int8, and optionally a
Gemma-2-27B-shaped one (54 GB) as int4, each in a fresh process; print seconds and peak RSS.

Not run in CI: it writes tens of GB.  It never runs the torch.load / two-step baselines at
these sizes (they need 2x the model in memory and would exhaust a 24 GiB machine).

    python benchmarks/big_model.py                       # 7B: plain + int8
    python benchmarks/big_model.py --27b                 # and 27B as int4 (needs ~55 GB of disk)
    python benchmarks/big_model.py --layers 1 --27b      # quick check of the whole pipeline
    python benchmarks/big_model.py --tiny --27b          # the same with tiny shapes (seconds, a few MB)

The checkpoint is a Hugging Face directory (model.embed_tokens tied to lm_head, sharded
model-0000i-of-0000n.safetensors + index, config.json), written by gemma_stream.benchmark, whose
child process measures each load (peak = VmHWM over the RSS before it; SQNR of sampled weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile

try:
    import gemma_stream  # noqa: F401
except ImportError:   # running from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "python"))

from gemma_stream.benchmark.cli import check_disk  # noqa: E402
from gemma_stream.benchmark.report import machine_info, write_json  # noqa: E402
from gemma_stream.benchmark.runner import run_loaders, synthetic_workload  # noqa: E402
from gemma_stream.benchmark.shapes import LARGE_SIZES, SIZES  # noqa: E402
from gemma_stream.cli_text import human_bytes  # noqa: E402

MARGIN_BYTES = 2 << 30


def table(rows: list[dict]) -> str:
    head = (f"{'case':<24} {'quantize':>8} {'seconds':>8} {'GB/s':>6} {'peak':>10} {'model':>10} "
            f"{'peak/model':>10} {'SQNR dB':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['case']:<24} {r['quantize']:>8} {r['status']}: {r['message']}")
            continue
        sqnr = r.get("sqnr_db") or {}
        lowest = f"{min(sqnr.values()):.1f}" if sqnr else "-"
        lines.append(f"{r['case']:<24} {r['quantize']:>8} {r['seconds']:>8.2f} {r['gb_per_s']:>6.2f} "
                     f"{human_bytes(r['peak_bytes']):>10} {human_bytes(r['model_bytes']):>10} "
                     f"{r['peak_over_model']:>9.3f}x {lowest:>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="where to write the checkpoints (default: a new temp dir)")
    parser.add_argument("--27b", dest="big", action="store_true", help="also write Gemma-2-27B-shaped and load it as int4")
    parser.add_argument("--layers", type=int, help="override the layer count (a quick check)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes instead of 7B / 27B (tests the script)")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--backend", default="native", choices=["native", "python"])
    parser.add_argument("--threads", type=int)
    parser.add_argument("--warm", action="store_true", help="keep the page cache (default: evict before each load)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint files")
    parser.add_argument("--json", default="big_model.json", help="where to write the results")
    args = parser.parse_args(argv)

    plans = [(SIZES["7b"], [None, "int8"])] + ([(LARGE_SIZES["27b"], ["int4"])] if args.big else [])
    if args.tiny:   # the 27B slot keeps its Gemma 2 sandwich norms
        plans = [(dataclasses.replace(SIZES["tiny"], name=f"tiny-as-{s.name}", sandwich_norms=s.sandwich_norms), q)
                 for s, q in plans]
    if args.layers:
        plans = [(dataclasses.replace(s, layers=args.layers, name=f"{s.name}-{args.layers}l"), q) for s, q in plans]
    sizes = [shape.nbytes(2) for shape, _ in plans]
    need = sum(sizes) if args.keep else max(sizes)   # without --keep, each is removed before the next
    root = args.dir or tempfile.mkdtemp(prefix="gemma_stream_big_")
    os.makedirs(root, exist_ok=True)
    try:
        check_disk(root, need + MARGIN_BYTES)
    except SystemExit as e:
        print(f"{e} (or use --layers)", file=sys.stderr)
        if not args.dir:
            os.rmdir(root)
        return 2

    rows = []
    try:
        for shape, schemes in plans:
            workload = synthetic_workload(shape, "bf16", "hf", root)
            case = f"gemma-{shape.name}"
            for scheme in schemes:
                print(f"loading {case} as {scheme or 'bf16'} ...", flush=True)
                row = run_loaders(workload, [f"gs_{args.backend}"], cold=not args.warm, quantize=scheme,
                                  group_size=args.group_size, threads=args.threads)[0]
                rows.append(dict(row.as_dict(workload.data_bytes), case=case, quantize=scheme or "none"))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
            if not args.keep:
                shutil.rmtree(workload.directory, ignore_errors=True)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    print()
    print(table(rows))
    write_json(args.json, {"cache": "warm" if args.warm else "cold", "machine": machine_info(), "rows": rows})
    print(f"\nresults: {args.json}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
