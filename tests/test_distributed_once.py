"""read="once"'s schedule without a process group: pieces, owners, steps, and how each piece travels.

The loads themselves run in spawned groups (test_distributed.py, dist_worker.run_read_once);
these check the plan every rank computes alike from the same inputs.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torch.distributed")

from gemma_stream import distributed_once as once  # noqa: E402
from gemma_stream.dtypes import from_torch  # noqa: E402
from gemma_stream.formats.records import TensorRecord  # noqa: E402

BF16 = from_torch(torch.bfloat16)


def _records() -> list[TensorRecord]:
    shapes = {"norm": (64,), "q": (96, 64), "o": (64, 96), "scale": ()}
    out, offset = [], 0
    for name, shape in shapes.items():
        r = TensorRecord(name, BF16, shape, "model.safetensors", offset)
        out.append(r)
        offset += r.nbytes
    return out


def test_every_piece_has_one_owner_and_one_step_in_file_order():
    records = _records()
    pieces = once._pieces(records, 1000)
    assert all(p.nbytes <= 1000 or p.hi - p.lo == 1 for p in pieces)
    assert sum(p.nbytes for p in pieces) == sum(r.nbytes for r in records)
    for world in (1, 2, 3):
        owners = once._owners(pieces, world)
        assert owners == sorted(owners) and set(owners) <= set(range(world))
        steps = once._steps(pieces, owners, world, 3000)
        seen = [p for step in steps for s, ps in enumerate(step) for p in ps if owners[pieces.index(p)] == s]
        assert sorted(seen, key=pieces.index) == pieces  # each piece once, read by its owner
        assert all(sum(p.nbytes for p in ps) <= 3000 for step in steps for ps in step)


def test_replicated_pieces_are_broadcast_and_others_go_to_each_rank_by_block():
    records = {r.name: r for r in _records()}
    norm, q, o = (once._Piece(records[n], 0, records[n].shape[0]) for n in ("norm", "q", "o"))
    # rank 0 holds q's rows [0, 48) and o's columns [0, 48); rank 1 the rest; both need the whole norm
    boxes = [{"norm": (0, 64, 0, 1), "q": (0, 48, 0, 64), "o": (0, 64, 0, 48)},
             {"norm": (0, 64, 0, 1), "q": (48, 96, 0, 64), "o": (0, 64, 48, 96)}]
    step = once._Step.of([norm, q, o], boxes)
    assert [p.record.name for p in step.replicated] == ["norm"]
    assert [p.record.name for p in step.scattered] == ["q", "o"] and not step.staged
    assert step.replicated_bytes == once._aligned(norm.nbytes) == step.nbytes  # no buffer for direct reads
    to_rank1 = step.blocks_for(boxes[1])
    assert [(p.record.name, box) for p, box, _ in to_rank1] == [("q", (48, 96, 0, 64)), ("o", (0, 64, 48, 96))]
    assert once._stream_bytes(to_rank1) == once._aligned(48 * 64 * 2) + once._aligned(64 * 48 * 2)


def test_blocks_two_ranks_both_need_are_read_once_then_packed():
    records = {r.name: r for r in _records()}
    q = once._Piece(records["q"], 0, 96)
    # a 2-D mesh with a Replicate() dim: ranks 0 and 1 need the same rows, rank 2 others
    boxes = [{"q": (0, 48, 0, 64)}, {"q": (0, 48, 0, 64)}, {"q": (48, 96, 0, 64)}]
    step = once._Step.of([q], boxes)
    assert step.staged == {q.key} and step.nbytes == once._aligned(q.nbytes)
    assert not once._overlap([(0, 48, 0, 64), (48, 96, 0, 64)])
    assert once._overlap([(0, 48, 0, 32), (40, 96, 16, 64)])


def test_a_rank_that_needs_nothing_of_a_tensor_makes_it_scattered_not_broadcast():
    records = {r.name: r for r in _records()}
    scale = once._Piece(records["scale"], 0, 1)
    assert once._Step.of([scale], [{"scale": (0, 1, 0, 1)}, {"scale": (0, 1, 0, 1)}]).replicated == [scale]
    step = once._Step.of([scale], [{"scale": (0, 1, 0, 1)}, {}])
    assert step.scattered == [scale] and step.blocks_for({}) == []
