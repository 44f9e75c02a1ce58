"""``python -m gemma_stream.fuzz``: the fuzzer's command line (also how :func:`fuzz` starts its children)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
