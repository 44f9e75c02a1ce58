#!/usr/bin/env python
"""Issue 15's matrix: every loader on four checkpoint mixes, three sizes, three formats, warm and cold.

Mixes: Gemma 2B and 7B layers, "few large" (a 512 MiB embedding, 48-64 MiB projections), "many
small" (thousands of tensors under 1 MiB); formats: one safetensors file, a sharded HF directory
(3+ files), a torch zip. Loaders interleaved in rounds, each load in a fresh process; ratios taken
within each round; medians and spreads; JSON out; --markdown prints the README table.
The harness lives in ``gemma_stream.benchmark.matrix``.

    python benchmarks/bench_mixes.py --sizes 1,2,5 --rounds 5 --wait-idle 30 --json benchmarks/out/mixes.json
    python benchmarks/bench_mixes.py --render benchmarks/out/mixes.json --markdown
    python benchmarks/bench_mixes.py --sizes tiny --rounds 2                      # a quick check
"""

import os
import sys

try:
    import gemma_stream  # noqa: F401
except ImportError:   # running from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "python"))

from gemma_stream.benchmark.matrix import main

if __name__ == "__main__":
    sys.exit(main())
