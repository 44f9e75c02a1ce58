#!/usr/bin/env python
"""CPU seconds of the format readers on a many-tensor checkpoint: safetensors vs torch zip (issue 15).

    python benchmarks/bench_readers.py --tensors 8000 --repeat 5 --load --json benchmarks/out/readers.json

The measurement lives in ``gemma_stream.benchmark.readers``.
"""

import os
import sys

try:
    import gemma_stream  # noqa: F401
except ImportError:   # running from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "python"))

from gemma_stream.benchmark.readers import main

if __name__ == "__main__":
    sys.exit(main())
