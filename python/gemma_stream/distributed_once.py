"""read="once": each checkpoint byte read by one rank, and sent only to the ranks that need it.

The tensors any rank needs are cut into row pieces and split, in file order,
into one contiguous run per rank.  First the ranks
exchange, once (``all_gather_object``), the block of every checkpoint tensor
each of them copies from: its rows x columns, the bounding box of its routes.
Then the load runs in steps; in each step every rank reads the next
``ONCE_BATCH_BYTES`` of its run (all ranks read at the same time) and

- a piece that every rank needs whole (a ``Replicate()`` tensor, a plain
  buffer) is broadcast: one broadcast per reading rank and step, of its
  replicated pieces laid end to end;
- from any other piece (``Shard(0)`` rows, ``Shard(1)`` columns made
  contiguous, a 2-D mesh's block) the reader packs each rank's block, and one
  ``all_to_all_single`` per step delivers them: a rank receives its shard's
  bytes, not the checkpoint.

Each rank copies its own blocks out of what it read and received (converting
the dtype on the way); a step's all_to_all runs while the previous step's blocks
are copied out and the next step is read.  Peak memory per rank: its shard plus
about four batches (two steps of packed and received blocks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Mapping

import torch

from .distributed import _Sharded, file_bytes
from .distributed_quant import comm_device
from .formats.records import Checkpoint, TensorRecord
from .plan import PartialRoutes, Plan, Route, make_plan

#: bytes each rank reads per step (it holds about four times this: two steps of packed and received blocks)
ONCE_BATCH_BYTES = 16 << 20
#: offsets of blocks laid end to end in one buffer (so each can be viewed as its dtype)
_ALIGN = 64

Box = tuple[int, int, int, int]   # rows [r0, r1) x columns [c0, c1) of a checkpoint tensor


@dataclass(frozen=True)
class _Piece:
    """Rows [lo, hi) of a checkpoint tensor: the unit one rank reads."""

    record: TensorRecord
    lo: int
    hi: int

    @property
    def nbytes(self) -> int:
        return self.record.nbytes * (self.hi - self.lo) // max(_rows(self.record), 1)

    @property
    def key(self) -> str:
        return f"{self.record.name}[{self.lo}:{self.hi}]"

    @property
    def full(self) -> Box:
        return (self.lo, self.hi, 0, _cols(self.record))

    def cut(self, box: Box | None) -> Box | None:
        """The part of this piece inside ``box`` (None: nothing)."""
        if box is None:
            return None
        r0, r1 = max(box[0], self.lo), min(box[1], self.hi)
        return (r0, r1, box[2], box[3]) if r0 < r1 and box[2] < box[3] else None

    def whole(self, box: Box | None) -> bool:
        return self.cut(box) == self.full

    def block_bytes(self, box: Box) -> int:
        r = self.record
        return (box[1] - box[0]) * (box[3] - box[2]) * math.prod(r.shape[2:]) * r.dtype.itemsize

    def block(self, source: torch.Tensor, box: Box) -> torch.Tensor:
        """``box`` of this piece, from ``source`` (the piece's rows)."""
        if not self.record.shape:
            return source
        rows = source[box[0] - self.lo:box[1] - self.lo]
        return rows[:, box[2]:box[3]] if len(self.record.shape) >= 2 else rows

    def block_shape(self, box: Box) -> tuple[int, ...]:
        r = self.record
        if not r.shape:
            return ()
        return (box[1] - box[0], box[3] - box[2], *r.shape[2:]) if len(r.shape) >= 2 else (box[1] - box[0],)


def _rows(record: TensorRecord) -> int:
    return record.shape[0] if record.shape else 1


def _cols(record: TensorRecord) -> int:
    return record.shape[1] if len(record.shape) >= 2 else 1


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _boxes(records: list[TensorRecord], routes: Mapping[str, list[Route] | None], view: _Sharded) -> dict[str, Box]:
    """The block of each checkpoint tensor this rank copies from: the bounding box of its routes."""
    out: dict[str, Box] = {}
    for record in records:
        for route in routes.get(record.name) or ():
            if route.target not in view.local:
                continue
            rows = route.src_rows or (0, _rows(record))
            cols = route.src_cols or (0, _cols(record))
            box = out.get(record.name)
            out[record.name] = (*rows, *cols) if box is None else (
                min(box[0], rows[0]), max(box[1], rows[1]), min(box[2], cols[0]), max(box[3], cols[1]))
    return out


def _pieces(records: list[TensorRecord], piece_bytes: int) -> list[_Piece]:
    """Records cut into row blocks of at most ``piece_bytes`` (one row at least), in the given order."""
    out = []
    for r in records:
        rows = _rows(r)
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


def _steps(pieces: list[_Piece], owners: list[int], world: int, batch_bytes: int) -> list[list[list[_Piece]]]:
    """``steps[k][s]``: the pieces rank ``s`` reads in step ``k`` (its run, ``batch_bytes`` at a time)."""
    runs: list[list[list[_Piece]]] = [[] for _ in range(world)]
    size = [0] * world
    for p, s in zip(pieces, owners):
        if not runs[s] or size[s] + p.nbytes > batch_bytes:
            runs[s].append([])
            size[s] = 0
        runs[s][-1].append(p)
        size[s] += p.nbytes
    return [[run[k] if k < len(run) else [] for run in runs] for k in range(max(map(len, runs)))]


@dataclass
class _Step:
    """One rank's pieces of a step, by how they travel.

    Replicated pieces (every rank needs them whole) are read into the
    broadcast prefix of the step's buffer.  From the others each rank gets its
    block through the all_to_all: read straight into the packed send buffer,
    or, where two ranks' blocks overlap (a 2-D mesh with a ``Replicate()``
    dim), read once into the buffer (``staged``) and packed from it.
    """

    replicated: list[_Piece]
    scattered: list[_Piece]
    staged: set[str]              # keys of scattered pieces read into the buffer first
    offsets: dict[str, int]       # piece key -> byte offset in the buffer (replicated first, then staged)
    replicated_bytes: int
    nbytes: int

    @classmethod
    def of(cls, pieces: list[_Piece], boxes: list[dict[str, Box]]) -> "_Step":
        replicated, scattered, staged = [], [], set()
        for p in pieces:
            if all(p.whole(b.get(p.record.name)) for b in boxes):
                replicated.append(p)
                continue
            scattered.append(p)
            if _overlap([c for b in boxes if (c := p.cut(b.get(p.record.name))) is not None]):
                staged.add(p.key)
        offsets, at = {}, 0
        for p in replicated:
            offsets[p.key], at = at, at + _aligned(p.nbytes)
        rep = at
        for p in scattered:
            if p.key in staged:
                offsets[p.key], at = at, at + _aligned(p.nbytes)
        return cls(replicated, scattered, staged, offsets, rep, at)

    def blocks_for(self, box_of: dict[str, Box]) -> list[tuple[_Piece, Box, int]]:
        """(piece, block, offset in the packed stream) of what a rank with boxes ``box_of`` gets."""
        out, at = [], 0
        for p in self.scattered:
            cut = p.cut(box_of.get(p.record.name))
            if cut is not None:
                out.append((p, cut, at))
                at += _aligned(p.block_bytes(cut))
        return out


def _overlap(cuts: list[Box]) -> bool:
    return any(a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3]
               for i, a in enumerate(cuts) for b in cuts[i + 1:])


