"""torch.distributed destinations: each rank fills its own DTensor shards.

A model whose parameters are DTensors (``parallelize_module`` with
Colwise/Rowwise plans, ``distribute_tensor``, FSDP2 ``fully_shard``) is loaded
rank by rank: each rank turns its shard of every DTensor into a block of rows
and columns of the global tensor (torch's own uneven-chunk rule,
``compute_local_shape_and_global_offset``), intersects the checkpoint's routes
with that block, and runs the usual plan into ``param.to_local()``.  Only the
planner's routes change; reading, conversion and executors are the single-process ones.

``read="own"`` (the default) has every rank read its own bytes from the file
(replicated tensors are read by every rank).  ``read="once"`` splits the
checkpoint's bytes into one contiguous run of the files per rank; the ranks
read their runs at the same time, a step at a time, and each sends every other
rank only that rank's blocks (one all_to_all per step; replicated tensors are
broadcast), so a rank receives about its shard (distributed_once.py; NOTES.md 16, 18, 23).
``quantize=`` makes the DTensor layers quantized ones of DTensors (distributed_quant.py).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Iterable

import torch

from .api import LoadReport
from .deprecation import renamed_argument
from .errors import GemmaStreamError, InternalError, UsageError
from .distributed_blocks import _Block, _block, _local_route
from .formats.records import Checkpoint
from .plan import CopyJob, PartialRoutes, Rename, Route, make_plan, normalize_rename

__all__ = ["DistributedLoadReport", "ReadRange", "has_dtensors", "load_sharded", "rank_reads"]

READ_MODES = ("own", "once")


def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def has_dtensors(model: torch.nn.Module, tensors: Iterable[torch.Tensor] | None = None) -> bool:
    """True when any parameter or buffer of ``model`` (or of ``tensors``, its state dict's values) is a DTensor."""
    if "torch.distributed.tensor" not in sys.modules:  # no DTensor can exist; spare every load the import
        return False
    DTensor = _dtensor_class()
    tensors = model.state_dict(keep_vars=True).values() if tensors is None else tensors
    return DTensor is not None and any(isinstance(t, DTensor) for t in tensors)


@dataclass
class _Sharded:
    """The model seen by one rank: local destination tensors and how to route into them."""

    local: dict[str, torch.Tensor]           # name -> local tensor (DTensor.to_local() or the plain tensor)
    global_shape: dict[str, tuple[int, ...]]
    blocks: dict[str, _Block]                # DTensor names only
    shard_bytes: int = 0                     # bytes of this rank's local tensors (ties counted once)

    def routes(self, ckpt: Checkpoint, rename: Rename) -> dict[str, list[Route] | None]:
        routes_of = normalize_rename(rename)
        out: dict[str, list[Route] | None] = {}
        for record in ckpt.records:
            routes = routes_of(record.name)
            if routes is None:
                out[record.name] = None
                continue
            local = []
            for route in routes:
                block = self.blocks.get(route.target)
                if block is None:
                    local.append(route)
                elif not block.empty and (cut := _local_route(record, route, self.global_shape[route.target],
                                                              block)) is not None:
                    local.append(cut)
            out[record.name] = local
        return out


def _routes_except(routes: dict[str, list[Route] | None], later) -> dict[str, list[Route] | None]:
    """``routes`` without those into the int8 column blocks ``later`` (read after the main plan)."""
    names = {n for b in later for n in b.names}
    return {n: [r for r in rs if r.target not in names] if rs is not None else None for n, rs in routes.items()}


def _sharded_view(model: torch.nn.Module, coordinate=None) -> _Sharded:
    DTensor = _dtensor_class()
    local, shapes, blocks = {}, {}, {}
    seen: dict[int, torch.Tensor] = {}
    shard_bytes = 0
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            shapes[name] = tuple(t.shape)
            if isinstance(t, DTensor):
                blocks[name] = _block(name, t, coordinate)
                if blocks[name].empty:
                    continue
            if id(t) not in seen:  # ties: one local tensor per DTensor, so the planner sees the tie
                seen[id(t)] = t.to_local() if isinstance(t, DTensor) else t
                shard_bytes += seen[id(t)].numel() * seen[id(t)].element_size()
            local[name] = seen[id(t)]
    return _Sharded(local, shapes, blocks, shard_bytes)


def _materialize(model: torch.nn.Module, device: torch.device | None) -> list[str]:
    """Allocate every meta parameter and buffer: DTensors get an empty local shard on their mesh's device."""
    from .modules import same_kind
    DTensor = _dtensor_class()
    replaced: dict[int, torch.Tensor] = {}
    names = []
    for prefix, module in model.named_modules(remove_duplicate=False):
        for slot in (module._parameters, module._buffers):
            for attr, old in list(slot.items()):
                if old is None or not old.is_meta:
                    continue
                if id(old) not in replaced:
                    if isinstance(old, DTensor):
                        where = device or _mesh_device(old.device_mesh)
                        local = torch.empty(old.to_local().shape, dtype=old.dtype, device=where)
                        data = DTensor.from_local(local, old.device_mesh, old.placements, run_check=False,
                                                  shape=old.shape, stride=old.stride())
                    else:
                        data = torch.empty(old.shape, dtype=old.dtype, device=device or "cpu")
                    replaced[id(old)] = same_kind(old, data)
                slot[attr] = replaced[id(old)]
                names.append(f"{prefix}.{attr}" if prefix else attr)
    return names


def _meshes(model: torch.nn.Module) -> dict:
    """The device meshes of the model's DTensors, by value (two mesh objects over the same ranks are one)."""
    DTensor = _dtensor_class()
    return {(m.device_type, tuple(m.mesh.shape), tuple(m.mesh.flatten().tolist()), m.mesh_dim_names): m
            for m in (t.device_mesh for t in model.state_dict(keep_vars=True).values() if isinstance(t, DTensor))}


def _model_group(model: torch.nn.Module):
    """The process group of the model's device mesh (one mesh; a 1-D mesh's group, else the world's)."""
    import torch.distributed as dist
    meshes = _meshes(model)
    if len(meshes) == 1:
        mesh = next(iter(meshes.values()))
        if mesh.ndim == 1:
            return mesh.get_group()
        if mesh.size() != dist.get_world_size():
            raise GemmaStreamError(f"read='once': the model's {mesh.ndim}-D mesh covers {mesh.size()} of "
                                   f"{dist.get_world_size()} ranks; pass a 1-D mesh or use read='own'")
    return None


def _mesh_device(mesh) -> torch.device:
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    module = getattr(torch, mesh.device_type)
    return torch.device(mesh.device_type, module.current_device())


@dataclass
class DistributedLoadReport(LoadReport):
    """What ``load_into`` did on this rank of a sharded model: a :class:`LoadReport` plus

    ``rank`` and ``world_size``; ``read`` ("own" or "once"); ``bytes_read``: bytes
    this rank asked of the files (a coalesced column block counts the gaps it
    reads); ``bytes_received``: bytes that came from other ranks
    (``read="once"``); ``shard_bytes``: this rank's local tensors.
    """

    rank: int = 0
    world_size: int = 1
    read: str = "own"
    bytes_received: int = 0
    shard_bytes: int = 0


def file_bytes(job: CopyJob) -> int:
    """Bytes a job asks of its file: a strided job reads whole spans of rows, gaps included, unless
    its rows are read apart (``block_rows``)."""
    return job.file_bytes


def _check_args(read: str, quantize: str | None, mode: str) -> None:
    if read not in READ_MODES:
        raise UsageError(f"read must be 'own' or 'once', not {read!r}")
    if quantize is not None and read == "once":
        raise GemmaStreamError("quantize= with read='once' is not supported: use read='own' (the default), where "
                               "each rank quantizes its own shard on read")
    if mode != "copy":
        raise GemmaStreamError("mode='mmap' with DTensor parameters or read='once' is not supported; "
                               "use mode='copy'")


def load_sharded(model: torch.nn.Module, ckpt: Checkpoint, *, strict: bool = True, rename: Rename = None,
                 device=None, threads: int | None = None, backend: str = "auto", progress=None,
                 cache: str = "auto", read: str = "own", group=None, quantize: str | None = None,
                 group_size: int = 128, mode: str = "copy") -> DistributedLoadReport:
    """``gs.load_into`` for a model with DTensor parameters (it calls this); one call per rank.

    >>> model = parallelize_module(model, mesh, {"proj": ColwiseParallel()})
    >>> report = gs.load_into(model, "model.safetensors")          # on every rank
    >>> report.bytes_read, report.shard_bytes

    ``quantize="int8"|"int4"`` quantizes the DTensor layers on read, each rank
    its own slice (distributed_quant.py).
    """
    import torch.distributed as dist

    from .api import _execute, _unfilled_meta
    from .config import config
    from .distributed_quant import global_quant_targets, load_int8_columns, local_quant_targets, quantize_layers
    from .modules import meta_tensors, run_post_load_hooks
    _check_args(read, quantize, mode)
    if quantize is not None:
        quantize_layers(model, quantize, group_size)
    # names, shapes and dtypes against the global (meta) shapes first: a mismatch allocates nothing
    meta: dict[int, torch.Tensor] = {}
    global_targets = {}
    state = model.state_dict(keep_vars=True)
    for name, t in state.items():
        if id(t) not in meta:
            meta[id(t)] = torch.empty(t.shape, dtype=t.dtype, device="meta")
        global_targets[name] = meta[id(t)]
    global_quant = global_quant_targets(model, meta)
    if global_quant and read == "once":  # read-once copies float pieces; it has no quantizing step
        raise GemmaStreamError("read='once' cannot fill quantized layers: use read='own' (the default)")
    checked = make_plan(ckpt, global_targets, rename=rename, quant=global_quant, strict=strict)
    uninitialized = _unfilled_meta(meta_tensors(model), checked, state, ckpt.where, strict)
    device = torch.device(device) if device is not None else None
    _materialize(model, device)
    view = _sharded_view(model)
    quant, int8_columns = local_quant_targets(model, view)
    routes = view.routes(ckpt, rename)
    plan = make_plan(ckpt, view.local, rename=PartialRoutes(_routes_except(routes, int8_columns)), quant=quant,
                     strict=False, check_splits=False)
    known = {m.split(":")[0] for m in checked.mismatched_keys}
    gaps = [m for m in plan.mismatched_keys if m.split(":")[0] not in known] + \
        [n for n in plan.missing_keys if n not in checked.missing_keys]
    if gaps:  # the global plan covered these: a gap in a rank's plan is a bug of ours, not the user's
        raise InternalError(f"gemma_stream: rank plan disagrees with the global plan: {gaps[:5]}")
    if group is None and dist.is_initialized():
        group = _model_group(model)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    start = time.perf_counter()
    received = 0
    if read == "once" and world > 1:
        from .distributed_once import read_once
        read_bytes, received, backend_name, cache = read_once(ckpt, checked, view, routes, group=group,
                                                              threads=threads, backend=backend, cache=cache)
    else:
        _, _, backend_name, cache = _execute(plan, threads=threads, backend=backend, progress=progress,
                                             cache=cache, desc=f"gemma_stream load (rank {rank})")
        read_bytes = sum(file_bytes(j) for j in plan.jobs)
        if int8_columns:
            read_bytes += load_int8_columns(ckpt, int8_columns, routes, lambda p: _execute(
                p, threads=threads, backend=backend, progress=False, cache=cache, desc="gemma_stream int8 columns"))
    seconds = time.perf_counter() - start
    run_post_load_hooks(model, threads or config().default_threads)
    return DistributedLoadReport(
        rank=rank, world_size=world, read=read, loaded=checked.loaded, missing_keys=checked.missing_keys,
        unexpected_keys=checked.unexpected_keys, mismatched_keys=checked.mismatched_keys,
        skipped_keys=checked.skipped_keys, uninitialized=uninitialized,
        bytes_read=read_bytes, bytes_received=received, shard_bytes=view.shard_bytes, seconds=seconds,
        backend=backend_name, files=list(ckpt.files), cache=cache)


# ---------------------------------------------------------------- which bytes each rank reads

@dataclass(frozen=True)
class ReadRange:
    """One file range a rank reads: ``nbytes`` from ``offset`` (a strided block spans its gaps)."""

    rank: int
    tensor: str
    file: str
    offset: int
    nbytes: int


def rank_reads(model: torch.nn.Module, path, *, rename: Rename = None, state_dict_key: str | None = None,
               ranks: list[int] | None = None, key: str | None = None) -> list[ReadRange]:
    """The file ranges each rank of a sharded (meta or real) model would read with ``read="own"``.

    No bytes are read and nothing is allocated; call it on any rank once the
    process group is up (the mesh of every DTensor names all ranks).

    >>> for r in gs.distributed.rank_reads(model, "model.safetensors"):
    ...     print(r.rank, r.tensor, r.offset, r.nbytes)
    """
    from .distributed_quant import int8_columns_jobs, local_quant_targets
    from .formats import open_checkpoint
    ckpt = open_checkpoint(path, key=renamed_argument(state_dict_key, key, old="key", new="state_dict_key",
                                                      where="gs.distributed.rank_reads"))
    meshes = list(_meshes(model).values())
    if not meshes:
        raise GemmaStreamError("rank_reads needs a model with DTensor parameters (none found)")
    out = []
    # a 2-D model (TP then FSDP2) also has tensors on a 1-D sub-mesh: each tensor's coordinate is its own mesh's
    for rank in ranks if ranks is not None else sorted({r for m in meshes for r in m.mesh.flatten().tolist()}):
        sharded = _sharded_view_meta(model, lambda mesh: _coordinate(mesh, rank))
        quant, int8_columns = local_quant_targets(model, sharded)
        routes = sharded.routes(ckpt, rename)
        plan = make_plan(ckpt, sharded.local, rename=PartialRoutes(_routes_except(routes, int8_columns)),
                         quant=quant, strict=False, check_splits=False)
        jobs = plan.jobs + int8_columns_jobs(ckpt, int8_columns, routes)
        out.extend(ReadRange(rank, j.name, plan.files[j.file_index], offset, nbytes)
                   for j in jobs for offset, nbytes in j.file_ranges())
    return out


def _coordinate(mesh, rank: int) -> list[int] | None:
    """``rank``'s coordinate in ``mesh``; None when the mesh does not include it."""
    hits = (mesh.mesh == rank).nonzero()
    return [int(c) for c in hits[0]] if len(hits) else None


def _sharded_view_meta(model: torch.nn.Module, coordinate_in) -> _Sharded:
    """Like ``_sharded_view`` for another rank (``coordinate_in(mesh)``: its coordinate there, or None):
    meta tensors of that rank's local shapes."""
    DTensor = _dtensor_class()
    local, shapes, blocks, seen = {}, {}, {}, {}
    for name, t in model.state_dict(keep_vars=True).items():
        shapes[name] = tuple(t.shape)
        shape = tuple(t.shape)
        if isinstance(t, DTensor):
            coordinate = coordinate_in(t.device_mesh)
            blocks[name] = _block(name, t, coordinate) if coordinate is not None else _Block((0,), (0,))
            if blocks[name].empty:
                continue
            shape = blocks[name].local_shape
        if id(t) not in seen:
            seen[id(t)] = torch.empty(shape, dtype=t.dtype, device="meta")
        local[name] = seen[id(t)]
    return _Sharded(local, shapes, blocks)
