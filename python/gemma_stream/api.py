"""Public entry points: load_into, load_state_dict, inspect.

Each one is the same pipeline: format reader -> plan -> executor.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field

import torch

from . import fileio, pagecache
from .config import config, mem_available
from .deprecation import renamed_argument
from .dtypes import CONVERTIBLE, FLOAT_DTYPES
from .errors import GemmaStreamError, MismatchError, UninitializedWarning, UsageError
from .executors import RunResult, get_executor, run_plan_jobs
from .mapped import FileViews, Prefetch
from .fileio import platform_cache_policy
from .formats import Checkpoint, open_checkpoint
from .formats.records import gc_paused
from .modules import (materialize, meta_tensors, module_walk, quant_targets, run_post_load_hooks, same_kind,
                      swap_tensors)
from .plan import (CACHE_POLICIES, Plan, Rename, Route, choose_cache, drops_if_cold, make_plan, normalize_rename,
                   zero_copy_jobs)
from .progress import Progress, progress_callback
from .readahead import start_copy_readahead

__all__ = ["LoadReport", "StateDict", "TensorInfo", "load_into", "load_state_dict", "inspect"]


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
    #: the background read-ahead (``.wait()``, ``.done``), or None: ``mode="mmap"``'s of the mapped ranges;
    #: ``mode="copy"``'s of the plan's bytes, cold files only, stopped when the copy ends
    prefetch: Prefetch | None = field(default=None, repr=False)
    #: host bytes of the staging ring (destinations off the CPU or not contiguous), its uploads, and the
    #: share of the shorter of reading and uploading hidden behind the other (1: fully overlapped)
    staging_bytes: int = 0
    uploads: int = 0
    overlap: float = 0.0

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


def inspect(path: str | os.PathLike | Checkpoint, *, state_dict_key: str | None = None,
            key: str | None = None) -> list[TensorInfo]:
    """List the tensors of a checkpoint without reading their data.

    ``state_dict_key`` picks the state dict inside a torch zip (found
    automatically by default; ``key=`` is its deprecated name).

    >>> for t in gs.inspect("model.safetensors"):
    ...     print(t.name, t.dtype, t.shape)
    """
    ckpt = _open(path, renamed_argument(state_dict_key, key, old="key", new="state_dict_key", where="gs.inspect"))
    return [TensorInfo(r.name, r.dtype.torch, r.shape, r.nbytes, r.file, r.byte_offset,
                       None if r.is_contiguous else r.strides, r.storage) for r in ckpt.records]


# ---------------------------------------------------------------- helpers

def _open(path: str | os.PathLike | Checkpoint, key: str | None) -> Checkpoint:
    """A checkpoint opened and validated once per load (callers that already hold one pass it down)."""
    return path if isinstance(path, Checkpoint) else open_checkpoint(path, key=key)


def _resolve_cache(plan: Plan, cache: str, device: torch.device | None = None, *,
                   ckpt: Checkpoint | None = None) -> str:
    """``cache`` as "keep" or "drop" for this plan (:func:`~gemma_stream.plan.choose_cache`), decided
    once per load, before the model is allocated and before any read-ahead: destinations still on
    ``meta`` count as host memory when ``device`` is the CPU, as they will once allocated.
    ``ckpt``: given by the loads that may drop a large cold file (``load_into``, ``load_state_dict``,
    vLLM's direct path; :func:`_cold_for_this_process`), except a torch zip of many tensors, whose
    reader has asked for every local header: dropping measured 0.87 of keeping there (many_small
    at 2 GiB) and 1.1-1.9x faster on every other mix and format (NOTES.md 41)."""
    if cache != "auto":
        return cache
    cold = ckpt is not None and not _headers_asked(ckpt) and drops_if_cold(plan) \
        and _cold_for_this_process(plan)
    available = mem_available()
    if available is None:
        return choose_cache(plan, cache, None, cold=cold)
    meta_on_host = device is not None and device.type == "cpu"
    return choose_cache(plan, cache, available, plan.host_nbytes(meta_on_host), cold=cold)


def _cold_for_this_process(plan: Plan) -> bool:
    """Whether the plan's files are out of the page cache (``pagecache.is_cold``, on a sample of
    pages) and no other process of a job on this node is about to read them: not under a launcher
    that started several local ranks (``LOCAL_WORLD_SIZE``) nor, without that variable, in an
    initialized process group of more than one rank, whose ranks may share the node's page cache."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    if local.isdigit():
        if int(local) > 1:
            return False
    elif torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        return False
    files = sorted({plan.files[job.file_index] for job in plan.jobs})
    return pagecache.is_cold(files, pagecache.RESIDENCY_SAMPLES)


