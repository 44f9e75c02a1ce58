"""Load-time and peak-memory benchmark of gemma_stream against the usual ways to load a checkpoint.

Each loader runs in its own fresh process on a Gemma-shaped synthetic checkpoint (or a checkpoint
you have), warm or cold, and the results come out as one table with the issue targets as ratios::

    python benchmarks/bench_load.py --size 2b --repeat 3 --json out.json --plot out.png
    gemma-stream bench --synthetic tiny --loaders gs_native,safetensors

The pieces, along the pipeline: ``shapes`` (Gemma shapes and a model class buildable on meta),
``writers`` (streaming checkpoint writers, page-cache control), ``child`` (one load in a subprocess),
``bounds`` (the same bytes with no parsing), ``runner`` (checkpoints on disk, subprocesses,
repeats), ``report`` (table, targets, JSON, chart), ``cli`` (the ``bench`` and ``demo`` entry points).
"""

from .cli import add_bench_arguments, add_demo_arguments, default_loaders, run_bench, run_demo
from .shapes import SIZES, GemmaShape, GemmaShaped, parse_size, tensor_specs

__all__ = ["SIZES", "GemmaShape", "GemmaShaped", "add_bench_arguments", "add_demo_arguments", "default_loaders",
           "parse_size", "run_bench", "run_demo", "tensor_specs"]
