"""The direct path: plan vLLM's own parameters as destinations and copy straight in.

For architectures whose loading vLLM does with ``AutoWeightsLoader`` and its
``WeightsMapper`` alone (Gemma, Gemma 2, Gemma 3 text, Llama, Mistral, Qwen2), the checkpoint
name of every tensor maps to a parameter name plus, for fused projections, a
shard id (``q``/``k``/``v`` of ``qkv_proj``, 0/1 of ``gate_up_proj``).  The
shard id becomes a row range of the fused parameter, read from the vLLM
module itself (its heads and ``output_sizes``), so the engine writes each
checkpoint tensor into its rows with no intermediate tensor.

With tensor parallelism each rank plans only its own slices, as vLLM's weight
loaders would narrow them: rows of column-parallel weights (a q/k/v or gate/up
shard's rows of the checkpoint tensor into the rank's rows of the fused
parameter; k/v replicated when there are fewer heads than ranks), columns of
row-parallel weights, the rank's vocabulary rows of an embedding; replicated
parameters whole.  So each worker reads about its share of the sharded weights
plus the replicated ones.

Anything this module does not know (another architecture, a quantized layer,
a parameter with its own ``weight_loader``, a fused projection stored fused, a
name the mapper leaves unmatched) raises :class:`NotDirect` before a byte is
read, and the loader streams into ``model.load_weights`` instead.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..formats import Checkpoint
from ..plan import PartialRoutes, Plan, Route, make_plan

__all__ = ["DIRECT_ARCHITECTURES", "NotDirect", "plan_direct"]

logger = logging.getLogger("gemma_stream")

#: model classes whose ``load_weights`` is ``AutoWeightsLoader`` + ``hf_to_vllm_mapper`` and nothing else
#: (Mistral's ``load_weights`` also renames and permutes Mistral-format names such as ``wq``: those match no
#: parameter here, so such a checkpoint streams; Qwen2 adds q/k/v biases, row ranges like the weights)
DIRECT_ARCHITECTURES = ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "LlamaForCausalLM",
                        "MistralForCausalLM", "Qwen2ForCausalLM")


class NotDirect(Exception):
    """The direct path cannot load this model; the message says why (the loader then streams)."""


def _layers():
    from vllm.model_executor.layers import linear
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    plain_methods = {"UnquantizedLinearMethod", "UnquantizedEmbeddingMethod"}
    return linear, VocabParallelEmbedding, default_weight_loader, plain_methods


def _shard_route(target: str, module: nn.Module, param: torch.Tensor, shard_id, linear, embedding_cls,
                 padding: dict[str, torch.Tensor]) -> Route:
    """The rows (and columns) of one checkpoint tensor that this tensor-parallel rank keeps, and where
    they go in its parameter: what vLLM's weight loader for ``module`` would narrow and copy (vLLM 0.32
    ``linear.py`` / ``parameter.py`` / ``vocab_parallel_embedding.py``).  At tensor parallel size 1 the
    ranges are whole tensors, and only a fused projection's ``dst_rows`` remain."""
    kind = type(module)
    rank, size = getattr(module, "tp_rank", 0), getattr(module, "tp_size", 1)
    if shard_id is not None:
        if kind is linear.QKVParallelLinear and shard_id in ("q", "k", "v"):
            q = module.num_heads * module.head_size
            kv = module.num_kv_heads * module.head_size
            offset, rows = {"q": (0, q), "k": (q, kv), "v": (q + kv, module.num_kv_heads * module.v_head_size)}[shard_id]
            # k and v heads are replicated when there are fewer of them than ranks
            shard_rank = rank if shard_id == "q" else rank // module.num_kv_head_replicas
        elif kind is linear.MergedColumnParallelLinear and isinstance(shard_id, int) and \
                0 <= shard_id < len(module.output_sizes):
            offset = sum(module.output_sizes[:shard_id]) // size
            rows = module.output_sizes[shard_id] // size
            shard_rank = rank
        else:
            raise NotDirect(f"{target}: shard id {shard_id!r} of a {kind.__name__}")
        if getattr(param, "output_dim", 0) != 0:
            raise NotDirect(f"{target}: output dimension {param.output_dim} (the direct path splits rows)")
        return Route(target, src_rows=(shard_rank * rows, (shard_rank + 1) * rows), dst_rows=(offset, offset + rows))
    if issubclass(kind, embedding_cls) and getattr(param, "output_dim", None) is not None:
        indices = module.shard_indices
        if indices.num_added_elements or param.output_dim != 0:
            raise NotDirect(f"{target}: an embedding with added vocabulary or sharded along dim {param.output_dim}")
        rows = indices.org_vocab_end_index - indices.org_vocab_start_index
        if rows < param.shape[0]:
            padding[target] = param[rows:]      # vLLM zeroes the padding rows
        if rows == param.shape[0] and size == 1:
            return Route(target)
        return Route(target, src_rows=(indices.org_vocab_start_index, indices.org_vocab_end_index),
                     dst_rows=(0, rows))
    if size == 1 or getattr(param, "is_sharded_weight", False):
        return Route(target)
    if kind in (linear.ColumnParallelLinear, linear.MergedColumnParallelLinear, linear.QKVParallelLinear):
        if kind is not linear.ColumnParallelLinear:
            raise NotDirect(f"{target}: a fused {kind.__name__} stored fused in the checkpoint")
        if getattr(param, "output_dim", None) is None:
            return Route(target)
        if param.output_dim != 0:
            raise NotDirect(f"{target}: output dimension {param.output_dim} (the direct path splits rows)")
        rows = param.shape[0]
        return Route(target, src_rows=(rank * rows, (rank + 1) * rows))
    if kind is linear.RowParallelLinear and getattr(param, "input_dim", None) is not None:
        if param.input_dim != 1 or param.dim() != 2:
            raise NotDirect(f"{target}: input dimension {param.input_dim} of a {param.dim()}-d parameter")
        cols = param.shape[1]
        return Route(target, src_cols=(rank * cols, (rank + 1) * cols))
    return Route(target)     # replicated: norms, ReplicatedLinear, a row-parallel bias


