"""torch's CPU int4 kernel layout, converted to and from ours in place.

``_convert_weight_to_int4pack_for_cpu`` (torch 2.13, aten/src/ATen/native/cpu/
int4mm_kernel.cpp) returns [N, K/2] uint8 built block by block: B rows (64 with
AVX-512, 32 with AVX2 or without vectors) become [K, B/2] bytes, byte (k, j) =
q[lo(j), k] | q[hi(j), k] << 4, pairing row j with row j + B/2 ("halves") or rows
2j, 2j+1 (always so for a 16/32/48-row tail).  A block's bytes are the bytes its
rows had in our layout (FORMATS.md: [N, K/2], even k in the low nibble), so the
repack runs in place.  Which variant this torch build uses is probed once against
the op itself; the layout is torch-internal and never leaves the process.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..errors import InternalError
from .reference import dequant_int4, join_nibbles, split_nibbles  # noqa: F401 - re-exported: layout code and tests

_CHUNK_BYTES = 8 << 20   # the torch fallback repacks this many bytes of rows at a time


@dataclass(frozen=True)
class CpuLayout:
    block: int       # rows per full block
    halves: bool     # full blocks pair row j with j + block/2 (else 2j with 2j + 1)


_LOW_NIBBLES = 0x0F0F0F0F0F0F0F0F     # as int64 words: the nibble ops run 8 bytes at a time
_HIGH_NIBBLES = -0x0F0F0F0F0F0F0F10   # 0xF0F0F0F0F0F0F0F0


def _pair_rows(plain: torch.Tensor, halves: bool, out: torch.Tensor) -> None:
    """Our layout [nb, B, K/2] -> the kernel's [nb, K, B/2], written to ``out``."""
    nb, b, half_k = plain.shape
    x, y = (plain[:, :b // 2], plain[:, b // 2:]) if halves else (plain[:, 0::2], plain[:, 1::2])
    x, y = x.view(torch.int64), y.view(torch.int64)
    even_k = (x & _LOW_NIBBLES) | ((y << 4) & _HIGH_NIBBLES)   # q[lo, 2m] | q[hi, 2m] << 4
    odd_k = ((x >> 4) & _LOW_NIBBLES) | (y & _HIGH_NIBBLES)    # q[lo, 2m+1] | q[hi, 2m+1] << 4
    dst = out.view(nb, half_k, 2, b // 2)
    dst[:, :, 0].copy_(even_k.view(torch.uint8).transpose(1, 2))
    dst[:, :, 1].copy_(odd_k.view(torch.uint8).transpose(1, 2))


def _unpair_rows(packed: torch.Tensor, halves: bool, out: torch.Tensor) -> None:
    """The kernel's [nb, K, B/2] -> our layout [nb, B, K/2], written to ``out``."""
    nb, k, half_b = packed.shape
    src = packed.view(nb, k // 2, 2, half_b)
    even_k = src[:, :, 0].transpose(1, 2).contiguous().view(torch.int64)
    odd_k = src[:, :, 1].transpose(1, 2).contiguous().view(torch.int64)
    x, y = (out[:, :half_b], out[:, half_b:]) if halves else (out[:, 0::2], out[:, 1::2])
    x.view(torch.int64).copy_((even_k & _LOW_NIBBLES) | ((odd_k << 4) & _HIGH_NIBBLES))
    y.view(torch.int64).copy_(((even_k >> 4) & _LOW_NIBBLES) | (odd_k & _HIGH_NIBBLES))


def _blocks(layout: CpuLayout, rows: int):
    """(first row, row count, block rows, halves) of the full blocks, then of the tail."""
    full = rows // layout.block * layout.block
    if full:
        yield 0, full, layout.block, layout.halves
    if rows > full:
        yield full, rows - full, rows - full, False


def pack(plain: torch.Tensor, layout: CpuLayout) -> torch.Tensor:
    """Our [R, K/2] (starting on a block boundary) -> the kernel's bytes, [R, K/2]."""
    out = torch.empty_like(plain)
    half_k = plain.shape[1]
    for r0, n, b, halves in _blocks(layout, plain.shape[0]):
        _pair_rows(plain[r0:r0 + n].view(n // b, b, half_k), halves, out[r0:r0 + n])
    return out


def unpack(packed: torch.Tensor, layout: CpuLayout) -> torch.Tensor:
    out = torch.empty_like(packed)
    half_k = packed.shape[1]
    for r0, n, b, halves in _blocks(layout, packed.shape[0]):
        _unpair_rows(packed[r0:r0 + n].view(n // b, 2 * half_k, b // 2), halves,
                     out[r0:r0 + n].view(n // b, b, half_k))
    return out


def gather_rows(packed: torch.Tensor, layout: CpuLayout, rows: torch.Tensor) -> torch.Tensor:
    """4-bit values [T, K] of ``rows`` of a whole packed [N, K/2] weight."""
    k = 2 * packed.shape[1]
    out = torch.empty(rows.numel(), k, dtype=torch.uint8, device=packed.device)
    for r0, n, b, halves in _blocks(layout, packed.shape[0]):
        sel = (rows >= r0) & (rows < r0 + n)
        if not bool(sel.any()):
            continue
        local = rows[sel] - r0
        i = local % b
        j = i % (b // 2) if halves else i // 2
        high = i >= b // 2 if halves else (i % 2).bool()
        byte = packed[r0:r0 + n].view(n // b, k, b // 2)[local // b, :, j]
        out[sel] = torch.where(high[:, None], byte >> 4, byte & 0x0F)
    return out


def torch_pack(q4: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4.to(torch.int32).contiguous(), 2)


@functools.lru_cache(maxsize=1)
def layout() -> CpuLayout | None:
    """Probe once which layout torch's CPU int4 ops use, and that they compute
    ``x @ ((q - 8) * s + z).T`` as FORMATS.md says; None disables the kernel path."""
    try:
        gen = torch.Generator().manual_seed(0)
        n, k, g = 2 * 128 + 48, 64, 32   # full blocks of any candidate size plus a tail
        q4 = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
        want = torch_pack(q4)
        plain = join_nibbles(q4)
        layout = next((c for c in (CpuLayout(b, h) for b in (64, 32, 16, 128) for h in (True, False))
                       if torch.equal(pack(plain, c), want)), None)
        if layout is None or not torch.equal(unpack(want, layout), plain):
            return None
        s = torch.rand(n, k // g, generator=gen).bfloat16() / 8 + 0.01
        z = torch.randn(n, k // g, generator=gen).bfloat16()
        x = torch.randn(3, k, generator=gen).bfloat16()
        sz = torch.stack((s.t(), z.t()), dim=-1).contiguous()
        got = torch.ops.aten._weight_int4pack_mm_for_cpu(x, want, g, sz).float()
        ref = x.float() @ dequant_int4(q4, s, z).t()
        return layout if bool((got - ref).norm() <= 1e-2 * ref.norm()) else None
    except (AttributeError, RuntimeError):
        return None


def native_repack(to_kernel: bool):
    from ..executors import native_module
    _native = native_module()
    if _native is None:
        return None
    return getattr(_native, "int4_to_cpu_kernel_layout" if to_kernel else "int4_from_cpu_kernel_layout", None)


def repack_(weight: torch.Tensor, layout: CpuLayout, *, to_kernel: bool) -> None:
    """Convert an int4 weight between our layout and the CPU kernel's, in place.

    The C++ kernel (csrc/quant.cc) needs one block of scratch; the torch
    fallback works through about _CHUNK_BYTES of rows at a time."""
    n, k = weight.shape[0], 2 * weight.shape[1]
    native = native_repack(to_kernel)
    if native is not None and weight.device.type == "cpu" and weight.is_contiguous():
        if not native(weight.data_ptr(), n, k, layout.block, layout.halves):
            raise InternalError(f"int4 repack: bad shape [{n}, {k}] for blocks of {layout.block} rows")
        return
    step = max(1, _CHUNK_BYTES // (2 * k) // layout.block) * layout.block
    convert = pack if to_kernel else unpack
    with torch.no_grad():
        for r0 in range(0, n, step):
            rows = weight[r0:r0 + step]
            rows.copy_(convert(rows, layout))