def _stream_bytes(blocks: list[tuple[_Piece, Box, int]]) -> int:
    return blocks[-1][2] + _aligned(blocks[-1][0].block_bytes(blocks[-1][1])) if blocks else 0


def _view(buffer: torch.Tensor, offset: int, piece: _Piece, box: Box | None = None) -> torch.Tensor:
    """The bytes at ``offset`` of ``buffer`` as the piece (or its block ``box``) in the checkpoint's dtype."""
    box = box or piece.full
    n = piece.block_bytes(box)
    return buffer[offset:offset + n].view(piece.record.dtype.torch).reshape(piece.block_shape(box))


def _routes_in(piece: _Piece, routes: list[Route] | None, view: _Sharded) -> dict[str, tuple[Route, torch.Tensor]]:
    """This rank's routes from ``piece``'s checkpoint tensor, each cut to the piece's rows and aimed at the
    rows of the local tensor it fills (so a step's plan counts only the bytes it fills: its coalescing
    budget, plan.COALESCE_WASTE, is then 1% of this step's bytes), by target key."""
    record, out = piece.record, {}
    for r in routes or ():
        target = view.local.get(r.target)
        if target is None:
            continue
        src = r.src_rows or (0, _rows(record))
        if not record.shape or (piece.lo <= src[0] and src[1] <= piece.hi):
            out[r.target] = (r, target)
            continue
        lo, hi = max(src[0], piece.lo), min(src[1], piece.hi)
        if lo < hi:
            d0 = (r.dst_rows or (0, 0))[0] + lo - src[0]
            key = f"{r.target}@{piece.key}"
            out[key] = (replace(r, target=key, src_rows=(lo, hi), dst_rows=None), target[d0:d0 + hi - lo])
    return out


