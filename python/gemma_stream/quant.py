"""Quantized layouts (docs/FORMATS.md): reference quantizers, ``dequantize``, ``quantize_``.

The reference quantizers are the contract both executors are held to, bit for
bit.  ``quantize_`` swaps ``nn.Linear``/``nn.Embedding`` for
:class:`QuantLinear`/:class:`QuantEmbedding` (quant_modules.py, re-exported
here), whose ``state_dict()`` is always the contract layout, so
``gs.load_into(..., quantize=...)`` writes the quantized bytes straight from
the checkpoint stream.

>>> with torch.device("meta"):
...     model = MyModel()
>>> gs.load_into(model, "model.safetensors", quantize="int4", group_size=128)
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Union

import torch
from torch import nn

from ._int4_cpu import dequant_int4 as _dequant_int4
from ._int4_cpu import split_nibbles as _split_nibbles
from .errors import GemmaStreamError
# the modules live in quant_modules; quant stays their public home (gs.quant.QuantLinear, ...)
from .quant_modules import GROUP_SIZES, QuantEmbedding, QuantLinear, QuantScaledEmbedding, _QuantWeight
from .quant_modules import _check_scheme, _default_scale_dtype, _dequant_int8, _is_cpu_layout  # noqa: F401 - tests

__all__ = ["quantize_int8", "quantize_int4", "dequantize", "quantize_", "QuantLinear", "QuantEmbedding",
           "QuantScaledEmbedding", "QuantizeReport", "FLT_EPSILON", "GROUP_SIZES"]

log = logging.getLogger("gemma_stream")

FLT_EPSILON = 2.0 ** -23
_CHUNK_BYTES = 8 << 20   # rows quantized at a time by quantize_ on a materialized model


# ---------------------------------------------------------------- reference quantizers (the contract)

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


# ---------------------------------------------------------------- dequantize

Tensors = Union[_QuantWeight, dict, tuple, list]


def dequantize(module_or_tensors: Tensors, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference dequantizer: the float [N, K] matrix of a quantized module or of contract tensors.

    Takes a :class:`QuantLinear`/:class:`QuantEmbedding`, a dict with the
    contract names (``weight`` + ``weight_scaler``, or ``weight`` +
    ``weight_scale`` + ``weight_zero``), or a tuple ``(q, s)`` / ``(q, s, z)``.

    >>> w = gs.quant.dequantize(gs.quant.quantize_int4(torch.randn(8, 256), 128))
    """
    if isinstance(module_or_tensors, _QuantWeight):
        return module_or_tensors.dequantized(dtype)
    t = module_or_tensors
    if isinstance(t, dict):
        t = (t["weight"], t["weight_scaler"]) if "weight_scaler" in t else \
            (t["weight"], t["weight_scale"], t["weight_zero"])
    if len(t) == 2:
        return _dequant_int8(t[0], t[1]).to(dtype)
    if len(t) == 3:
        return _dequant_int4(_split_nibbles(t[0]), t[1], t[2]).to(dtype)
    raise TypeError("dequantize takes a quantized module, a dict of contract tensors, (q, s) or (q, s, z)")


# ---------------------------------------------------------------- quantize_

Skip = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]


@dataclass
class QuantizeReport:
    """What ``quantize_`` did; stored on the model as ``model.gs_quantize_report``."""

    scheme: str
    group_size: int
    scale_dtype: torch.dtype
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)    # module name -> why it stays float
    tied: list[tuple[str, ...]] = field(default_factory=list)  # modules sharing one quantized storage


def _skip_predicate(skip: Skip) -> Callable[[str, nn.Module], bool]:
    if skip is None:
        return lambda name, module: False
    if callable(skip):
        return skip
    patterns = [skip] if isinstance(skip, str) else list(skip)
    return lambda name, module: any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def _why_not(name: str, module: nn.Module, scheme: str, group_size: int, skip) -> str | None:
    if not name:
        return "the model itself cannot be replaced in place"
    base = nn.Linear if isinstance(module, nn.Linear) else nn.Embedding
    if type(module).forward is not base.forward and not QuantScaledEmbedding.stands_in_for(module):
        return f"{type(module).__name__} overrides forward"
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse):
        return "embedding with max_norm or sparse gradients"
    if skip(name, module):
        return "skipped by the caller"
    n, k = module.weight.shape
    if n == 0 or k == 0:
        return "empty weight"
    if scheme == "int4" and k % group_size:
        return f"K={k} is not a multiple of group_size={group_size}"
    return None


