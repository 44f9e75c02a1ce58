"""Gemma-shaped synthetic models: sizes, tensor lists in both naming schemes, a module buildable on meta.

The shapes are the real Gemma text-model configurations (docs/FORMATS.md); the weights are
synthetic.  Two namings: "hf" (transformers' GemmaForCausalLM, LM head tied to the embedding so it is
not stored) and "gemma_pytorch" (``embedder.weight``, fused ``qkv_proj``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

__all__ = ["GemmaShape", "LARGE_SIZES", "SIZES", "GemmaShaped", "shape_for_bytes", "hf_parts", "parse_size", "tensor_specs", "module_from_specs"]

NAMINGS = ("hf", "gemma_pytorch")


@dataclass(frozen=True)
class GemmaShape:
    name: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    sandwich_norms: bool = False   # Gemma 2 adds pre/post feed-forward norms to every layer

    def params(self) -> int:
        return sum(math.prod(shape) for _, shape in tensor_specs(self, "hf"))

    def nbytes(self, itemsize: int) -> int:
        return self.params() * itemsize

    def as_dict(self) -> dict:
        return asdict(self)


SIZES = {
    # a few MB: for tests; every K is a multiple of 128 so int4 G=128 applies everywhere
    "tiny": GemmaShape("tiny", 4096, 256, 1024, 2, 4, 1, 64),
    # Gemma 3 1B text dimensions in the Gemma layout: 1.0B params, 2.0 GB bf16
    "1b": GemmaShape("1b", 262144, 1152, 6912, 26, 4, 1, 256),
    # Gemma 2B: 2.51B params, 5.0 GB bf16
    "2b": GemmaShape("2b", 256000, 2048, 16384, 18, 8, 1, 256),
    # Gemma 7B: 8.54B params, 17.1 GB bf16
    "7b": GemmaShape("7b", 256000, 3072, 24576, 28, 16, 16, 256),
}

#: shapes too big for ``--synthetic`` on an ordinary machine (benchmarks/big_model.py writes them)
LARGE_SIZES = {
    # Gemma 2 27B: 27.2B params, 54.3 GB bf16
    "27b": GemmaShape("27b", 256000, 4608, 36864, 46, 32, 16, 128, sandwich_norms=True),
}


def shape_for_bytes(target_bytes: int, itemsize: int, base: GemmaShape | None = None) -> GemmaShape:
    """``base``'s layers and width (Gemma 2B by default), with as many layers (and as large a vocabulary)
    as fit ``target_bytes``.

    Keeps the base's embedding (one ~1 GB tensor, the case chunking must bound) whenever it fits.
    """
    base = base or SIZES["2b"]
    one_layer = (base.nbytes(itemsize) - base.vocab * base.hidden * itemsize - base.hidden * itemsize) // base.layers
    embed = base.vocab * base.hidden * itemsize
    if target_bytes >= embed + one_layer:
        layers = max(1, round((target_bytes - embed) / one_layer))
        vocab = base.vocab
    else:
        layers = 1
        vocab = max(256, (target_bytes - one_layer) // (base.hidden * itemsize) // 256 * 256)
    gib = target_bytes / 2**30
    return replace(base, name=f"{gib:g}gib", vocab=vocab, layers=layers)


def parse_size(size: str, itemsize: int = 2) -> GemmaShape:
    """``tiny|1b|2b|7b``, or a size in GiB such as ``1``, ``1.5gib``, ``0.5GiB`` (2B-wide layers)."""
    key = size.strip().lower()
    if key in SIZES:
        return SIZES[key]
    return shape_for_bytes(int(parse_gib(size, f"one of {', '.join(SIZES)}") * 2**30), itemsize)


def parse_gib(size: str, names: str) -> float:
    """A size in GiB (``1``, ``1.5gib``, ``0.5GiB``) in (0, 64]; ``names`` says what else was accepted."""
    key = size.strip().lower()
    number = key[:-3] if key.endswith("gib") else key
    try:
        gib = float(number)
    except ValueError:
        raise ValueError(f"size {size!r}: expected {names} or a size in GiB such as 1.5") from None
    if not 0 < gib <= 64:
        raise ValueError(f"size {size!r}: GiB must be in (0, 64]")
    return gib


def tensor_specs(shape: GemmaShape, naming: str = "hf") -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every stored tensor, in file order."""
    if naming not in NAMINGS:
        raise ValueError(f"naming must be one of {NAMINGS}, not {naming!r}")
    d, hd = shape.hidden, shape.head_dim
    q, kv = shape.heads * hd, shape.kv_heads * hd
    specs = [("embedder.weight" if naming == "gemma_pytorch" else "model.embed_tokens.weight", (shape.vocab, d))]
    for i in range(shape.layers):
        p = f"model.layers.{i}"
        if naming == "gemma_pytorch":
            specs.append((f"{p}.self_attn.qkv_proj.weight", (q + 2 * kv, d)))
        else:
            specs += [(f"{p}.self_attn.q_proj.weight", (q, d)), (f"{p}.self_attn.k_proj.weight", (kv, d)),
                      (f"{p}.self_attn.v_proj.weight", (kv, d))]
        specs += [(f"{p}.self_attn.o_proj.weight", (d, q)),
                  (f"{p}.mlp.gate_proj.weight", (shape.intermediate, d)),
                  (f"{p}.mlp.up_proj.weight", (shape.intermediate, d)),
                  (f"{p}.mlp.down_proj.weight", (d, shape.intermediate)),
                  (f"{p}.input_layernorm.weight", (d,)),
                  (f"{p}.post_attention_layernorm.weight", (d,))]
        if shape.sandwich_norms:
            specs += [(f"{p}.pre_feedforward_layernorm.weight", (d,)),
                      (f"{p}.post_feedforward_layernorm.weight", (d,))]
    specs.append(("model.norm.weight", (d,)))
    return specs


