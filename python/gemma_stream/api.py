"""Public entry points: load_into, load_state_dict, inspect.

Each one is the same pipeline: format reader -> plan -> executor.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Union

import torch

from .config import config, mem_available
from .errors import GemmaStreamError, UsageError
from .executors import get_executor, run_plan_jobs
from .executors.mapped import FileViews, Prefetch
from .formats import Checkpoint, open_checkpoint
from .plan import CACHE_POLICIES, Plan, QuantTarget, Rename, choose_cache, make_plan, zero_copy_jobs

__all__ = ["LoadReport", "TensorInfo", "load_into", "load_state_dict", "inspect"]

Progress = Union[None, bool, Callable[[int, int], Union[bool, None]]]
_AUTO_PROGRESS_BYTES = 1 << 30
logger = logging.getLogger("gemma_stream")


@dataclass
class LoadReport:
    """What ``load_into`` did."""

    loaded: list[str] = field(default_factory=list)
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched_keys: list[str] = field(default_factory=list)
    skipped_keys: list[str] = field(default_factory=list)
    #: tensors allocated from ``meta`` that the checkpoint did not fill (their memory is uninitialized)
    uninitialized: list[str] = field(default_factory=list)
    #: ``mode="mmap"``: tensors that are now copy-on-write views of the file (the rest were copied)
    mapped: list[str] = field(default_factory=list)
    bytes_read: int = 0
    seconds: float = 0.0
    backend: str = ""
    files: list[str] = field(default_factory=list)
    #: the page-cache policy the copy ran with ("keep" or "drop"; ``cache="auto"`` resolved)
    cache: str = ""
    #: ``mode="mmap"``: the background read-ahead of the mapped ranges (``.wait()``, ``.done``), or None
    prefetch: Prefetch | None = field(default=None, repr=False)

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint as ``inspect`` lists it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    file: str
    offset: int
    strides: tuple[int, ...] | None = None
    storage: str | None = None


def inspect(path: str | os.PathLike, *, key: str | None = None) -> list[TensorInfo]:
    """List the tensors of a checkpoint without reading their data.

    >>> for t in gs.inspect("model.safetensors"):
    ...     print(t.name, t.dtype, t.shape)
    """
    ckpt = open_checkpoint(path, key=key)
    return [TensorInfo(r.name, r.dtype.torch, r.shape, r.nbytes, r.file, r.byte_offset,
                       None if r.is_contiguous else r.strides, r.storage) for r in ckpt.records]


# ---------------------------------------------------------------- helpers

def _progress_callback(progress: Progress, total: int, desc: str):
    """Return (callback(bytes_done) -> bool, close()) for the executor."""
    if progress is None:
        progress = sys.stderr.isatty() and total > _AUTO_PROGRESS_BYTES
    if progress is False:
        return None, lambda: None
    if progress is True:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False)

        def update(done: int) -> bool:
            bar.update(done - bar.n)
            return True
        return update, bar.close
    if not callable(progress):
        raise UsageError("progress must be None, a bool or a callable(bytes_done, bytes_total)")
    return (lambda done: progress(done, total) is not False), lambda: None


def _execute(plan: Plan, *, threads: int | None, backend: str, progress: Progress, cache: str,
             desc: str) -> tuple[int, float, str, str]:
    """Run the plan's jobs; returns (bytes read, seconds, executor name, cache policy used)."""
    cache = choose_cache(plan, cache, mem_available() if cache == "auto" else None)
    cfg = config()
    executor = get_executor(backend)
    callback, close = _progress_callback(progress, plan.nbytes, desc)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            read = run_plan_jobs(executor, plan.files, plan.jobs, threads=threads or cfg.default_threads,
                                 chunk_bytes=cfg.chunk_bytes, drop_cache=cache == "drop", progress=callback)
    finally:
        close()
    return read, time.perf_counter() - start, executor.name, cache


