"""Quantized layouts (../shared/FORMATS.md): reference quantizers, modules, ``quantize_``.

The reference quantizers are the contract both executors are held to, bit for
bit.  ``quantize_`` swaps ``nn.Linear``/``nn.Embedding`` for
:class:`QuantLinear`/:class:`QuantEmbedding`, whose ``state_dict()`` is always
the contract layout, so ``gs.load_into(..., quantize=...)`` writes the
quantized bytes straight from the checkpoint stream.

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
import torch.nn.functional as F
from torch import nn

from . import _int4_cpu as cpu4
from ._int4_cpu import dequant_int4 as _dequant_int4
from ._int4_cpu import split_nibbles as _split_nibbles
from .errors import GemmaStreamError
from .plan import QuantTarget

__all__ = ["quantize_int8", "quantize_int4", "dequantize", "quantize_", "QuantLinear", "QuantEmbedding",
           "QuantizeReport", "FLT_EPSILON", "GROUP_SIZES"]

log = logging.getLogger("gemma_stream")

FLT_EPSILON = 2.0 ** -23
GROUP_SIZES = (32, 64, 128, 256)
_SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
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


def _dequant_int8(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return q.float() * s.float()[..., None]


# ---------------------------------------------------------------- modules

# Set on an int4 weight tensor whose bytes hold torch's CPU kernel layout.  It lives
# on the tensor, not the module, so an embedding and an LM head sharing the
# tensor always agree on what its bytes mean.
_CPU_LAYOUT = "_gs_int4_cpu_layout"


def _is_cpu_layout(t: torch.Tensor) -> bool:
    return bool(getattr(t, _CPU_LAYOUT, False))


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class _QuantWeight(nn.Module):
    """One quantized [N, K] matrix; the shared base of QuantLinear and QuantEmbedding.

    The tensors are frozen Parameters with the contract names (gemma_pytorch
    registers its quantized weights the same way), so a tied embedding and LM
    head stay one storage through ``.to()``.

    int4 and torch's CPU kernel: ``gs_post_load`` (or the first forward) rewrites
    the ``weight`` bytes in place into the kernel's layout, so the model never
    holds a second copy; a flag on the tensor records it.  Whatever hands the
    bytes out goes back through the contract layout: ``state_dict()`` returns a
    contract-layout *copy* of an int4 weight (a later repack must not change a
    dict already handed out), while ``state_dict(keep_vars=True)``,
    ``load_state_dict`` and ``gs_quant_target`` (callers that write into the
    live tensors) convert back in place first; the next forward repacks.
    """

    def _init_quant(self, scheme: str, shape: tuple[int, int], group_size: int, scale_dtype: torch.dtype | None,
                    tensors: dict[str, torch.Tensor] | None, device=None) -> None:
        _check_scheme(scheme, group_size, scale_dtype)
        self.scheme = scheme
        self.group_size = group_size if scheme == "int4" else 0
        n, k = shape
        if scheme == "int4" and k % group_size:
            raise GemmaStreamError(f"int4 needs K ({k}) to be a multiple of the group size ({group_size})")
        if tensors is None:
            dtype = scale_dtype or _default_scale_dtype(scheme)
            if scheme == "int8":
                tensors = {"weight": torch.empty(n, k, dtype=torch.int8, device=device),
                           "weight_scaler": torch.empty(n, dtype=dtype, device=device)}
            else:
                tensors = {"weight": torch.empty(n, k // 2, dtype=torch.uint8, device=device),
                           "weight_scale": torch.empty(n, k // group_size, dtype=dtype, device=device),
                           "weight_zero": torch.empty(n, k // group_size, dtype=dtype, device=device)}
        for name, tensor in tensors.items():
            setattr(self, name, tensor if isinstance(tensor, nn.Parameter) else _frozen(tensor))

    def _quant_tensors(self) -> dict[str, nn.Parameter]:
        names = ("weight", "weight_scaler") if self.scheme == "int8" else ("weight", "weight_scale", "weight_zero")
        return {name: getattr(self, name) for name in names}

    @property
    def quant_shape(self) -> tuple[int, int]:
        n = self.weight.shape[0]
        return n, self.weight.shape[1] * (2 if self.scheme == "int4" else 1)

    # ---- loader protocol (api.load_into)
    def gs_quant_target(self, prefix: str) -> QuantTarget:
        """The destination gemma_stream's planner writes quantize-on-read jobs into."""
        self._to_contract_layout_()
        p = f"{prefix}." if prefix else ""
        if self.scheme == "int8":
            return QuantTarget("int8", self.quant_shape, self.weight, self.weight_scaler, None, 0,
                               (f"{p}weight_scaler",))
        return QuantTarget("int4", self.quant_shape, self.weight, self.weight_scale, self.weight_zero,
                           self.group_size, (f"{p}weight_scale", f"{p}weight_zero"))

    # ---- int4 layouts
    def _to_contract_layout_(self) -> None:
        """Undo the CPU kernel repack in place (block by block)."""
        w = self.weight
        if not _is_cpu_layout(w):
            return
        cpu4.repack_(w, cpu4.layout(), to_kernel=False)
        setattr(w, _CPU_LAYOUT, False)

    def _to_cpu_layout_(self) -> bool:
        """Repack the int4 weight in place for ``_weight_int4pack_mm_for_cpu``; False when it cannot."""
        w = self.weight
        if _is_cpu_layout(w):
            return True
        layout = cpu4.layout() if self.scheme == "int4" and w.device.type == "cpu" else None
        if layout is None or w.shape[0] % 16:
            return False
        cpu4.repack_(w, layout, to_kernel=True)
        setattr(w, _CPU_LAYOUT, True)
        return True

    def _int4_values(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """4-bit values [N or T, K] (all rows, or ``rows``), whatever the storage layout."""
        w = self.weight
        if not _is_cpu_layout(w):
            return _split_nibbles(w if rows is None else w[rows])
        if rows is None:
            return _split_nibbles(cpu4.unpack(w, cpu4.layout()))
        return cpu4.gather_rows(w, cpu4.layout(), rows)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float [N, K] matrix the quantized tensors stand for."""
        if self.scheme == "int8":
            return _dequant_int8(self.weight, self.weight_scaler).to(dtype)
        return _dequant_int4(self._int4_values(), self.weight_scale, self.weight_zero).to(dtype)

    # ---- state dict: always the contract layout
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.scheme == "int4" and keep_vars:
            self._to_contract_layout_()  # callers of keep_vars write into the live tensors
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.scheme == "int4" and not keep_vars:
            # a copy: the live bytes may hold (or later be repacked to) the kernel layout
            w = self.weight
            destination[prefix + "weight"] = cpu4.unpack(w.detach(), cpu4.layout()) if _is_cpu_layout(w) else \
                w.detach().clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self._to_contract_layout_()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        n, k = self.quant_shape
        scale = (self.weight_scaler if self.scheme == "int8" else self.weight_scale).dtype
        group = f", group_size={self.group_size}" if self.scheme == "int4" else ""
        return f"{self.scheme}, shape=({n}, {k}){group}, scale_dtype={scale}"


class QuantLinear(_QuantWeight):
    """``nn.Linear`` with an int8 or int4 weight (FORMATS.md layout); ``bias`` stays float.

    >>> layer = QuantLinear(4096, 1024, scheme="int4", group_size=128)
    >>> y = layer(x_bf16)   # torch's CPU int4 kernel after gs_post_load / first call
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, scheme: str = "int8",
                 group_size: int = 128, scale_dtype: torch.dtype | None = None, device=None, dtype=None,
                 _tensors: dict[str, torch.Tensor] | None = None, _bias: nn.Parameter | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_quant(scheme, (out_features, in_features), group_size, scale_dtype, _tensors, device)
        if _bias is not None:
            self.bias = _bias
        elif bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def gs_post_load(self) -> None:
        """Called by ``gs.load_into`` after the load: repack int4 for the CPU kernel, once."""
        if self.scheme == "int4" and not self.weight.is_meta:
            self._to_cpu_layout_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        out = None
        # torch's CPU kernels are vectorized for bf16 activations only (f32/f16 run a scalar loop)
        if x2.shape[0] and x.device.type == "cpu" and x.dtype == torch.bfloat16 and \
                not (torch.is_grad_enabled() and x.requires_grad):
            scale = self.weight_scaler if self.scheme == "int8" else self.weight_scale
            if not scale.requires_grad:
                out = self._kernel(x2.contiguous())
        if out is None:
            out = F.linear(x2, self.dequantized(x.dtype))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.scheme == "int8":
            # torch 2.13's AVX2/AVX-512 int8 kernels load 16 k at a time with *aligned* loads and
            # check neither: a K that is not a multiple of 16 or a misaligned row reads garbage
            # (or segfaults).  Fresh CPU allocations are 64-byte aligned.
            if self.in_features % 16 or self.weight.data_ptr() % 64:
                return None
            if x.data_ptr() % 64:
                x = x.clone()
            return torch.ops.aten._weight_int8pack_mm(x, self.weight, self.weight_scaler.to(x.dtype))
        if not self._to_cpu_layout_():
            return None
        sz = torch.stack((self.weight_scale.t().to(x.dtype), self.weight_zero.t().to(x.dtype)), dim=-1)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, self.group_size, sz)


