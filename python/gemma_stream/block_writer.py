"""Fill output tensors in bounded blocks through the ordinary plan -> executor path.

Each source tensor (a :class:`SourceUnit`) is cut into pieces of at most
``BLOCK_BYTES`` of output: a contiguous source anywhere, a strided one by rows
(recursing into rows too long for a block), a quantized one by rows (per-row
scales need whole rows).  A piece becomes a record of exactly its bytes, planned
with ``make_plan`` into a region of one reusable bounce buffer: copy and dtype
conversion jobs, or ``QuantTarget`` jobs so both executors write identical
bytes.  A strided weight to quantize is copied contiguous first and quantized
with the torch reference (the executors quantize contiguous rows only).  Once a
block is full its jobs run in one executor call and its regions are written with
``pwrite`` at their final file offsets, so the read order follows the source
while the file layout is free.

Example::

    writer = BlockWriter(ckpt, data_starts=[len(header)], backend="auto", threads=None, progress=None)
    writer.run(units, fds=[fd])
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .config import config
from .dtypes import DType
from .errors import CheckpointError, nan_row
from .executors import get_executor, run_plan_jobs
from .formats import Checkpoint, TensorRecord
from .formats.safetensors_writer import pwrite_all
from .plan import QuantTarget, Route, make_plan
from .quant.reference import quantize_int4, quantize_int8

__all__ = ["BLOCK_BYTES", "OutputTensor", "SourceUnit", "BlockWriter"]

#: bytes of output produced per executor run (the bounce buffer's size)
BLOCK_BYTES = 64 << 20
_ALIGN = 64  # bounce regions start on cache lines, which also suits every dtype


@dataclass
class OutputTensor:
    """One tensor of the output; ``offset`` is inside its shard's data buffer."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    shard: int = 0
    offset: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize


@dataclass
class SourceUnit:
    """One source record and the outputs it fills: [copy] or [q, scale(, zero)]."""

    record: TensorRecord
    op: str                      # "copy" | "int8" | "int4"
    outputs: list[OutputTensor]


@dataclass
class _Piece:
    """What one bounce block holds of a unit: ``source`` is a record for exactly those bytes
    (rows of the unit's record, of its flattened form or of a sub-view)."""

    unit: SourceUnit
    source: TensorRecord
    first: int                   # first output element (copy) or row (quantized) it fills

    @property
    def count(self) -> int:
        return self.source.shape[0]


def _rows(record: TensorRecord, lo: int, hi: int) -> TensorRecord:
    """The record of rows [lo, hi) of ``record`` (what ``Route(src_rows=...)`` reads, as its own record,
    because the planner insists that a routed tensor is read whole)."""
    stride = record.strides[0] if record.strides is not None else math.prod(record.shape[1:])
    return dataclasses.replace(record, shape=(hi - lo, *record.shape[1:]),
                               byte_offset=record.byte_offset + lo * stride * record.dtype.itemsize)


