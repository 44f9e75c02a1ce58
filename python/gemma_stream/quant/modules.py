"""Quantized modules: QuantLinear, QuantEmbedding, QuantScaledEmbedding (layouts in docs/FORMATS.md).

Their ``state_dict()`` is always the contract layout, whatever they keep
internally (int4 weights are repacked in place for torch's CPU kernel), so
``gs.load_into(..., quantize=...)`` writes the quantized bytes straight from the
checkpoint stream and saving round-trips.  ``gs.quantize_`` (quant.py) decides
which modules become these (swap.py).

>>> layer = QuantLinear(4096, 1024, scheme="int4", group_size=128)
>>> gs.load_into(layer, "layer.safetensors")
"""

from __future__ import annotations

import sys
import threading

import torch
import torch.nn.functional as F
from torch import nn

from ..dtypes import FLOAT_DTYPES
from ..errors import GemmaStreamError
from ..plan import QuantTarget
from . import int4_cpu as cpu4
from .reference import GROUP_SIZES, dequant_int4, dequant_int8, split_nibbles

__all__ = ["QuantLinear", "QuantEmbedding", "QuantScaledEmbedding", "QuantWeight", "check_scheme",
           "default_scale_dtype", "is_cpu_layout"]


def default_scale_dtype(scheme: str) -> torch.dtype:
    """FORMATS.md: float32 scales for int8, bfloat16 scales and zero points for int4."""
    return torch.float32 if scheme == "int8" else torch.bfloat16


def check_scheme(scheme: str, group_size: int, scale_dtype: torch.dtype | None) -> None:
    if scheme not in ("int8", "int4"):
        raise GemmaStreamError(f"quantize must be 'int8' or 'int4', not {scheme!r}")
    if scheme == "int4" and group_size not in GROUP_SIZES:
        raise GemmaStreamError(f"int4 group_size must be one of {GROUP_SIZES}, not {group_size}")
    if scale_dtype is not None and scale_dtype not in FLOAT_DTYPES:
        raise GemmaStreamError(f"scale_dtype must be float32, float16 or bfloat16, not {scale_dtype}")


# Set on an int4 weight tensor whose bytes hold torch's CPU kernel layout.  It lives
# on the tensor, not the module, so an embedding and an LM head sharing the
# tensor always agree on what its bytes mean.
_CPU_LAYOUT = "_gs_int4_cpu_layout"


def is_cpu_layout(t: torch.Tensor) -> bool:
    return bool(getattr(t, _CPU_LAYOUT, False))


# One lock per int4 weight storage: the repack rewrites the bytes in place, and two
# modules sharing the weight (tied embedding and head), post-load hooks on worker
# threads or two first forward calls may reach it at once; exactly one must repack.
_LOCKS_GUARD = threading.Lock()
_REPACK_LOCKS: dict[int, threading.Lock] = {}


def _repack_lock(t: torch.Tensor) -> threading.Lock:
    with _LOCKS_GUARD:
        return _REPACK_LOCKS.setdefault(t.data_ptr(), threading.Lock())


def _is_dtensor(t: torch.Tensor) -> bool:
    """A tensor-parallel layer's DTensor (distributed_quant.py): torch's quantized CPU kernels take
    plain tensors only, so such a layer runs ``dequantized()`` through DTensor ops."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class QuantWeight(nn.Module):
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
        check_scheme(scheme, group_size, scale_dtype)
        self.scheme = scheme
        self.group_size = group_size if scheme == "int4" else 0
        n, k = shape
        if scheme == "int4" and k % group_size:
            raise GemmaStreamError(f"int4 needs K ({k}) to be a multiple of the group size ({group_size})")
        if tensors is None:
            dtype = scale_dtype or default_scale_dtype(scheme)
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
        if not is_cpu_layout(w):
            return
        cpu4.repack_(w, cpu4.layout(), to_kernel=False)
        setattr(w, _CPU_LAYOUT, False)

    def _to_cpu_layout_(self) -> bool:
        """Repack the int4 weight in place for ``_weight_int4pack_mm_for_cpu``; False when it cannot."""
        w = self.weight
        if is_cpu_layout(w):
            return True
        layout = cpu4.layout() if self.scheme == "int4" and w.device.type == "cpu" else None
        if layout is None or w.shape[0] % 16:
            return False
        with _repack_lock(w):
            if not is_cpu_layout(w):
                cpu4.repack_(w, layout, to_kernel=True)
                setattr(w, _CPU_LAYOUT, True)
        return True

    def _int4_values(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """4-bit values [N or T, K] (all rows, or ``rows``), whatever the storage layout."""
        w = self.weight
        if not is_cpu_layout(w):
            return split_nibbles(w if rows is None else w[rows])
        if rows is None:
            return split_nibbles(cpu4.unpack(w, cpu4.layout()))
        return cpu4.gather_rows(w, cpu4.layout(), rows)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float [N, K] matrix the quantized tensors stand for."""
        if self.scheme == "int8":
            return dequant_int8(self.weight, self.weight_scaler).to(dtype)
        return dequant_int4(self._int4_values(), self.weight_scale, self.weight_zero).to(dtype)

    # ---- state dict: always the contract layout
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.scheme == "int4" and keep_vars:
            self._to_contract_layout_()  # callers of keep_vars write into the live tensors
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.scheme == "int4" and not keep_vars:
            # a copy: the live bytes may hold (or later be repacked to) the kernel layout
            w = self.weight
            destination[prefix + "weight"] = cpu4.unpack(w.detach(), cpu4.layout()) if is_cpu_layout(w) else \
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