def _execute(plan: Plan, *, threads: int | None, backend: str, progress: Progress, cache: str,
             desc: str, resolved: str | None = None) -> tuple[RunResult, float, str, str]:
    """Run the plan's jobs; returns (what ran, seconds, executor name, cache policy used).
    ``cache``: the caller's policy; ``resolved``: its :func:`_resolve_cache`, when already decided."""
    if resolved is None:
        resolved = _resolve_cache(plan, cache)
    cache = platform_cache_policy(resolved, explicit=cache == "drop")
    cfg = config()
    executor = get_executor(backend)
    callback, close = progress_callback(progress, plan.nbytes, desc)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            done = run_plan_jobs(executor, plan.files, plan.jobs, threads=threads or cfg.default_threads,
                                 chunk_bytes=cfg.chunk_bytes, drop_cache=cache == "drop", progress=callback)
    finally:
        close()
    return done, time.perf_counter() - start, executor.name, cache


def _read_ahead(plan: Plan, resolved: str, mode: str, ckpt: Checkpoint) -> Prefetch | None:
    """``mode="copy"``: the plan's source bytes asked for ahead of the engine on a background
    thread, when the files are cold and fit in memory (:mod:`gemma_stream.readahead`).  Not for a
    torch zip of many tensors: its reader has already asked for every local header, and reading
    the plan ahead on top measured slower (0.92 on vs off, many_small cold; NOTES.md 36).
    ``resolved``: the load's cache policy, "keep" or "drop" (:func:`_resolve_cache`)."""
    if mode != "copy" or not plan.jobs or _headers_asked(ckpt):
        return None
    return start_copy_readahead(plan, resolved)


def _headers_asked(ckpt: Checkpoint) -> bool:
    """A torch zip of enough tensors that its reader asked for every local header ahead."""
    return ckpt.format == "torchzip" and len(ckpt.records) >= fileio.PARALLEL_READS


def _check_mode(mode: str, cache: str, device: str | torch.device | None = None) -> str:
    """Validate ``mode`` and ``cache``; returns the cache policy for the copying part."""
    if mode not in ("copy", "mmap"):
        raise UsageError(f"mode must be 'copy' or 'mmap', not {mode!r}")
    if mode == "mmap" and device is not None and torch.device(device).type != "cpu":
        raise UsageError(f"mode='mmap' maps the file into CPU memory; it cannot place tensors on {device}: "
                         f"use mode='copy' (the default), which streams through the staging ring")
    if cache not in CACHE_POLICIES:
        raise UsageError(f"cache must be 'auto', 'keep' or 'drop', not {cache!r}")
    if mode == "mmap" and cache == "drop":
        raise UsageError("cache='drop' cannot be combined with mode='mmap': mapped weights live in the page cache")
    return "keep" if mode == "mmap" else cache   # dropping next to mapped weights would evict them


def _map_zero_copy(plan: Plan, targets: dict[str, torch.Tensor], device: torch.device,
                   threads: int | None) -> tuple[dict[int, tuple[str, torch.Tensor]], Prefetch | None]:
    """``mode="mmap"``: a copy-on-write view of the file for every job that needs no conversion
    (one view per tensor object, so ties stay ties); those jobs leave the plan.  Returns
    ``id(old) -> (name, view)`` and the read-ahead of the mapped bytes in file order, if started
    (``GEMMA_STREAM_PREFETCH``)."""
    views = FileViews(plan.files)
    mapped: dict[int, tuple[str, torch.Tensor]] = {}
    for job in zero_copy_jobs(plan, targets, device):
        old = targets[job.target]
        view = views.view(job.file_index, job.src_offset, old.dtype, job.shape, job.src_strides)
        mapped[id(old)] = (job.target, same_kind(old, view))
    plan.jobs = [j for j in plan.jobs if id(targets.get(j.target)) not in mapped]
    return mapped, views.prefetch(config().prefetch, threads or config().default_threads)


