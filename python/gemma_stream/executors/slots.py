"""Jobs cut into ring slots: the staging pipeline's packing (``staging.py`` runs it).

Jobs go in file order; one larger than the room left in a slot is split by rows
(a row range of a source is a job at a later offset: contiguous sources by rows
of elements, strided ones by their first stride); quantized jobs keep whole
rows, so their scales and int4 groups are those of the unsplit tensor.

    batches = pack(plan.jobs, 32 << 20)   # [[CopyJob, ...], ...], each within 32 MiB of staged bytes
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..plan import CopyJob

__all__ = ["carve", "need", "pack", "row_count"]

_ALIGN = 64  # staged regions start on cache lines, which also suits every dtype


def _regions(job: CopyJob) -> list[torch.Tensor]:
    return [t for t in (job.dst, job.scale, job.zero) if t is not None]


def _round(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def need(job: CopyJob) -> int:
    """Slot bytes the job's staged regions take."""
    return sum(_round(t.numel() * t.element_size()) for t in _regions(job))


def row_count(job: CopyJob) -> int:
    return job.shape[0] if job.shape else 1


def _fitting_rows(job: CopyJob, space: int) -> int:
    """How many leading rows of ``job`` fit in ``space`` slot bytes."""
    rows = row_count(job)
    if len(job.shape) == 0 or rows <= 1:
        return rows if need(job) <= space else 0
    per_row = sum(t.numel() * t.element_size() for t in _regions(job)) // rows
    usable = space - _ALIGN * len(_regions(job))
    return max(0, min(rows, usable // per_row)) if per_row else rows


def _split(job: CopyJob, rows: int) -> tuple[CopyJob, CopyJob]:
    """``job`` as its first ``rows`` rows and the rest, each at its own source offset."""
    item = job.src_dtype.itemsize
    step = (math.prod(job.shape[1:]) if job.src_strides is None else job.src_strides[0]) * item

    def part(lo: int, hi: int) -> CopyJob:
        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[lo:hi]
        return dataclasses.replace(job, src_offset=job.src_offset + lo * step, shape=(hi - lo, *job.shape[1:]),
                                   dst=cut(job.dst), scale=cut(job.scale), zero=cut(job.zero),
                                   first_row=job.first_row + lo)
    return part(0, rows), part(rows, row_count(job))


def pack(jobs: list[CopyJob], slot_bytes: int) -> list[list[CopyJob]]:
    """Jobs in file order, cut by rows into batches of at most ``slot_bytes`` of staged regions.

    A single row larger than a slot (a pathological shape) gets a batch of its
    own; the ring grows to hold it.
    """
    batches: list[list[CopyJob]] = []
    current: list[CopyJob] = []
    used = 0
    for job in sorted(jobs, key=lambda j: (j.file_index, j.src_offset)):
        if math.prod(job.shape) == 0:
            continue
        rest: CopyJob | None = job
        while rest is not None:
            size = need(rest)
            if used + size <= slot_bytes:
                current.append(rest)
                used += size
                break
            rows = _fitting_rows(rest, slot_bytes - used)
            if rows == 0 and not current:
                rows = 1
            if rows:
                head, rest = (rest, None) if rows >= row_count(rest) else _split(rest, rows)
                current.append(head)
            batches.append(current)
            current, used = [], 0
    if current:
        batches.append(current)
    return batches


def carve(buffer: torch.Tensor, batch: list[CopyJob]) -> tuple[list[CopyJob], list[tuple]]:
    """The batch's jobs rewritten to fill views of ``buffer``; and (view, final region, name) to upload."""
    jobs, pairs, offset = [], [], 0

    for job in batch:
        def stage(region: torch.Tensor | None) -> torch.Tensor | None:
            nonlocal offset
            if region is None:
                return None
            nbytes = region.numel() * region.element_size()
            view = buffer[offset:offset + nbytes].view(region.dtype).view(region.shape)
            offset += _round(nbytes)
            pairs.append((view, region, job.name))
            return view
        jobs.append(dataclasses.replace(job, dst=stage(job.dst), scale=stage(job.scale), zero=stage(job.zero),
                                        staged=False))
    return jobs, pairs
