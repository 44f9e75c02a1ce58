"""Warm ``gs.load_state_dict`` time of two builds of gemma_stream on the same files (NOTES.md 31).

Each build is a folder to put on PYTHONPATH (e.g. ``pip install --no-deps --target /tmp/site_a .``);
each measurement is a fresh process taking the best of 5 warm loads; rounds alternate the builds'
order; medians and spreads::

    python benchmarks/ab_builds.py /tmp/site_main /tmp/site_new FILE [FILE ...]   # ROUNDS=6
"""
import os
import statistics
import subprocess
import sys

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
    results: dict[tuple[str, str], list[float]] = {}
    for r in range(int(os.environ.get("ROUNDS", "6"))):
        for site in builds if r % 2 == 0 else builds[::-1]:
            for path in files:
                env = dict(os.environ, PYTHONPATH=site)
                out = subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True, text=True, env=env)
                if out.returncode:
                    print(out.stderr)
                    return 1
                results.setdefault((path, site), []).append(float(out.stdout.split()[-1]))
    for (path, site), values in sorted(results.items()):
        print(f"{path} {site}: median {1000 * statistics.median(values):.1f} ms "
              f"({1000 * min(values):.1f}-{1000 * max(values):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
