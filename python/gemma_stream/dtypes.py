"""Element types: one table shared by the formats, the planner and both executors.

The integer ``code`` of each dtype is the contract with the C++ core
(``csrc/convert.h``); change them together or not at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UsageError

__all__ = ["DType", "DTYPES", "from_torch", "from_safetensors", "by_name", "CONVERTIBLE", "FLOAT_DTYPES"]


@dataclass(frozen=True)
class DType:
    name: str            # canonical short name, e.g. "bf16"
    code: int            # code understood by gemma_stream._native
    itemsize: int        # bytes per element
    safetensors: str | None
    torch: torch.dtype | None
    is_float: bool

    def __repr__(self) -> str:  # keeps error messages short
        return self.name


_TABLE = [
    # name    code size  safetensors  torch                  float
    ("bool",  0,  1, "BOOL",    torch.bool,           False),
    ("u8",    1,  1, "U8",      torch.uint8,          False),
    ("i8",    2,  1, "I8",      torch.int8,           False),
    ("i16",   3,  2, "I16",     torch.int16,          False),
    ("u16",   4,  2, "U16",     getattr(torch, "uint16", None), False),
    ("i32",   5,  4, "I32",     torch.int32,          False),
    ("u32",   6,  4, "U32",     getattr(torch, "uint32", None), False),
    ("i64",   7,  8, "I64",     torch.int64,          False),
    ("u64",   8,  8, "U64",     getattr(torch, "uint64", None), False),
    ("f16",   9,  2, "F16",     torch.float16,        True),
    ("bf16",  10, 2, "BF16",    torch.bfloat16,       True),
    ("f32",   11, 4, "F32",     torch.float32,        True),
    ("f64",   12, 8, "F64",     torch.float64,        True),
    ("f8_e4m3", 13, 1, "F8_E4M3", getattr(torch, "float8_e4m3fn", None), True),
    ("f8_e5m2", 14, 1, "F8_E5M2", getattr(torch, "float8_e5m2", None), True),
    ("c64",   15, 8, "C64",     torch.complex64,      False),
    ("c128",  16, 16, None,     torch.complex128,     False),
    # Copied only to the same dtype, so the engine moves their bytes as u8 (code 1); safetensors'
    # F4 header shape counts 4-bit values, torch's float4_e2m1fn_x2 counts bytes (two values each).
    ("f8_e4m3fnuz", 1, 1, "F8_E4M3FNUZ", getattr(torch, "float8_e4m3fnuz", None), True),
    ("f8_e5m2fnuz", 1, 1, "F8_E5M2FNUZ", getattr(torch, "float8_e5m2fnuz", None), True),
    ("f8_e8m0", 1,  1, "F8_E8M0", getattr(torch, "float8_e8m0fnu", None), True),
    ("f4_x2",   1,  1, "F4",      getattr(torch, "float4_e2m1fn_x2", None), True),
]

DTYPES: dict[str, DType] = {row[0]: DType(*row) for row in _TABLE}
_BY_SAFETENSORS = {d.safetensors: d for d in DTYPES.values() if d.safetensors}
_BY_TORCH = {d.torch: d for d in DTYPES.values() if d.torch is not None}

#: dtypes between which both executors convert on read, bit-identical to ``Tensor.to``.
CONVERTIBLE = frozenset({"f16", "bf16", "f32"})
#: the same set as torch dtypes (``dtype=`` arguments, model dtypes)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def by_name(name: str) -> DType:
    return DTYPES[name]


def from_safetensors(code: object) -> DType | None:
    """The dtype for a safetensors header code, or None if unknown (or not a string)."""
    return _BY_SAFETENSORS.get(code) if isinstance(code, str) else None


def from_torch(dtype: torch.dtype) -> DType:
    try:
        return _BY_TORCH[dtype]
    except KeyError:
        raise UsageError(f"gemma_stream does not handle torch dtype {dtype}") from None