class QuantLinear(QuantWeight):
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
        if self.scheme == "int4" and not self.weight.is_meta and not _is_dtensor(self.weight):
            self._to_cpu_layout_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        out = None
        # torch's CPU kernels are vectorized for bf16 activations only (f32/f16 run a scalar loop)
        if x2.shape[0] and x.device.type == "cpu" and x.dtype == torch.bfloat16 and \
                not (torch.is_grad_enabled() and x.requires_grad) and not _is_dtensor(self.weight):
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


class QuantEmbedding(QuantWeight):
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
            values = dequant_int8(self.weight[rows], self.weight_scaler[rows])
        else:
            values = dequant_int4(self._int4_values(rows), self.weight_scale[rows], self.weight_zero[rows])
        return values.to(self.dtype).reshape(*input.shape, self.embedding_dim)

    def _apply(self, fn, recurse=True):
        try:  # follow module.to(dtype)/.half() for the output dtype, as a float weight would
            self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        except Exception:  # noqa: BLE001 - a fn that only moves devices, or cannot take a probe
            pass
        return super()._apply(fn, recurse)


class QuantScaledEmbedding(QuantEmbedding):
    """A transformers ``*ScaledWordEmbedding`` (Gemma's ``embed_tokens``) with int8 or int4 rows.

    Gemma scales its embeddings by ``sqrt(hidden_size)`` inside the embedding's
    forward, ``embedding(ids) * embed_scale.to(weight.dtype)``, with
    ``embed_scale`` a non-persistent buffer that no checkpoint holds.  This
    module keeps that buffer (``quantize_`` hands over the float module's own
    tensor, so the value computed when the model was built carries over) and
    applies it the same way: its output is bit for bit the float module's on
    the dequantized weight.

    >>> embed = QuantScaledEmbedding(256000, 2048, 0, embed_scale=2048 ** 0.5, scheme="int8")
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 embed_scale: float | torch.Tensor = 1.0, **kwargs):
        super().__init__(num_embeddings, embedding_dim, padding_idx, **kwargs)
        if not isinstance(embed_scale, torch.Tensor):
            embed_scale = torch.tensor(embed_scale, device=kwargs.get("device"))
        self.register_buffer("embed_scale", embed_scale, persistent=False)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows = super().forward(input)
        return rows * self.embed_scale.to(rows.dtype)

    @staticmethod
    def stands_in_for(module: nn.Module) -> bool:
        """Whether ``module`` is a scaled word embedding this class reproduces exactly.

        Narrow on purpose: an ``nn.Embedding`` subclass named ``*ScaledWordEmbedding``
        with a scalar floating ``embed_scale`` buffer, whose forward computes
        ``embedding(ids) * embed_scale.to(weight.dtype)`` on a probe.  BART's
        (``embed_scale`` a Python float attribute) and any forward that does
        something else stay float, reported as overriding forward.
        """
        scale = module._buffers.get("embed_scale") if isinstance(module, nn.Embedding) else None
        return (type(module).__name__.endswith("ScaledWordEmbedding") and isinstance(scale, torch.Tensor)
                and scale.dim() == 0 and scale.is_floating_point() and _forward_is_scaled_lookup(type(module)))


def _forward_is_scaled_lookup(cls: type) -> bool:
    """Run ``cls.forward`` on a small CPU stand-in (its ``__init__`` skipped) and compare.

    bf16 rows times a float32 scale that bf16 cannot hold: multiplying by the
    unrounded scale (a Python float, or the float32 tensor as is) gives other
    bits than rounding the scale to the weight dtype first, as Gemma does.
    """
    weight = (torch.arange(-8, 8, dtype=torch.float32, device="cpu") * 0.37).to(torch.bfloat16).reshape(8, 2)
    scale = torch.tensor(3.3, dtype=torch.float32, device="cpu")
    ids = torch.tensor([[7, 0, 3], [1, 5, 6]], device="cpu")
    try:
        probe = cls.__new__(cls)
        nn.Embedding.__init__(probe, 8, 2, _weight=weight)
        probe.register_buffer("embed_scale", scale, persistent=False)
        with torch.no_grad():
            got = probe(ids)
    except Exception:  # noqa: BLE001 - a forward that needs more than an embedding and a scale is not this one
        return False
    want = F.embedding(ids, weight) * scale.to(torch.bfloat16)
    return isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want)
