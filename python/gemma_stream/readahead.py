"""Copy mode's read-ahead: a plan's source bytes asked for before the engine reads them.

A cold load spends its first tens of milliseconds in Python (planning, allocating the model; 50 ms
for 2,065 tensors) with the disk idle, and then the engine's threads each keep one readahead
window in flight.  :func:`start_copy_readahead` starts, right after the plan is made, one
background thread that asks the kernel for the first ``READAHEAD_BYTES`` of the plan's byte
ranges with ``posix_fadvise(WILLNEED)`` in 2 MiB steps (``mapped.Prefetch``, the same thread
``mode="mmap"`` uses), front to back: the engine starts on a deep queue of reads.  Walking the
engine threads' stretches in turn instead (each thread reads one contiguous share of the jobs,
``csrc/parallel_for.h``) measured slower.  Cold, on a 2,065-tensor 1 GiB file, see
benchmarks/NOTES.md section 36 for the figures.

Whether it runs is :func:`gemma_stream.plan.choose_readahead`'s call on ``GEMMA_STREAM_PREFETCH``
(auto: when the bytes fit in ``MemAvailable`` with a fifth to spare), after "auto" has found the
files not already in the page cache (``pagecache.is_warm`` on a sample of pages), for "auto" only
on plans of 32 MiB to 2 GiB, and never with ``cache="drop"``, whose pages would come back behind
the engine.
"""

from __future__ import annotations

import os

from . import pagecache
from .config import config, mem_available
from .jobs import Plan
from .mapped import MERGE_GAP, Prefetch, join_extents
from .plan import choose_readahead

__all__ = ["start_copy_readahead", "readahead_ranges", "MIN_READAHEAD_BYTES", "MAX_AUTO_PLAN_BYTES",
           "READAHEAD_BYTES"]

#: below this many bytes to read, a load is over before a read-ahead could help
MIN_READAHEAD_BYTES = 32 << 20
#: how much of the plan is asked for: the front, while Python allocates and the engine starts.  The
#: whole plan measured no better at 1 GiB and worse at 5 GiB, where the one stream ahead of the
#: engine's first thread held back its second (0.86 on vs off on gemma7b's zip; NOTES.md 36)
READAHEAD_BYTES = 256 << 20
#: "auto" reads ahead only plans up to this size: at 1 GiB the read-ahead gained 1.1-1.6x cold on
#: every mix; at 5 GiB it measured 0.91-1.07 (the setup it overlaps is a smaller share of a larger
#: load, and the engine's own readahead keeps the disk busy).  2 GiB lies between what was measured.
MAX_AUTO_PLAN_BYTES = 2 << 30


def _extents(plan: Plan) -> list[tuple[int, int, int]]:
    """(file index, start, end) of every read the plan's jobs make."""
    return [(job.file_index, offset, offset + nbytes) for job in plan.jobs
            for offset, nbytes in job.file_ranges() if nbytes > 0]


def readahead_ranges(plan: Plan, limit: int | None = None,
                     extents: list[tuple[int, int, int]] | None = None) -> list[tuple[str, int, int, int]]:
    """The plan's source bytes as ``(path, start, end, 0)`` in file order (files in plan order),
    neighbours less than ``MERGE_GAP`` apart joined (a torch zip's local headers between storages),
    the first ``limit`` bytes of them when given.  ``extents``: :func:`_extents` of the plan, when
    the caller has them."""
    out = []
    for index, start, end in join_extents(_extents(plan) if extents is None else extents):
        if limit is not None:
            if limit <= 0:
                break
            end = min(end, start + limit)
            limit -= end - start
        out.append((plan.files[index], start, end, 0))
    return out


def start_copy_readahead(plan: Plan, cache: str, policy: str | None = None) -> Prefetch | None:
    """Start reading the plan's source bytes ahead of the engine, or None when it would not help
    (warm files, too little or, for "auto", too much to read, ``cache="drop"``, no
    ``posix_fadvise``, ``policy="off"``).
    ``cache`` is the policy the load resolved ("keep"/"drop"); ``policy`` defaults to
    ``GEMMA_STREAM_PREFETCH``."""
    policy = config().prefetch if policy is None else policy
    if cache == "drop" or policy == "off" or not hasattr(os, "posix_fadvise") or not plan.jobs:
        return None
    auto = policy == "auto"
    # first, as it is cheap (a sample of pages): a warm load, the common case, walks no job's ranges;
    # where residency cannot be known (None) the load reads ahead as for a cold file
    if auto and pagecache.is_warm(sorted({plan.files[job.file_index] for job in plan.jobs}),
                                    pagecache.RESIDENCY_SAMPLES):
        return None
    extents = _extents(plan)   # one walk of the jobs serves the size and the ranges
    nbytes = sum(end - start for _, start, end in extents)
    if policy != "on" and not MIN_READAHEAD_BYTES <= nbytes <= MAX_AUTO_PLAN_BYTES:
        return None
    if not choose_readahead(policy, nbytes, mem_available() if auto else None):
        return None
    ranges = readahead_ranges(plan, READAHEAD_BYTES, extents)
    return Prefetch(ranges, threads=1) if ranges else None