def _split(unit: SourceUnit, record: TensorRecord, first: int, budget_elems: int) -> Iterator[_Piece]:
    """Copy pieces covering ``record`` in row-major order, each at most ``budget_elems`` elements
    (a contiguous source is cut anywhere; a strided one by rows, recursing into rows too big)."""
    if record.numel == 0:
        return
    if record.is_contiguous:
        record = dataclasses.replace(record, shape=(record.numel,), strides=None)
    row = math.prod(record.shape[1:])
    if row <= budget_elems:
        per = max(1, budget_elems // row)
        for lo in range(0, record.shape[0], per):
            yield _Piece(unit, _rows(record, lo, min(record.shape[0], lo + per)), first + lo * row)
        return
    step = record.strides[0] * record.dtype.itemsize
    for i in range(record.shape[0]):
        sub = dataclasses.replace(record, shape=record.shape[1:], strides=record.strides[1:],
                                  byte_offset=record.byte_offset + i * step)
        yield from _split(unit, sub, first + i * row, budget_elems)


def _pieces(unit: SourceUnit, budget: int) -> Iterator[_Piece]:
    record = unit.record
    if unit.op == "copy":
        yield from _split(unit, record, 0, max(1, budget // unit.outputs[0].dtype.itemsize))
        return
    n, k = record.shape
    if record.is_contiguous:
        per = max(1, budget // sum(out.row_bytes for out in unit.outputs))
    else:  # staged in the source dtype, then quantized by the torch reference (~6 float temporaries)
        per = max(1, budget // (24 * k))
    for lo in range(0, n, per):
        yield _Piece(unit, _rows(record, lo, min(n, lo + per)), lo)


class BlockWriter:
    """Fills the data of output files from a checkpoint, one bounce block per executor run.

    ``data_starts[i]`` is where file ``i``'s data buffer begins (its header length);
    ``progress(bytes_read)`` returning False cancels (then ``cancelled`` is True and
    the executor driver raises).  ``bytes_read`` and ``executor`` describe the run.
    """

    def __init__(self, ckpt: Checkpoint, data_starts: list[int], backend: str, threads: int | None,
                 progress: Callable[[int], bool] | None):
        self.ckpt, self.data_starts, self.fds = ckpt, data_starts, []
        self.executor = get_executor(backend)
        cfg = config()
        self.threads, self.chunk_bytes = threads or cfg.default_threads, cfg.chunk_bytes
        self.progress, self.cancelled, self.bytes_read = progress, False, 0
        self.bounce = torch.empty(BLOCK_BYTES + 4 * _ALIGN, dtype=torch.uint8)
        self._reset()

    def _reset(self) -> None:
        self.cursor = 0
        self.jobs: list = []
        self.writes: list[tuple[torch.Tensor, OutputTensor, int]] = []   # (bytes, output, byte offset in it)
        self.deferred: list[Callable[[], None]] = []
        self.first_rows: dict[str, int] = {}                          # quantized pieces: name -> first row

    def _region(self, dtype: DType, shape: tuple[int, ...]) -> torch.Tensor:
        start = -(-self.cursor // _ALIGN) * _ALIGN
        nbytes = math.prod(shape) * dtype.itemsize
        self.cursor = start + nbytes
        return self.bounce[start:start + nbytes].view(dtype.torch).view(shape)

    def _plan(self, source: TensorRecord, targets: dict[str, torch.Tensor], route: Route,
              quant: dict[str, QuantTarget] | None = None) -> None:
        piece_ckpt = Checkpoint(self.ckpt.format, self.ckpt.files, [source])
        self.jobs += make_plan(piece_ckpt, targets, rename={source.name: route}, quant=quant).jobs

    def _add(self, piece: _Piece) -> None:
        unit, source, lo = piece.unit, piece.source, piece.first
        staged = unit.op != "copy" and not source.is_contiguous
        if unit.op == "copy":
            shapes = [(unit.outputs[0].dtype, source.shape)]
        elif staged:  # the rows in the source dtype, quantized after the run
            shapes = [(source.dtype, source.shape)]
        else:
            shapes = [(out.dtype, (piece.count, *out.shape[1:])) for out in unit.outputs]
        need = sum(math.prod(shape) * dtype.itemsize + _ALIGN for dtype, shape in shapes)
        if self.cursor and self.cursor + need > self.bounce.numel():
            self._flush()
        if need > self.bounce.numel():  # only a single quantized row larger than a block gets here
            self.bounce = torch.empty(need, dtype=torch.uint8)
        views = [self._region(dtype, shape) for dtype, shape in shapes]
        names = [out.name for out in unit.outputs]
        if unit.op == "copy":
            self._plan(source, {names[0]: views[0]}, Route(names[0]))
            self.writes.append((views[0], unit.outputs[0], lo * unit.outputs[0].dtype.itemsize))
        elif staged:
            self._plan(source, {"rows": views[0]}, Route("rows"))
            self.deferred.append(lambda: self._quantize_staged(unit, views[0], lo))
        else:
            target = QuantTarget(unit.op, source.shape, views[0], views[1], views[2] if len(views) > 2 else None,
                                 self._group_size(unit), tuple(names[1:]))
            self._plan(source, dict(zip(names, views)), Route(names[0]), {names[0]: target})
            self.first_rows[source.name] = lo
            self.writes += [(view, out, lo * out.row_bytes) for view, out in zip(views, unit.outputs)]

    @staticmethod
    def _group_size(unit: SourceUnit) -> int:
        return unit.record.shape[1] // unit.outputs[1].shape[1] if unit.op == "int4" else 0

    def _quantize_staged(self, unit: SourceUnit, rows: torch.Tensor, lo: int) -> None:
        """A strided weight: its rows were copied contiguous; quantize them with the reference."""
        finite = torch.isfinite(rows).all(dim=1)
        if not bool(finite.all()):
            bad = lo + int((~finite).nonzero()[0, 0])
            raise nan_row(unit.record.file, unit.record.name, bad)
        scale_dtype = unit.outputs[1].dtype.torch
        parts = quantize_int8(rows, scale_dtype) if unit.op == "int8" else \
            quantize_int4(rows, self._group_size(unit), scale_dtype)
        self.writes += [(part, out, lo * out.row_bytes) for part, out in zip(parts, unit.outputs)]

    def _offset_progress(self) -> Callable[[int], bool] | None:
        if self.progress is None:
            return None
        base = self.bytes_read

        def report(done: int) -> bool:
            keep_going = self.progress(base + done)
            self.cancelled = self.cancelled or not keep_going
            return keep_going
        return report

    def run(self, units: list[SourceUnit], fds: list[int]) -> None:
        self.fds = fds
        with torch.no_grad():
            for unit in units:
                for piece in _pieces(unit, BLOCK_BYTES):
                    self._add(piece)
            self._flush()

    def _flush(self) -> None:
        try:
            self.bytes_read += run_plan_jobs(self.executor, self.ckpt.files, self.jobs, threads=self.threads,
                                             chunk_bytes=self.chunk_bytes, drop_cache=False,
                                             progress=self._offset_progress()).bytes_read
        except CheckpointError as e:
            # executors count a bad row from the start of their job; a block starts at row ``first``
            first = self.first_rows.get(e.tensor)
            if e.row is None or first is None:
                raise
            raise nan_row(e.path, e.tensor, e.row + first) from None
        for finish in self.deferred:
            finish()
        for tensor, out, offset in self.writes:
            data = memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
            pwrite_all(self.fds[out.shard], data, self.data_starts[out.shard] + out.offset + offset)
        self._reset()
