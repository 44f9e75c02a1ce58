"""Where a rank's shard of a DTensor sits in the global tensor, and the routes that read it.

torch's own uneven-chunk rule (``compute_local_shape_and_global_offset``) gives
each rank's block of rows and columns; ``_StridedShard`` (FSDP2 over a
tensor-parallel dim) is accepted when it still gives the rank one block.  A
checkpoint route in global coordinates is then cut to the block
(``_local_route``); the planner does the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import GemmaStreamError
from .formats.records import TensorRecord
from .plan import Route


@dataclass
class _Block:
    """Where a rank's local tensor sits in the global one: rows [row0, row0 + rows) x cols [col0, col0 + cols)."""

    local_shape: tuple[int, ...]
    offset: tuple[int, ...]

    @property
    def empty(self) -> bool:
        return math.prod(self.local_shape) == 0


def _shard_types() -> tuple[type, ...]:
    """``Shard`` and, where torch has it, ``_StridedShard`` (FSDP2 over a tensor-parallel dim; no subclass)."""
    from torch.distributed.tensor import Shard
    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:
        return (Shard,)
    return (Shard, _StridedShard)


def _placements_supported(name: str, dt) -> None:
    from torch.distributed.tensor import Replicate
    for p in dt.placements:
        if type(p) is Replicate:
            continue
        if isinstance(p, _shard_types()) and p.dim in (0, 1):   # _StridedShard: _block checks it gives one block
            continue
        raise GemmaStreamError(
            f"model tensor {name!r}: placement {p} is not supported (Shard(0), Shard(1) and Replicate() are; "
            f"a rank's shard must be one block of rows and columns of the checkpoint tensor)")


def _block(name: str, dt, coordinate=None) -> _Block:
    """The rank's block of ``dt`` (``coordinate``: another rank's mesh coordinate, for ``rank_reads``)."""
    from torch.distributed.tensor._utils import (_compute_local_shape_and_global_offset,
                                                 compute_local_shape_and_global_offset)
    _placements_supported(name, dt)
    if coordinate is None:
        shape, offset = compute_local_shape_and_global_offset(dt.shape, dt.device_mesh, dt.placements)
        coordinate = dt.device_mesh.get_coordinate()
    else:
        shape, offset = _compute_local_shape_and_global_offset(dt.shape, dt.device_mesh.shape, list(coordinate),
                                                               dt.placements)
    if coordinate is not None and any(type(p) in _shard_types()[1:] for p in dt.placements):
        _check_one_block(name, dt, list(coordinate), tuple(shape), tuple(offset))
    return _Block(tuple(shape), tuple(offset))


def _check_one_block(name: str, dt, coordinate: list[int], shape: tuple[int, ...], offset: tuple[int, ...]) -> None:
    """A ``_StridedShard`` (FSDP2 over a tensor-parallel dim: ``(_StridedShard(0), Shard(0))``) gives a
    rank one block when the later ``Shard`` of the same dim picks one of its strided chunks; other
    orders interleave rows.  The rank's global indices per dim, as torch derives them, must be a run."""
    from torch.distributed.tensor._utils import _get_shard_size_and_offsets
    size = list(dt.shape)
    indices: dict[int, torch.Tensor] = {}
    for mesh_dim, p in enumerate(dt.placements):
        if not isinstance(p, _shard_types()):
            continue
        size[p.dim], indices[p.dim] = _get_shard_size_and_offsets(
            size[p.dim], dt.device_mesh.shape[mesh_dim], coordinate[mesh_dim], p, indices.get(p.dim),
            dt.shape[p.dim], False)
    for d, index in indices.items():
        if shape[d] and not torch.equal(index, torch.arange(offset[d], offset[d] + shape[d])):
            raise GemmaStreamError(
                f"model tensor {name!r}: placements {tuple(dt.placements)} give this rank dim-{d} indices that "
                f"are not one run ({index[:8].tolist()}...); a rank's shard must be one block of rows and "
                f"columns of the checkpoint tensor")


def _intersect(span: tuple[int, int], lo: int, n: int) -> tuple[int, int] | None:
    a, b = max(span[0], lo), min(span[1], lo + n)
    return (a, b) if a < b else None


def _local_route(record: TensorRecord, route: Route, global_shape: tuple[int, ...], block: _Block) -> Route | None:
    """``route`` (in global coordinates) cut to ``block`` and moved to the local tensor's; None if disjoint."""
    if not global_shape:
        return route
    dst_rows = route.dst_rows or (0, global_shape[0])
    src_rows = route.src_rows or (0, record.shape[0] if record.shape else 1)
    rows = _intersect(dst_rows, block.offset[0], block.local_shape[0])
    if rows is None:
        return None
    out = dict(target=route.target,
               src_rows=(src_rows[0] + rows[0] - dst_rows[0], src_rows[0] + rows[1] - dst_rows[0]),
               dst_rows=(rows[0] - block.offset[0], rows[1] - block.offset[0]))
    if len(global_shape) >= 2:
        dst_cols = route.dst_cols or (0, global_shape[1])
        src_cols = route.src_cols or (0, record.shape[1] if len(record.shape) >= 2 else 1)
        cols = _intersect(dst_cols, block.offset[1], block.local_shape[1])
        if cols is None:
            return None
        out.update(src_cols=(src_cols[0] + cols[0] - dst_cols[0], src_cols[0] + cols[1] - dst_cols[0]),
                   dst_cols=(cols[0] - block.offset[1], cols[1] - block.offset[1]))
    return Route(**out)
