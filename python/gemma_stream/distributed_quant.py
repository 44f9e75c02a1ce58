"""``quantize=`` on DTensor models: quantized layers whose tensors are DTensors on the float weight's mesh.

``gs.load_into(tp_model, path, quantize="int8"|"int4")`` swaps every
``nn.Linear``/``nn.Embedding`` whose weight is a DTensor for a
:class:`~gemma_stream.QuantLinear`/``QuantEmbedding`` (``quantize_``), and
makes the quantized tensors DTensors on the same mesh, so ``full_tensor()`` of
each is the single-process quantized tensor and each rank holds its slice:

- the q weight keeps the float weight's placements (``Shard(0)`` rows,
  ``Shard(1)`` columns; int4's packed ``[N, K/2]`` is cut at the same columns);
- per-row scales (int8 ``[N]``) follow ``Shard(0)`` and are replicated over a
  ``Shard(1)`` dim; int4's per-group scales and zero points ``[N, K/G]`` keep the
  weight's placements, so a column shard must hold whole groups.

Rows quantize on their own.  An int4 column block aligned to the group size
quantizes on its own too.  An int8 column block needs the whole row's absmax:
each rank reads its float block, takes the per-row maximum of ``|w|``, an
all-reduce (MAX) over the mesh dims that split the columns makes it the row's,
and each rank quantizes its block with that scale, bit for bit the
single-process result sliced (``quantize_int8_absmax``).  The parallel
style's forward hooks move to the new module (the quantized forward runs on
DTensors through ``dequantized()``; torch's int8/int4 CPU kernels take plain
tensors only).  FSDP2 models are refused: FSDP keeps its own references to
the float parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from .errors import GemmaStreamError, nan_row
from .formats.records import Checkpoint
from .plan import PartialRoutes, QuantTarget, Route, make_plan

__all__ = ["quantize_layers", "global_quant_targets", "local_quant_targets", "RowAbsmax", "load_int8_columns",
           "int8_rows_plan", "int8_columns_jobs", "comm_device"]

#: an int8 column block is read, all-reduced and quantized a block of rows at a time: rows of this many
#: float32 bytes of the *global* tensor (the same row blocks on every rank; a rank's share is smaller)
QUANTIZE_CHUNK_BYTES = 8 << 20

_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def comm_device(group) -> torch.device:
    """Where tensors for ``group``'s collectives live: the CPU when gloo carries CPU tensors ("gloo", or
    "cpu:gloo,cuda:nccl" from ``init_process_group()`` without a backend, whose ``get_backend`` is
    "undefined"), else the GPU."""
    import torch.distributed as dist
    if "gloo" in str(getattr(dist, "get_backend_config", dist.get_backend)(group)):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def quantize_layers(model: nn.Module, scheme: str, group_size: int) -> None:
    """``quantize_`` for a model with DTensor weights (on meta); the quantized tensors become DTensors."""
    from .quant import quantize_
    from .quant.modules import check_scheme
    check_scheme(scheme, group_size, None)
    _refuse_fsdp(model)
    floats = {name: m for name, m in model.named_modules(remove_duplicate=False)
              if isinstance(m, (nn.Linear, nn.Embedding)) and _is_dtensor(m.weight)}
    for name, m in floats.items():
        if not m.weight.is_meta:
            raise GemmaStreamError(f"quantize= with DTensor parameters needs the model built on meta ({name}.weight "
                                   f"is materialized): build it inside gs.init_empty() or torch.device('meta')")
        if scheme == "int4" and m.weight.shape[1] % group_size == 0:  # before any swap: a refusal changes nothing
            _check_int4_columns(name, m.weight, group_size)
    quantize_(model, scheme, group_size=group_size)
    done: dict[int, torch.Tensor] = {}
    for name, old in floats.items():
        new = model.get_submodule(name)
        if new is old:  # stayed float (model.gs_quantize_report.skipped says why)
            continue
        for attr, t in new._quant_tensors().items():
            if id(t) not in done:
                done[id(t)] = nn.Parameter(_distribute_meta(t, old.weight, attr), requires_grad=False)
            setattr(new, attr, done[id(t)])
        for hooks in _HOOK_DICTS:  # the parallel style's input/output redistribution
            getattr(new, hooks).update(getattr(old, hooks))


def _refuse_fsdp(model: nn.Module) -> None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise GemmaStreamError("quantize= is not supported on FSDP2 (fully_shard) models: FSDP holds its own "
                               "references to the float parameters. Quantize a tensor-parallel model, or load "
                               "the float weights")


def _check_int4_columns(name: str, weight, group_size: int) -> None:
    from torch.distributed.tensor import Shard
    dims = [d for d, p in enumerate(weight.placements) if isinstance(p, Shard) and p.dim == 1]
    if len(dims) > 1:
        raise GemmaStreamError(f"{name}.weight: int4 over columns split on {len(dims)} mesh dims is not supported")
    for d in dims:
        k, ranks = weight.shape[1], weight.device_mesh.size(d)
        chunk = -(-k // ranks)  # torch's chunk rule: every shard but the last holds ceil(K / ranks) columns
        if chunk % group_size:
            raise GemmaStreamError(
                f"{name}.weight: int4 Shard(1) over {ranks} ranks gives column blocks of {chunk} of {k} columns, "
                f"not a multiple of the group size {group_size}; choose a group size dividing {chunk}, or int8")


def _distribute_meta(t: torch.Tensor, weight, attr: str):
    """A meta DTensor for quantized tensor ``attr`` of a layer whose float weight is the DTensor ``weight``."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    placements = list(weight.placements)
    if t.dim() == 1:  # int8 per-row scales: rows follow the weight, a column split is replicated
        placements = [p if isinstance(p, Shard) and p.dim == 0 else Replicate() for p in placements]
    mesh = weight.device_mesh
    local_shape, _ = compute_local_shape_and_global_offset(t.shape, mesh, placements)
    local = torch.empty(local_shape, dtype=t.dtype, device="meta")
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=t.shape, stride=t.stride())


