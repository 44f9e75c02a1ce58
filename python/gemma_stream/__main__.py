"""``python -m gemma_stream``: the same command as ``gemma-stream``."""

import sys

from .cli import main

sys.exit(main())
