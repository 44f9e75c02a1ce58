"""Parent side of the benchmark: checkpoints on disk, page cache state, one subprocess per load.

A ``Workload`` says what is loaded (a synthetic Gemma shape, or a user's checkpoint) and which file
sets exist for it; ``run_loaders`` runs each loader ``repeat`` times, each time in a fresh
interpreter, after evicting the files (cold) or making sure they are cached (warm). The workloads
live in ``workloads``, the machine probes in ``probes``; their names stay importable from here.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field

from ..cli_text import human_bytes
from . import writers
from .child import LOADERS, RESULT_PREFIX
# the probes and workloads stay importable from here, as before the split
from .probes import (children_cpu_seconds, cpu_busy, cpu_times, mem_available, meminfo_bytes,  # noqa: F401
                     wait_for_idle)
from .workloads import Workload, folder_of, log_progress, quantized_bytes, synthetic_workload, user_workload

__all__ = ["CHILD_BOOT", "Workload", "Row", "child_command", "cpu_busy", "cpu_times", "ensure_bytecode",
           "mem_available", "package_root", "run_child", "run_loaders", "synthetic_workload", "user_workload",
           "wait_for_idle"]

# a shared machine: a run during which the rest of the machine used this much CPU does not count when
# quieter runs exist (the median is taken over the quiet ones)
CLEAN_OTHERS_CPU = 0.10


# ---------------------------------------------------------------- one row of the table

@dataclass
class Row:
    loader: str
    label: str
    kind: str
    status: str = "ok"            # ok | n/a | skipped | error
    message: str = ""
    runs: list[dict] = field(default_factory=list)
    reads: str = ""
    errors: list[str] = field(default_factory=list)

    @property
    def clean_runs(self) -> list[dict]:
        """Runs during which other processes used under 10% of the CPUs (all runs when none was quiet)."""
        quiet = [r for r in self.runs if r.get("others_cpu", 0.0) < CLEAN_OTHERS_CPU]
        return quiet or self.runs

    @property
    def seconds(self) -> float | None:
        values = [r["seconds"] for r in self.clean_runs]
        return statistics.median(values) if values else None

    @property
    def min_seconds(self) -> float | None:
        values = [r["seconds"] for r in self.runs]
        return min(values) if values else None

    @property
    def peak_bytes(self) -> int | None:
        values = [r["peak_bytes"] for r in self.runs]
        return max(values) if values else None

    @property
    def model_bytes(self) -> int | None:
        return self.runs[-1]["model_bytes"] if self.runs else None

    def last(self, key: str):
        return self.runs[-1].get(key) if self.runs else None

    @property
    def resident(self) -> str:
        if not self.runs:
            return ""
        anon, filed, model = self.last("anon_bytes"), self.last("file_bytes"), self.model_bytes or 1
        if anon >= 0.9 * model and filed < 0.1 * model:
            return "anon"
        if filed >= 0.9 * model and anon < 0.1 * model:
            return "file"
        return f"a{max(anon, 0) / model:.2f} f{max(filed, 0) / model:.2f}"

    def as_dict(self, data_bytes: int) -> dict:
        seconds = self.seconds
        out = {"loader": self.loader, "label": self.label, "kind": self.kind, "status": self.status,
               "message": self.message, "reads": self.reads, "seconds": seconds,
               "seconds_all": [r["seconds"] for r in self.runs], "min_seconds": self.min_seconds,
               "quiet_runs": len([r for r in self.runs if r.get("others_cpu", 0.0) < CLEAN_OTHERS_CPU]),
               "peak_bytes": self.peak_bytes,
               "model_bytes": self.model_bytes, "resident": self.resident,
               "gb_per_s": data_bytes / seconds / 1e9 if seconds else None,
               "peak_over_model": self.peak_bytes / self.model_bytes if self.runs and self.model_bytes else None,
               "runs": self.runs, "errors": self.errors}
        for key in ("anon_bytes", "file_bytes", "check", "sqnr_db", "backend", "hwm_reset", "executor_seconds"):
            out[key] = self.last(key)
        return out


# ---------------------------------------------------------------- running children

def package_root() -> str:
    """The folder holding the gemma_stream this process imported (what a child puts first on its path)."""
    import gemma_stream

    return os.path.dirname(os.path.dirname(os.path.abspath(gemma_stream.__file__)))


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = package_root() + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


#: The start of every child: gemma_stream from ``root`` (argv[1]) and nowhere else.  An editable
#: install puts a finder ahead of ``sys.path`` (scikit-build-core's redirects every
#: ``gemma_stream`` import to the source tree), so a build on PYTHONPATH alone is silently not the
#: build that runs: A/B runs of two builds then measure one build twice (NOTES.md 38).  Finders
#: that place ``gemma_stream`` outside ``root`` are dropped, and a child that still imports it from
#: elsewhere fails instead of measuring the wrong code.
CHILD_BOOT = """
import os, sys
root = os.path.abspath(sys.argv.pop(1))
sys.path.insert(0, root)   # first, so that the path finder finds root's package and is kept
for finder in list(sys.meta_path):
    try:
        spec = finder.find_spec("gemma_stream", None)
    except Exception:
        continue
    origin = getattr(spec, "origin", None)
    if origin and not os.path.abspath(origin).startswith(root + os.sep):
        sys.meta_path.remove(finder)
