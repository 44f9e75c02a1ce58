"""Load-time and peak-memory benchmark of gemma_stream against the usual ways to load a checkpoint.

Each loader runs in its own fresh process on a Gemma-shaped synthetic checkpoint (or a checkpoint
you have), warm or cold, and the results come out as one table with the issue targets as ratios::

    python benchmarks/bench_load.py --size 2b --repeat 3 --json out.json --plot out.png
    gemma-stream bench --synthetic tiny --loaders gs_native,safetensors

The pieces, along the pipeline: ``shapes`` (Gemma shapes and a model class buildable on meta),
``mixes`` (other tensor-size mixes: few large, many small), ``writers`` (streaming checkpoint writers,
page-cache control), ``loaders`` (what each compared loader imports, builds and times), ``child`` (one
load in a subprocess and what is measured after it), ``probes`` (the /proc and rusage readers of both
sides, idle waiting), ``bounds`` (the same bytes with no parsing), ``workloads`` (the checkpoints on
disk and the file set each loader reads), ``runner`` (subprocesses, cache state, repeats), ``report`` (table, targets, JSON, chart), ``cli`` (the
``bench`` and ``demo`` entry points), ``matrix`` and ``matrix_report`` (the mix matrix of issue 15). The scripts in
``benchmarks/`` (bench_load, bench_mixes, big_model, engine_probe) are front ends of these.
"""

from .cli import add_bench_arguments, add_demo_arguments, default_loaders, run_bench, run_demo
from .shapes import SIZES, GemmaShape, GemmaShaped, parse_size, tensor_specs

__all__ = ["SIZES", "GemmaShape", "GemmaShaped", "add_bench_arguments", "add_demo_arguments", "default_loaders",
           "parse_size", "run_bench", "run_demo", "tensor_specs"]
