"""What the planner produces: copy jobs, quantized destinations and the plan that holds them.

Executors read :class:`CopyJob` s and nothing else of the plan; :meth:`Plan.rebind`
points jobs planned on ``meta`` tensors at the tensors allocated for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch

from .dtypes import DType, from_torch
from .errors import InternalError, MismatchError
from .layout import span_elements

__all__ = ["QuantTarget", "CopyJob", "Plan", "is_plain_cpu"]


@dataclass
class QuantTarget:
    """A quantized destination: a float [N, K] weight stored as q + scales."""

    scheme: str                  # "int8" | "int4"
    shape: tuple[int, int]       # logical float shape [N, K]
    weight: torch.Tensor         # int8 [N, K] or uint8 [N, K/2]
    scale: torch.Tensor          # [N] or [N, K/G]
    zero: torch.Tensor | None    # int4: [N, K/G]
    group_size: int = 0
    covers: tuple[str, ...] = ()  # state-dict names filled along with the weight


@dataclass
class CopyJob:
    """One executor job: a source view (or row range) into a destination region.

    ``dst``/``scale``/``zero`` are the final destination regions.  When one is
    not a contiguous CPU tensor the job is ``staged``: the driver gives the
    executor a contiguous CPU buffer and copies it over afterwards.
    """

    name: str
    target: str
    file_index: int
    src_offset: int
    src_dtype: DType
    shape: tuple[int, ...]
    src_strides: tuple[int, ...] | None
    dst: torch.Tensor
    op: str = "copy"             # "copy" | "int8" | "int4"
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    group_size: int = 0
    staged: bool = False
    first_row: int = 0           # the source view's first row in the checkpoint tensor (error messages)
    #: strided jobs: at most this many rows (indices of the largest-stride dim, dim 0) per read; 0: as
    #: many as a chunk holds, the gaps between them read too; 1: each row's segment alone, no gaps
    block_rows: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.src_dtype.itemsize

    @property
    def src_span_bytes(self) -> int:
        """Bytes from ``src_offset`` to the end of the last element read: a strided job's span,
        gaps between its rows included (``nbytes`` for a contiguous one, 0 for an empty one)."""
        return span_elements(self.shape, self.src_strides) * self.src_dtype.itemsize

    @property
    def file_bytes(self) -> int:
        """Bytes the executors read from the file for this job (the sum of ``file_ranges``)."""
        return sum(nbytes for _, nbytes in self.file_ranges())

    def file_ranges(self) -> list[tuple[int, int]]:
        """(offset, bytes) of each read this job makes: one span, or one per block of ``block_rows``."""
        if not self.block_rows or self.src_strides is None or len(self.shape) < 2:
            return [(self.src_offset, self.src_span_bytes)]
        item, step = self.src_dtype.itemsize, self.src_strides[0] * self.src_dtype.itemsize
        return [(self.src_offset + first * step,
                 span_elements((min(self.block_rows, self.shape[0] - first), *self.shape[1:]), self.src_strides) * item)
                for first in range(0, self.shape[0], self.block_rows)]

    @property
    def dst_dtype(self) -> DType:
        return from_torch(self.dst.dtype)


@dataclass
class Plan:
    files: list[str]
    jobs: list[CopyJob]
    loaded: list[str] = field(default_factory=list)            # target names filled
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched_keys: list[str] = field(default_factory=list)   # "name: why"
    skipped_keys: list[str] = field(default_factory=list)      # renamed to None / tied duplicates
    computed_keys: list[str] = field(default_factory=list)     # not filled, the map says the model computes them

    @property
    def nbytes(self) -> int:
        return sum(job.nbytes for job in self.jobs)

    @property
    def dst_nbytes(self) -> int:
        """Bytes the jobs write into host memory (weights, scales and zero points on the CPU;
        an accelerator's memory does not compete with the page cache)."""
        return self.host_nbytes()

    def host_nbytes(self, meta_on_host: bool = False) -> int:
        """``dst_nbytes``, counting destinations still on ``meta`` too when ``meta_on_host`` (a
        load that will allocate them on the CPU, asked before it does)."""
        return sum(t.nbytes for job in self.jobs for t in (job.dst, job.scale, job.zero)
                   if t is not None and (t.is_cpu or meta_on_host and t.is_meta))

    def filled(self, targets: Mapping[str, torch.Tensor]) -> set[int]:
        """``id`` of every target tensor the jobs write whole (partly written ones are missing keys)."""
        missing = set(self.missing_keys) | set(self.computed_keys)
        return {id(targets[n]) for n in self.loaded if n in targets and n not in missing}

    def rebind(self, replacement: Mapping[int, torch.Tensor]) -> None:
        """Point jobs planned on ``meta`` tensors at the tensors that replaced them.

        A load plans once, on the model as built (so a mismatch is found before
        anything is allocated), then allocates; each job's destination is the
        same view (size, strides, offset) of the replacing tensor, which
        ``modules.materialize`` lays out as the meta tensor was.
        """
        def moved(region: torch.Tensor, target: str) -> torch.Tensor:
            new = replacement.get(id(region))
            if new is not None:   # the whole tensor (almost every job)
                return new
            base = region._base
            new = replacement.get(id(base)) if base is not None else None
            if new is None:
                raise InternalError(f"gemma_stream bug: a job writes a meta tensor that was not allocated "
                                    f"({list(region.shape)})")
            if any(n > 1 and a != b for n, a, b in zip(base.shape, base.stride(), new.stride())):
                raise MismatchError(f"model tensor {target!r} has overlapping strides {list(base.stride())}: "
                                    f"it cannot be filled in parts; give it a dense layout")
            return new.as_strided(region.size(), region.stride(), region.storage_offset())

        for job in self.jobs:
            dst, scale, zero = job.dst, job.scale, job.zero
            if dst.is_meta:
                job.dst = dst = moved(dst, job.target)
            if scale is None and zero is None:
                job.staged = not is_plain_cpu(dst)
                continue
            if scale is not None and scale.is_meta:
                job.scale = scale = moved(scale, job.target)
            if zero is not None and zero.is_meta:
                job.zero = zero = moved(zero, job.target)
            job.staged = not all(is_plain_cpu(r) for r in (dst, scale, zero) if r is not None)


def is_plain_cpu(t: torch.Tensor) -> bool:
    """Contiguous host memory, which the engine writes through a raw pointer.  ``is_cpu``: a
    seventh of the cost of building ``t.device`` (60 against 440 ns, once or more per job)."""
    return t.is_cpu and t.is_contiguous()
