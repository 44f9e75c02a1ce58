"""verify's verdict on one tensor pair: bit-exact checks, then error figures over row chunks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..formats import Checkpoint
from .operands import Operand, layout_problem, dequantize_rows

__all__ = ["CHUNK_ELEMENTS", "TensorComparison", "judge", "structural_verdict", "tied_verdict"]

#: elements compared at a time: bounds the float temporaries whatever the tensor size
CHUNK_ELEMENTS = 1 << 20


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


def judge(name: str, oa: Operand, ob: Operand, ta: dict, tb: dict, min_sqnr_db: float | None) -> TensorComparison:
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


def structural_verdict(name: str, oa: Operand | None, ob: Operand | None) -> TensorComparison | None:
    """The verdict on a pair that needs no data: a missing side, a shape or layout mismatch."""
    if oa is None or ob is None:
        present = oa or ob
        return TensorComparison(name, oa and oa.describe(), ob and ob.describe(), list(present.shape),
                                "only in A" if ob is None else "only in B", False)
    for op in (oa, ob):
        problem = op.layout != "plain" and layout_problem(op)
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


def tied_verdict(verdict: TensorComparison, present: Checkpoint, absent: Checkpoint) -> TensorComparison:
    """A name missing on one side is fine when it is tied to a name both sides hold (convert writes ties once)."""
    held = absent.by_name()
    twin = next((n for n in _tied_groups(present).get(verdict.name, []) if n != verdict.name and n in held), None)
    if twin is not None:
        verdict.status, verdict.ok, verdict.note = "tied", True, f"same bytes as {twin!r}"
    return verdict
