"""Planner: checkpoint records + destination tensors -> copy jobs.

All policy lives here: renames and fused row ranges, tied weights, dtype
conversion rules, quantize-on-read, strictness, and the page-cache decisions
(``choose_cache``, ``choose_readahead``) taken on facts the caller measured.
The planner never reads file bytes and never allocates destination memory;
executors never decide policy.  Routes and ``rename=`` live in
:mod:`~gemma_stream.routes`, the plan's data types in :mod:`~gemma_stream.jobs`,
the cross-route checks in :mod:`~gemma_stream.plan_checks`; their names are
importable from here too.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from .dtypes import CONVERTIBLE, from_torch
from .errors import MismatchError, UsageError
from .formats.records import Checkpoint, TensorRecord, contiguous_strides
from .jobs import CopyJob, Plan, QuantTarget, is_plain_cpu as _is_plain_cpu
from .plan_checks import check_quant_columns, check_split_covers, describe_mismatch
from .routes import PartialRoutes, Rename, RenameResult, Route, normalize_rename

__all__ = ["Route", "PartialRoutes", "QuantTarget", "CopyJob", "Plan", "choose_cache", "choose_readahead",
           "COLD_DROP_BYTES", "drops_if_cold", "make_plan", "normalize_rename", "zero_copy_jobs", "Rename",
           "RenameResult", "CACHE_POLICIES", "READAHEAD_POLICIES"]


CACHE_POLICIES = ("auto", "keep", "drop")

#: ``cache="auto"`` drops a cold plan larger than this when one process reads it (``choose_cache``'s
#: ``cold``): at 2 GiB a dropping cold load beat a kept one with its read-ahead on every mix and
#: format, at 1 GiB the kept load with its read-ahead is 1.1-1.6x the bound (NOTES.md 41)
COLD_DROP_BYTES = 1 << 30


def drops_if_cold(plan: Plan) -> bool:
    """Whether ``cache="auto"`` drops this plan when its files are cold and one process reads them:
    it reads more than ``COLD_DROP_BYTES``.  Callers ask this before they sample the page cache."""
    return plan.nbytes > COLD_DROP_BYTES


def choose_cache(plan: Plan, cache: str, available: int | None, dst_nbytes: int | None = None, *,
                 cold: bool = False) -> str:
    """``cache="auto"`` -> "keep" or "drop" for this plan.

    "drop" when the bytes read and the bytes written cannot both stay in memory
    (``available``: MemAvailable, which counts the file's own cached pages):
    then keeping the file would only push out the model's first pages or other
    files, and dropping hands the file's pages straight to the model's page
    faults (on a 24 GiB VM, a cold 7B load took 11.7 s with drop against 14.1 s
    with keep; benchmarks/NOTES.md, section 12).  "drop" too when ``cold``
    (the caller found the files out of the page cache and no other process
    of a job about to read them) and the plan reads more than
    ``COLD_DROP_BYTES``: keeping a large cold file costs a second model's
    worth of fresh memory while the load runs, which dropping recycles into
    the model's own pages (a cold 5 GiB load ran 1.9x faster with drop on
    this project's VM, 1.1-1.9x at 2 GiB; NOTES.md 41); a file that was warm stays cached.
    "keep" otherwise, so a file that fits stays cached for the next load.
    "keep"/"drop" pass through.  ``dst_nbytes``: the bytes written, when the
    caller counted them otherwise than ``plan.dst_nbytes`` (destinations still
    on ``meta`` that the load will allocate).

    >>> choose_cache(plan_of_5_gib, "auto", available=20 << 30, cold=True)
    'drop'
    """
    if cache not in CACHE_POLICIES:
        raise UsageError(f"cache must be 'auto', 'keep' or 'drop', not {cache!r}")
    if cache != "auto":
        return cache
    if cold and drops_if_cold(plan):
        return "drop"
    if available is None:
        return "keep"
    written = plan.dst_nbytes if dst_nbytes is None else dst_nbytes
    return "drop" if plan.nbytes + written > available else "keep"


READAHEAD_POLICIES = ("auto", "on", "off")


def choose_readahead(policy: str, mapped_bytes: int, available: int | None, *, supported: bool = True) -> bool:
    """Whether a load reads its bytes ahead in the background (GEMMA_STREAM_PREFETCH): ``mode="mmap"``'s
    mapped ranges, or ``mode="copy"``'s plan (``readahead.py``, which also never reads ahead with
    ``cache="drop"``).

    ``mapped_bytes``: the byte ranges joined; ``available``: MemAvailable
    (None where unknown); ``supported``: the platform can ask for pages ahead
    (``posix_fadvise``; macOS and Windows cannot).  "auto" reads ahead only when
    the ranges fit in ``available`` with a fifth to spare: otherwise the
    read-ahead would push out its own first pages, or the rest of the
    system's, before they are used.  A warm load never gets this far: its
    callers ask ``pagecache.is_warm`` first, on a sample of pages, before they
    join a range (a warm read-ahead only competes with the first touches,
    0.91x on a warm many-small zip; a whole-file mincore cost as much as the
    rest of a warm 1 GiB load, NOTES.md 38).  "on" always, "off" never; nothing
    mapped, nothing to read.

    >>> choose_readahead("auto", mapped_bytes=5 << 30, available=16 << 30)
    True
    >>> choose_readahead("auto", mapped_bytes=15 << 30, available=16 << 30)
    False
    """
    if policy not in READAHEAD_POLICIES:
        raise UsageError(f"read-ahead policy must be 'auto', 'on' or 'off', not {policy!r}")
    if policy == "off" or mapped_bytes <= 0 or not supported:
        return False
    if policy == "on":
        return True
    return available is not None and mapped_bytes <= 0.8 * available


def _rows(span: tuple[int, int] | None, total: int, what: str, unit: str = "rows") -> tuple[int, int]:
    if span is None:
        return (0, total)
    lo, hi = span
    if not 0 <= lo < hi <= total:
        # a range past the end would read another tensor's bytes or write past the destination
        raise MismatchError(f"{what}: {unit} [{lo}, {hi}) are not a non-empty range inside its {total} {unit}")
    return lo, hi


def _cols(span: tuple[int, int] | None, shape: tuple[int, ...], what: str) -> tuple[int, int]:
    """Column range [lo, hi) of dim 1; (0, 1) for tensors of fewer than two dims (no columns)."""
    if len(shape) < 2:
        if span is not None:
            raise MismatchError(f"{what}: a column range needs a tensor of 2 or more dims, not shape {list(shape)}")
        return (0, 1)
    return _rows(span, shape[1], what, "columns")


#: A column slice of a row-major tensor is one segment per row, planned as one
#: strided job.  Its rows are read in blocks, gaps included (fewest reads), only
#: when the gap is under COALESCE_GAP_BYTES (the device reads those pages anyway)
#: and the gaps fit in what is left of a budget of COALESCE_WASTE times the bytes
#: of all the plan's targets, spent in plan order: a rank reads at most 1% more
#: than its own bytes.  Otherwise the job has ``block_rows=1`` and the executors
#: read each row's segment alone, skipping the gaps (benchmarks/NOTES.md,
#: sections 16, 18 and 21).  ``COALESCE_GAP_BYTES = 0`` always reads per row.
COALESCE_GAP_BYTES = 4096
COALESCE_WASTE = 0.01


def _block_shape(shape: tuple[int, ...], rows: tuple[int, int] | None,
                 cols: tuple[int, int] | None) -> tuple[int, ...]:
    out = list(shape)
    if rows is not None:
        out[0] = rows[1] - rows[0]
    if cols is not None:
        out[1] = cols[1] - cols[0]
    return tuple(out)


class _Planner:
    def __init__(self, checkpoint: Checkpoint, targets: Mapping[str, torch.Tensor],
                 quant: Mapping[str, QuantTarget]):
        self.ckpt = checkpoint
        self.targets = targets
        self.quant = quant
        self.file_index = {f: i for i, f in enumerate(checkpoint.files)}
        # names of one tied tensor share a group; coverage is tracked per group
        self.group_of: dict[str, int] = {name: id(tensor) for name, tensor in targets.items()}
        # per group: written blocks (row_lo, row_hi, col_lo, col_hi, source)
        self.covered: dict[int, list[tuple[int, int, int, int, str]]] = {}
        self.complete: set[int] = set()   # groups one whole-tensor job fills (finish need not add them up)
        self.plan = Plan(files=list(checkpoint.files), jobs=[])

    # ---- coverage -------------------------------------------------------
    def _claim(self, target: str, rows: tuple[int, int], source: str,
               cols: tuple[int, int] = (0, 1)) -> bool:
        """Record that block ``rows`` x ``cols`` of ``target`` is written; False if already written
        (tied duplicate)."""
        group = self.group_of[target]
        spans = self.covered.get(group)
        if spans is None:   # the group's first block (almost every claim): nothing to overlap
            self.covered[group] = [(rows[0], rows[1], cols[0], cols[1], source)]
            return True
        for lo, hi, clo, chi, other in spans:
            if (lo, hi, clo, chi) == (*rows, *cols):
                return False
            if lo < rows[1] and rows[0] < hi and clo < cols[1] and cols[0] < chi:
                where = f"rows [{rows[0]}, {rows[1]})" + ("" if cols == (clo, chi) == (0, 1) else
                                                         f" x columns [{cols[0]}, {cols[1]})")
                theirs = f"rows [{lo}, {hi})" + ("" if (clo, chi) == (0, 1) else f" x columns [{clo}, {chi})")
                raise MismatchError(f"tensor {source!r} writes {where} of {target!r}, which overlap "
                                    f"{theirs} written by {other!r}")
        spans.append((rows[0], rows[1], cols[0], cols[1], source))
        return True

    def _fully_covered(self, name: str, total_rows: int, total_cols: int) -> bool:
        # claimed blocks never overlap (_claim refuses), so their areas add up to the union's
        spans = self.covered.get(self.group_of[name], [])
        area = sum((hi - lo) * (chi - clo) for lo, hi, clo, chi, _ in spans)
        return bool(spans) and area >= total_rows * total_cols

    # ---- jobs -----------------------------------------------------------
    def route(self, record: TensorRecord, route: Route) -> None:
        if route.src_rows is None and route.dst_rows is None and route.src_cols is None and route.dst_cols is None:
            return self.whole(record, route.target)
        p = self.plan
        if route.target in self.quant and record.dtype.is_float:
            return self._quant_job(record, route, self.quant[route.target])
        target = self.targets.get(route.target)
        if target is None:
            p.unexpected_keys.append(record.name)
            return
        tshape = tuple(target.shape)
        src_lo, src_hi = _rows(route.src_rows, record.shape[0] if record.shape else 1,
                               f"checkpoint tensor {record.name!r}")
        dst_lo, dst_hi = _rows(route.dst_rows, tshape[0] if tshape else 1,
                               f"{record.name!r} -> model tensor {route.target!r}")
        src_c = _cols(route.src_cols, record.shape, f"checkpoint tensor {record.name!r}")
        dst_c = _cols(route.dst_cols, tshape, f"{record.name!r} -> model tensor {route.target!r}")
        src_shape = _block_shape(record.shape, (src_lo, src_hi) if route.src_rows else None,
                                 src_c if route.src_cols else None)
        dst_shape = _block_shape(tshape, (dst_lo, dst_hi) if route.dst_rows else None,
                                 dst_c if route.dst_cols else None)
        if src_shape != dst_shape:
            p.mismatched_keys.append(
                f"{record.name}: checkpoint shape {list(src_shape)} vs model {route.target!r} shape {list(dst_shape)}")
            return
        if not self._convertible(record, route.target, target):
            return
        if not self._claim(route.target, (dst_lo, dst_hi) if tshape else (0, 1), record.name, dst_c):
            p.skipped_keys.append(record.name)
            return
        region = target[dst_lo:dst_hi] if route.dst_rows else target
        if route.dst_cols:
            region = region[:, dst_c[0]:dst_c[1]]
        if route.src_cols and src_c != (0, record.shape[1]):
            self._column_jobs(record, route, (src_lo, src_hi), src_c, region)
        else:
            offset, strides = self._source(record, src_lo if route.src_rows else 0)
            p.jobs.append(CopyJob(name=record.name, target=route.target, file_index=self.file_index[record.file],
                                  src_offset=offset, src_dtype=record.dtype, shape=tuple(src_shape),
                                  src_strides=strides, dst=region, staged=not _is_plain_cpu(region)))
        p.loaded.append(route.target)

    def whole(self, record: TensorRecord, name: str) -> None:
        """``record`` whole into the whole target ``name``: every route of a load without
        ``rename``, and almost every route of one with it (a few microseconds a tensor less
        than the general case of :meth:`route`; benchmarks/NOTES.md 44)."""
        p = self.plan
        qt = self.quant.get(name)
        if qt is not None and record.dtype.is_float:
            return self._quant_job(record, Route(name), qt)
        target = self.targets.get(name)
        if target is None:
            p.unexpected_keys.append(record.name)
            return
        shape = record.shape
        if shape != target.shape:   # a tuple against a torch.Size: compared as tuples
            p.mismatched_keys.append(
                f"{record.name}: checkpoint shape {list(shape)} vs model {name!r} shape {list(target.shape)}")
            return
        if not self._convertible(record, name, target):
            return
        group = self.group_of[name]
        if group in self.complete:   # a tied name already filled whole: the same claim again
            p.skipped_keys.append(record.name)
            return
        if not self._claim(name, (0, shape[0]) if shape else (0, 1), record.name,
                           (0, shape[1]) if len(shape) >= 2 else (0, 1)):
            p.skipped_keys.append(record.name)
            return
        self.complete.add(group)
        offset, strides = (record.byte_offset, None) if record.strides is None else self._source(record, 0)
        p.jobs.append(CopyJob(name=record.name, target=name, file_index=self.file_index[record.file],
                              src_offset=offset, src_dtype=record.dtype, shape=shape, src_strides=strides,
                              dst=target, staged=not _is_plain_cpu(target)))
        p.loaded.append(name)

    def _convertible(self, record: TensorRecord, name: str, target: torch.Tensor) -> bool:
        """Whether ``record``'s dtype can be written into ``target``'s (the same, or floats
        converted); a mismatch is noted otherwise."""
        dst_dtype = from_torch(target.dtype)
        if record.dtype is dst_dtype or record.dtype == dst_dtype or \
                (record.dtype.name in CONVERTIBLE and dst_dtype.name in CONVERTIBLE):
            return True
        self.plan.mismatched_keys.append(f"{record.name}: checkpoint dtype {record.dtype.torch} cannot be loaded "
                                         f"into {name!r} of dtype {target.dtype}")
        return False

    def _column_jobs(self, record: TensorRecord, route: Route, rows: tuple[int, int], cols: tuple[int, int],
                     region: torch.Tensor) -> None:
        """Columns ``cols`` of rows ``rows``: one strided job, its rows read in blocks or apart
        (COALESCE_GAP_BYTES, COALESCE_WASTE)."""
        strides = record.strides or contiguous_strides(record.shape)
        item = record.dtype.itemsize
        offset = record.byte_offset + (rows[0] * strides[0] + cols[0] * strides[1]) * item
        shape = (rows[1] - rows[0], cols[1] - cols[0], *record.shape[2:])
        segment = math.prod(shape[1:])
        inner_contiguous = strides[1:] == contiguous_strides(record.shape)[1:]
        gap_bytes = (strides[0] - segment) * item
        base = dict(name=record.name, target=route.target, file_index=self.file_index[record.file],
                    src_dtype=record.dtype)
        budget = getattr(self, "_gap_budget", None)
        if budget is None:  # once per plan: the bytes the gaps may add up to
            tensors = {id(t): t for t in self.targets.values()}
            budget = COALESCE_WASTE * sum(t.numel() * t.element_size() for t in tensors.values())
        waste = gap_bytes * (shape[0] - 1)
        coalesce = gap_bytes < COALESCE_GAP_BYTES and waste <= budget
        self._gap_budget = budget - waste if coalesce else budget
        # one strided job either way; apart, the executors read each row's segment on its own (one
        # pread per row in the engine, no job per row: benchmarks/NOTES.md, section 21)
        apart = inner_contiguous and shape[0] > 1 and not coalesce
        self.plan.jobs.append(CopyJob(**base, src_offset=offset, shape=shape, src_strides=tuple(strides),
                                      dst=region, staged=not _is_plain_cpu(region), first_row=rows[0],
                                      block_rows=1 if apart else 0))

    def _source(self, record: TensorRecord, first_row: int) -> tuple[int, tuple[int, ...] | None]:
        if record.is_contiguous:
            row_elems = math.prod(record.shape[1:])
            return record.byte_offset + first_row * row_elems * record.dtype.itemsize, None
        return record.byte_offset + first_row * record.strides[0] * record.dtype.itemsize, record.strides

    def _quant_job(self, record: TensorRecord, route: Route, qt: QuantTarget) -> None:
        p = self.plan
        n, k = qt.shape
        src_lo, src_hi = _rows(route.src_rows, record.shape[0] if record.shape else 1,
                               f"checkpoint tensor {record.name!r}")
        dst_lo, dst_hi = _rows(route.dst_rows, n, f"{record.name!r} -> quantized model tensor {route.target!r}")
        src_c = _cols(route.src_cols, record.shape, f"checkpoint tensor {record.name!r}")
        dst_c = _cols(route.dst_cols, qt.shape, f"{record.name!r} -> quantized model tensor {route.target!r}")
        src_shape = _block_shape(record.shape, (src_lo, src_hi), src_c if route.src_cols else None)
        dst_shape = (dst_hi - dst_lo, dst_c[1] - dst_c[0] if route.dst_cols else k)
        if src_shape != dst_shape:
            p.mismatched_keys.append(
                f"{record.name}: checkpoint shape {list(src_shape)} vs quantized model {route.target!r} "
                f"shape {list(dst_shape)}")
            return
        if record.dtype.name not in CONVERTIBLE:
            p.mismatched_keys.append(f"{record.name}: cannot quantize dtype {record.dtype.torch}")
            return
        if not record.is_contiguous:
            p.mismatched_keys.append(
                f"{record.name}: a strided (non-contiguous) view cannot be quantized on read; "
                f"re-save the checkpoint with contiguous tensors")
            return
        sliced = (route.src_cols and src_c != (0, record.shape[1])) or (route.dst_cols and dst_c != (0, k))
        if sliced:
            check_quant_columns(record, route.target, qt, src_c, dst_c)
        def own_cols(t: torch.Tensor) -> tuple[int, int]:
            # the same block in a stored tensor's own columns: q [N, K] or [N, K/2], scales [N] or [N, K/G]
            return (dst_c[0] * t.shape[1] // k, dst_c[1] * t.shape[1] // k) if t.dim() >= 2 else (0, 1)

        if not self._claim(route.target, (dst_lo, dst_hi), record.name, own_cols(qt.weight)):
            p.skipped_keys.append(record.name)
            return
        for covered in qt.covers:  # the scales (and zeros) are written by the same job
            if covered in self.group_of:
                self._claim(covered, (dst_lo, dst_hi), record.name, own_cols(self.targets[covered]))
        base = dict(name=record.name, target=route.target, file_index=self.file_index[record.file],
                    src_dtype=record.dtype, src_strides=None, op=qt.scheme, group_size=qt.group_size)
        if not sliced:
            offset, _ = self._source(record, src_lo)
            rows = slice(dst_lo, dst_hi)
            zero = qt.zero[rows] if qt.zero is not None else None
            regions = [qt.weight[rows], qt.scale[rows]] + ([zero] if zero is not None else [])
            p.jobs.append(CopyJob(**base, src_offset=offset, shape=tuple(src_shape), dst=qt.weight[rows],
                                  scale=qt.scale[rows], zero=zero, staged=not all(_is_plain_cpu(r) for r in regions),
                                  first_row=src_lo))
        else:
            # int4 groups lie along a row: an aligned column block quantizes on its own, one row per job
            width, item = src_c[1] - src_c[0], record.dtype.itemsize
            g = qt.group_size
            wcols = slice(dst_c[0] // 2, dst_c[1] // 2)
            gcols = slice(dst_c[0] // g, dst_c[1] // g)
            for i in range(src_hi - src_lo):
                r = dst_lo + i
                regions = [qt.weight[r:r + 1, wcols], qt.scale[r:r + 1, gcols], qt.zero[r:r + 1, gcols]]
                offset = record.byte_offset + ((src_lo + i) * record.shape[1] + src_c[0]) * item
                p.jobs.append(CopyJob(**base, src_offset=offset, shape=(1, width), dst=regions[0],
                                      scale=regions[1], zero=regions[2],
                                      staged=not all(_is_plain_cpu(t) for t in regions), first_row=src_lo + i))
        p.loaded.append(route.target)
        p.loaded.extend(qt.covers)

    def finish(self) -> Plan:
        p = self.plan
        seen_groups = set(self.complete)
        for name, tensor in self.targets.items():
            group = self.group_of[name]
            if group in seen_groups:
                continue
            seen_groups.add(group)
            qt = self.quant.get(name)
            shape = tuple(tensor.shape)
            total_rows = qt.shape[0] if qt else (shape[0] if shape else 1)
            total_cols = shape[1] if len(shape) >= 2 else 1
            if not self._fully_covered(name, total_rows, total_cols):
                # report every name of the tied group, so the user sees each spelling
                p.missing_keys.extend(n for n, g in self.group_of.items() if g == group and n in self.targets)
        p.loaded = list(dict.fromkeys(p.loaded))
        return p


def make_plan(checkpoint: Checkpoint, targets: Mapping[str, torch.Tensor], *, rename: Rename = None,
              quant: Mapping[str, QuantTarget] | None = None, strict: bool = True,
              check_splits: bool = True) -> Plan:
    """Match ``checkpoint`` records with ``targets`` (name -> tensor) and build the jobs.

    With ``strict`` any missing, unexpected or mismatched key raises
    :class:`MismatchError` before a byte is copied.  ``check_splits=False``
    allows routes that read only part of a checkpoint tensor (a rank's shard).
    """
    routes_of = normalize_rename(rename)
    planner = _Planner(checkpoint, targets, quant or {})
    for record in checkpoint.records:
        if rename is None:   # every record whole into the tensor of its own name
            planner.whole(record, record.name)
            continue
        routes = routes_of(record.name)
        if routes is None:
            planner.plan.skipped_keys.append(record.name)
            continue
        if check_splits and rename is not None and not isinstance(rename, PartialRoutes):   # None: whole tensors
            check_split_covers(record, routes, planner.plan)
        for route in routes:
            planner.route(record, route)
    plan = planner.finish()
    # a map may name tensors the model computes itself (gemma_pytorch's freqs_cis): not missing
    computed = set(getattr(rename, "computed", ()) or ())
    if computed:
        plan.computed_keys = [n for n in plan.missing_keys if n in computed]
        plan.missing_keys = [n for n in plan.missing_keys if n not in computed]
    if strict and (plan.missing_keys or plan.unexpected_keys or plan.mismatched_keys):
        raise MismatchError(describe_mismatch(plan, checkpoint))
    return plan


def zero_copy_jobs(plan: Plan, targets: Mapping[str, torch.Tensor], device: torch.device) -> list[CopyJob]:
    """The jobs ``mode="mmap"`` serves with a view of the file instead of a copy.

    A job qualifies when it fills a whole target (not rows of a fused one) in
    the checkpoint's own dtype, the target lives on the CPU (or is on meta and
    will be allocated on ``device``, the CPU), and its bytes start at a multiple
    of the item size. Conversion, quantization and row routes are copied.
    """
    out = []
    for job in plan.jobs:
        target = targets.get(job.target)
        if job.op != "copy" or target is None or job.dst is not target:
            continue
        where = device if target.is_meta else target.device
        if where.type == "cpu" and from_torch(target.dtype) == job.src_dtype and \
                job.src_offset % job.src_dtype.itemsize == 0:
            out.append(job)
    return out
