"""Quantized layouts (../shared/FORMATS.md): torch reference quantizers.

These functions are the contract both executors are held to, bit for bit.
"""

from __future__ import annotations

import torch

__all__ = ["quantize_int8", "quantize_int4", "FLT_EPSILON"]

FLT_EPSILON = 2.0 ** -23


def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: returns (q int8 [N, K], scale [N] in ``scale_dtype``).

    >>> q, s = quantize_int8(torch.randn(4, 64, dtype=torch.bfloat16))
    >>> (q.float() * s[:, None].float()).shape
    torch.Size([4, 64])
    """
    w = w.float()
    amax = w.abs().amax(dim=1)
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