def _unfilled_meta(metas: dict[int, tuple[str, torch.Tensor]], plan: Plan, targets: dict[str, torch.Tensor],
                   where: str, strict: bool) -> list[str]:
    """Tensors on ``meta`` that the load would allocate but no job fills (their memory would be
    garbage): a ``MismatchError`` under ``strict``, a warning otherwise.  Non-persistent buffers
    (rotary ``inv_freq``) are in no state dict and no checkpoint, and a map's "computed" names
    (gemma_pytorch's ``freqs_cis``) are computed only by a model built for real."""
    filled = plan.filled(targets)
    names = [name for key, (name, _) in metas.items() if key not in filled]
    if not names:
        return []
    shown = ", ".join(names[:20]) + (f", ... ({len(names) - 20} more)" if len(names) > 20 else "")
    what = (f"{where}: {len(names)} tensors of the model are on meta and the checkpoint does not fill them, "
            f"so their memory would be uninitialized: {shown}")
    if strict:
        raise MismatchError(f"{what}. Build the model inside gs.init_empty() (parameters on meta, buffers "
                            f"such as rotary tables computed for real), or pass strict=False to load anyway")
    warnings.warn(f"gemma_stream: {what} (strict=False: loaded anyway; build the model inside gs.init_empty() "
                  f"to compute its buffers)", UninitializedWarning, stacklevel=3)
    return names


# ---------------------------------------------------------------- public API

