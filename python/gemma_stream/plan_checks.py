"""The planner's checks that span routes: split tensors read whole, quantizable column blocks,
and the one message a strict plan raises."""

from __future__ import annotations

from .errors import GemmaStreamError
from .formats.records import Checkpoint, TensorRecord
from .jobs import Plan, QuantTarget
from .routes import Route

__all__ = ["check_quant_columns", "check_split_covers", "describe_mismatch"]


def check_quant_columns(record: TensorRecord, target: str, qt: QuantTarget, src_c: tuple[int, int],
                         dst_c: tuple[int, int]) -> None:
    """Which column blocks can be quantized on read without the rest of their rows."""
    if qt.scheme != "int4":
        # an int8 row's scale is the absmax of the whole row: a block of columns does not know it
        raise GemmaStreamError(
            f"{record.name!r} -> {target!r}: int8 quantization needs whole rows (its scale is the row's absmax); "
            f"columns [{src_c[0]}, {src_c[1]}) of {record.shape[1]} cannot be quantized on their own. "
            f"Use quantize='int4' with column blocks aligned to the group size, or shard rows (Shard(0))")
    g = qt.group_size
    if any(c % g for c in (*src_c, *dst_c)):
        raise GemmaStreamError(
            f"{record.name!r} -> {target!r}: int4 column block [{src_c[0]}, {src_c[1]}) into "
            f"[{dst_c[0]}, {dst_c[1]}) is not aligned to the group size {g}")


def check_split_covers(record: TensorRecord, routes: list[Route], plan: Plan) -> None:
    """Rows (or columns) of a split checkpoint tensor that no route reads would be silently lost."""
    if not record.shape or not routes or any(r.src_rows is None and r.src_cols is None for r in routes):
        return
    rows = [r.src_rows or (0, record.shape[0]) for r in routes]
    if all(r.src_cols is None for r in routes):
        spans = sorted(rows)
        cursor = 0
        for lo, hi in spans:
            if lo > cursor:
                break
            cursor = max(cursor, hi)
        if cursor < record.shape[0] or spans[0][0] > 0:
            plan.mismatched_keys.append(
                f"{record.name}: routes read rows {[list(s) for s in spans]} but the checkpoint tensor has "
                f"{record.shape[0]} rows; the rest would be dropped")
        return
    if len(record.shape) < 2:
        return  # route() reports the column range on a 1-D tensor
    blocks = [(*rw, *(r.src_cols or (0, record.shape[1]))) for rw, r in zip(rows, routes)]
    row_cuts = sorted({0, record.shape[0], *(b[0] for b in blocks), *(b[1] for b in blocks)})
    col_cuts = sorted({0, record.shape[1], *(b[2] for b in blocks), *(b[3] for b in blocks)})
    for r0, r1 in zip(row_cuts, row_cuts[1:]):
        for c0, c1 in zip(col_cuts, col_cuts[1:]):
            if not any(b[0] <= r0 and r1 <= b[1] and b[2] <= c0 and c1 <= b[3] for b in blocks):
                plan.mismatched_keys.append(
                    f"{record.name}: no route reads rows [{r0}, {r1}) x columns [{c0}, {c1}) of the checkpoint "
                    f"tensor {list(record.shape)}; they would be dropped")
                return


def describe_mismatch(plan: Plan, checkpoint: Checkpoint) -> str:
    parts = [f"{checkpoint.where}: checkpoint and model disagree"]
    for label, names in (("missing in checkpoint", plan.missing_keys),
                         ("unexpected in checkpoint", plan.unexpected_keys),
                         ("mismatched", plan.mismatched_keys)):
        if names:
            shown = ", ".join(names[:20]) + (f", ... ({len(names) - 20} more)" if len(names) > 20 else "")
            parts.append(f"{label} ({len(names)}): {shown}")
    if any(m.endswith("would be dropped") for m in plan.mismatched_keys):
        parts.append("routes that read part of a checkpoint tensor on purpose (one rank's shard) go inside "
                     "gs.PartialRoutes(rename)")
    return "; ".join(parts)
