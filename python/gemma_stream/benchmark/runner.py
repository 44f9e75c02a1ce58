"""Parent side of the benchmark: checkpoints on disk, page cache state, one subprocess per load.

A ``Workload`` says what is loaded (a synthetic Gemma shape, or a user's checkpoint) and which file
sets exist for it; ``run_loaders`` runs each loader ``repeat`` times, each time in a fresh
interpreter, after evicting the files (cold) or making sure they are cached (warm).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

from ..cli_text import human_bytes, human_count
from ..config import meminfo
from . import writers
from .child import LOADERS, RESULT_PREFIX
from .shapes import GemmaShape, tensor_specs

__all__ = ["Workload", "Row", "cpu_busy", "cpu_times", "mem_available", "run_child", "run_loaders",
           "synthetic_workload", "user_workload", "wait_for_idle"]

_FORMATS = ("safetensors", "sharded", "ckpt", "hf")
# a shared machine: a run during which the rest of the machine used this much CPU does not count when
# quieter runs exist (the median is taken over the quiet ones)
CLEAN_OTHERS_CPU = 0.10
_HF_SAMPLE = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
              "model.layers.0.mlp.down_proj.weight", "model.norm.weight"]
_GP_SAMPLE = ["embedder.weight", "model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.down_proj.weight",
              "model.norm.weight"]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


try:
    import resource
except ImportError:  # Windows
    resource = None


# ---------------------------------------------------------------- the machine: /proc/stat and rusage
# The parent's only readers of /proc/stat and resource (the child has its own for /proc/self).

def cpu_times() -> tuple[float, float]:
    """(busy, total) CPU seconds of all CPUs since boot: /proc/stat, else psutil (macOS, Windows)."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except FileNotFoundError:
        import psutil
        times = psutil.cpu_times()
        total = sum(times)
        return total - times.idle - getattr(times, "iowait", 0.0), total
    ticks = os.sysconf("SC_CLK_TCK")
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values) - idle) / ticks, sum(values) / ticks