def hf_parts(shape: GemmaShape, name: str, tensor_shape: tuple[int, ...]) -> list[tuple[str, int]]:
    """The Hugging Face tensors (name, numel) that make up ``name``, in row order."""
    if name == "embedder.weight":
        return [("model.embed_tokens.weight", math.prod(tensor_shape))]
    if name.endswith(".qkv_proj.weight"):
        stem = name[: -len("qkv_proj.weight")]
        q, kv = shape.heads * shape.head_dim * shape.hidden, shape.kv_heads * shape.head_dim * shape.hidden
        return [(stem + "q_proj.weight", q), (stem + "k_proj.weight", kv), (stem + "v_proj.weight", kv)]
    return [(name, math.prod(tensor_shape))]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype))


def _linear(n_in: int, n_out: int, dtype: torch.dtype) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=False, dtype=dtype)


class _Attention(nn.Module):
    def __init__(self, s: GemmaShape, naming: str, dtype: torch.dtype):
        super().__init__()
        q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
        if naming == "gemma_pytorch":
            self.qkv_proj = _linear(s.hidden, q + 2 * kv, dtype)
        else:
            self.q_proj = _linear(s.hidden, q, dtype)
            self.k_proj = _linear(s.hidden, kv, dtype)
            self.v_proj = _linear(s.hidden, kv, dtype)
        self.o_proj = _linear(q, s.hidden, dtype)


class _MLP(nn.Module):
    def __init__(self, s: GemmaShape, dtype: torch.dtype):
        super().__init__()
        self.gate_proj = _linear(s.hidden, s.intermediate, dtype)
        self.up_proj = _linear(s.hidden, s.intermediate, dtype)
        self.down_proj = _linear(s.intermediate, s.hidden, dtype)


