"""Planner: checkpoint records + destination tensors -> copy jobs.

All policy lives here: renames and fused row ranges, tied weights, dtype
conversion rules, quantize-on-read, strictness.  The planner never reads file
bytes and never allocates destination memory; executors never decide policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Union

import torch

from .dtypes import CONVERTIBLE, DType, from_torch
from .errors import MismatchError, UsageError
from .formats.records import Checkpoint, TensorRecord

__all__ = ["Route", "QuantTarget", "CopyJob", "Plan", "choose_cache", "make_plan", "normalize_rename",
           "zero_copy_jobs"]


@dataclass(frozen=True)
class Route:
    """Where a checkpoint tensor, or a range of its rows (dim 0), goes.

    ``src_rows`` selects rows of the checkpoint tensor, ``dst_rows`` the rows of
    the target they fill; ``None`` means all rows.  A fused projection (q, k, v
    into one ``qkv_proj``) is three routes into consecutive ``dst_rows``.
    """

    target: str
    src_rows: tuple[int, int] | None = None
    dst_rows: tuple[int, int] | None = None


RenameResult = Union[None, str, Route, Iterable[Route]]
Rename = Union[None, Mapping[str, RenameResult], Callable[[str], RenameResult]]


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

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.src_dtype.itemsize

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

    @property
    def nbytes(self) -> int:
        return sum(job.nbytes for job in self.jobs)

    @property
    def dst_nbytes(self) -> int:
        """Bytes the jobs write into host memory (weights, scales and zero points on the CPU;
        an accelerator's memory does not compete with the page cache)."""
        return sum(t.numel() * t.element_size() for job in self.jobs for t in (job.dst, job.scale, job.zero)
                   if t is not None and t.device.type == "cpu")


CACHE_POLICIES = ("auto", "keep", "drop")


def choose_cache(plan: Plan, cache: str, available: int | None) -> str:
    """``cache="auto"`` -> "keep" or "drop" for this plan.

    "drop" when the bytes read and the bytes written cannot both stay in memory
    (``available``: MemAvailable, which counts the file's own cached pages):
    then keeping the file would only push out the model's first pages or other
    files, and dropping hands the file's pages straight to the model's page
    faults (on a 24 GiB VM, a cold 7B load took 11.7 s with drop against 14.1 s
    with keep; benchmarks/NOTES.md, section 12).  "keep" otherwise, so a file
    that fits stays cached for the next load.  "keep"/"drop" pass through.
    """
    if cache not in CACHE_POLICIES:
        raise UsageError(f"cache must be 'auto', 'keep' or 'drop', not {cache!r}")
    if cache != "auto":
        return cache
    if available is None:
        return "keep"
    return "drop" if plan.nbytes + plan.dst_nbytes > available else "keep"


def normalize_rename(rename: Rename) -> Callable[[str], list[Route] | None]:
    """Turn a dict, callable or map object into ``name -> routes | None``."""
    if rename is None:
        lookup: Callable[[str], RenameResult] = lambda name: name
    elif isinstance(rename, Mapping):
        lookup = lambda name: rename.get(name, name)
    elif callable(rename):
        lookup = rename
    else:
        raise UsageError(f"rename must be a dict or a callable, not {type(rename).__name__}")

    def routes(name: str) -> list[Route] | None:
        result = lookup(name)
        if result is None:
            return None
        if isinstance(result, str):
            return [Route(result)]
        if isinstance(result, Route):
            return [result]
        out = [Route(r) if isinstance(r, str) else r for r in result]
        if not all(isinstance(r, Route) for r in out):
            raise UsageError(f"rename({name!r}) returned {result!r}; expected a name, Route, list of Routes or None")
        return out

    return routes


def _rows(span: tuple[int, int] | None, total: int, what: str) -> tuple[int, int]:
    if span is None:
        return (0, total)
    lo, hi = span
    if not 0 <= lo < hi <= total:
        # a range past the end would read another tensor's bytes or write past the destination
        raise MismatchError(f"{what}: rows [{lo}, {hi}) are not a non-empty range inside its {total} rows")
    return lo, hi


def _is_plain_cpu(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.is_contiguous()


class _Planner:
    def __init__(self, checkpoint: Checkpoint, targets: Mapping[str, torch.Tensor],
                 quant: Mapping[str, QuantTarget]):
        self.ckpt = checkpoint
        self.targets = targets
        self.quant = quant
        self.file_index = {f: i for i, f in enumerate(checkpoint.files)}
        # names of one tied tensor share a group; coverage is tracked per group
        self.group_of: dict[str, int] = {}
        first_name: dict[int, str] = {}
        for name, tensor in targets.items():
            self.group_of[name] = id(tensor)
            first_name.setdefault(id(tensor), name)
        self.covered: dict[int, list[tuple[int, int, str]]] = {}
        self.plan = Plan(files=list(checkpoint.files), jobs=[])

    # ---- coverage -------------------------------------------------------
    def _claim(self, target: str, rows: tuple[int, int], source: str) -> bool:
        """Record that ``rows`` of ``target`` are written; False if already written (tied duplicate)."""
        spans = self.covered.setdefault(self.group_of[target], [])
        for lo, hi, other in spans:
            if lo == rows[0] and hi == rows[1]:
                return False
            if lo < rows[1] and rows[0] < hi:
                raise MismatchError(
                    f"tensor {source!r} writes rows [{rows[0]}, {rows[1]}) of {target!r}, which overlap "
                    f"rows [{lo}, {hi}) written by {other!r}")
        spans.append((rows[0], rows[1], source))
        return True

    def _fully_covered(self, name: str, total_rows: int) -> bool:
        spans = sorted(self.covered.get(self.group_of[name], []))
        if not spans:
            return False
        cursor = 0
        for lo, hi, _ in spans:
            if lo > cursor:
                return False
            cursor = max(cursor, hi)
        return cursor >= total_rows

    # ---- jobs -----------------------------------------------------------
    def route(self, record: TensorRecord, route: Route) -> None:
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
        src_shape = (src_hi - src_lo, *record.shape[1:]) if route.src_rows else record.shape
        dst_shape = (dst_hi - dst_lo, *tshape[1:]) if route.dst_rows else tshape
        if src_shape != dst_shape:
            p.mismatched_keys.append(
                f"{record.name}: checkpoint shape {list(src_shape)} vs model {route.target!r} shape {list(dst_shape)}")
            return
        dst_dtype = from_torch(target.dtype)
        if record.dtype != dst_dtype and not (record.dtype.name in CONVERTIBLE and dst_dtype.name in CONVERTIBLE):
            p.mismatched_keys.append(
                f"{record.name}: checkpoint dtype {record.dtype.torch} cannot be loaded into "
                f"{route.target!r} of dtype {target.dtype}")
            return
        if not self._claim(route.target, (dst_lo, dst_hi) if tshape else (0, 1), record.name):
            p.skipped_keys.append(record.name)
            return
        offset, strides = self._source(record, src_lo if route.src_rows else 0)
        region = target[dst_lo:dst_hi] if route.dst_rows else target
        p.jobs.append(CopyJob(name=record.name, target=route.target, file_index=self.file_index[record.file],
                              src_offset=offset, src_dtype=record.dtype, shape=tuple(src_shape),
                              src_strides=strides, dst=region, staged=not _is_plain_cpu(region)))
        p.loaded.append(route.target)

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
        src_shape = (src_hi - src_lo, *record.shape[1:])
        if src_shape != (dst_hi - dst_lo, k):
            p.mismatched_keys.append(
                f"{record.name}: checkpoint shape {list(src_shape)} vs quantized model {route.target!r} "
                f"shape {[dst_hi - dst_lo, k]}")
            return
        if record.dtype.name not in CONVERTIBLE:
            p.mismatched_keys.append(f"{record.name}: cannot quantize dtype {record.dtype.torch}")
            return
        if not record.is_contiguous:
            p.mismatched_keys.append(
                f"{record.name}: a strided (non-contiguous) view cannot be quantized on read; "
                f"re-save the checkpoint with contiguous tensors")
            return
        if not self._claim(route.target, (dst_lo, dst_hi), record.name):
            p.skipped_keys.append(record.name)
            return
        for covered in qt.covers:  # the scales (and zeros) are written by the same job
            if covered in self.group_of:
                self._claim(covered, (dst_lo, dst_hi), record.name)
        offset, _ = self._source(record, src_lo)
        rows = slice(dst_lo, dst_hi)
        zero = qt.zero[rows] if qt.zero is not None else None
        regions = [qt.weight[rows], qt.scale[rows]] + ([zero] if zero is not None else [])
        p.jobs.append(CopyJob(name=record.name, target=route.target, file_index=self.file_index[record.file],
                              src_offset=offset, src_dtype=record.dtype, shape=tuple(src_shape), src_strides=None,
                              dst=qt.weight[rows], op=qt.scheme, scale=qt.scale[rows], zero=zero,
                              group_size=qt.group_size, staged=not all(_is_plain_cpu(r) for r in regions),
                              first_row=src_lo))
        p.loaded.append(route.target)
        p.loaded.extend(qt.covers)

    def finish(self) -> Plan:
        p = self.plan
        seen_groups: set[int] = set()
        for name, tensor in self.targets.items():
            group = self.group_of[name]
            if group in seen_groups:
                continue
            seen_groups.add(group)
            qt = self.quant.get(name)
            total = qt.shape[0] if qt else (tensor.shape[0] if tensor.dim() else 1)
            if not self._fully_covered(name, total):
                # report every name of the tied group, so the user sees each spelling
                p.missing_keys.extend(n for n, g in self.group_of.items() if g == group and n in self.targets)
        p.loaded = list(dict.fromkeys(p.loaded))
        return p


def make_plan(checkpoint: Checkpoint, targets: Mapping[str, torch.Tensor], *, rename: Rename = None,
              quant: Mapping[str, QuantTarget] | None = None, strict: bool = True) -> Plan:
    """Match ``checkpoint`` records with ``targets`` (name -> tensor) and build the jobs.

    With ``strict`` any missing, unexpected or mismatched key raises
    :class:`MismatchError` before a byte is copied.
    """
    routes_of = normalize_rename(rename)
    planner = _Planner(checkpoint, targets, quant or {})
    for record in checkpoint.records:
        routes = routes_of(record.name)
        if routes is None:
            planner.plan.skipped_keys.append(record.name)
            continue
        _check_split_covers(record, routes, planner.plan)
        for route in routes:
            planner.route(record, route)
    plan = planner.finish()
    # a map may name tensors the model computes itself (gemma_pytorch's freqs_cis): not missing
    computed = set(getattr(rename, "computed", ()) or ())
    if computed:
        plan.missing_keys = [n for n in plan.missing_keys if n not in computed]
    if strict and (plan.missing_keys or plan.unexpected_keys or plan.mismatched_keys):
        raise MismatchError(_describe(plan, checkpoint))
    return plan


def _check_split_covers(record: TensorRecord, routes: list[Route], plan: Plan) -> None:
    """Rows of a split checkpoint tensor that no route reads would be silently lost."""
    spans = sorted(r.src_rows for r in routes if r.src_rows is not None)
    if not spans or len(spans) != len(routes) or not record.shape:
        return
    cursor = 0
    for lo, hi in spans:
        if lo > cursor:
            break
        cursor = max(cursor, hi)
    if cursor < record.shape[0] or spans[0][0] > 0:
        plan.mismatched_keys.append(
            f"{record.name}: routes read rows {[list(s) for s in spans]} but the checkpoint tensor has "
            f"{record.shape[0]} rows; the rest would be dropped")


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


def _describe(plan: Plan, checkpoint: Checkpoint) -> str:
    where = checkpoint.files[0] if len(checkpoint.files) == 1 else f"{len(checkpoint.files)} shards"
    parts = [f"{where}: checkpoint and model disagree"]
    for label, names in (("missing in checkpoint", plan.missing_keys),
                         ("unexpected in checkpoint", plan.unexpected_keys),
                         ("mismatched", plan.mismatched_keys)):
        if names:
            shown = ", ".join(names[:20]) + (f", ... ({len(names) - 20} more)" if len(names) > 20 else "")
            parts.append(f"{label} ({len(names)}): {shown}")
    return "; ".join(parts)
