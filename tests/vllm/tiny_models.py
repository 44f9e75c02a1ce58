"""Tiny random checkpoints vLLM can serve, saved with transformers' save_pretrained, and an offline tokenizer."""

from __future__ import annotations

import importlib.util
import json
import os

import torch


def vllm_installed() -> bool:
    """A real vllm package: with tests/ on sys.path this directory is itself a namespace package
    named "vllm", which only a regular package shadows (so find_spec, not import)."""
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin not in (None, "namespace")

VOCAB = 384   # a multiple of 64: vLLM pads the embedding rows to one, so 384 needs no padding
COMMON = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, max_position_embeddings=256, bos_token_id=2, eos_token_id=1,
              pad_token_id=0)


def _config(arch: str, vocab: int, **overrides):
    import transformers

    common = dict(COMMON, vocab_size=vocab, **overrides)
    if arch == "gemma":
        return transformers.GemmaConfig(**common, hidden_activation="gelu_pytorch_tanh")
    if arch == "gemma2":
        return transformers.Gemma2Config(**common, sliding_window=32, query_pre_attn_scalar=32)
    if arch == "gemma3":
        return transformers.Gemma3TextConfig(**common, sliding_window=32, query_pre_attn_scalar=32)
    if arch == "llama":
        return transformers.LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "mistral":
        return transformers.MistralConfig(**common, tie_word_embeddings=False, sliding_window=None)
    if arch == "qwen2":   # biases on q/k/v, and tied embeddings as in the small Qwen2 models
        return transformers.Qwen2Config(**common, tie_word_embeddings=True)
    # architectures the direct path does not know (streamed): GPT-2's Conv1D weights, which vLLM
    # transposes; Phi-3's q/k/v and gate/up stored fused; Mixtral's experts
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_embd=128, n_layer=2, n_head=4, n_positions=256,
                                       bos_token_id=2, eos_token_id=1)
    if arch == "phi3":
        return transformers.Phi3Config(**common, tie_word_embeddings=False)
    if arch == "mixtral":
        return transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2,
                                          tie_word_embeddings=False)
    raise ValueError(arch)


def _model_class(arch: str):
    import transformers

    return {"gemma": transformers.GemmaForCausalLM, "gemma2": transformers.Gemma2ForCausalLM,
            "gemma3": transformers.Gemma3ForCausalLM, "llama": transformers.LlamaForCausalLM,
            "mistral": transformers.MistralForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
            "gpt2": transformers.GPT2LMHeadModel, "phi3": transformers.Phi3ForCausalLM,
            "mixtral": transformers.MixtralForCausalLM}[arch]


def write_tokenizer(directory: str, vocab: int = VOCAB) -> None:
    """A word-level tokenizer built with the ``tokenizers`` library: no hub access."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"w{i}" for i in range(vocab - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(directory)


def save_tiny(directory: str, arch: str = "gemma", *, dtype: torch.dtype = torch.float32, fmt: str = "safetensors",
              shard_size: str | None = None, vocab: int = VOCAB, seed: int = 0, **overrides) -> str:
    """Save a tiny random ``arch`` model in ``fmt`` ("safetensors" or "bin"); returns the directory.
    ``overrides`` replace config fields (``num_key_value_heads=1``)."""
    torch.manual_seed(seed)
    model = _model_class(arch)(_config(arch, vocab, **overrides)).to(dtype)
    with torch.no_grad():   # the init leaves norms at 0 or 1: make every tensor distinct
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    model.save_pretrained(directory, **({"max_shard_size": shard_size} if shard_size else {}))
    if fmt == "bin":
        # transformers 5 writes safetensors only; a .bin checkpoint is torch.save of the same state dict
        from safetensors.torch import load_file

        path = os.path.join(directory, "model.safetensors")
        torch.save(load_file(path), os.path.join(directory, "pytorch_model.bin"))
        os.remove(path)
    write_tokenizer(directory, vocab)
    files = sorted(os.listdir(directory))
    assert any(f.endswith(".bin" if fmt == "bin" else ".safetensors") for f in files), files
    with open(os.path.join(directory, "config.json")) as f:
        json.load(f)
    return directory
