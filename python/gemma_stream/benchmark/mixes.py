"""Checkpoint mixes: the same bytes cut into different tensor-size distributions (issue 15).

A loader tuned on one layout can lose on another, so the mix matrix runs every loader on:

- ``gemma2b`` / ``gemma7b``: the Gemma 2B and 7B layers (one ~1-1.6 GB embedding, mid-size
  projections, many small norms), with as many layers as fit the size;
- ``few_large``: one 512 MiB embedding and layers of 48-64 MiB projections with tiny norms (at
  2 GiB: 4 layers); other sizes keep those tensor sizes and change the number of layers;
- ``many_small``: thousands of tensors under 1 MiB, as in MoE experts, routers, norms and biases.

Every mix is a list of ``(name, shape)`` in file order; sizes are in GiB (``1``, ``2``, ``5``) or
``tiny`` (a few MiB, for tests).  Weights are bf16.

>>> specs = mix_specs("few_large", 2 << 30)
>>> sum(math.prod(s) for _, s in specs) * 2 / 2**30
2.000030517578125
"""

from __future__ import annotations

import math

from .shapes import SIZES, parse_gib, shape_for_bytes, tensor_specs

__all__ = ["MIXES", "ITEMSIZE", "TINY_BYTES", "mix_specs", "parse_mix_size", "size_name"]

ITEMSIZE = 2   # bf16
MIB, GIB = 1 << 20, 1 << 30
#: the ``tiny`` size: enough for every mix to keep its structure, small enough for the tests
TINY_BYTES = 6 * MIB

# few_large: hidden 4096, bf16 rows of 8 KiB; per layer 384 MiB in seven 48-64 MiB projections
_FL_HIDDEN = 4096
_FL_ROWS = {"self_attn.q_proj": 8192, "self_attn.k_proj": 6144, "self_attn.v_proj": 6144,
            "mlp.gate_proj": 7168, "mlp.up_proj": 7168}
_FL_O_COLS, _FL_DOWN_COLS = 8192, 6144
_FL_EMBED_BYTES = 512 * MIB

# many_small: hidden 1024; per layer a router, 8 experts of three 896 KiB matrices and two biases, 2 norms
_MS_HIDDEN, _MS_EXPERT, _MS_EXPERTS, _MS_ROUTER = 1024, 448, 8, 64


def _few_large(nbytes: int) -> list[tuple[str, tuple[int, ...]]]:
    layer_bytes = ITEMSIZE * _FL_HIDDEN * (sum(_FL_ROWS.values()) + _FL_O_COLS + _FL_DOWN_COLS)
    scale = 1.0
    if nbytes >= _FL_EMBED_BYTES + layer_bytes:
        layers = max(1, round((nbytes - _FL_EMBED_BYTES) / layer_bytes))
    else:   # tiny: one layer, every projection shrunk alike, the embedding a quarter of the bytes
        layers, scale = 1, 0.75 * nbytes / layer_bytes

    def rows(n: int) -> int:
        return max(8, int(n * scale) // 8 * 8)
    d = _FL_HIDDEN
    projections = []
    for name, n in _FL_ROWS.items():
        projections.append((name, (rows(n), d)))
    projections += [("self_attn.o_proj", (d, rows(_FL_O_COLS))), ("mlp.down_proj", (d, rows(_FL_DOWN_COLS)))]
    per_layer = sum(math.prod(s) for _, s in projections) * ITEMSIZE + 2 * d * ITEMSIZE
    vocab = max(8, (nbytes - layers * per_layer - d * ITEMSIZE) // (d * ITEMSIZE))
    specs = [("model.embed_tokens.weight", (vocab, d))]
    for i in range(layers):
        p = f"model.layers.{i}"
        specs += [(f"{p}.{name}.weight", shape) for name, shape in projections]
        specs += [(f"{p}.input_layernorm.weight", (d,)), (f"{p}.post_attention_layernorm.weight", (d,))]
    specs.append(("model.norm.weight", (d,)))
    return specs


def _many_small_layer(i: int, experts: int) -> list[tuple[str, tuple[int, ...]]]:
    d, e = _MS_HIDDEN, _MS_EXPERT
    p = f"model.layers.{i}"
    specs = [(f"{p}.input_layernorm.weight", (d,)), (f"{p}.mlp.router.weight", (_MS_ROUTER, d))]
    for x in range(experts):
        q = f"{p}.mlp.experts.{x}"
        specs += [(f"{q}.w1.weight", (e, d)), (f"{q}.w1.bias", (e,)), (f"{q}.w3.weight", (e, d)),
                  (f"{q}.w2.weight", (d, e)), (f"{q}.w2.bias", (d,))]
    specs.append((f"{p}.post_attention_layernorm.weight", (d,)))
    return specs


def _many_small(nbytes: int) -> list[tuple[str, tuple[int, ...]]]:
    def size(specs) -> int:
        return sum(math.prod(s) for _, s in specs) * ITEMSIZE
    layer_bytes = size(_many_small_layer(0, _MS_EXPERTS))
    if nbytes >= layer_bytes:
        layers, experts = max(1, round(nbytes / layer_bytes)), _MS_EXPERTS
    else:   # tiny: one layer with as many experts as fit
        one_expert = size(_many_small_layer(0, 1)) - size(_many_small_layer(0, 0))
        layers, experts = 1, max(1, nbytes // one_expert)
    specs = [spec for i in range(layers) for spec in _many_small_layer(i, experts)]
    return specs + [("model.norm.weight", (_MS_HIDDEN,))]


def _gemma(base: str):
    def specs(nbytes: int) -> list[tuple[str, tuple[int, ...]]]:
        if nbytes <= TINY_BYTES:
            return tensor_specs(SIZES["tiny"], "hf")
        return tensor_specs(shape_for_bytes(nbytes, ITEMSIZE, SIZES[base]), "hf")
    return specs


#: mix name -> (what it is, specs(nbytes))
MIXES = {
    "gemma2b": ("Gemma 2B layers", _gemma("2b")),
    "gemma7b": ("Gemma 7B layers", _gemma("7b")),
    "few_large": ("few large: a 512 MiB embedding, 48-64 MiB projections, tiny norms", _few_large),
    "many_small": ("many small: MoE-like, every tensor under 1 MiB", _many_small),
}


def mix_specs(mix: str, nbytes: int) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every tensor of ``mix`` at about ``nbytes`` (bf16), in file order."""
    if mix not in MIXES:
        raise ValueError(f"mix {mix!r}: expected one of {', '.join(MIXES)}")
    return MIXES[mix][1](nbytes)


def parse_mix_size(size: str) -> int:
    """``tiny`` or GiB (``1``, ``2``, ``5``, ``1.5gib``) -> bytes."""
    key = size.strip().lower()
    if key == "tiny":
        return TINY_BYTES
    return int(parse_gib(size, "'tiny'") * GIB)


def size_name(nbytes: int) -> str:
    return "tiny" if nbytes == TINY_BYTES else f"{nbytes / GIB:g}gib"