class QuantEmbedding(_QuantWeight):
    """``nn.Embedding`` with int8 or int4 rows: gathers the rows, then dequantizes only those.

    ``dtype`` is the output dtype (the float embedding's).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, *,
                 scheme: str = "int8", group_size: int = 128, scale_dtype: torch.dtype | None = None,
                 device=None, dtype=None, _tensors: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.dtype = dtype or torch.get_default_dtype()
        self._init_quant(scheme, (num_embeddings, embedding_dim), group_size, scale_dtype, _tensors, device)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows = input.reshape(-1)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.num_embeddings):
            raise IndexError(f"index out of range in QuantEmbedding({self.num_embeddings} rows)")
        if self.scheme == "int8":
            values = _dequant_int8(self.weight[rows], self.weight_scaler[rows])
        else:
            values = _dequant_int4(self._int4_values(rows), self.weight_scale[rows], self.weight_zero[rows])
        return values.to(self.dtype).reshape(*input.shape, self.embedding_dim)

    def _apply(self, fn, recurse=True):
        try:  # follow module.to(dtype)/.half() for the output dtype, as a float weight would
            self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        except Exception:  # noqa: BLE001 - a fn that only moves devices, or cannot take a probe
            pass
        return super()._apply(fn, recurse)


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


def _default_scale_dtype(scheme: str) -> torch.dtype:
    return torch.float32 if scheme == "int8" else torch.bfloat16


def _check_scheme(scheme: str, group_size: int, scale_dtype: torch.dtype | None) -> None:
    if scheme not in ("int8", "int4"):
        raise GemmaStreamError(f"quantize must be 'int8' or 'int4', not {scheme!r}")
    if scheme == "int4" and group_size not in GROUP_SIZES:
        raise GemmaStreamError(f"int4 group_size must be one of {GROUP_SIZES}, not {group_size}")
    if scale_dtype is not None and scale_dtype not in _SCALE_DTYPES:
        raise GemmaStreamError(f"scale_dtype must be float32, float16 or bfloat16, not {scale_dtype}")


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
    if type(module).forward is not base.forward:
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
    are listed with the reason in ``model.gs_quantize_report.skipped``.  A weight
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
