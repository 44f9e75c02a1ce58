"""The checks behind ``gemma-stream verify``: byte ranges, SHA-256 per file, and a
tensor-by-tensor comparison of two checkpoints in bounded memory.

Nothing here prints; :mod:`gemma_stream.cli` renders the results.

>>> from gemma_stream.verify import compare_checkpoints
>>> result = compare_checkpoints("model.ckpt", "model.safetensors")
>>> result.ok, [t.status for t in result.tensors][:2]
(True, ['equal', 'equal'])
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .api import load_state_dict
from .errors import CheckpointError
from .formats import Checkpoint, TensorRecord, contiguous_strides, open_checkpoint, resolve_path
from .formats.records import CheckpointFile
from .quant import dequantize

__all__ = ["check_ranges", "checkpoint_files", "sha256_file", "Operand", "pair_operands",
           "TensorComparison", "Comparison", "compare_checkpoints", "dequantize_rows"]

log = logging.getLogger("gemma_stream.verify")

#: elements compared at a time: bounds the float temporaries whatever the tensor size
CHUNK_ELEMENTS = 1 << 20
#: bytes of tensors (both sides together) loaded per batch by ``compare_checkpoints``
DEFAULT_BATCH_BYTES = 256 << 20
HASH_CHUNK_BYTES = 8 << 20

OnBytes = Callable[[int], None]


# ---------------------------------------------------------------- validation and checksums

def record_extent(record: TensorRecord) -> int:
    """Bytes from ``byte_offset`` to the end of the last element the record reads."""
    if record.numel == 0:
        return 0
    strides = record.strides or contiguous_strides(record.shape)
    return (1 + sum((n - 1) * s for n, s in zip(record.shape, strides))) * record.dtype.itemsize


def check_ranges(ckpt: Checkpoint) -> None:
    """Re-check every tensor's byte range against its file's size, as the executors do before copying.

    The readers already validated the headers; this is the loader's second line of
    defence, run up front so ``verify`` reports what a load would trip over.
    """
    sizes = {}
    for path in ckpt.files:
        try:
            st = os.stat(path)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot stat: {e.strerror or e}", path=path) from e
        if isinstance(path, CheckpointFile):
            path.check(st)   # the file whose header was read, not one renamed over it since
        sizes[path] = st.st_size
    for r in ckpt.records:
        size = sizes.get(r.file)
        if size is None:
            raise CheckpointError(f"{r.file}: tensor {r.name!r} lives in a file the checkpoint does not list",
                                  path=r.file, tensor=r.name)
        end = r.byte_offset + record_extent(r)
        if r.byte_offset < 0 or end > size:
            raise CheckpointError(f"{r.file}: tensor {r.name!r}: bytes [{r.byte_offset}, {end}) lie outside "
                                  f"the file ({size} bytes)", path=r.file, tensor=r.name)


def checkpoint_files(path: str | os.PathLike, ckpt: Checkpoint) -> list[str]:
    """Every file the checkpoint at ``path`` consists of: its index (if any), then the data files."""
    resolved = resolve_path(path)
    return ([resolved] if resolved.endswith(".index.json") else []) + list(ckpt.files)


def sha256_file(path: str, *, on_bytes: OnBytes | None = None, chunk_bytes: int = HASH_CHUNK_BYTES) -> str:
    """SHA-256 of a file read sequentially in ``chunk_bytes`` pieces into one reused buffer."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk_bytes)
    view = memoryview(buffer)
    try:
        with open(path, "rb", buffering=0) as f:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while n := f.readinto(buffer):
                digest.update(view[:n])  # hashlib releases the GIL on large buffers
                if on_bytes is not None:
                    on_bytes(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}", path=path) from e
    return digest.hexdigest()


# ---------------------------------------------------------------- quantized layouts

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


def _layout_problem(op: Operand) -> str | None:
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


# ---------------------------------------------------------------- comparison