def _meta_like(t: torch.Tensor | None, meta: dict[int, torch.Tensor]) -> torch.Tensor | None:
    if t is None:
        return None
    if id(t) not in meta:
        meta[id(t)] = torch.empty(t.shape, dtype=t.dtype, device="meta")
    return meta[id(t)]


def global_quant_targets(model: nn.Module, meta: dict[int, torch.Tensor]) -> dict[str, QuantTarget]:
    """The model's quantized destinations with meta tensors of the global shapes (the global check)."""
    from .modules import quant_targets
    return {name: QuantTarget(qt.scheme, qt.shape, _meta_like(qt.weight, meta), _meta_like(qt.scale, meta),
                              _meta_like(qt.zero, meta), qt.group_size, qt.covers)
            for name, qt in quant_targets(model).items()}


@dataclass
class RowAbsmax:
    """An int8 destination whose rank holds a column block: read as float, quantized after the all-reduce."""

    name: str
    names: list[str]             # every name of the weight (a tied embedding and LM head: one block)
    target: QuantTarget | None   # the local tensors; None when this rank's block is empty
    rows: int
    cols: int
    groups: list                 # process groups of the mesh dims that split the columns
    row_bytes: int               # float32 bytes of one global row (the same row blocks on every rank)

    def row_blocks(self) -> list[tuple[int, int]]:
        step = max(1, QUANTIZE_CHUNK_BYTES // max(1, self.row_bytes))
        return [(lo, min(self.rows, lo + step)) for lo in range(0, self.rows, step)]


def local_quant_targets(model: nn.Module, view) -> tuple[dict[str, QuantTarget], list[RowAbsmax]]:
    """Each rank's quantized destinations (local tensors, local logical shapes), and the int8 column
    blocks that need the all-reduce.  Fixes ``view`` for int4: its blocks count float columns."""
    from torch.distributed.tensor import Shard

    from .distributed_blocks import _Block
    from .modules import quant_targets
    local: dict[str, QuantTarget] = {}
    absmax: list[RowAbsmax] = []
    seen: dict[int, RowAbsmax] = {}
    for name, qt in quant_targets(model).items():
        if not _is_dtensor(qt.weight):
            local[name] = qt
            continue
        block = view.blocks[name]
        if qt.scheme == "int4":  # the packed weight's block is in bytes of two columns
            block = view.blocks[name] = _Block((block.local_shape[0], block.local_shape[1] * 2),
                                               (block.offset[0], block.offset[1] * 2))
            view.global_shape[name] = qt.shape
        # the view's local tensors: this rank's shards, or meta ones of another rank's (rank_reads)
        parts = [view.local.get(n) for n in (name, *qt.covers)] + [None]
        target = None if block.empty else QuantTarget(qt.scheme, block.local_shape, *parts[:3], qt.group_size,
                                                      qt.covers)
        col_dims = [d for d, p in enumerate(qt.weight.placements) if isinstance(p, Shard) and p.dim == 1]
        if qt.scheme == "int8" and col_dims:
            if id(qt.weight) in seen:
                seen[id(qt.weight)].names.append(name)
            else:
                mesh = qt.weight.device_mesh
                seen[id(qt.weight)] = RowAbsmax(name, [name], target, *block.local_shape,
                                                [mesh.get_group(d) for d in col_dims], math.prod(qt.shape[1:]) * 4)
                absmax.append(seen[id(qt.weight)])
            for covered in (name, *qt.covers):  # filled by load_int8_columns, not by the plan
                view.local.pop(covered, None)
        elif target is not None:
            local[name] = target
    return local, absmax


def load_int8_columns(ckpt: Checkpoint, blocks: list[RowAbsmax], routes: dict[str, list[Route] | None],
                      execute: Callable) -> int:
    """Read each int8 column block as float, a block of rows at a time: all-reduce those rows' absmax,
    quantize them; returns bytes read.

    Only one block of rows of float data is alive at a time, so the float
    block of a whole layer never is (peak: the int8 shard plus a few MiB).
    Every rank runs the same row blocks and collectives in the same order
    (decided by the global shapes), also a rank whose block is empty.
    """
    import torch.distributed as dist

    from .distributed import file_bytes
    from .quant.reference import quantize_int8_absmax
    read = 0
    for b in blocks:
        for lo, hi in b.row_blocks():
            plan, w = int8_rows_plan(ckpt, b, routes, lo, hi)
            if w is not None:
                execute(plan)
                read += sum(file_bytes(j) for j in plan.jobs)
            amax = _row_absmax(w) if w is not None else torch.zeros(hi - lo, dtype=torch.float32)
            for group in b.groups:  # nccl reduces device tensors only
                on = amax.to(comm_device(group))
                dist.all_reduce(on, op=dist.ReduceOp.MAX, group=group)
                amax = on.cpu()
            if not bool(torch.isfinite(amax).all()):
                row = int((~torch.isfinite(amax)).nonzero()[0, 0])
                raise _nan_row(ckpt, routes, b.names, lo + row)
            if w is not None:
                q, s = quantize_int8_absmax(w, amax, b.target.scale.dtype)
                b.target.weight[lo:hi].copy_(q)
                b.target.scale[lo:hi].copy_(s)
    return read


def _row_absmax(w: torch.Tensor) -> torch.Tensor:
    """Per-row max of ``|w|``; a row holding NaN or infinity gets infinity (then every rank raises)."""
    if w.shape[1] == 0:
        return torch.zeros(w.shape[0], dtype=torch.float32)
    # abs and max are exact in the block's own dtype: no float32 copy of the block
    return torch.where(torch.isfinite(w).all(dim=1), w.abs().amax(dim=1).float(), torch.inf)


def _cut_rows(route: Route, lo: int, hi: int, rows: int) -> Route | None:
    """``route`` cut to rows [lo, hi) of its target, whose rows then count from ``lo``."""
    dst = route.dst_rows or (0, rows)
    src = route.src_rows or dst
    a, b = max(dst[0], lo), min(dst[1], hi)
    if a >= b:
        return None
    return replace(route, src_rows=(src[0] + a - dst[0], src[0] + b - dst[0]), dst_rows=(a - lo, b - lo))


def int8_rows_plan(ckpt: Checkpoint, block: RowAbsmax, routes: dict[str, list[Route] | None], lo: int, hi: int,
                   device: str = "cpu"):
    """The jobs reading rows [lo, hi) of an int8 column block in the checkpoint's float dtype (float32 if
    its sources differ; on ``device``: "meta" to list reads only), and the buffer (None: empty block)."""
    if block.target is None:
        return None, None
    wanted: dict[str, list[Route]] = {}
    kinds = set()
    for record in ckpt.records:
        for r in routes.get(record.name) or ():
            cut = _cut_rows(replace(r, target=block.name), lo, hi, block.rows) if r.target in block.names else None
            if cut is not None:
                wanted.setdefault(record.name, []).append(cut)
                kinds.add(record.dtype.torch)
    dtype = next(iter(kinds)) if len(kinds) == 1 and next(iter(kinds)).is_floating_point else torch.float32
    buffer = torch.empty(hi - lo, block.cols, dtype=dtype, device=device)
    return make_plan(ckpt, {block.name: buffer}, rename=PartialRoutes(wanted), strict=False,
                     check_splits=False), buffer


def int8_columns_jobs(ckpt: Checkpoint, blocks: list[RowAbsmax], routes: dict[str, list[Route] | None]) -> list:
    """Every job ``load_int8_columns`` runs, planned on meta (``rank_reads``)."""
    return [j for b in blocks if b.target is not None for lo, hi in b.row_blocks()
            for j in int8_rows_plan(ckpt, b, routes, lo, hi, "meta")[0].jobs]


def _nan_row(ckpt: Checkpoint, routes: dict[str, list[Route] | None], targets: list[str], row: int):
    """The checkpoint tensor and row behind local row ``row`` of ``target`` (found on some rank)."""
    records = {r.name: r for r in ckpt.records}
    for name, rs in routes.items():
        for r in rs or ():
            lo, hi = r.dst_rows or (0, row + 1)
            if r.target in targets and lo <= row < hi:
                return nan_row(records[name].file, name, (r.src_rows[0] if r.src_rows else 0) + row - lo)
    return GemmaStreamError(f"{ckpt.where}: a row of {targets[0]!r} (local row {row} on this rank) holds NaN or "
                            f"infinity on another rank's columns; it cannot be quantized")