import gemma_stream
if not os.path.abspath(gemma_stream.__file__).startswith(root + os.sep):
    sys.exit(f"gemma_stream.benchmark: the child imported gemma_stream from {gemma_stream.__file__}, not {root}")
"""


def child_command(root: str, code: str, *args: str) -> list[str]:
    """``python -c`` running ``code`` (with ``args`` as ``sys.argv[1:]``) after ``CHILD_BOOT`` has made
    sure that ``gemma_stream`` comes from ``root`` (a folder holding the package), whose modules are
    first compiled to bytecode (``ensure_bytecode``)."""
    ensure_bytecode(root)
    return [sys.executable, "-c", CHILD_BOOT + code, root, *args]


@functools.cache
def ensure_bytecode(root: str) -> bool:
    """Compile ``root``'s gemma_stream to ``__pycache__`` once per run, as installing a wheel does.

    A load imports some modules on first use (the zip reader, the native executor); without their
    bytecode each fresh process compiles them inside its timed load: 20-40 ms of a 300 ms warm
    1 GiB load where ``PYTHONDONTWRITEBYTECODE`` is set or the tree is a fresh checkout (NOTES.md
    38), which a user's installed wheel never pays.  False where the tree cannot be written."""
    import compileall

    return bool(compileall.compile_dir(os.path.join(root, "gemma_stream"), quiet=2))


_CHILD_MAIN = "from gemma_stream.benchmark.child import child_main\nsys.exit(child_main(sys.argv[1]))\n"


def run_child(spec: dict, timeout: float, pythonpath: str | None = None) -> dict:
    """One load in a fresh interpreter (``spec`` as ``child`` reads it); its result, plus ``others_cpu``.

    ``pythonpath``: import gemma_stream from there instead (another build: before/after); the child
    fails rather than import it from anywhere else (``CHILD_BOOT``).
    """
    env = _child_env()
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = child_command(os.path.abspath(pythonpath or package_root()), _CHILD_MAIN, json.dumps(spec))
    ours0, (busy0, total0) = children_cpu_seconds(), cpu_times()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    ours1, (busy1, total1) = children_cpu_seconds(), cpu_times()
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
            # CPU time the rest of the machine used while the child ran (ours excluded): interference
            result["others_cpu"] = max(0.0, (busy1 - busy0 - (ours1 - ours0)) / max(total1 - total0, 1e-9))
            return result
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    reason = lines[-1] if lines else f"exit status {proc.returncode}, no output"
    if proc.returncode < 0:
        reason = f"killed by signal {-proc.returncode} ({reason})"
    raise RuntimeError(reason)


def availability(loader_id: str, workload: Workload, quantize: str | None) -> str | None:
    """Why a loader cannot run here (None when it can): said in the table, never skipped silently."""
    import importlib.util
    import inspect

    import gemma_stream as gs

    loader = LOADERS[loader_id]
    if workload.reads(loader_id) is None:
        return f"cannot read a {workload.fmt} checkpoint" + (" with these names" if loader.reads == "hf" else "")
    if quantize and not loader.quantizes and loader.kind == "loader" and loader_id != "gs_plain":
        return "does not quantize"
    if not quantize and loader_id.startswith("twostep"):
        return "needs --quantize"
    if quantize and not hasattr(gs, "quantize_"):
        if loader.quantizes and loader_id.startswith("gs"):
            return "gemma_stream.quantize_ is not available in this checkout"
    needs = {"safetensors": "safetensors", "twostep_torch": "safetensors", "twostep_torchao": "torchao",
             "transformers": "transformers", "gs_hf": "transformers", "gs_hf_mmap": "transformers"}.get(loader_id)
    if needs and importlib.util.find_spec(needs) is None:
        return f"{needs} is not installed"
    if loader_id == "twostep_torchao" and quantize == "int4" and importlib.util.find_spec("mslk") is None:
        return "torchao's int4 weight-only needs the mslk package (not installed)"
    if loader_id.startswith("gs_hf") and importlib.util.find_spec("gemma_stream.hf") is None:
        return "gemma_stream.hf is not available in this checkout"
    if loader_id.startswith("gs_mmap") and "mode" not in inspect.signature(gs.load_into).parameters:
        return "load_into has no mode= in this checkout"
    if loader_id == "gs_native" and not gs.native_available():
        return "gemma_stream._native is not built"
    if loader_id == "torch_load_mmap_assign" and workload.model_dtype and workload.stored_dtype != workload.model_dtype:
        return "assign=True keeps the checkpoint's dtype: no conversion"
    return None


