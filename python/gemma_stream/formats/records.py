"""What every format reader produces: validated tensor records.

A reader checks every byte range against its file before it returns; the
planner and the executors trust these records (the C++ core re-checks ranges
against the file size as a second line of defence).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..dtypes import DType

__all__ = ["TensorRecord", "Checkpoint", "contiguous_strides"]


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


@dataclass(frozen=True)
class TensorRecord:
    """One tensor of a checkpoint: where its bytes are and how to read them.

    ``byte_offset`` is the absolute file offset of element ``[0, ..., 0]``.
    ``strides`` are in elements; ``None`` means C-contiguous.  ``storage``
    identifies the underlying storage when several records may share one
    (torch zip views); it is ``None`` for safetensors.
    """

    name: str
    dtype: DType
    shape: tuple[int, ...]
    file: str
    byte_offset: int
    strides: tuple[int, ...] | None = None
    storage: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def is_contiguous(self) -> bool:
        if self.strides is None:
            return True
        return all(
            stride == want or size == 1
            for size, stride, want in zip(self.shape, self.strides, contiguous_strides(self.shape))
        )


@dataclass
class Checkpoint:
    """A checkpoint as the readers see it: files, records and side information."""

    format: str                                   # "safetensors" | "torchzip"
    files: list[str]
    records: list[TensorRecord]
    metadata: dict[str, str] = field(default_factory=dict)
    #: non-tensor entries of a torch zip (name -> short repr), listed by inspect
    extras: dict[str, str] = field(default_factory=dict)

    def by_name(self) -> dict[str, TensorRecord]:
        return {r.name: r for r in self.records}
