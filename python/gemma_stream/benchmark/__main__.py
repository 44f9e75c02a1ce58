"""``python -m gemma_stream.benchmark [bench arguments]``; ``--child SPEC`` runs one load (internal)."""

import argparse
import sys

if len(sys.argv) > 2 and sys.argv[1] == "--child":
    from .child import child_main
    sys.exit(child_main(sys.argv[2]))

from .cli import add_bench_arguments, run_bench  # noqa: E402

sys.exit(run_bench(add_bench_arguments(argparse.ArgumentParser(prog="python -m gemma_stream.benchmark")).parse_args()))