def read_once(ckpt: Checkpoint, checked: Plan, view: _Sharded, routes: Mapping[str, list[Route] | None], *,
              group, threads, backend, cache) -> tuple[int, int, str, str]:
    """Each rank reads its run of the checkpoint and sends every rank its blocks; returns
    (bytes read, bytes received, backend, cache)."""
    import torch.distributed as dist

    from .api import _execute
    world, me = dist.get_world_size(group), dist.get_rank(group)
    # the same pieces on every rank, though ranks (pipeline stages, plain layers) may need different tensors
    wanted: list = [None] * world
    dist.all_gather_object(wanted, sorted({j.name for j in checked.jobs}), group=group)
    needed = set().union(*wanted)
    order = {f: i for i, f in enumerate(ckpt.files)}
    records = sorted((r for r in ckpt.records if r.name in needed), key=lambda r: (order[r.file], r.byte_offset))
    boxes: list[dict[str, Box]] = [{} for _ in range(world)]
    dist.all_gather_object(boxes, _boxes(records, routes, view), group=group)
    pieces = _pieces(records, max(1, ONCE_BATCH_BYTES // 4))  # finer than a batch: the runs come out even
    comm = comm_device(group)
    read_bytes = received = 0
    backend_name, used_cache = backend, cache
    pending: _Exchange | None = None

    def global_rank(r: int) -> int:
        return r if group is None else dist.get_global_rank(group, r)

    for step_pieces in _steps(pieces, _owners(pieces, world), world, ONCE_BATCH_BYTES):
        steps = [_Step.of(ps, boxes) for ps in step_pieces]
        mine = steps[me]
        sends = [mine.blocks_for(boxes[r]) if r != me else [] for r in range(world)]
        buffer = torch.empty(mine.nbytes, dtype=torch.uint8)
        packed = torch.empty(sum(map(_stream_bytes, sends)), dtype=torch.uint8)
        if mine.replicated or mine.scattered:
            plan = _step_plan(ckpt, records, mine, sends, buffer, packed, routes, view)
            _, _, backend_name, used_cache = _execute(plan, threads=threads, backend=backend, progress=False,
                                                      cache=cache, desc="gemma_stream read once")
            read_bytes += sum(file_bytes(j) for j in plan.jobs)
        for p in mine.replicated + [p for p in mine.scattered if p.key in mine.staged]:
            _copy_blocks(p, p.full, _view(buffer, mine.offsets[p.key], p), routes.get(p.record.name), view)
        # this step's exchange runs (gloo's threads) while the last one's blocks are copied out
        # and the next step is read: one in flight, so about two steps of buffers are alive
        exchange = _start_exchange(steps, boxes, sends, buffer, packed, me, comm, group)
        received += _finish_exchange(pending, routes, view)
        pending = exchange
        for s, step in enumerate(steps):  # replicated pieces: one broadcast per reading rank
            if not step.replicated_bytes:
                continue
            flat = (buffer[:step.replicated_bytes] if s == me else
                    torch.empty(step.replicated_bytes, dtype=torch.uint8)).to(comm)
            dist.broadcast(flat, src=global_rank(s), group=group)
            if s != me:
                flat = flat.cpu()
                for p in step.replicated:
                    _copy_blocks(p, p.full, _view(flat, step.offsets[p.key], p), routes.get(p.record.name), view)
                    received += p.nbytes
    received += _finish_exchange(pending, routes, view)
    return read_bytes, received, backend_name, used_cache


def _step_plan(ckpt: Checkpoint, records: list[TensorRecord], mine: _Step, sends, buffer: torch.Tensor,
               packed: torch.Tensor, routes: Mapping[str, list[Route] | None], view: _Sharded) -> Plan:
    """The reads of one step: replicated and staged pieces into ``buffer``; every other rank's block
    straight into its place in ``packed``; this rank's own blocks straight into its local tensors."""
    targets: dict[str, torch.Tensor] = {}
    wanted: dict[str, list[Route]] = {}
    for p in mine.replicated + mine.scattered:
        if p.key in mine.offsets:
            targets[p.key] = _view(buffer, mine.offsets[p.key], p)
            wanted.setdefault(p.record.name, []).append(
                Route(p.key, src_rows=(p.lo, p.hi)) if p.record.shape else Route(p.key))
        else:
            for key, (route, tensor) in _routes_in(p, routes.get(p.record.name), view).items():
                targets[key] = tensor
                wanted.setdefault(p.record.name, []).append(route)
    base = 0
    for r, blocks in enumerate(sends):
        for p, box, at in blocks:
            if p.key in mine.staged:
                continue
            key = f"{p.key}>{r}"
            targets[key] = _view(packed, base + at, p, box)
            cols = {"src_cols": (box[2], box[3])} if len(p.record.shape) >= 2 else {}
            wanted.setdefault(p.record.name, []).append(
                Route(key, src_rows=(box[0], box[1]), **cols) if p.record.shape else Route(key))
        base += _stream_bytes(blocks)
    return make_plan(Checkpoint(ckpt.format, ckpt.files, [r for r in records if r.name in wanted]),
                     targets, rename=PartialRoutes(wanted), strict=False, check_splits=False)


@dataclass
class _Exchange:
    """An all_to_all in flight: what this rank will find where in ``into``."""

    work: object
    into: torch.Tensor
    recvs: list[list[tuple[_Piece, Box, int]]]
    recv_sizes: list[int]
    keep: torch.Tensor            # the send buffer, alive until the collective is done


def _start_exchange(steps: list[_Step], boxes: list[dict[str, Box]], sends, buffer: torch.Tensor,
                    packed: torch.Tensor, me: int, comm, group) -> _Exchange | None:
    """Start one all_to_all: this rank's packed blocks out, its blocks of the others' pieces in."""
    import torch.distributed as dist
    world = len(steps)
    if not any(steps[s].blocks_for(boxes[r]) for s in range(world) for r in range(world) if r != s):
        return None  # the same answer on every rank: nobody calls the collective
    recvs = [steps[s].blocks_for(boxes[me]) if s != me else [] for s in range(world)]
    send_sizes, recv_sizes = [_stream_bytes(b) for b in sends], [_stream_bytes(b) for b in recvs]
    base = 0
    for r, blocks in enumerate(sends):  # staged pieces: pack each rank's block now
        for p, box, at in blocks:
            if p.key in steps[me].staged:
                _view(packed, base + at, p, box).copy_(p.block(_view(buffer, steps[me].offsets[p.key], p), box))
        base += send_sizes[r]
    into = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=comm)
    packed = packed.to(comm)
    work = dist.all_to_all_single(into, packed, recv_sizes, send_sizes, group=group, async_op=True)
    return _Exchange(work, into, recvs, recv_sizes, packed)


def _finish_exchange(x: _Exchange | None, routes: Mapping[str, list[Route] | None], view: _Sharded) -> int:
    """Wait for the all_to_all and copy this rank's blocks out; returns the bytes received."""
    if x is None:
        return 0
    x.work.wait()
    into = x.into.cpu()
    got, base = 0, 0
    for s, blocks in enumerate(x.recvs):
        for p, box, at in blocks:
            _copy_blocks(p, box, _view(into, base + at, p, box), routes.get(p.record.name), view)
            got += p.block_bytes(box)
        base += x.recv_sizes[s]
    return got


def _copy_blocks(piece: _Piece, box: Box, source: torch.Tensor, routes: list[Route] | None, view: _Sharded) -> None:
    """Copy what each local route wants from ``source``: rows x columns ``box`` of the checkpoint tensor."""
    record = piece.record
    with torch.no_grad():
        for route in routes or ():
            target = view.local.get(route.target)
            if target is None:
                continue
            if not record.shape:
                target.copy_(source.reshape(target.shape))
                continue
            src_rows = route.src_rows or (0, record.shape[0])
            dst_rows = route.dst_rows or (0, target.shape[0] if target.dim() else 1)
            lo, hi = max(src_rows[0], box[0]), min(src_rows[1], box[1])
            if lo >= hi:
                continue
            src = source[lo - box[0]:hi - box[0]]
            d0 = dst_rows[0] + lo - src_rows[0]
            dst = target[d0:d0 + hi - lo] if target.dim() else target
            if len(record.shape) >= 2:
                cols = route.src_cols or (0, record.shape[1])
                src = src[:, cols[0] - box[2]:cols[1] - box[2]]
            if route.dst_cols:
                dst = dst[:, route.dst_cols[0]:route.dst_cols[1]]
            dst.copy_(src.reshape(dst.shape))