def run_loaders(workload: Workload, loader_ids: list[str], *, cold: bool, repeat: int = 1,
                quantize: str | None = None, group_size: int = 128, threads: int | None = None,
                timeout: float = 1800.0, wait_idle: float = 0.0) -> list[Row]:
    """Run each loader ``repeat`` times (round-robin), each load in a fresh process.

    ``wait_idle``: before each load, wait up to that many seconds for other work on the machine to stop.
    """
    rows = []
    for loader_id in loader_ids:
        loader = LOADERS[loader_id]
        row = Row(loader_id, loader.label, loader.kind)
        reason = availability(loader_id, workload, quantize)
        if reason:
            row.status, row.message = "n/a", reason
        else:
            row.reads = workload.reads(loader_id)
        rows.append(row)
    for row in rows:   # write every file set first, so that writing never overlaps a measurement
        if row.status == "ok":
            workload.ensure(row.reads)
    quant_bytes = quantized_bytes(workload, quantize, group_size)
    # With repeats, round 0 is a discarded warm-up of the first loader: the first process to
    # allocate gigabytes after files were written (or after a cold series) pays extra for it in
    # a VM (measured: 4-7 s instead of 1 s for a warm 2b load), whichever loader it is.
    first_ok = next((r for r in rows if r.status == "ok"), None)
    for round_index in range(0 if repeat <= 1 else -1, repeat):
        warm_up_round = round_index < 0
        # Each round starts one loader further on, so that no loader always follows the same one
        # (a load runs faster or slower depending on what the previous process left behind).
        shift = max(round_index, 0) % len(rows)
        for row in rows[shift:] + rows[:shift]:
            if row.status != "ok":
                continue
            if warm_up_round and row is not first_ok:
                continue
            loader = LOADERS[row.loader]
            out_bytes = quant_bytes if (quantize and loader.quantizes) else workload.model_bytes
            if loader.doubles_memory:
                need = workload.data_bytes + 1.1 * workload.model_bytes + (1 << 30)   # state dict + model
                if need > mem_available():
                    row.status = "skipped"
                    row.message = (f"needs about {need / 2**30:.1f} GiB (two copies), "
                                   f"MemAvailable {mem_available() / 2**30:.1f} GiB")
                    continue
            files = workload.file_sets[row.reads]
            spec = {"loader": row.loader, "model": workload.model, "model_dtype": workload.model_dtype,
                    "files": {"primary": files["path"], "data": files["data"], "ckpt": files["path"],
                              "safetensors": files["data"], "hf": folder_of(files["path"])},
                    "quantize": quantize, "group_size": group_size, "threads": threads, "key": workload.key,
                    "check_names": workload.check_names,
                    "sqnr_names": [n for n in workload.check_names if "norm" not in n]}
            if cold:
                writers.evict(workload.all_files())
            else:
                # only the files this load reads stay cached: the other copies of the checkpoint
                # (.ckpt, HF directory) would leave the load less free memory than a server has
                writers.evict([f for f in workload.all_files() if f not in files["data"]])
                if writers.cached_fraction(files["data"]) < 0.99:
                    writers.warm_up(files["data"])
            cached = writers.cached_fraction(files["data"])
            busy = wait_for_idle(wait_idle) if wait_idle > 0 else cpu_busy(0.2)
            log_progress(f"[{'warm-up, discarded' if warm_up_round else f'{round_index + 1}/{repeat}'}] {row.loader} "
                 f"({'cold' if cold else 'warm'}, {cached:.0%} cached, cpu {busy:.0%} busy before) ...")
            try:
                result = run_child(spec, timeout)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                row.errors.append(str(exc)[-300:])
                log_progress(f"    error: {row.errors[-1]}")
                continue
            if warm_up_round:
                log_progress(f"    {result['seconds']:.2f} s (not counted)")
                continue
            result["cached_before"] = cached
            result["cpu_busy_before"] = busy
            result["mem_free_before"] = meminfo_bytes("MemFree")
            result["expected_model_bytes"] = out_bytes
            row.runs.append(result)
            log_progress(f"    {result['seconds']:.2f} s, peak {human_bytes(result['peak_bytes'])}, "
                 f"other work {result['others_cpu']:.0%} of the CPUs meanwhile")
    for row in rows:
        if row.status == "ok" and row.errors:
            if not row.runs:
                row.status, row.message = "error", row.errors[-1]
            else:
                row.message = f"{len(row.errors)} of {len(row.errors) + len(row.runs)} runs failed: {row.errors[-1]}"
    return rows

