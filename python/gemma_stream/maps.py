"""Name maps between Hugging Face Gemma checkpoints and gemma_pytorch models.

A map is plain data (checkpoint name template -> routes) plus a small lookup,
and is accepted wherever ``rename=`` is::

    cfg = transformers.AutoConfig.from_pretrained("gemma-2b-hf")
    gs.load_into(gemma_pytorch_model, "gemma-2b-hf", rename=gs.maps.hf_to_gemma_pytorch(cfg))

Fused destinations (q, k, v -> ``qkv_proj``) and split sources (``qkv_proj`` ->
q, k, v) are row-range :class:`~gemma_stream.plan.Route` s: the planner turns them
into copy jobs on row ranges, nothing is concatenated in memory.

A name the map does not cover is passed through unchanged, so the planner sees
it under its own name: unless the model has a tensor of exactly that name it is
an unexpected key (a ``MismatchError`` with ``strict=True``), never dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import UsageError
from .plan import Route

__all__ = ["NameMap", "hf_to_gemma_pytorch", "gemma_pytorch_to_hf"]

#: both layouts keep their decoder layers under this prefix
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_LAYER_TEMPLATE = "model.layers.{i}."

#: per-layer tensors named the same way in both layouts
_SAME_IN_LAYER = (
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "pre_feedforward_layernorm.weight",    # Gemma 2 and 3
    "post_feedforward_layernorm.weight",   # Gemma 2 and 3
)
#: HF name -> gemma_pytorch name, per layer (Gemma 3 qk-norm)
_RENAMED_IN_LAYER = {
    "self_attn.q_norm.weight": "self_attn.query_norm.weight",
    "self_attn.k_norm.weight": "self_attn.key_norm.weight",
}
#: rotary tables gemma_pytorch computes at init (Gemma 3 has a local and a global one)
_GEMMA_PYTORCH_COMPUTED = ("freqs_cis", "local_freqs_cis", "global_freqs_cis")
#: old HF checkpoints may still carry these; transformers ignores them too
_HF_STALE = ("model.rotary_emb.inv_freq", _LAYER_TEMPLATE + "self_attn.rotary_emb.inv_freq")


@dataclass(frozen=True)
class NameMap:
    """``checkpoint name -> None | list[Route]`` as data.

    ``routes`` maps a checkpoint name, or a per-layer template containing
    ``{i}``, to the routes it takes (an empty tuple skips the tensor);
    ``computed`` names model tensors the model computes itself at init, which no
    checkpoint of the source layout holds.
    """

    name: str
    routes: Mapping[str, tuple[Route, ...]]
    computed: tuple[str, ...] = ()
    _layer_keys: frozenset = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_layer_keys", frozenset(k for k in self.routes if "{i}" in k))

    def __call__(self, name: str) -> None | str | list[Route]:
        key, layer = name, None
        match = _LAYER.fullmatch(name)
        if match is not None and _LAYER_TEMPLATE + match[2] in self._layer_keys:
            key, layer = _LAYER_TEMPLATE + match[2], match[1]
        spec = self.routes.get(key)
        if spec is None:
            return name            # not covered: the planner decides (unexpected unless the model has it)
        if not spec:
            return None            # skipped on purpose
        if layer is None:
            return list(spec)
        return [Route(r.target.format(i=layer), r.src_rows, r.dst_rows) for r in spec]

    def inverse(self, name: str) -> "NameMap":
        """The map in the other direction: fused row ranges become split ones and back."""
        inverse: dict[str, list[Route]] = {}
        for source, spec in self.routes.items():
            for r in spec:
                inverse.setdefault(r.target, []).append(Route(source, src_rows=r.dst_rows, dst_rows=r.src_rows))
        return NameMap(name, {k: tuple(sorted(v, key=_row_order)) for k, v in inverse.items()})

    def __repr__(self) -> str:
        return f"NameMap({self.name!r}, {len(self.routes)} names)"


def _row_order(route: Route) -> tuple[int, int]:
    return route.src_rows or route.dst_rows or (0, 0)


def _text_config(config: Any) -> Any:
    if isinstance(config, Mapping):
        return config.get("text_config") or config
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def _field(config: Any, key: str, default: Any = None) -> Any:
    value = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
    return default if value is None else value


def _attention_rows(config: Any) -> tuple[int, int]:
    """Rows of q and of k (= v) in a fused ``qkv_proj``."""
    config = _text_config(config)
    heads = _field(config, "num_attention_heads")
    hidden = _field(config, "hidden_size")
    if heads is None or (hidden is None and _field(config, "head_dim") is None):
        raise UsageError("config needs num_attention_heads and head_dim (or hidden_size)")
    head_dim = _field(config, "head_dim", None) or hidden // heads
    kv_heads = _field(config, "num_key_value_heads", heads)
    return heads * head_dim, kv_heads * head_dim


def _tied(config: Any) -> bool:
    return bool(_field(_text_config(config), "tie_word_embeddings", True))


def _hf_to_gemma_pytorch_routes(config: Any) -> dict[str, tuple[Route, ...]]:
    q, kv = _attention_rows(config)
    layer = _LAYER_TEMPLATE
    qkv = layer + "self_attn.qkv_proj.weight"
    routes: dict[str, tuple[Route, ...]] = {
        "model.embed_tokens.weight": (Route("embedder.weight"),),
        "model.norm.weight": (Route("model.norm.weight"),),
        layer + "self_attn.q_proj.weight": (Route(qkv, dst_rows=(0, q)),),
        layer + "self_attn.k_proj.weight": (Route(qkv, dst_rows=(q, q + kv)),),
        layer + "self_attn.v_proj.weight": (Route(qkv, dst_rows=(q + kv, q + 2 * kv)),),
    }
    routes.update({layer + n: (Route(layer + n),) for n in _SAME_IN_LAYER})
    routes.update({layer + hf: (Route(layer + gp),) for hf, gp in _RENAMED_IN_LAYER.items()})
    return routes


def hf_to_gemma_pytorch(config: Any) -> NameMap:
    """Map an HF Gemma / Gemma 2 / Gemma 3 (text) checkpoint onto gemma_pytorch names.

    ``config`` is a transformers config, a gemma_pytorch config or a dict with
    ``num_attention_heads``, ``num_key_value_heads``, ``head_dim`` (or
    ``hidden_size``) and optionally ``tie_word_embeddings``.  ``q/k/v_proj`` fill
    consecutive row ranges of ``qkv_proj``; ``lm_head.weight`` is skipped when
    the embeddings are tied (gemma_pytorch reuses ``embedder.weight``).

    >>> rename = hf_to_gemma_pytorch({"num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256})
    >>> rename("model.layers.3.self_attn.k_proj.weight")
    [Route(target='model.layers.3.self_attn.qkv_proj.weight', src_rows=None, dst_rows=(2048, 2304))]
    """
    routes = _hf_to_gemma_pytorch_routes(config)
    routes.update({name: () for name in _HF_STALE})
    if _tied(config):
        routes["lm_head.weight"] = ()
    return NameMap("hf_to_gemma_pytorch", routes, computed=_GEMMA_PYTORCH_COMPUTED)


def gemma_pytorch_to_hf(config: Any) -> NameMap:
    """Map a gemma_pytorch checkpoint onto HF transformers Gemma names.

    ``qkv_proj`` is split by rows into ``q_proj``, ``k_proj`` and ``v_proj``
    (three routes from one checkpoint tensor); the ``freqs_cis`` tables are
    skipped (transformers computes its rotary tables at init).  With untied
    embeddings in ``config``, ``embedder.weight`` also fills ``lm_head.weight``.

    >>> rename = gemma_pytorch_to_hf({"num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256})
    >>> [r.target.split(".")[-2] for r in rename("model.layers.0.self_attn.qkv_proj.weight")]
    ['q_proj', 'k_proj', 'v_proj']
    """
    forward = NameMap("hf_to_gemma_pytorch", _hf_to_gemma_pytorch_routes(config))
    routes = dict(forward.inverse("gemma_pytorch_to_hf").routes)
    if not _tied(config):
        routes["embedder.weight"] += (Route("lm_head.weight"),)
    routes.update({name: () for name in _GEMMA_PYTORCH_COMPUTED})
    return NameMap("gemma_pytorch_to_hf", routes)
