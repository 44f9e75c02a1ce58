"""read="once": each checkpoint byte read by one rank and broadcast over the process group.

The checkpoint's tensors (those the load needs) are cut into row pieces and
split, in file order, into one contiguous run per rank; each rank reads its
run with the usual plan and executor, broadcasts every piece, and copies its
own block out of every piece it receives.  Peak memory per rank: its shard
plus ``ONCE_BATCH_BYTES`` of pieces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from .distributed import _Sharded, file_bytes
from .formats.records import Checkpoint, TensorRecord
from .plan import PartialRoutes, Plan, Route, make_plan

#: bytes each rank holds in broadcast pieces at a time
ONCE_BATCH_BYTES = 64 << 20


@dataclass(frozen=True)
class _Piece:
    """Rows [lo, hi) of a checkpoint tensor: the unit read by one rank and broadcast."""

    record: TensorRecord
    lo: int
    hi: int

    @property
    def nbytes(self) -> int:
        rows = self.record.shape[0] if self.record.shape else 1
        return self.record.nbytes * (self.hi - self.lo) // max(rows, 1)

    @property
    def key(self) -> str:
        return f"{self.record.name}[{self.lo}:{self.hi}]"


def _pieces(records: list[TensorRecord], piece_bytes: int) -> list[_Piece]:
    """Records cut into row blocks of at most ``piece_bytes`` (one row at least), in the given order."""
    out = []
    for r in records:
        rows = r.shape[0] if r.shape else 1
        if not r.shape or r.nbytes <= piece_bytes:
            out.append(_Piece(r, 0, rows))
            continue
        per = max(1, piece_bytes // max(r.nbytes // rows, 1))
        out.extend(_Piece(r, lo, min(rows, lo + per)) for lo in range(0, rows, per))
    return out


def _owners(pieces: list[_Piece], world: int) -> list[int]:
    """Split the pieces, in file order, into ``world`` contiguous runs of about equal bytes."""
    total = sum(p.nbytes for p in pieces)
    owners, acc = [], 0
    for p in pieces:
        owners.append(min(world - 1, acc * world // max(total, 1)))
        acc += p.nbytes
    return owners


def read_once(ckpt: Checkpoint, checked: Plan, view: _Sharded, routes: Mapping[str, list[Route] | None], *,
               group, threads, backend, cache) -> tuple[int, int, str, str]:
    """Each rank reads its run of the checkpoint and broadcasts it; every rank keeps its own blocks."""
    import torch.distributed as dist

    from .api import _execute
    world, me = dist.get_world_size(group), dist.get_rank(group)
    mine = {j.name for j in checked.jobs}
    # every rank must walk the same pieces: ranks of plain models (a pipeline stage, an engine's own
    # layers) may need different tensors, so the pieces cover what any rank needs
    wanted: list = [None] * world
    dist.all_gather_object(wanted, sorted(mine), group=group)
    needed = set().union(*wanted)
    order = {f: i for i, f in enumerate(ckpt.files)}
    records = sorted((r for r in ckpt.records if r.name in needed), key=lambda r: (order[r.file], r.byte_offset))
    pieces = _pieces(records, max(1, ONCE_BATCH_BYTES // 4))  # finer than a batch: the runs come out even
    owners = _owners(pieces, world)
    comm = torch.device("cpu") if dist.get_backend(group) == "gloo" else _comm_device()
    read_bytes = received = 0
    backend_name, used_cache = backend, cache
    batch: list[tuple[_Piece, int]] = []
    size = 0

    def flush() -> None:
        nonlocal read_bytes, received, backend_name, used_cache, batch, size
        to_read = [p for p, owner in batch if owner == me]
        buffers = {p.key: torch.empty((p.hi - p.lo, *p.record.shape[1:]), dtype=p.record.dtype.torch)
                   for p in to_read}
        if to_read:
            piece_routes: dict[str, list[Route]] = {}
            for p in to_read:
                piece_routes.setdefault(p.record.name, []).append(
                    Route(p.key, src_rows=(p.lo, p.hi)) if p.record.shape else Route(p.key))
            own_plan = make_plan(Checkpoint(ckpt.format, ckpt.files, [r for r in records if r.name in piece_routes]),
                                 buffers, rename=PartialRoutes(piece_routes), strict=False, check_splits=False)
            _, _, backend_name, used_cache = _execute(own_plan, threads=threads, backend=backend, progress=False,
                                                      cache=cache, desc="gemma_stream read once")
            read_bytes += sum(file_bytes(j) for j in own_plan.jobs)
        for p, owner in batch:
            if p.nbytes == 0:
                continue
            buffer = buffers.get(p.key)
            flat = buffer.reshape(-1).view(torch.uint8) if buffer is not None else \
                torch.empty(p.nbytes, dtype=torch.uint8)
            flat = flat.to(comm)
            dist.broadcast(flat, src=owner if group is None else dist.get_global_rank(group, owner), group=group)
            if buffer is None:
                received += p.nbytes
            source = flat.cpu().view(p.record.dtype.torch).reshape((p.hi - p.lo, *p.record.shape[1:]))
            if p.record.name in mine:
                _copy_blocks(p, source, routes.get(p.record.name) or [], view)
        batch, size = [], 0

    for piece, owner in zip(pieces, owners):
        if batch and size + piece.nbytes > ONCE_BATCH_BYTES:
            flush()
        batch.append((piece, owner))
        size += piece.nbytes
    if batch:
        flush()
    return read_bytes, received, backend_name, used_cache


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def _copy_blocks(piece: _Piece, source: torch.Tensor, routes: list[Route], view: _Sharded) -> None:
    """Copy what each local route wants from rows [piece.lo, piece.hi) of its checkpoint tensor."""
    with torch.no_grad():
        for route in routes:
            target = view.local.get(route.target)
            if target is None:
                continue
            if not piece.record.shape:
                target.copy_(source.reshape(target.shape))
                continue
            src_rows = route.src_rows or (0, piece.record.shape[0])
            dst_rows = route.dst_rows or (0, target.shape[0] if target.dim() else 1)
            lo, hi = max(src_rows[0], piece.lo), min(src_rows[1], piece.hi)
            if lo >= hi:
                continue
            src = source[lo - piece.lo:hi - piece.lo]
            d0 = dst_rows[0] + lo - src_rows[0]
            dst = target[d0:d0 + hi - lo] if target.dim() else target
            if route.src_cols:
                src = src[:, route.src_cols[0]:route.src_cols[1]]
            if route.dst_cols:
                dst = dst[:, route.dst_cols[0]:route.dst_cols[1]]
            dst.copy_(src.reshape(dst.shape))
