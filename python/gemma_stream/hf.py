"""Hugging Face transformers integration: ``from_pretrained`` through gemma_stream.

transformers is an optional dependency (``pip install "gemma_stream[hf]"``); it
is imported inside the functions, so ``import gemma_stream`` never imports it.

>>> import gemma_stream.hf
>>> model = gemma_stream.hf.from_pretrained("gemma-2b-hf", dtype=torch.bfloat16)
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .api import LoadReport, load_into, load_state_dict
from .dtypes import FLOAT_DTYPES
from .errors import GemmaStreamError, MismatchError
from .formats import Checkpoint, open_checkpoint
from .modules import init_empty
from .progress import Progress

__all__ = ["from_pretrained", "build_empty"]

def _resolve_dtype(dtype: torch.dtype | str | None, config: Any, path: str, ckpt: Checkpoint) -> torch.dtype:
    """``dtype=None`` means transformers' ``"auto"``: the config's dtype, else the checkpoint's."""
    if dtype is None or dtype == "auto":
        dtype = getattr(config, "dtype", None) or vars(config).get("torch_dtype")
    if dtype is None:  # like transformers: the first floating-point tensor of the checkpoint
        dtype = next((r.dtype.torch for r in ckpt.records if r.dtype.torch is not None and
                      r.dtype.torch.is_floating_point), torch.float32)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if dtype not in FLOAT_DTYPES:
        raise GemmaStreamError(f"{path}: dtype must be one of float32, bfloat16, float16 (or None), not {dtype!r}")
    return dtype


def _dtype_keyword() -> str:
    import transformers
    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def build_empty(config: Any, dtype: torch.dtype, **model_kwargs: Any) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_config`` inside :func:`gemma_stream.init_empty`: parameters on
    ``meta``, buffers computed for real.

    >>> model = build_empty(AutoConfig.from_pretrained("gemma-2b-hf"), torch.bfloat16)
    >>> model.model.embed_tokens.weight.is_meta
    True
    """
    from transformers import AutoModelForCausalLM
    with init_empty():
        return AutoModelForCausalLM.from_config(config, **{_dtype_keyword(): dtype}, **model_kwargs)


def _check_tied_sources(model: torch.nn.Module, ckpt: Checkpoint, backend: str) -> None:
    """Names of one tied tensor found twice in the checkpoint must hold the same values.

    The planner loads a tied tensor once and skips its other names; a checkpoint
    whose ``lm_head.weight`` differs from its embeddings (while the config ties
    them) would otherwise lose one of them without a word.  transformers unties
    them in that case; we refuse, because the model was built tied.
    """
    by_name = {r.name: r for r in ckpt.records}
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    for names in groups.values():
        present = [n for n in names if n in by_name]
        if len({(by_name[n].file, by_name[n].byte_offset, by_name[n].storage) for n in present}) < 2:
            continue  # absent, once, or views of one storage (torch.save of a tied model)
        values = load_state_dict(ckpt, keys=present, backend=backend)
        if not all(torch.equal(values[present[0]], values[n]) for n in present[1:]):
            raise MismatchError(
                f"{ckpt.files[0]}: {' and '.join(present)} are tied in the model (tie_word_embeddings) but hold different "
                f"values in the checkpoint; set tie_word_embeddings to false in config.json to load both")


def _tie_weights(model: torch.nn.Module, config: Any, quantized: bool) -> None:
    """Make sure tied embeddings are one tensor, as ``model.tie_weights()`` does."""
    if quantized:
        return  # quantize_ owns how a quantized head shares the embedding
    model.tie_weights()
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text_config, "tie_word_embeddings", False):
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        if head is not None and head.weight is not embed.weight:
            raise GemmaStreamError(f"{type(model).__name__}: lm_head is not tied to the embeddings after loading")


def from_pretrained(path: str | os.PathLike, *, dtype: torch.dtype | str | None = None, quantize: str | None = None,
                    group_size: int = 128, device: str | torch.device = "cpu", threads: int | None = None,
                    progress: Progress = None, backend: str = "auto", attn_implementation: str | None = None,
                    cache: str = "auto", mode: str = "copy",
                    return_report: bool = False) -> torch.nn.Module | tuple[torch.nn.Module, LoadReport]:
    """Load a transformers causal LM from a ``save_pretrained`` directory with gemma_stream.

    Reads ``config.json`` with transformers, builds the model without allocating
    or initializing its weights, optionally quantizes its Linear/Embedding layers
    (``quantize="int8"|"int4"``), streams the checkpoint (sharded or single
    safetensors, ``pytorch_model*.bin``) into it and returns it in eval mode.
    ``dtype=None`` follows transformers (the config's dtype); ``cache`` and
    ``mode`` as in ``load_into`` (``mode="mmap"``: same-dtype weights stay
    copy-on-write views of the files, as transformers 5 leaves them, and are
    read ahead in the background).  Loading is strict:
    any missing, unexpected or mis-shaped tensor raises ``MismatchError``.

    >>> model = gemma_stream.hf.from_pretrained("gemma-2b-hf", dtype=torch.bfloat16)
    >>> logits = model(torch.tensor([[2, 651, 6037]])).logits
    """
    from transformers import AutoConfig

    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise GemmaStreamError(f"{path}: no config.json; from_pretrained takes a local directory written by "
                               f"save_pretrained (it never downloads)")
    config = AutoConfig.from_pretrained(path)
    ckpt = open_checkpoint(path)   # opened and validated once: the tie check and the load share it
    dtype = _resolve_dtype(dtype, config, path, ckpt)
    model_kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = build_empty(config, dtype, **model_kwargs)
    _check_tied_sources(model, ckpt, backend)
    report = load_into(model, ckpt, strict=True, device=device, threads=threads, backend=backend,
                       progress=progress, quantize=quantize, group_size=group_size, cache=cache, mode=mode)
    _tie_weights(model, config, quantize is not None)
    model.to(device)  # the buffers were computed on the CPU; loaded tensors are already on ``device``
    _load_generation_config(model, path)
    model.eval()
    return (model, report) if return_report else model


def _load_generation_config(model: torch.nn.Module, path: str) -> None:
    if not os.path.isfile(os.path.join(path, "generation_config.json")) or not hasattr(model, "generation_config"):
        return
    from transformers import GenerationConfig
    model.generation_config = GenerationConfig.from_pretrained(path)
