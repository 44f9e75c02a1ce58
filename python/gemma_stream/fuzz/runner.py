"""Runs fuzz cases in child processes (memory limit, per-case alarm) and counts the verdicts."""

from __future__ import annotations

import collections
import json
import os
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterator

from .differential import CATEGORIES, short_reason, run_case
from .mutators import FORMATS, make_case

__all__ = ["fuzz"]

# The folder that holds the gemma_stream package, for the children's PYTHONPATH.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child_cases(fmt: str, seed: int, first: int, last: int, backends: tuple[str, ...], case_seconds: int) -> None:
    """Run cases [first, last) and print one JSON line per case (a child of :func:`fuzz`)."""
    import warnings
    warnings.simplefilter("ignore")
    import torch  # noqa: F401 - imported before the first alarm
    import gemma_stream
    if "native" in backends and not gemma_stream.native_available():
        # e.g. the extension being rebuilt while the child started: no case is to blame, retry
        sys.exit(_NO_BACKEND)

    def alarm(signum, frame):
        raise TimeoutError(f"case ran over {case_seconds} s")
    signal.signal(signal.SIGALRM, alarm)
    suffix = ".safetensors" if fmt == "safetensors" else ".pt"
    crash_at = int(os.environ.get("GEMMA_STREAM_FUZZ_SELFTEST_CRASH", "-1"))   # tests/test_fuzz.py only
    with tempfile.TemporaryDirectory(prefix="gs_fuzz_") as tmp:
        path = os.path.join(tmp, f"case{suffix}")
        for index in range(first, last):
            try:
                data, _ = make_case(fmt, seed, index)
            except Exception as e:  # noqa: BLE001 - a bug of the mutator, not of the code under test
                print(json.dumps({"i": index, "v": {"all": ("generator_error", short_reason(e))}}), flush=True)
                continue
            if index == crash_at:
                os.abort()
            signal.alarm(case_seconds)
            try:
                verdicts = run_case(fmt, data, path, backends)
            except TimeoutError as e:
                verdicts = {"all": ("hang", str(e))}
            finally:
                signal.alarm(0)
            print(json.dumps({"i": index, "v": verdicts}), flush=True)


_NO_BACKEND = 75   # a child's exit status: a requested backend did not import


def _limit_memory(nbytes: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (nbytes, nbytes))
    return apply


def _run_children(fmt: str, seed: int, first: int, cases: int, backends: tuple[str, ...], batch: int,
                  case_seconds: int, memory_bytes: int) -> Iterator[tuple[int, dict]]:
    """Yield (index, verdicts) for every case; a child that dies or hangs is blamed on its current case."""
    env = dict(os.environ, OMP_NUM_THREADS="1", GEMMA_STREAM_PREFETCH="off")
    env["PYTHONPATH"] = os.pathsep.join([PACKAGE_PARENT, env.get("PYTHONPATH", "")])
    index, retries = first, 0
    while index < cases:
        last = min(cases, index + batch)
        cmd = [sys.executable, "-m", "gemma_stream.fuzz", "--child", fmt, str(seed), str(index), str(last),
               ",".join(backends), str(case_seconds)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                preexec_fn=_limit_memory(memory_bytes))
        buffer = b""
        deadline = time.monotonic() + 120 + 4 * case_seconds   # start-up, then per case
        while True:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    break
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    record = json.loads(line)
                    index = record["i"] + 1
                    deadline = time.monotonic() + 4 * case_seconds
                    yield record["i"], record["v"]
            elif time.monotonic() > deadline:
                proc.kill()
                break
        proc.wait()
        stderr = proc.stderr.read().decode(errors="replace")[-300:]
        proc.stdout.close()
        proc.stderr.close()
        if proc.returncode == _NO_BACKEND and retries < 5:
            retries += 1
            time.sleep(10)
            continue
        if proc.returncode == _NO_BACKEND:
            raise RuntimeError(f"fuzz: a requested backend does not import: {stderr}")
        if index < last:   # the child stopped inside case `index`
            kind = "hang" if proc.returncode == -signal.SIGKILL else "crash"
            yield index, {"all": (kind, f"exit {proc.returncode}: {stderr.strip()[-160:]}")}
            index += 1


def fuzz(cases: int, formats: tuple[str, ...] = FORMATS, backends: tuple[str, ...] = ("native", "python"),
         seed: int = 0, batch: int = 500, case_seconds: int = 20, memory_bytes: int = 8 << 30,
         jobs: int = 1, progress: Callable[[dict], None] | None = None) -> dict:
    """Run ``cases`` cases per format; returns {format: {category: count, "reasons": ..., "examples": ...}}.

    Counts are per case and backend (a case refused by both backends counts twice);
    ``progress(partial results)`` is called every 1,000 cases.

    >>> fuzz(200, formats=("safetensors",))["safetensors"]["wrong_data"]
    0
    """
    results: dict = {}
    for fmt in formats:
        counts: collections.Counter = collections.Counter()
        reasons: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        examples: dict[str, list[int]] = collections.defaultdict(list)
        start = time.monotonic()

        def summary(done: int) -> dict:
            return {"cases": done, "backends": list(backends), "seed": seed,
                    "seconds": round(time.monotonic() - start, 1), **{c: counts[c] for c in CATEGORIES},
                    "reasons": {c: dict(r.most_common(12)) for c, r in reasons.items()},
                    "examples": dict(examples)}
        shares = [(cases * k // jobs, cases * (k + 1) // jobs) for k in range(jobs)]
        streams = [_run_children(fmt, seed, lo, hi, backends, batch, case_seconds, memory_bytes) for lo, hi in shares]
        done = 0
        for index, verdicts in _interleave(streams):
            done += 1
            for who, (category, why) in verdicts.items():
                weight = len(backends) if who == "all" else 1
                counts[category] += weight
                if why:
                    reasons[category][why] += weight
                if category not in ("both_reject", "both_accept_equal") and len(examples[category]) < 5:
                    examples[category].append(index)
            if progress is not None and done % 1000 == 0:
                progress({**results, fmt: summary(done)})
        results[fmt] = summary(done)
    return results


def _interleave(streams: list[Iterator]) -> Iterator:
    if len(streams) == 1:
        yield from streams[0]
        return
    import threading
    import queue
    out: queue.Queue = queue.Queue(maxsize=1000)
    done = object()

    def pump(stream):
        for item in stream:
            out.put(item)
        out.put(done)
    for stream in streams:
        threading.Thread(target=pump, args=(stream,), daemon=True).start()
    finished = 0
    while finished < len(streams):
        item = out.get()
        if item is done:
            finished += 1
        else:
            yield item

