"""The reference quantizers and dequantizers: the contract both executors are held to, bit for bit.

Layouts and arithmetic: docs/FORMATS.md.  Plain tensor functions with no
``torch.nn`` in sight, so the python executor and the block writer import only
these.

>>> q, s = quantize_int8(torch.randn(4, 64, dtype=torch.bfloat16))
>>> w = dequantize((q, s))
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["FLT_EPSILON", "GROUP_SIZES", "quantize_int8", "quantize_int8_absmax", "quantize_int4", "dequantize",
           "dequant_int8", "dequant_int4", "split_nibbles", "join_nibbles"]

FLT_EPSILON = 2.0 ** -23
#: int4 group sizes (consecutive k per scale and zero point)
GROUP_SIZES = (32, 64, 128, 256)


def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: returns (q int8 [N, K], scale [N] in ``scale_dtype``).

    >>> q, s = quantize_int8(torch.randn(4, 64, dtype=torch.bfloat16))
    >>> (q.float() * s[:, None].float()).shape
    torch.Size([4, 64])
    """
    w = w.float()
    return quantize_int8_absmax(w, w.abs().amax(dim=1), scale_dtype)


def quantize_int8_absmax(w: torch.Tensor, amax: torch.Tensor,
                         scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_int8`` of columns of rows whose whole-row absmax ``amax`` [N] is known.

    A tensor-parallel rank holding columns [a, b) of every row gets the same
    bits as ``quantize_int8(full)[:, a:b]`` once ``amax`` is the maximum over
    all ranks' partial maxima (max is exact, so the reduction order is free).

    >>> w = torch.randn(4, 64)
    >>> q, s = quantize_int8_absmax(w[:, :32], w.abs().amax(dim=1))
    """
    w = w.float()
    s = (amax / 127).to(scale_dtype)
    s = torch.where(amax == 0, torch.ones_like(s), s)
    q = torch.round(w / s.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, s


def quantize_int4(w: torch.Tensor, group_size: int = 128,
                  scale_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per row and group: returns (q uint8 [N, K/2], scale, zero [N, K/G]).

    ``q[n, 2j]`` is the low nibble of byte ``j``, ``q[n, 2j+1]`` the high one.

    >>> q, s, z = quantize_int4(torch.randn(4, 64), group_size=32)
    >>> q.shape, s.shape
    (torch.Size([4, 32]), torch.Size([4, 2]))
    """
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    mn = g.amin(dim=2)
    mx = g.amax(dim=2)
    s = torch.clamp((mx - mn) / 15, min=FLT_EPSILON).to(scale_dtype)
    z = (mn + 8 * s.float()).to(scale_dtype)
    q = torch.round((g - z.float()[..., None]) / s.float()[..., None]) + 8
    q = q.clamp(0, 15).to(torch.uint8).reshape(n, k)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed, s, z


def split_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> the 4-bit values [..., K] (even k from the low nibble)."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def join_nibbles(q: torch.Tensor) -> torch.Tensor:
    return q[..., 0::2] | (q[..., 1::2] << 4)


def dequant_int8(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """q int8 [..., K], s [...] -> float32 ``q * s``."""
    return q.float() * s.float()[..., None]


def dequant_int4(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """q: 4-bit values [..., K]; s, z: [..., K/G] -> float32 ``(q - 8) * s + z``."""
    groups = s.shape[-1]
    g = q.reshape(*q.shape[:-1], groups, q.shape[-1] // groups).float()
    return ((g - 8) * s.float()[..., None] + z.float()[..., None]).flatten(-2)


def dequantize(quantized: Any, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference dequantizer: the float [N, K] matrix of a quantized module or of contract tensors.

    Takes a quantized module (anything with ``dequantized(dtype)``, such as
    :class:`~gemma_stream.QuantLinear`), a dict with the contract names
    (``weight`` + ``weight_scaler``, or ``weight`` + ``weight_scale`` +
    ``weight_zero``), or a tuple ``(q, s)`` / ``(q, s, z)``.

    >>> w = gs.quant.dequantize(gs.quant.quantize_int4(torch.randn(8, 256), 128))
    """
    if callable(getattr(quantized, "dequantized", None)):
        return quantized.dequantized(dtype)
    t = quantized
    if isinstance(t, dict):
        t = (t["weight"], t["weight_scaler"]) if "weight_scaler" in t else \
            (t["weight"], t["weight_scale"], t["weight_zero"])
    if isinstance(t, (tuple, list)) and len(t) == 2:
        return dequant_int8(t[0], t[1]).to(dtype)
    if isinstance(t, (tuple, list)) and len(t) == 3:
        return dequant_int4(split_nibbles(t[0]), t[1], t[2]).to(dtype)
    from ..errors import GemmaStreamError
    raise GemmaStreamError("dequantize takes a quantized module, a dict of contract tensors, (q, s) or (q, s, z)")