def _check_parameters(model: nn.Module, linear, embedding_cls, default_loader, plain_methods) -> None:
    """Every parameter must be a plain one that vLLM copies as stored (no quantization, no custom loader)."""
    own_loaders = {linear.QKVParallelLinear, linear.MergedColumnParallelLinear, linear.ColumnParallelLinear,
                   linear.RowParallelLinear, linear.ReplicatedLinear}
    for prefix, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is not None and type(method).__name__ not in plain_methods:
            raise NotDirect(f"{prefix}: quantized layer ({type(method).__name__})")
        for name, param in module.named_parameters(recurse=False):
            loader = getattr(param, "weight_loader", default_loader)
            owner = getattr(loader, "__self__", None)
            # a tied lm_head keeps the embedding's bound loader
            known = loader is default_loader or type(owner) in own_loaders or isinstance(owner, embedding_cls)
            if not known:
                raise NotDirect(f"{prefix}.{name}: has its own weight_loader {getattr(loader, '__qualname__', loader)}")
            if getattr(param, "packed_dim", None) is not None:
                raise NotDirect(f"{prefix}.{name}: packed parameter")


def _tied_aliases(model: nn.Module, embedding_cls) -> dict[str, str]:
    """Names of tied embedding parameters after the first (vLLM skips them, as its loader does)."""
    first: dict[int, str] = {}
    aliases = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, embedding_cls):
            for name, param in module.named_parameters(remove_duplicate=False):
                qualname = f"{prefix}.{name}" if prefix else name
                if first.setdefault(id(param), qualname) != qualname:
                    aliases[qualname] = first[id(param)]
    return aliases


def plan_direct(model: nn.Module, ckpt: Checkpoint, *, tp_size: int) -> tuple[Plan, list[torch.Tensor], list[str]]:
    """Jobs that fill ``model``'s parameters from ``ckpt``; also the rows to zero (vocabulary padding)
    and the parameter names loaded.  Raises :class:`NotDirect` when the direct path does not apply."""
    arch = type(model).__name__
    if arch not in DIRECT_ARCHITECTURES:
        raise NotDirect(f"architecture {arch} is not one the direct path knows")
    linear, embedding_cls, default_loader, plain_methods = _layers()
    _check_parameters(model, linear, embedding_cls, default_loader, plain_methods)
    from vllm.model_executor.models.utils import AutoWeightsLoader

    mapper = model.hf_to_vllm_mapper | AutoWeightsLoader.REMOVE_UNUSED_ROTARY_EMBEDS_MAPPER
    map_with_shard = getattr(mapper, "_map_name_with_shard", None)
    if map_with_shard is None:
        raise NotDirect("this vLLM's WeightsMapper has no shard ids")
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    aliases = _tied_aliases(model, embedding_cls)
    padding: dict[str, torch.Tensor] = {}      # parameter -> its vocabulary padding rows (zeroed, as vLLM does)

    def route(name: str):
        mapped = map_with_shard(name)
        if mapped is None:
            return None
        target, shard_id = mapped
        if target in aliases:
            return None                          # a tied copy: vLLM loads the first name only
        if target not in params:
            if target.endswith(".bias"):
                return None                      # vLLM ignores unexpected biases (GPTQ leftovers)
            raise NotDirect(f"checkpoint tensor {name!r} -> {target!r}: no such parameter")
        module = modules.get(target.rsplit(".", 1)[0])
        return _shard_route(target, module, params[target], shard_id, linear, embedding_cls, padding)

    targets = {name: param for name, param in params.items() if name not in aliases}
    # with tensor parallelism a rank reads its slices only: the routes leave the other ranks' rows unread
    plan = make_plan(ckpt, targets, rename=route if tp_size == 1 else PartialRoutes(route), strict=False)
    missing = [n for n in plan.missing_keys if n not in padding]
    problems = missing + plan.unexpected_keys + plan.mismatched_keys
    if problems:
        raise NotDirect(f"checkpoint and {arch} disagree: {', '.join(problems[:10])}")
    loaded = sorted(set(plan.loaded) | {alias for alias, first in aliases.items() if first in plan.loaded})
    return plan, list(padding.values()), loaded