def _materialize(model: torch.nn.Module, device: torch.device) -> list[tuple[str, torch.Tensor]]:
    """Allocate every meta parameter and buffer on ``device``, keeping ties and Parameter classes."""
    replaced: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(old) -> (old, new)
    names = []
    for prefix, module in model.named_modules(remove_duplicate=False):
        for slot in (module._parameters, module._buffers):
            for attr, old in list(slot.items()):
                if old is None or not old.is_meta:
                    continue
                if id(old) not in replaced:
                    replaced[id(old)] = (old, _same_kind(old, torch.empty(old.shape, dtype=old.dtype, device=device)))
                slot[attr] = replaced[id(old)][1]
                names.append((f"{prefix}.{attr}" if prefix else attr, slot[attr]))
    return names


def _same_kind(old: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """``data`` as the same kind of tensor as ``old``: its Parameter class and ``requires_grad``."""
    if not isinstance(old, torch.nn.Parameter):
        return data
    try:
        return type(old)(data, requires_grad=old.requires_grad)
    except TypeError:
        return torch.nn.Parameter(data, requires_grad=old.requires_grad)


def _check_mode(mode: str, cache: str) -> str:
    """Validate ``mode`` and ``cache``; returns the cache policy for the copying part."""
    if mode not in ("copy", "mmap"):
        raise UsageError(f"mode must be 'copy' or 'mmap', not {mode!r}")
    if cache not in CACHE_POLICIES:
        raise UsageError(f"cache must be 'auto', 'keep' or 'drop', not {cache!r}")
    if mode == "mmap" and cache == "drop":
        raise UsageError("cache='drop' cannot be combined with mode='mmap': mapped weights live in the page cache")
    return "keep" if mode == "mmap" else cache   # dropping next to mapped weights would evict them


def _map_views(model: torch.nn.Module, ckpt: Checkpoint, *, rename: Rename, quant: dict[str, QuantTarget],
               device: torch.device, threads: int | None) -> tuple[list[tuple[str, torch.Tensor]], Prefetch | None]:
    """``mode="mmap"``: swap in copy-on-write views of the file for every tensor that needs no
    conversion (ties stay ties: one view per tensor object); returns (name, view) of those mapped,
    and the read-ahead of their bytes in file order when it was started (``GEMMA_STREAM_PREFETCH``)."""
    targets = model.state_dict(keep_vars=True)
    plan = make_plan(ckpt, targets, rename=rename, quant=quant, strict=False)
    views = FileViews(plan.files)
    replaced: dict[int, torch.Tensor] = {}
    mapped = []
    for job in zero_copy_jobs(plan, targets, device):
        old = targets[job.target]
        view = views.view(job.file_index, job.src_offset, old.dtype, job.shape, job.src_strides)
        replaced[id(old)] = _same_kind(old, view)
        mapped.append((job.target, replaced[id(old)]))
    for _, module in model.named_modules(remove_duplicate=False) if replaced else ():
        for slot in (module._parameters, module._buffers):
            for attr, old in list(slot.items()):
                if old is not None and id(old) in replaced:
                    slot[attr] = replaced[id(old)]
    return mapped, views.prefetch(config().prefetch, threads or config().default_threads)


def _quant_targets(model: torch.nn.Module) -> dict[str, QuantTarget]:
    """Quantized modules describe their destination through ``gs_quant_target()``."""
    targets = {}
    for prefix, module in model.named_modules():
        describe = getattr(module, "gs_quant_target", None)
        if describe is not None:
            target = describe(prefix)
            targets[f"{prefix}.weight" if prefix else "weight"] = target
    return targets


# ---------------------------------------------------------------- public API

def load_into(model: torch.nn.Module, path: str | os.PathLike, *, strict: bool = True, rename: Rename = None,
              device: str | torch.device | None = None, threads: int | None = None, backend: str = "auto",
              progress: Progress = None, key: str | None = None, quantize: str | None = None,
              group_size: int = 128, cache: str = "auto", mode: str = "copy") -> LoadReport:
    """Stream a checkpoint into ``model``'s parameters and buffers, in place.

    Each tensor keeps its own dtype and device; tensors on ``meta`` are first
    allocated on ``device`` (default cpu).  With ``quantize="int8"|"int4"``
    the model's Linear/Embedding layers are quantized first and the weights
    quantized on read.  ``cache="drop"`` evicts the file from the page cache
    as it is read, ``"keep"`` leaves it cached, and ``"auto"`` (the default)
    keeps it unless the file and the model cannot both stay in memory.
    ``mode="mmap"`` replaces, instead of filling, every CPU tensor stored in
    its own dtype by a copy-on-write view of the file (like
    ``torch.load(mmap=True)`` + ``assign=True``: the fastest start, weights
    backed by the file; the file is read ahead in file order in the
    background when it fits in memory, see ``LoadReport.prefetch``); the
    others are copied as usual.  The mapped file is checked to be the one
    whose header was validated, but after the load the weights *are* the
    file: truncating or rewriting it in place makes the next touch of a
    mapped page raise ``SIGBUS`` and kill the process, as with
    ``torch.load(mmap=True)``.  Replace a mapped checkpoint by renaming a new
    file over it (the old inode lives on), or use ``mode="copy"``.  In every
    mode a file replaced or rewritten during the load raises
    ``CheckpointError``.

    >>> with torch.device("meta"):
    ...     model = MyModel()
    >>> report = gs.load_into(model, "model.safetensors")
    """
    cache = _check_mode(mode, cache)
    ckpt = open_checkpoint(path, key=key)
    if quantize is not None:
        from .quant import quantize_
        quantize_(model, quantize, group_size=group_size)
    if strict and (mode == "mmap" or any(t.is_meta for t in model.state_dict(keep_vars=True).values())):
        # check names and shapes on the meta model first: a mismatch must not allocate (or remap) the model
        make_plan(ckpt, model.state_dict(keep_vars=True), rename=rename, quant=_quant_targets(model), strict=True)
    device = torch.device(device) if device is not None else torch.device("cpu")
    mapped, prefetch = _map_views(model, ckpt, rename=rename, quant=_quant_targets(model), device=device,
                                  threads=threads) if mode == "mmap" else ([], None)
    allocated = _materialize(model, device)
    targets = model.state_dict(keep_vars=True)
    plan = make_plan(ckpt, targets, rename=rename, quant=_quant_targets(model), strict=strict)
    if mapped:
        mapped_ids = {id(t) for _, t in mapped}
        plan.jobs = [j for j in plan.jobs if id(targets.get(j.target)) not in mapped_ids]
    read, seconds, backend_name, cache = _execute(plan, threads=threads, backend=backend, progress=progress,
                                                  cache=cache, desc="gemma_stream load")
    _run_post_load_hooks(model, threads)
    filled = {id(targets[n]) for n in plan.loaded if n in targets}
    uninitialized = [n for n, tensor in allocated if id(tensor) not in filled]
    if uninitialized:
        # e.g. non-persistent buffers (rotary inv_freq) that a meta-built model never computed
        logger.warning("gemma_stream: %d tensors were allocated from meta but not in the checkpoint; their "
                       "memory is uninitialized: %s", len(uninitialized), ", ".join(uninitialized[:10]))
    return LoadReport(loaded=plan.loaded, missing_keys=plan.missing_keys, unexpected_keys=plan.unexpected_keys,
                      mismatched_keys=plan.mismatched_keys, skipped_keys=plan.skipped_keys,
                      uninitialized=uninitialized, mapped=[n for n, _ in mapped],
                      bytes_read=read, seconds=seconds, backend=backend_name, files=list(ckpt.files),
                      cache=cache, prefetch=prefetch)


def _run_post_load_hooks(model: torch.nn.Module, threads: int | None) -> None:
    """``gs_post_load()`` of every module that has one (the int4 repack for torch's CPU kernel),
    on the loader's thread count: the native repack releases the GIL, and each hook touches
    only its own module's tensors (QuantLinear locks a weight it shares)."""
    hooks = [hook for module in model.modules() if (hook := getattr(module, "gs_post_load", None)) is not None]
    workers = min(len(hooks), threads or config().default_threads)
    if workers <= 1:
        for hook in hooks:
            hook()
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gemma_stream_post") as pool:
        for future in [pool.submit(hook) for hook in hooks]:
            future.result()


def _select(ckpt: Checkpoint, keys) -> Checkpoint:
    if keys is None:
        return ckpt
    wanted = set([keys] if isinstance(keys, str) else keys)
    absent = sorted(wanted - {r.name for r in ckpt.records})
    if absent:
        raise GemmaStreamError(f"{ckpt.files[0]}: keys not in the checkpoint: {', '.join(absent[:20])}")
    return Checkpoint(ckpt.format, ckpt.files, [r for r in ckpt.records if r.name in wanted], ckpt.metadata,
                      ckpt.extras)


def load_state_dict(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu", keys=None, rename: Rename = None,
                    threads: int | None = None, backend: str = "auto", progress: Progress = False,
                    key: str | None = None, cache: str = "auto", mode: str = "copy") -> dict[str, torch.Tensor]:
    """Read a checkpoint into a new dict of tensors.

    ``dtype`` converts floating-point tensors (f16/bf16/f32) and leaves the
    others as stored; ``keys`` reads only those tensors.  ``mode="mmap"``
    returns copy-on-write views of the file for CPU tensors that need no
    conversion; ``cache`` and ``mode`` as in ``load_into``.

    >>> sd = gs.load_state_dict("model.safetensors", dtype=torch.bfloat16)
    """
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise GemmaStreamError(f"dtype must be float16, bfloat16 or float32, not {dtype}")
    cache = _check_mode(mode, cache)
    ckpt = _select(open_checkpoint(path, key=key), keys)
    names = normalize_names(ckpt, rename)
    targets: dict[str, torch.Tensor] = {}
    views: dict[tuple, torch.Tensor] = {}  # identical views of one storage stay one tensor
    for record in ckpt.records:
        name = names.get(record.name)
        if name is None:
            continue
        out_dtype = dtype if dtype is not None and record.dtype.name in ("f16", "bf16", "f32") else record.dtype.torch
        view_key = (record.storage, record.file, record.byte_offset, record.shape, record.strides, out_dtype)
        if record.storage is not None and view_key in views:
            targets[name] = views[view_key]
            continue
        tensor = torch.empty(record.shape, dtype=out_dtype, device=device)
        views[view_key] = targets[name] = tensor
    plan = make_plan(ckpt, targets, rename={r.name: names.get(r.name) for r in ckpt.records}, strict=True)
    if mode == "mmap":
        files = FileViews(plan.files)
        mapped: dict[int, torch.Tensor] = {}
        for job in zero_copy_jobs(plan, targets, torch.device(device)):
            old = targets[job.target]
            mapped[id(old)] = files.view(job.file_index, job.src_offset, old.dtype, job.shape, job.src_strides)
        plan.jobs = [j for j in plan.jobs if id(targets[j.target]) not in mapped]
        targets = {name: mapped.get(id(t), t) for name, t in targets.items()}
        files.prefetch(config().prefetch, threads or config().default_threads)
    _execute(plan, threads=threads, backend=backend, progress=progress, cache=cache, desc="gemma_stream read")
    return targets


def normalize_names(ckpt: Checkpoint, rename: Rename) -> dict[str, str | None]:
    """Checkpoint name -> output name (or None to skip) for ``load_state_dict``."""
    if rename is None:
        return {r.name: r.name for r in ckpt.records}
    out = {}
    for r in ckpt.records:
        new = rename.get(r.name, r.name) if isinstance(rename, dict) else rename(r.name)
        if new is not None and not isinstance(new, str):
            raise GemmaStreamError(f"load_state_dict: rename({r.name!r}) must give a name or None, not {new!r}")
        out[r.name] = new
    return out