@dataclass
class TensorComparison:
    """How one tensor of checkpoint A compares with the same-named tensor of B.

    ``status``: equal (bit-identical, or equal values across dtypes), equal as
    <dtype> (the wider side rounded to the narrower float dtype is bit-identical),
    dequantized, close (differs but reaches ``min_sqnr_db``), differs, low SQNR
    (a dequantized tensor below ``min_sqnr_db``), shape mismatch, bad layout, only
    in A, only in B, tied (missing on one side but the same view as a tensor both
    sides hold, as ``convert`` writes tied weights once).

    ``rel_err`` is the relative Frobenius error ``||a - b|| / ||a||`` and
    ``sqnr_db`` is ``20 log10(||a|| / ||a - b||)`` (None when the values agree
    exactly), both over positions finite on both sides, A as the reference.
    """

    name: str
    a: str | None
    b: str | None
    shape: list[int] | None
    status: str
    ok: bool
    max_abs_err: float | None = None
    rel_err: float | None = None
    sqnr_db: float | None = None
    nonfinite_mismatches: int = 0
    note: str = ""


@dataclass
class Comparison:
    path_a: str
    path_b: str
    tensors: list[TensorComparison] = field(default_factory=list)
    min_sqnr_db: float | None = None

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.tensors)

    def counts(self) -> Counter:
        return Counter(t.status for t in self.tensors)


class _Errors:
    """Running error figures over row chunks, reference side ``a``."""

    def __init__(self) -> None:
        self.signal = self.noise = self.max_abs = 0.0
        self.nonfinite = 0
        self.same = True

    def add(self, va: torch.Tensor, vb: torch.Tensor) -> None:
        """Accumulate one chunk of flat values; the common all-finite case costs four passes."""
        if not va.is_complex():
            diff = va - vb
            signal, noise = float(torch.dot(va, va)), float(torch.dot(diff, diff))
            if math.isfinite(signal) and math.isfinite(noise):  # else a NaN/Inf (or an f32 overflow)
                lo, hi = torch.aminmax(diff)
                self.signal += signal
                self.noise += noise
                self.max_abs = max(self.max_abs, -float(lo), float(hi))
                self.same = self.same and float(lo) == float(hi) == 0
                return
        self._add_masked(va, vb)

    def _add_masked(self, va: torch.Tensor, vb: torch.Tensor) -> None:
        """The careful path: non-finite values compared by position, sums in float64."""
        finite = torch.isfinite(va) & torch.isfinite(vb)
        same = (va == vb) | (torch.isnan(va) & torch.isnan(vb))
        self.same = self.same and bool(same.all())
        self.nonfinite += int((~finite & ~same).sum())
        diff = torch.where(finite, va - vb, 0).abs()
        ref = torch.where(finite, va, 0).abs()
        self.signal += float(torch.sum(ref.square(), dtype=torch.float64))
        self.noise += float(torch.sum(diff.square(), dtype=torch.float64))
        if diff.numel():
            self.max_abs = max(self.max_abs, float(diff.max()))

    def figures(self) -> tuple[float, float, float | None]:
        if self.noise == 0:
            return self.max_abs, 0.0, None
        rel = math.sqrt(self.noise / self.signal) if self.signal > 0 else math.inf
        sqnr = 10 * math.log10(self.signal / self.noise) if self.signal > 0 else -math.inf
        return self.max_abs, rel, sqnr


_WIDE = {"f64", "i16", "u16", "i32", "u32", "i64", "u64"}
_FLOATS = ("f16", "bf16", "f32", "f64")


