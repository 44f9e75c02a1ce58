"""``quantize_``: which ``nn.Linear``/``nn.Embedding`` become quantized modules, and why the others stay float.

>>> with gs.init_empty():
...     model = MyModel()
>>> gs.quantize_(model, "int4", group_size=128, skip=["lm_head"])
>>> gs.load_into(model, "model.safetensors")     # quantized on read
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Union

import torch
from torch import nn

from ..errors import GemmaStreamError
from ..modules import int8_rows_target
from .modules import QuantEmbedding, QuantLinear, QuantScaledEmbedding, QuantWeight, check_scheme, default_scale_dtype
from .reference import quantize_int4, quantize_int8

__all__ = ["quantize_", "QuantizeReport"]

log = logging.getLogger("gemma_stream")

_CHUNK_BYTES = 8 << 20   # rows quantized at a time by quantize_ on a materialized model


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
                 tensors: dict[str, torch.Tensor] | None) -> QuantWeight:
    w = module.weight
    kwargs = dict(scheme=scheme, group_size=group_size, scale_dtype=scale_dtype, device=w.device, _tensors=tensors)
    if isinstance(module, nn.Linear):
        return QuantLinear(module.in_features, module.out_features, module.bias is not None,
                           dtype=w.dtype, _bias=module.bias, **kwargs)
    if QuantScaledEmbedding.stands_in_for(module):  # Gemma's embed_tokens: keep its computed embed_scale buffer
        return QuantScaledEmbedding(module.num_embeddings, module.embedding_dim, module.padding_idx,
                                    module.embed_scale, dtype=w.dtype, **kwargs)
    return QuantEmbedding(module.num_embeddings, module.embedding_dim, module.padding_idx, dtype=w.dtype, **kwargs)


def _check_foreign_layers(model: nn.Module, scheme: str) -> list[str]:
    """Layers ``quantize_`` cannot swap must not stay float without a word.

    gemma_pytorch's own ``Linear``/``Embedding`` are not ``torch.nn`` classes: with
    ``quant=False`` they hold a float weight their forward uses directly, so an error
    says how to get an int8 model (build it with ``quant=True``; ``load_into`` then
    quantizes a float checkpoint on read into its int8 ``weight`` + ``weight_scaler``).
    Already-int8 layers of that kind are returned: with ``scheme="int8"`` they are
    the quantized destinations.
    """
    foreign, int8_layers = [], []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding, QuantWeight)):
            continue
        if int8_rows_target(module, name) is not None:
            int8_layers.append(name)
            continue
        weight = module._parameters.get("weight")
        if weight is not None and weight.dim() == 2 and weight.is_floating_point() and \
                (hasattr(module, "quant") or type(module).__name__ in ("Linear", "Embedding")):
            foreign.append(f"{name} ({type(module).__module__}.{type(module).__name__})")
    if foreign:
        raise GemmaStreamError(
            f"quantize_({scheme!r}): {len(foreign)} layers are not torch.nn.Linear/Embedding and cannot be replaced "
            f"(their forward would keep using a float weight): {', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}. For gemma_pytorch, build the model with quant=True in its "
            f"config (int8 weight + weight_scaler) and call gs.load_into without quantize=: a float checkpoint is "
            f"quantized on read into those layers")
    if int8_layers and scheme != "int8":
        raise GemmaStreamError(f"quantize_({scheme!r}): {len(int8_layers)} layers already hold gemma_pytorch's int8 "
                               f"layout (e.g. {int8_layers[0]}); only int8 can be loaded into them")
    return int8_layers


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
    shared by both.  gemma_pytorch's own ``Linear``/``Embedding`` cannot be
    swapped: with ``quant=False`` that is an error saying to build the model with
    ``quant=True`` (whose int8 layers ``load_into`` fills on read), with
    ``quant=True`` they count as int8 layers.  A model with nothing to quantize
    is an error.

    >>> with torch.device("meta"):
    ...     model = MyModel()
    >>> gs.quantize_(model, "int4", group_size=128, skip=["lm_head"])
    >>> model.gs_quantize_report.skipped
    """
    check_scheme(scheme, group_size, scale_dtype)
    scale_dtype = scale_dtype or default_scale_dtype(scheme)
    report = QuantizeReport(scheme, group_size if scheme == "int4" else 0, scale_dtype)
    skip_fn = _skip_predicate(skip)
    # every place a Linear/Embedding sits, grouped by the weight Parameter they share
    groups: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            groups.setdefault(id(module.weight), []).append((name, module))
    int8_layers = _check_foreign_layers(model, scheme)
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
        done: dict[int, QuantWeight] = {}
        for name, module in members:
            if id(module) not in done:
                new = _replacement(module, scheme, group_size, scale_dtype, tensors)
                tensors = new._quant_tensors()  # later members share these very tensors
                done[id(module)] = new
            _set_module(model, name, done[id(module)])
            report.quantized.append(name)
        if len(members) > 1:
            report.tied.append(tuple(name for name, _ in members))

    report.quantized.extend(int8_layers)
    model.gs_quantize_report = report
    if not report.quantized and not any(isinstance(m, QuantWeight) for m in model.modules()):
        why = "; ".join(f"{n}: {w}" for n, w in list(report.skipped.items())[:10])
        raise GemmaStreamError(f"quantize_({scheme!r}): {type(model).__name__} has no layer to quantize (no "
                               f"torch.nn.Linear or torch.nn.Embedding that can be replaced" +
                               (f"; {why})" if why else ")"))
    if report.skipped:
        log.info("quantize_(%s): %d modules stay float: %s", scheme, len(report.skipped),
                 ", ".join(f"{n} ({why})" for n, why in report.skipped.items()))
    return model
