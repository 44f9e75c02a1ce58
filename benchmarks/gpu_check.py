#!/usr/bin/env python
"""gemma_stream into CUDA through the staging ring: correctness, speed and host memory in one command.

The harness lives in ``gemma_stream.benchmark.gpu``; see its docstring for the cases and figures.

    python benchmarks/gpu_check.py --size 2b --json gpu_check.json       # on a CUDA machine
    python benchmarks/gpu_check.py --size 0.25 --cold                    # no CUDA: the CPU part, small
"""

import os
import sys

try:
    import gemma_stream  # noqa: F401
except ImportError:   # running from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "python"))

from gemma_stream.benchmark.gpu import main

if __name__ == "__main__":
    sys.exit(main())
