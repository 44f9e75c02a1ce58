"""verify's tensor pairs: matching two checkpoints by name, and the quantized layouts of FORMATS.md."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats import Checkpoint, TensorRecord
from ..quant import dequantize

__all__ = ["Operand", "layout_problem", "dequantize_rows", "pair_operands"]


@dataclass(frozen=True)
class Operand:
    """One side of a tensor pair: a plain tensor, or a quantized weight with its scale tensors.

    ``layout`` is ``"plain"``, ``"int8"`` (``weight`` + ``weight_scaler``) or
    ``"int4"`` (``weight`` + ``weight_scale`` + ``weight_zero``), as in FORMATS.md.
    """

    records: tuple[TensorRecord, ...]
    layout: str = "plain"

    @property
    def name(self) -> str:
        return self.records[0].name

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.records)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the values it stands for (dequantized for int4: two values per byte)."""
        shape = self.records[0].shape
        return (shape[0], shape[1] * 2) if self.layout == "int4" else shape

    def describe(self) -> str:
        main = self.records[0]
        if self.layout == "int8":
            return f"int8*{self.records[1].dtype.name}"
        if self.layout == "int4":
            groups = self.records[1].shape[1] if len(self.records[1].shape) == 2 else 0
            return f"int4/g{self.shape[1] // groups if groups else '?'}*{self.records[1].dtype.name}"
        return main.dtype.name


def _quantized(records: dict[str, TensorRecord], name: str) -> Operand | None:
    main = records[name]
    if len(main.shape) != 2:
        return None
    scaler = records.get(f"{name}_scaler")
    if main.dtype.name == "i8" and scaler is not None:
        return Operand((main, scaler), "int8")
    scale, zero = records.get(f"{name}_scale"), records.get(f"{name}_zero")
    if main.dtype.name == "u8" and scale is not None and zero is not None:
        return Operand((main, scale, zero), "int4")
    return None


def layout_problem(op: Operand) -> str | None:
    """Why a quantized operand's tensors do not fit together, or None."""
    n, k = op.shape
    if op.layout == "int8" and op.records[1].shape != (n,):
        return f"{op.records[1].name} has shape {list(op.records[1].shape)}, expected [{n}]"
    if op.layout == "int4":
        scale, zero = op.records[1], op.records[2]
        if len(scale.shape) != 2 or scale.shape[0] != n or scale.shape[1] == 0 or k % scale.shape[1]:
            return f"{scale.name} has shape {list(scale.shape)}, which does not divide [{n}, {k}] into groups"
        if zero.shape != scale.shape:
            return f"{zero.name} has shape {list(zero.shape)}, expected {list(scale.shape)}"
    return None


def dequantize_rows(op: Operand, tensors: dict[str, torch.Tensor], start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of a quantized weight as float32, by the reference :func:`quant.dequantize`.

    Every FORMATS.md layout is per row, so a row range dequantizes on its own.
    """
    return dequantize(tuple(tensors[r.name][start:stop] for r in op.records))


def pair_operands(a: Checkpoint, b: Checkpoint) -> list[tuple[str, Operand | None, Operand | None]]:
    """Match the tensors of two checkpoints by name, in ``a``'s file order.

    A quantized weight meets a plain one (or one quantized differently) as a
    dequantized operand whose scale tensors are consumed; when both sides use the
    same layout their tensors are compared as stored.
    """
    records = a.by_name(), b.by_name()
    quantized = [{n: op for n in side if (op := _quantized(side, n))} for side in records]
    operands: list[dict[str, Operand]] = [{}, {}]
    consumed: list[set[str]] = [set(), set()]
    for side in (0, 1):
        for name, op in quantized[side].items():
            other = quantized[1 - side].get(name)
            if name in records[1 - side] and (other is None or other.layout != op.layout):
                operands[side][name] = op
                consumed[side].update(r.name for r in op.records[1:])
    pairs, seen = [], set()
    for side in (0, 1):
        for r in (a, b)[side].records:
            if r.name in seen or r.name in consumed[side]:
                continue
            seen.add(r.name)
            ops = [None, None]
            for s in (0, 1):
                if r.name in records[s] and r.name not in consumed[s]:
                    ops[s] = operands[s].get(r.name) or Operand((records[s][r.name],))
            pairs.append((r.name, ops[0], ops[1]))
    return pairs
