"""Strided layout facts shared by the readers, the planner, the executors and mmap views."""

from __future__ import annotations

import math
from typing import Sequence

__all__ = ["span_elements"]


def span_elements(shape: Sequence[int], strides: Sequence[int] | None = None) -> int:
    """Elements from a view's first element to one past the last one it touches (0 when it has none).

    The end of a strided view: ``offset + span_elements(shape, strides)`` elements
    is as far as it reads, gaps between rows included.  ``strides=None`` is the
    contiguous layout (the span is the element count).

    >>> span_elements((3, 2), (1, 3))      # a transposed [2, 3]
    6
    >>> span_elements((4, 2), (8, 1))      # 2 columns of 8: rows 8 apart
    26
    """
    if math.prod(shape) == 0:
        return 0
    if strides is None:
        return math.prod(shape)
    return 1 + sum((n - 1) * s for n, s in zip(shape, strides))