def _compute_dtype(*names: str) -> torch.dtype:
    if any(n in ("c64", "c128") for n in names):
        return torch.complex128
    return torch.float64 if any(n in _WIDE for n in names) else torch.float32


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1) if t.dim() else t.reshape(1, 1)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _compare_values(name: str, oa: Operand, ob: Operand, ta: dict, tb: dict) -> tuple[_Errors, bool, str]:
    """Walk both operands in row chunks; returns (errors, bit-exact?, label of the exact check)."""
    da, db = oa.records[0].dtype, ob.records[0].dtype
    plain = oa.layout == ob.layout == "plain"
    if plain and da.name == db.name:
        if torch.equal(_bits(ta[name]), _bits(tb[name])):  # one memcmp-like pass: no figures to compute
            return _Errors(), True, "equal"
    narrow = None
    if plain and da.name != db.name and da.name in _FLOATS and db.name in _FLOATS and da.itemsize != db.itemsize:
        narrow = da if da.itemsize < db.itemsize else db
    compute = _compute_dtype(da.name, db.name)
    raw_a, raw_b = _rows(ta[name]) if oa.layout == "plain" else None, _rows(tb[name]) if ob.layout == "plain" else None
    n_rows = oa.shape[0] if oa.shape else 1
    row_numel = max(1, math.prod(oa.shape[1:]) if oa.shape else 1)
    step = max(1, CHUNK_ELEMENTS // row_numel)
    errors, cast_exact = _Errors(), narrow is not None
    for start in range(0, n_rows, step):
        stop = min(n_rows, start + step)
        ra = raw_a[start:stop] if raw_a is not None else dequantize_rows(oa, ta, start, stop)
        rb = raw_b[start:stop] if raw_b is not None else dequantize_rows(ob, tb, start, stop)
        if cast_exact:
            wide, short = (ra, rb) if narrow is db else (rb, ra)
            cast_exact = torch.equal(_bits(wide.to(narrow.torch)), _bits(short))
        errors.add(ra.to(compute).reshape(-1), rb.to(compute).reshape(-1))
    if narrow is not None:
        return errors, cast_exact, f"equal as {narrow.name}"
    # same dtype: the bits differ; otherwise no stored form to compare, the values decide
    return errors, not (plain and da.name == db.name) and errors.same, "equal"


def _judge(name: str, oa: Operand, ob: Operand, ta: dict, tb: dict, min_sqnr_db: float | None) -> TensorComparison:
    result = TensorComparison(name, oa.describe(), ob.describe(), list(oa.shape), "equal", True)
    if math.prod(oa.shape) == 0:
        return result
    errors, exact, label = _compare_values(name, oa, ob, ta, tb)
    result.max_abs_err, result.rel_err, result.sqnr_db = errors.figures()
    result.nonfinite_mismatches = errors.nonfinite
    if exact:
        result.status = label
        return result
    passes = min_sqnr_db is not None and (result.sqnr_db is None or result.sqnr_db >= min_sqnr_db)
    if errors.same and not errors.nonfinite:
        result.note = "equal values, different bits (signed zeros or NaN payloads)"
    if errors.nonfinite:
        result.status, result.ok = "differs", False
        result.note = f"{errors.nonfinite} non-finite values differ"
    elif oa.layout != "plain" or ob.layout != "plain":
        result.status, result.ok = ("dequantized", True) if min_sqnr_db is None or passes else ("low SQNR", False)
    else:
        result.status, result.ok = ("close", True) if passes else ("differs", False)
    return result


def _structural(name: str, oa: Operand | None, ob: Operand | None) -> TensorComparison | None:
    """The verdict on a pair that needs no data: a missing side, a shape or layout mismatch."""
    if oa is None or ob is None:
        present = oa or ob
        return TensorComparison(name, oa and oa.describe(), ob and ob.describe(), list(present.shape),
                                "only in A" if ob is None else "only in B", False)
    for op in (oa, ob):
        problem = op.layout != "plain" and _layout_problem(op)
        if problem:
            return TensorComparison(name, oa.describe(), ob.describe(), list(oa.shape), "bad layout", False,
                                    note=problem)
    if oa.shape != ob.shape:
        return TensorComparison(name, oa.describe(), ob.describe(), list(oa.shape), "shape mismatch", False,
                                note=f"{list(oa.shape)} vs {list(ob.shape)}")
    return None


def _tied_groups(ckpt: Checkpoint) -> dict[str, list[str]]:
    """Name -> every name that is the very same view of one storage (tied weights in a torch zip)."""
    groups: dict[tuple, list[str]] = {}
    for r in ckpt.records:
        if r.storage is not None:
            view = (r.file, r.storage, r.byte_offset, r.shape, r.strides, r.dtype.name)
            groups.setdefault(view, []).append(r.name)
    return {name: names for names in groups.values() if len(names) > 1 for name in names}


def _tied(verdict: TensorComparison, present: Checkpoint, absent: Checkpoint) -> TensorComparison:
    """A name missing on one side is fine when it is tied to a name both sides hold (convert writes ties once)."""
    held = absent.by_name()
    twin = next((n for n in _tied_groups(present).get(verdict.name, []) if n != verdict.name and n in held), None)
    if twin is not None:
        verdict.status, verdict.ok, verdict.note = "tied", True, f"same bytes as {twin!r}"
    return verdict


def _batches(pairs: list, batch_bytes: int) -> Iterator[list]:
    batch, size = [], 0
    for pair in pairs:
        cost = pair[1].nbytes + pair[2].nbytes
        if batch and size + cost > batch_bytes:
            yield batch
            batch, size = [], 0
        batch.append(pair)
        size += cost
    if batch:
        yield batch


def compare_checkpoints(path_a: str | os.PathLike, path_b: str | os.PathLike, *, key: str | None = None,
                        min_sqnr_db: float | None = None, batch_bytes: int = DEFAULT_BATCH_BYTES,
                        backend: str = "auto", on_bytes: OnBytes | None = None,
                        checkpoints: tuple[Checkpoint, Checkpoint] | None = None,
                        ignore: re.Pattern | None = None) -> Comparison:
    """Stream two checkpoints tensor by tensor, a batch of about ``batch_bytes`` at a time.

    Peak memory is one batch of both sides (or the largest tensor pair, whichever
    is larger) plus float temporaries of ``CHUNK_ELEMENTS``; never two whole models.
    ``on_bytes(n)`` is called as tensor bytes are read (for a progress bar);
    names matching ``ignore`` (``re.search``) are left out on both sides.
    """
    ckpt_a, ckpt_b = checkpoints or (open_checkpoint(path_a, key=key), open_checkpoint(path_b, key=key))
    result = Comparison(os.fspath(path_a), os.fspath(path_b), min_sqnr_db=min_sqnr_db)
    pairs = [pair for pair in pair_operands(ckpt_a, ckpt_b) if ignore is None or not ignore.search(pair[0])]
    position = {name: i for i, (name, _, _) in enumerate(pairs)}
    judged: list[TensorComparison] = []
    comparable = []
    for name, oa, ob in pairs:
        verdict = _structural(name, oa, ob)
        if verdict is not None and verdict.status in ("only in A", "only in B"):
            verdict = _tied(verdict, *((ckpt_a, ckpt_b) if ob is None else (ckpt_b, ckpt_a)))
        if verdict is not None:
            judged.append(verdict)
        else:
            comparable.append((name, oa, ob))
    for batch in _batches(comparable, batch_bytes):
        log.debug("comparing %d tensors starting at %r", len(batch), batch[0][0])
        # the checkpoints opened above are read from, never parsed again per batch
        loaded = [load_state_dict(ckpt, keys=sorted({r.name for pair in batch for r in pair[side].records}),
                                  backend=backend, progress=_progress(on_bytes))
                  for side, ckpt in ((1, ckpt_a), (2, ckpt_b))]
        judged.extend(_judge(name, oa, ob, loaded[0], loaded[1], min_sqnr_db) for name, oa, ob in batch)
        del loaded
    result.tensors = sorted(judged, key=lambda t: position[t.name])
    return result


def _progress(on_bytes: OnBytes | None):
    if on_bytes is None:
        return False
    last = 0

    def update(done: int, total: int) -> bool:
        nonlocal last
        on_bytes(done - last)
        last = done
        return True
    return update