@gc_paused()  # a load makes many acyclic objects (records, jobs): no collections during it
def load_into(model: torch.nn.Module, path: str | os.PathLike, *, strict: bool = True, rename: Rename = None,
              device: str | torch.device | None = None, threads: int | None = None, backend: str = "auto",
              progress: Progress = None, state_dict_key: str | None = None, quantize: str | None = None,
              group_size: int = 128, cache: str = "auto", mode: str = "copy", read: str = "own",
              key: str | None = None) -> LoadReport:
    """Stream a checkpoint into ``model``'s parameters and buffers, in place.

    Each tensor keeps its own dtype and device; tensors on ``meta`` are first
    allocated on ``device`` (default cpu).  Build the model inside
    ``gs.init_empty()``: its parameters stay on ``meta`` (no memory, no random
    init) while buffers the checkpoint does not hold (rotary tables) are
    computed for real.  A ``meta`` tensor the checkpoint does not fill is a
    ``MismatchError`` (``strict=False``: a warning and uninitialized memory).
    With ``quantize="int8"|"int4"`` the model's Linear/Embedding layers are
    quantized first and the weights quantized on read; gemma_pytorch's own
    int8 layers (``quant=True``) are filled the same way from a float
    checkpoint.  ``state_dict_key`` picks the state dict inside a torch zip
    (found automatically by default; ``key=`` is its deprecated name).
    ``cache="drop"`` evicts the file from the page cache as it is
    read (and the whole file again at the end, once the kernel's readahead
    has landed), ``"keep"`` leaves it cached, and ``"auto"`` (the default) keeps it
    unless the file and the model cannot both stay in memory, or the file is
    cold, over 1 GiB and read by no other rank on this machine (then keeping
    it would cost a second model's worth of fresh memory during the load; a
    torch zip of 256 tensors or more is kept; ``report.cache`` says which ran).
    ``mode="mmap"`` replaces, instead of filling, every CPU tensor stored in
    its own dtype by a copy-on-write view of the file (like
    ``torch.load(mmap=True)`` + ``assign=True``: the fastest start, weights
    backed by the file; the file is read ahead in file order in the
    background when it fits in memory, see ``LoadReport.prefetch``); the
    others are copied as usual.  DTensor parameters (tensor parallel, FSDP2)
    are filled rank by rank, each from its own bytes (``read="once"``: each
    byte read by one rank and broadcast); see ``gemma_stream.distributed``.
    With ``mode="mmap"`` the mapped file is checked to be the one whose
    header was validated, but after the load the weights *are* the file: truncating or rewriting it in place makes the next touch of a
    mapped page raise ``SIGBUS`` and kill the process, as with
    ``torch.load(mmap=True)``.  Replace a mapped checkpoint by renaming a new
    file over it (the old inode lives on), or use ``mode="copy"``.  In every
    mode a file replaced or rewritten during the load raises
    ``CheckpointError``.

    >>> with gs.init_empty():
    ...     model = MyModel()
    >>> report = gs.load_into(model, "model.safetensors")
    """
    cache = _check_mode(mode, cache, device)
    ckpt = _open(path, renamed_argument(state_dict_key, key, old="key", new="state_dict_key", where="gs.load_into"))
    from .distributed import has_dtensors, load_sharded
    targets = model.state_dict(keep_vars=True)   # one walk of the model serves the check and the plan
    if read != "own" or has_dtensors(model, targets.values()):
        return load_sharded(model, ckpt, strict=strict, rename=rename, device=device, threads=threads, backend=backend,
                            progress=progress, cache=cache, read=read, quantize=quantize, group_size=group_size,
                            mode=mode)
    if quantize is not None:
        from .quant import quantize_
        quantize_(model, quantize, group_size=group_size)
        targets = model.state_dict(keep_vars=True)
    device = torch.device(device) if device is not None else torch.device("cpu")
    # one plan, on the model as built: a mismatch is raised before anything is allocated or mapped
    walk = module_walk(model)   # the model's modules as quantized: every step below visits these
    plan = make_plan(ckpt, targets, rename=rename, quant=quant_targets(model, walk), strict=strict)
    metas = meta_tensors(model, walk)
    uninitialized = _unfilled_meta(metas, plan, targets, ckpt.where, strict)
    mapped, prefetch = _map_zero_copy(plan, targets, device, threads) if mode == "mmap" else ({}, None)
    resolved = _resolve_cache(plan, cache, device, ckpt=ckpt)
    if mode == "copy":   # reads while the model is allocated, then ahead of the engine
        prefetch = _read_ahead(plan, resolved, mode, ckpt)
    try:
        swap_tensors(model, {key: view for key, (_, view) in mapped.items()}, walk)
        for key in mapped:   # those are views of the file now; the rest of the meta tensors are allocated
            metas.pop(key, None)
        plan.rebind(materialize(model, device, metas, walk))
        done, seconds, backend_name, cache = _execute(plan, threads=threads, backend=backend, progress=progress,
                                                      cache=cache, desc="gemma_stream load", resolved=resolved)
    finally:
        if prefetch is not None and mode == "copy":
            prefetch.cancel()   # the engine has read everything (or failed): nothing left to ask for
    run_post_load_hooks(model, threads or config().default_threads, walk)
    return LoadReport(loaded=plan.loaded, missing_keys=plan.missing_keys, unexpected_keys=plan.unexpected_keys,
                      mismatched_keys=plan.mismatched_keys, skipped_keys=plan.skipped_keys,
                      uninitialized=uninitialized, mapped=[name for name, _ in mapped.values()],
                      bytes_read=done.bytes_read, seconds=seconds, backend=backend_name, files=list(ckpt.files),
                      cache=cache, prefetch=prefetch, staging_bytes=done.staging_bytes, uploads=done.uploads,
                      overlap=done.overlap)


def _select(ckpt: Checkpoint, keys) -> Checkpoint:
    if keys is None:
        return ckpt
    wanted = set([keys] if isinstance(keys, str) else keys)
    absent = sorted(wanted - {r.name for r in ckpt.records})
    if absent:
        raise GemmaStreamError(f"{ckpt.files[0]}: keys not in the checkpoint: {', '.join(absent[:20])}")
    return Checkpoint(ckpt.format, ckpt.files, [r for r in ckpt.records if r.name in wanted], ckpt.metadata,
                      ckpt.extras)


