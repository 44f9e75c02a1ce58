#!/usr/bin/env python
"""Load time and peak memory of gemma_stream against torch.load, safetensors and transformers.

Every loader runs in its own fresh process; one table, targets as ratios, optional JSON and chart.
The harness lives in ``gemma_stream.benchmark`` (``gemma-stream bench`` runs the same code).

    python benchmarks/bench_load.py --size 2b --repeat 3                 # warm, all loaders
    python benchmarks/bench_load.py --size 2b --cold --repeat 3          # evicted before each load
    python benchmarks/bench_load.py --size 2b --format ckpt              # gemma_pytorch's torch zip
    python benchmarks/bench_load.py --size 2b --quantize int8            # quantize-on-read vs two-step
    python benchmarks/bench_load.py --size 2b --hf                       # HF directory, from_pretrained
    python benchmarks/bench_load.py --size 2b --dtype f32 --model-dtype bf16
    python benchmarks/bench_load.py --scaling                            # 1b, 2b, 7b: GB/s per size
    python benchmarks/bench_load.py --size tiny --loaders gs_native,safetensors --json r.json --plot r.png
"""

import argparse
import os
import sys

try:
    import gemma_stream  # noqa: F401
except ImportError:   # running from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "python"))

from gemma_stream.benchmark import add_bench_arguments, run_bench


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(parser)
    return run_bench(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