def children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's finished children; 0 where there is no getrusage
    (Windows: the others_cpu figure then includes the child's own time)."""
    if resource is None:
        return 0.0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_busy(seconds: float = 0.5) -> float:
    """Fraction of all CPUs busy over ``seconds``: other work skews timings."""
    busy0, total0 = cpu_times()
    time.sleep(seconds)
    busy1, total1 = cpu_times()
    # psutil's times are float sums: an idle interval can come out a rounding error below zero
    return min(1.0, max(0.0, (busy1 - busy0) / max(total1 - total0, 1e-9)))


def wait_for_idle(limit_seconds: float, busy_max: float = 0.15) -> float:
    """Wait (up to ``limit_seconds``) until the machine is quiet; returns the last busy fraction."""
    deadline = time.monotonic() + limit_seconds
    busy = cpu_busy()
    while busy > busy_max and time.monotonic() < deadline:
        time.sleep(2.0)
        busy = cpu_busy()
    return busy


def _meminfo(field: str) -> int:
    return meminfo(field) or 0


def mem_available() -> int:
    return _meminfo("MemAvailable")


# ---------------------------------------------------------------- what is loaded

@dataclass
class Workload:
    """The checkpoint(s) of one benchmark and the model they fill."""

    title: str
    fmt: str                       # format of the primary file set
    model: dict                    # the child's model description
    model_dtype: str | None        # torch dtype name of the destination, None = as stored
    stored_dtype: str | None       # torch dtype name in the file (None: mixed)
    data_bytes: int                # tensor bytes in the checkpoint (what a loader reads)
    model_bytes: int               # bytes of the destination model (before quantization)
    file_sets: dict[str, dict] = field(default_factory=dict)   # kind -> {"path", "data", "ready"}
    check_names: list[str] = field(default_factory=list)
    key: str | None = None
    directory: str | None = None
    _make: dict = field(default_factory=dict)                  # kind -> writer callback

    def reads(self, loader_id: str) -> str | None:
        """The file set a loader reads here, or None when it cannot read this workload."""
        want = LOADERS[loader_id].reads
        if want == "primary":
            return "primary"
        if want == "ckpt":
            return "primary" if self.fmt == "ckpt" else ("ckpt" if "ckpt" in self._make else None)
        if want == "safetensors":
            if self.fmt in ("safetensors", "sharded", "hf"):
                return "primary"
            return "safetensors" if "safetensors" in self._make else None
        if want == "hf":   # a Hugging Face directory: config.json next to safetensors with HF names
            return "primary" if self.fmt != "ckpt" and self.model.get("naming") == "hf" else None
        return None

    def ensure(self, kind: str) -> dict:
        entry = self.file_sets.get(kind)
        if entry is None or not entry.get("ready"):
            entry = self._make[kind]()
            self.file_sets[kind] = entry
        return entry

    def all_files(self) -> list[str]:
        return [f for e in self.file_sets.values() if e.get("ready") for f in e["data"]]


def _itemsize(dtype: str) -> int:
    return torch.empty((), dtype=writers.DTYPES[dtype]).element_size()


def synthetic_workload(shape: GemmaShape, dtype: str, fmt: str, workdir: str, model_dtype: str | None = None,
                       naming: str | None = None, durable: bool = True) -> Workload:
    """A Gemma-shaped checkpoint under ``workdir`` (written on first use, reused when complete).

    ``durable=False`` skips the fsync: quicker, but the pages cannot be evicted for cold runs.
    """
    if fmt not in _FORMATS:
        raise ValueError(f"format must be one of {_FORMATS}, not {fmt!r}")
    naming = naming or ("gemma_pytorch" if fmt == "ckpt" else "hf")
    if fmt == "hf" and naming != "hf":
        raise ValueError("an HF directory holds Hugging Face names")
    torch_dtype = writers.DTYPES[dtype]
    folder = os.path.join(workdir, f"{shape.name}-{dtype}-{naming}")
    os.makedirs(folder, exist_ok=True)
    manifest_path = os.path.join(folder, "manifest.json")
    shape_key = shape.as_dict()

    def manifest() -> dict:
        try:
            with open(manifest_path) as f:
                found = json.load(f)
            return found if found.get("shape") == shape_key else {"shape": shape_key}
        except (OSError, ValueError):
            return {"shape": shape_key}

    def record(kind: str, entry: dict) -> dict:
        found = manifest()
        found[kind] = entry
        with open(manifest_path, "w") as f:
            json.dump(found, f, indent=2)
        return entry

    def make(kind: str):
        def write() -> dict:
            cached = manifest().get(kind)
            if cached and all(os.path.exists(p) for p in cached["data"]):
                return dict(cached, ready=True)
            started = time.perf_counter()
            if kind == "ckpt":
                path = os.path.join(folder, "model.ckpt")
                _log(f"writing {path} ...")
                writers.write_ckpt(path, shape, torch_dtype, naming, durable=durable)
                data = [path]
            elif kind == "safetensors":
                sub = os.path.join(folder, "single")
                os.makedirs(sub, exist_ok=True)
                path = os.path.join(sub, "model.safetensors")
                _log(f"writing {path} ...")
                writers.write_safetensors(path, shape, torch_dtype, naming, durable=durable)
                if naming == "hf":
                    writers.write_config(sub, shape, torch_dtype)
                data = [path]
            else:   # sharded / hf: the layout save_pretrained writes
                path = os.path.join(folder, "sharded")
                os.makedirs(path, exist_ok=True)
                _log(f"writing {path}/ ...")
                data = writers.write_sharded(path, shape, torch_dtype, naming, durable=durable)
                if naming == "hf":
                    writers.write_config(path, shape, torch_dtype)
            _log(f"  {human_bytes(sum(os.path.getsize(p) for p in data))} in {time.perf_counter() - started:.0f} s")
            return record(kind, {"path": path, "data": data, "ready": True})
        return write

    primary_kind = {"safetensors": "safetensors", "sharded": "sharded", "hf": "sharded", "ckpt": "ckpt"}[fmt]
    makers = {"primary": make(primary_kind), "ckpt": make("ckpt"), "safetensors": make("safetensors")}
    if primary_kind == "sharded":
        makers["sharded"] = makers["primary"]
    itemsize = _itemsize(dtype)
    out_itemsize = _itemsize(model_dtype) if model_dtype else itemsize
    title = (f"Gemma-{shape.name} shape ({human_count(shape.params())} params), {dtype} {fmt}"
             + (f" -> {model_dtype} model" if model_dtype and model_dtype != dtype else ""))
    return Workload(
        title=title, fmt=fmt,
        model={"kind": "gemma", "shape": shape_key, "naming": naming},
        model_dtype=str(writers.DTYPES[model_dtype or dtype]).replace("torch.", ""),
        stored_dtype=str(torch_dtype).replace("torch.", ""),
        data_bytes=shape.params() * itemsize, model_bytes=shape.params() * out_itemsize,
        check_names=_HF_SAMPLE if naming == "hf" else _GP_SAMPLE, directory=folder, _make=makers,
    )


def user_workload(path: str, key: str | None = None, model_dtype: str | None = None) -> Workload:
    """A checkpoint the user already has; the model is rebuilt from its tensor list."""
    import gemma_stream as gs

    infos = gs.inspect(path, key=key)
    data = sorted({i.file for i in infos})
    first = data[0]
    fmt = "ckpt" if not first.endswith(".safetensors") else ("sharded" if len(data) > 1 else "safetensors")
    out_dtype = writers.DTYPES[model_dtype] if model_dtype else None
    tensors = [(i.name, list(i.shape), str(i.dtype).replace("torch.", "")) for i in infos]
    model_bytes = sum(math.prod(i.shape) * (torch.empty((), dtype=out_dtype).element_size()
                                            if out_dtype is not None and i.dtype.is_floating_point
                                            else i.dtype.itemsize) for i in infos)
    floats = [i.name for i in infos if i.dtype.is_floating_point and len(i.shape) >= 1]
    hf_ready = fmt != "ckpt" and os.path.exists(os.path.join(_folder(str(path)), "config.json"))
    workload = Workload(
        title=f"{path} ({len(infos)} tensors, {sum(i.nbytes for i in infos) / 2**30:.2f} GiB, {fmt})", fmt=fmt,
        model={"kind": "records", "tensors": tensors, "naming": "hf" if hf_ready else "user"},
        model_dtype=str(out_dtype).replace("torch.", "") if out_dtype is not None else None,
        stored_dtype=None,
        data_bytes=sum(i.nbytes for i in infos), model_bytes=model_bytes, check_names=floats[:3], key=key,
    )
    workload.file_sets["primary"] = {"path": str(path), "data": data, "ready": True}
    return workload


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

def _child_env() -> dict:
    import gemma_stream
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(gemma_stream.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_child(spec: dict, timeout: float, pythonpath: str | None = None) -> dict:
    """One load in a fresh interpreter (``spec`` as ``child`` reads it); its result, plus ``others_cpu``.

    ``pythonpath``: import gemma_stream from there instead (another build: before/after).
    """
    cmd = [sys.executable, "-m", "gemma_stream.benchmark", "--child", json.dumps(spec)]
    env = _child_env()
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
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
    quant_bytes = _quantized_bytes(workload, quantize, group_size)
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
                              "safetensors": files["data"], "hf": _folder(files["path"])},
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
            _log(f"[{'warm-up, discarded' if warm_up_round else f'{round_index + 1}/{repeat}'}] {row.loader} "
                 f"({'cold' if cold else 'warm'}, {cached:.0%} cached, cpu {busy:.0%} busy before) ...")
            try:
                result = run_child(spec, timeout)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                row.errors.append(str(exc)[-300:])
                _log(f"    error: {row.errors[-1]}")
                continue
            if warm_up_round:
                _log(f"    {result['seconds']:.2f} s (not counted)")
                continue
            result["cached_before"] = cached
            result["cpu_busy_before"] = busy
            result["mem_free_before"] = _meminfo("MemFree")
            result["expected_model_bytes"] = out_bytes
            row.runs.append(result)
            _log(f"    {result['seconds']:.2f} s, peak {human_bytes(result['peak_bytes'])}, "
                 f"other work {result['others_cpu']:.0%} of the CPUs meanwhile")
    for row in rows:
        if row.status == "ok" and row.errors:
            if not row.runs:
                row.status, row.message = "error", row.errors[-1]
            else:
                row.message = f"{len(row.errors)} of {len(row.errors) + len(row.runs)} runs failed: {row.errors[-1]}"
    return rows


def _folder(path: str) -> str:
    return path if os.path.isdir(path) else os.path.dirname(path)


def _quantized_bytes(workload: Workload, quantize: str | None, group_size: int) -> int | None:
    """Bytes of the model after quantize_ (every Linear/Embedding weight), for the shape we know."""
    if not quantize or workload.model.get("kind") != "gemma":
        return None
    shape = GemmaShape(**workload.model["shape"])
    itemsize = workload.model_bytes // max(shape.params(), 1)
    total = 0
    for _, dims in tensor_specs(shape, workload.model["naming"]):
        if len(dims) != 2:
            total += math.prod(dims) * itemsize
        elif quantize == "int8":
            total += dims[0] * dims[1] + dims[0] * 4
        else:
            total += dims[0] * dims[1] // 2 + 2 * dims[0] * (dims[1] // group_size) * 2
    return total
