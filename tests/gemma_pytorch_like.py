"""A model shaped like google/gemma_pytorch's ``GemmaForCausalLM``, written here for the tests.

gemma_pytorch is not on the package index.  What the tests rely on was checked
against its ``gemma/model.py`` and ``gemma/config.py`` (read, not copied):
- ``Linear`` / ``Embedding`` are plain ``nn.Module`` s (not ``torch.nn.Linear``):
  with ``quant=False`` a float ``weight`` Parameter made by ``torch.empty`` in the
  default dtype; with ``quant=True`` an int8 ``weight`` Parameter
  (``requires_grad=False``) and a ``weight_scaler`` Parameter [out] in the default
  dtype; forward multiplies ``weight * weight_scaler.unsqueeze(-1)`` first;
- attention has one fused ``qkv_proj`` (q, k, v rows), ``o_proj``, and with Gemma 3
  ``query_norm`` / ``key_norm``; RMSNorm weights start at zero and add 1;
- the MLP is ``gate_proj``, ``up_proj``, ``down_proj`` with tanh-GELU;
- Gemma 2/3 layers add ``pre_feedforward_layernorm`` / ``post_feedforward_layernorm``
  and norm the attention output;
- ``GemmaForCausalLM`` holds ``embedder`` (tied LM head) and ``model`` (``layers``,
  ``norm``), and registers *persistent* complex64 rotary buffers computed in
  ``__init__``: ``freqs_cis`` (Gemma 1/2) or ``local_freqs_cis`` /
  ``global_freqs_cis`` (Gemma 3), for ``2 * max_position_embeddings`` positions;
- the embedding is scaled by ``hidden_size ** 0.5`` cast to the activation dtype;
- users build it under ``torch.set_default_dtype(config dtype)``.
Sampling, KV caches, the tokenizer and soft-capping are left out: the tests compare logits
of one full-sequence forward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Config:
    architecture: int = 1          # 1, 2 or 3
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    max_position_embeddings: int = 64
    rms_norm_eps: float = 1e-6
    quant: bool = False
    dtype: torch.dtype = torch.float32
    rope_theta: dict = field(default_factory=lambda: {"local": 10_000, "global": 1_000_000})

    @property
    def use_qk_norm(self) -> bool:
        return self.architecture == 3

    @property
    def use_ffw_norms(self) -> bool:
        return self.architecture >= 2


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """How gemma_pytorch's scripts build a model: the config's dtype as torch's default."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def rotary_table(head_dim: int, positions: int, theta: float) -> torch.Tensor:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32)[: head_dim // 2] / head_dim))
    angles = torch.outer(torch.arange(positions, dtype=torch.float32), inv)
    return torch.polar(torch.ones_like(angles), angles)


def rotate(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x [b, t, heads, d]: the halves of d are the real and imaginary parts."""
    pairs = torch.stack(torch.chunk(x.transpose(1, 2).float(), 2, dim=-1), dim=-1)
    out = torch.view_as_real(torch.view_as_complex(pairs.contiguous()) * table).type_as(x)
    out = torch.cat(torch.chunk(out, 2, dim=-1), dim=-2)
    return out.reshape(*out.shape[:3], -1).transpose(1, 2)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, quant: bool):
        super().__init__()
        if quant:
            self.weight = nn.Parameter(torch.empty((out_features, in_features), dtype=torch.int8),
                                       requires_grad=False)
            self.weight_scaler = nn.Parameter(torch.empty(out_features))
        else:
            self.weight = nn.Parameter(torch.empty((out_features, in_features)), requires_grad=False)
        self.quant = quant

    def forward(self, x):
        w = self.weight * self.weight_scaler.unsqueeze(-1) if self.quant else self.weight
        return F.linear(x, w)


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, quant: bool):
        super().__init__()
        if quant:
            self.weight = nn.Parameter(torch.empty((num_embeddings, embedding_dim), dtype=torch.int8),
                                       requires_grad=False)
            self.weight_scaler = nn.Parameter(torch.empty(num_embeddings))
        else:
            self.weight = nn.Parameter(torch.empty((num_embeddings, embedding_dim)), requires_grad=False)
        self.quant = quant

    def dequantized(self) -> torch.Tensor:
        return self.weight * self.weight_scaler.unsqueeze(-1) if self.quant else self.weight

    def forward(self, ids):
        return F.embedding(ids, self.dequantized())


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1 + self.weight.float())).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_size, self.kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.quant)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, cfg.quant)
        self.query_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.use_qk_norm else None
        self.key_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.use_qk_norm else None

    def forward(self, x, table):
        b, t, _ = x.shape
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(b, t, self.heads, self.head_dim)
        k = k.view(b, t, self.kv_heads, self.head_dim)
        v = v.view(b, t, self.kv_heads, self.head_dim)
        if self.query_norm is not None:
            q, k = self.query_norm(q), self.key_norm(k)
        q, k = rotate(q, table), rotate(k, table)
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
        q, k, v = (a.transpose(1, 2) for a in (q, k, v))
        scores = (q * self.head_dim ** -0.5) @ k.transpose(2, 3)
        mask = torch.full((t, t), float("-inf"), dtype=torch.float32).triu(1)
        probs = F.softmax(scores.float() + mask, dim=-1).type_as(q)
        return self.o_proj((probs @ v).transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, cfg.quant)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, cfg.quant)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, cfg.quant)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Config, attn_type: str):
        super().__init__()
        self.attn_type = attn_type
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffw_norms = cfg.use_ffw_norms
        if cfg.use_ffw_norms:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, table):
        if not self.ffw_norms:   # Gemma 1
            x = x + self.self_attn(self.input_layernorm(x), table)
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), table))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaModel(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        types = ["local", "global"] if cfg.architecture >= 2 else ["global"]
        self.layers = nn.ModuleList(DecoderLayer(cfg, types[i % len(types)]) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class GemmaForCausalLM(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.embedder = Embedding(cfg.vocab_size, cfg.hidden_size, cfg.quant)
        self.model = GemmaModel(cfg)
        positions = cfg.max_position_embeddings * 2
        if cfg.architecture == 3:
            self.register_buffer("local_freqs_cis", rotary_table(cfg.head_dim, positions, cfg.rope_theta["local"]))
            self.register_buffer("global_freqs_cis", rotary_table(cfg.head_dim, positions, cfg.rope_theta["global"]))
        else:
            self.register_buffer("freqs_cis", rotary_table(cfg.head_dim, positions, 10_000))

    def table(self, attn_type: str, t: int) -> torch.Tensor:
        if self.config.architecture == 3:
            return (self.local_freqs_cis if attn_type == "local" else self.global_freqs_cis)[:t]
        return self.freqs_cis[:t]

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embedder(ids)
        x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)
        for layer in self.model.layers:
            x = layer(x, self.table(layer.attn_type, ids.shape[1]))
        x = self.model.norm(x)
        return x @ self.embedder.dequantized().t()


def build(cfg: Config) -> GemmaForCausalLM:
    """As gemma_pytorch's scripts do: under the config's dtype as torch's default."""
    with default_dtype(cfg.dtype):
        return GemmaForCausalLM(cfg)
