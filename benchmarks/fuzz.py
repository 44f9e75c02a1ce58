"""Differential fuzzer front end: ``python benchmarks/fuzz.py --cases N`` (see gemma_stream.fuzz).

    python benchmarks/fuzz.py --cases 1000 --jobs 2          # the .ci/run smoke run
    python benchmarks/fuzz.py --cases 100000 --formats pickle --json pickle.json
    python benchmarks/fuzz.py --bombs                       # pickle bombs: memory and MB/s
"""

import os
import sys

try:  # the installed package (with its compiled engine) first, as .ci/run has it
    import gemma_stream  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "python"))

from gemma_stream.fuzz import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
