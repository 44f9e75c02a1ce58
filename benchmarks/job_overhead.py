#!/usr/bin/env python
"""Per-job CPU cost of a warm load: 8,000 tensors of 4-128 KiB against 8 tensors of the same bytes.
The harness lives in ``gemma_stream.benchmark.job_overhead``.

    python benchmarks/job_overhead.py --tensors 8000 --max-kib 128 --rounds 5
"""

import os
import sys

try:
    import gemma_stream  # noqa: F401
except ImportError:   # running from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "python"))

from gemma_stream.benchmark.job_overhead import main

if __name__ == "__main__":
    sys.exit(main())