class _Layer(nn.Module):
    def __init__(self, s: GemmaShape, naming: str, dtype: torch.dtype):
        super().__init__()
        self.self_attn = _Attention(s, naming, dtype)
        self.mlp = _MLP(s, dtype)
        self.input_layernorm = RMSNorm(s.hidden, dtype)
        self.post_attention_layernorm = RMSNorm(s.hidden, dtype)
        if s.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(s.hidden, dtype)
            self.post_feedforward_layernorm = RMSNorm(s.hidden, dtype)


class _Body(nn.Module):
    def __init__(self, s: GemmaShape, naming: str, dtype: torch.dtype):
        super().__init__()
        if naming == "hf":
            self.embed_tokens = nn.Embedding(s.vocab, s.hidden, dtype=dtype)
        self.layers = nn.ModuleList(_Layer(s, naming, dtype) for _ in range(s.layers))
        self.norm = RMSNorm(s.hidden, dtype)


class GemmaShaped(nn.Module):
    """A Gemma decoder's parameters (no forward): what a loader has to fill.

    The LM head is tied to the embedding, so it is neither a parameter of its own nor stored.

    >>> with torch.device("meta"):
    ...     model = GemmaShaped(SIZES["2b"], torch.bfloat16)
    >>> gs.load_into(model, "model.safetensors")
    """

    def __init__(self, shape: GemmaShape, dtype: torch.dtype = torch.bfloat16, naming: str = "hf"):
        super().__init__()
        if naming not in NAMINGS:
            raise ValueError(f"naming must be one of {NAMINGS}, not {naming!r}")
        if naming == "gemma_pytorch":
            self.embedder = nn.Embedding(shape.vocab, shape.hidden, dtype=dtype)
        self.model = _Body(shape, naming, dtype)


class _Holder(nn.Module):
    pass


def module_from_specs(specs: list[tuple[str, tuple[int, ...], torch.dtype]]) -> nn.Module:
    """A module whose state_dict has exactly these names, shapes and dtypes (for a user's checkpoint).

    A parent whose only tensors are a 2-D ``weight`` (and a 1-D ``bias``) becomes ``nn.Linear``
    (``nn.Embedding`` when its name says so), so ``quantize=`` has layers to act on.
    Build it under ``torch.device("meta")``.
    """
    by_parent: dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]] = {}
    for name, shape, dtype in specs:
        parent, _, leaf = name.rpartition(".")
        by_parent.setdefault(parent, {})[leaf] = (tuple(shape), dtype)
    root = _Holder()
    for parent, leaves in by_parent.items():
        module = _leaf_module(parent, leaves)
        if parent:
            _attach(root, parent, module)
        else:
            for leaf, (shape, dtype) in leaves.items():
                root.register_parameter(leaf, nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False))
    return root


def _leaf_module(parent: str, leaves: dict) -> nn.Module:
    weight = leaves.get("weight")
    bias = leaves.get("bias")
    if weight is not None and len(weight[0]) == 2 and set(leaves) <= {"weight", "bias"} and weight[1].is_floating_point:
        (n_out, n_in), dtype = weight
        if bias is None and "embed" in parent.rsplit(".", 1)[-1]:
            return nn.Embedding(n_out, n_in, dtype=dtype)
        if bias is None or (bias[0] == (n_out,) and bias[1] == dtype):
            return nn.Linear(n_in, n_out, bias=bias is not None, dtype=dtype)
    module = _Holder()
    for leaf, (shape, dtype) in leaves.items():
        module.register_parameter(leaf, nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False))
    return module


def _attach(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parts = dotted.split(".")
    node = root
    for part in parts[:-1]:
        child = node._modules.get(part)
        if child is None:
            child = _Holder()
            node.add_module(part, child)
        node = child
    existing = node._modules.get(parts[-1])
    if existing is not None:   # a parent that also has children: move its tensors onto the new module
        for name, child in existing._modules.items():
            module.add_module(name, child)
    node.add_module(parts[-1], module)