class StateDict(dict):
    """The dict ``load_state_dict`` returns: name -> tensor, plus ``report`` (a :class:`LoadReport`:
    bytes read, seconds, backend, cache policy, and for ``mode="mmap"`` the mapped names and the
    read-ahead handle, ``sd.report.prefetch.wait()``)."""

    report: LoadReport


@gc_paused()
def load_state_dict(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu", keys=None, rename: Rename = None,
                    threads: int | None = None, backend: str = "auto", progress: Progress = False,
                    state_dict_key: str | None = None, cache: str = "auto", mode: str = "copy",
                    key: str | None = None) -> StateDict:
    """Read a checkpoint into a new dict of tensors.

    ``dtype`` converts floating-point tensors (f16/bf16/f32) and leaves the
    others as stored; ``keys`` reads only those tensors; ``state_dict_key``
    picks the state dict inside a torch zip (``key=`` is its deprecated name).  ``mode="mmap"`` returns
    copy-on-write views of the file for CPU tensors that need no conversion;
    ``cache`` and ``mode`` as in ``load_into``.  The dict's ``report`` says what
    the read did.

    >>> sd = gs.load_state_dict("model.safetensors", dtype=torch.bfloat16)
    """
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise GemmaStreamError(f"dtype must be float16, bfloat16 or float32, not {dtype}")
    cache = _check_mode(mode, cache, device)
    state_dict_key = renamed_argument(state_dict_key, key, old="key", new="state_dict_key",
                                      where="gs.load_state_dict")
    ckpt = _select(_open(path, state_dict_key), keys)
    names = normalize_names(ckpt, rename)
    targets: dict[str, torch.Tensor] = {}
    views: dict[tuple, torch.Tensor] = {}  # identical views of one storage stay one tensor
    for record in ckpt.records:
        name = names.get(record.name)
        if name is None:
            continue
        out_dtype = dtype if dtype is not None and record.dtype.name in CONVERTIBLE else record.dtype.torch
        view_key = (record.storage, record.file, record.byte_offset, record.shape, record.strides, out_dtype)
        if record.storage is not None and view_key in views:
            targets[name] = views[view_key]
            continue
        tensor = torch.empty(record.shape, dtype=out_dtype, device=device)
        views[view_key] = targets[name] = tensor
    plan = make_plan(ckpt, targets, strict=True,
                     rename=None if rename is None else {r.name: names.get(r.name) for r in ckpt.records})
    resolved = _resolve_cache(plan, cache, ckpt=ckpt)
    mapped, prefetch = _map_zero_copy(plan, targets, torch.device(device), threads) if mode == "mmap" else \
        ({}, _read_ahead(plan, resolved, mode, ckpt))
    try:
        done, seconds, backend_name, cache = _execute(plan, threads=threads, backend=backend, progress=progress,
                                                      cache=cache, desc="gemma_stream read", resolved=resolved)
    finally:
        if prefetch is not None and mode == "copy":
            prefetch.cancel()
    out = StateDict({name: mapped[id(t)][1] if id(t) in mapped else t for name, t in targets.items()})
    out.report = LoadReport(loaded=plan.loaded, skipped_keys=plan.skipped_keys,
                            mapped=[name for name, _ in mapped.values()], bytes_read=done.bytes_read, seconds=seconds,
                            backend=backend_name, files=list(ckpt.files), cache=cache, prefetch=prefetch)
    return out


def normalize_names(ckpt: Checkpoint, rename: Rename) -> dict[str, str | None]:
    """Checkpoint name -> output name (or None to skip) for ``load_state_dict``: the planner's own
    rename normalization, limited to plain names (a new dict has no rows to route into)."""
    if rename is None:   # every name as it is: no per-tensor routing (thousands of tensors in MoE checkpoints)
        return {r.name: r.name for r in ckpt.records}
    routes_of = normalize_rename(rename)
    out: dict[str, str | None] = {}
    for r in ckpt.records:
        routes = routes_of(r.name)
        if routes is not None and (len(routes) != 1 or routes[0] != Route(routes[0].target)):
            raise GemmaStreamError(f"load_state_dict: rename({r.name!r}) must give a name or None, not {routes!r}")
        out[r.name] = None if routes is None else routes[0].target
    return out
