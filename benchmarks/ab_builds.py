"""``gs.load_state_dict`` time of two builds of gemma_stream on the same files (NOTES.md 31, 33).

Each build is a folder to put on PYTHONPATH (e.g. ``pip install --no-deps --target /tmp/site_a .``);
each measurement is a fresh process taking the best of 5 warm loads, or with ``COLD=1`` one load
after evicting the file (or the directory's files) from the page cache, or with ``IDLE=S`` one
load after S seconds of sleep (the file stays in the page cache, but on this VM the host takes
back the memory of pages left alone for seconds, NOTES.md 35); rounds alternate the builds'
order; medians and spreads, and the ratio of the two builds within each round.  Each child is
checked to import its own build (``runner.CHILD_BOOT``: with an editable install in the
interpreter, PYTHONPATH alone ran the editable tree for both builds, NOTES.md 38)::

    python benchmarks/ab_builds.py /tmp/site_main /tmp/site_new FILE [FILE ...]   # ROUNDS=6 COLD=0 IDLE=0
"""
import os
import statistics
import subprocess
import sys
import time

try:   # the parent only evicts files: gemma_stream from this checkout if none is installed
    import gemma_stream  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "python"))
from gemma_stream.benchmark.runner import child_command  # noqa: E402

COLD_CHILD = """
import sys, time
import gemma_stream as gs
start = time.perf_counter(); sd = gs.load_state_dict(sys.argv[1]); print(time.perf_counter() - start)
"""
CHILD = """
import sys, time
import gemma_stream as gs
path = sys.argv[1]
gs.load_state_dict(path)
best = float("inf")
for _ in range(5):
    start = time.perf_counter(); sd = gs.load_state_dict(path); best = min(best, time.perf_counter() - start); del sd
print(best)
"""


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__)
        return 2
    builds, files = argv[:2], argv[2:]
    cold = os.environ.get("COLD", "0") == "1"
    idle = float(os.environ.get("IDLE", "0"))
    results: dict[tuple[str, str], list[float]] = {}
    for r in range(int(os.environ.get("ROUNDS", "6"))):
        for site in builds if r % 2 == 0 else builds[::-1]:
            for path in files:
                env = dict(os.environ, PYTHONPATH=site)
                if cold:
                    _evict(path)
                elif idle:
                    time.sleep(idle)
                # each child imports its build and no other (an editable install would redirect it)
                out = subprocess.run(child_command(os.path.abspath(site), COLD_CHILD if cold or idle else CHILD, path),
                                     capture_output=True, text=True, env=env)
                if out.returncode:
                    print(out.stderr)
                    return 1
                results.setdefault((path, site), []).append(float(out.stdout.split()[-1]))
    for (path, site), values in sorted(results.items()):
        print(f"{path} {site}: median {1000 * statistics.median(values):.1f} ms "
              f"({1000 * min(values):.1f}-{1000 * max(values):.1f})")
    for path in files:
        ratios = [a / b for a, b in zip(results[path, builds[0]], results[path, builds[1]])]
        print(f"{path}: {builds[0]} / {builds[1]} within rounds {statistics.median(ratios):.2f} "
              f"({min(ratios):.2f}-{max(ratios):.2f})  (above 1: the second build is faster)")
    return 0


def _evict(path: str) -> None:
    """Drop the file, or every file of the directory, from the page cache."""
    from gemma_stream.benchmark.writers import evict

    evict([os.path.join(path, name) for name in os.listdir(path)] if os.path.isdir(path) else [path])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