def _quantize_weight(name: str, w: torch.Tensor, scheme: str, group_size: int,
                     scale_dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """Quantize an already materialized weight with the reference, a few MiB of rows at a time."""
    if w.is_meta:
        return None
    n, k = w.shape
    out = QuantLinear(k, n, False, scheme=scheme, group_size=group_size, scale_dtype=scale_dtype,
                      device=w.device)._quant_tensors()
    step = max(1, _CHUNK_BYTES // (4 * k))
    with torch.no_grad():
        for r0 in range(0, n, step):
            rows = w[r0:r0 + step].detach()
            finite = torch.isfinite(rows).all(dim=1)
            if not bool(finite.all()):
                bad = r0 + int((~finite).nonzero()[0, 0])
                raise GemmaStreamError(f"{name}.weight: row {bad} holds NaN or infinity; it cannot be quantized")
            parts = quantize_int8(rows, scale_dtype) if scheme == "int8" else \
                quantize_int4(rows, group_size, scale_dtype)
            for tensor, part in zip(out.values(), parts):
                tensor[r0:r0 + step].copy_(part)
    return dict(out)


def _replacement(module: nn.Module, scheme: str, group_size: int, scale_dtype: torch.dtype,
                 tensors: dict[str, torch.Tensor] | None) -> _QuantWeight:
    w = module.weight
    kwargs = dict(scheme=scheme, group_size=group_size, scale_dtype=scale_dtype, device=w.device, _tensors=tensors)
    if isinstance(module, nn.Linear):
        return QuantLinear(module.in_features, module.out_features, module.bias is not None,
                           dtype=w.dtype, _bias=module.bias, **kwargs)
    if QuantScaledEmbedding.stands_in_for(module):  # Gemma's embed_tokens: keep its computed embed_scale buffer
        return QuantScaledEmbedding(module.num_embeddings, module.embedding_dim, module.padding_idx,
                                    module.embed_scale, dtype=w.dtype, **kwargs)
    return QuantEmbedding(module.num_embeddings, module.embedding_dim, module.padding_idx, dtype=w.dtype, **kwargs)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def quantize_(model: nn.Module, scheme: str, *, group_size: int = 128, scale_dtype: torch.dtype | None = None,
              skip: Skip = None) -> nn.Module:
    """Swap ``nn.Linear``/``nn.Embedding`` for quantized modules, in place; returns ``model``.

    On ``meta`` nothing is allocated (``gs.load_into`` then quantizes on read);
    materialized weights are quantized with the reference quantizers.  ``skip``
    takes module names (``fnmatch`` patterns allowed) or ``predicate(name,
    module) -> bool``.  Modules that stay float (skipped, K not a multiple of
    ``group_size``, a subclass with its own forward, a tie with one of those)
    are listed with the reason in ``model.gs_quantize_report.skipped``.  The
    one subclass taken is transformers' Gemma ``*ScaledWordEmbedding``, which
    becomes a :class:`QuantScaledEmbedding` keeping its ``embed_scale``.  A weight
    tied between modules (embedding and LM head) becomes one quantized storage
    shared by both.

    >>> with torch.device("meta"):
    ...     model = MyModel()
    >>> gs.quantize_(model, "int4", group_size=128, skip=["lm_head"])
    >>> model.gs_quantize_report.skipped
    """
    _check_scheme(scheme, group_size, scale_dtype)
    scale_dtype = scale_dtype or _default_scale_dtype(scheme)
    report = QuantizeReport(scheme, group_size if scheme == "int4" else 0, scale_dtype)
    skip_fn = _skip_predicate(skip)
    # every place a Linear/Embedding sits, grouped by the weight Parameter they share
    groups: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            groups.setdefault(id(module.weight), []).append((name, module))
    uses: dict[int, list[str]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        uses.setdefault(id(param), []).append(pname)

    for key, members in groups.items():
        reasons = {name: _why_not(name, module, scheme, group_size, skip_fn) for name, module in members}
        outside = sorted(set(uses.get(key, [])) - {f"{name}.weight" if name else "weight" for name, _ in members})
        blocker = next((name for name, why in reasons.items() if why), None)
        if blocker is not None or outside:
            for name, why in reasons.items():
                report.skipped[name] = why or (f"tied to {blocker}, which stays float" if blocker else
                                               f"weight also used as {outside[0]}")
            continue
        first_name, first = members[0]
        tensors = _quantize_weight(first_name, first.weight, scheme, group_size, scale_dtype)
        done: dict[int, _QuantWeight] = {}
        for name, module in members:
            if id(module) not in done:
                new = _replacement(module, scheme, group_size, scale_dtype, tensors)
                tensors = new._quant_tensors()  # later members share these very tensors
                done[id(module)] = new
            _set_module(model, name, done[id(module)])
            report.quantized.append(name)
        if len(members) > 1:
            report.tied.append(tuple(name for name, _ in members))

    model.gs_quantize_report = report
    if report.skipped:
        log.info("quantize_(%s): %d modules stay float: %s", scheme, len(report.skipped),
                 ", ".join(f"{n} ({why})" for n, why in report.skipped.items()))
    return model
