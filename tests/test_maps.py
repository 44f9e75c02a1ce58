"""Name maps HF <-> gemma_pytorch: fused qkv rows, split qkv rows, strictness.

``GemmaPytorchLM`` below reproduces the parameter names and shapes of
google/gemma_pytorch's ``GemmaForCausalLM`` (gemma/model.py) for a tiny config,
including its persistent ``freqs_cis`` rotary buffers.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import gemma_stream as gs
import gemma_stream.hf as gs_hf
from gemma_stream import maps
from gemma_stream.plan import Route

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            head_dim=16, max_position_embeddings=128)
FAMILIES = {
    "gemma": lambda kv=2: transformers.GemmaConfig(**TINY, num_key_value_heads=kv),
    "gemma2": lambda kv=2: transformers.Gemma2Config(**TINY, num_key_value_heads=kv),
    "gemma3": lambda kv=1: transformers.Gemma3TextConfig(**TINY, num_key_value_heads=kv,
                                                         layer_types=["sliding_attention", "full_attention"]),
}
INPUT_IDS = torch.randint(0, TINY["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- gemma_pytorch's module tree

class Weight(nn.Module):
    """gemma_pytorch's ``Linear`` and ``Embedding``: a bare ``weight`` [out, in] (no bias)."""

    def __init__(self, rows: int, cols: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, cols), requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))


class Attention(nn.Module):
    def __init__(self, c, qk_norm: bool):
        super().__init__()
        self.qkv_proj = Weight((c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim, c.hidden_size)
        self.o_proj = Weight(c.hidden_size, c.num_attention_heads * c.head_dim)
        self.query_norm = RMSNorm(c.head_dim) if qk_norm else None
        self.key_norm = RMSNorm(c.head_dim) if qk_norm else None


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gate_proj = Weight(c.intermediate_size, c.hidden_size)
        self.up_proj = Weight(c.intermediate_size, c.hidden_size)
        self.down_proj = Weight(c.hidden_size, c.intermediate_size)


class DecoderLayer(nn.Module):
    def __init__(self, c, version: int):
        super().__init__()
        self.self_attn = Attention(c, qk_norm=version == 3)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size)
        self.post_attention_layernorm = RMSNorm(c.hidden_size)
        if version >= 2:
            self.pre_feedforward_layernorm = RMSNorm(c.hidden_size)
            self.post_feedforward_layernorm = RMSNorm(c.hidden_size)


class Body(nn.Module):
    def __init__(self, c, version: int):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(c, version) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size)


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    freqs = torch.outer(torch.arange(end), freqs).float()
    return torch.polar(torch.ones_like(freqs), freqs)  # complex64


class GemmaPytorchLM(nn.Module):
    """Names and shapes of gemma_pytorch's GemmaForCausalLM (the Sampler holds no tensors)."""

    def __init__(self, c, version: int):
        super().__init__()
        self.embedder = Weight(c.vocab_size, c.hidden_size)
        self.model = Body(c, version)
        table = precompute_freqs_cis(c.head_dim, c.max_position_embeddings * 2)
        for name in (("local_freqs_cis", "global_freqs_cis") if version == 3 else ("freqs_cis",)):
            self.register_buffer(name, table.clone())  # persistent, as in gemma_pytorch


VERSION = {"gemma": 1, "gemma2": 2, "gemma3": 3}


def hf_model(family: str, **config) -> nn.Module:
    torch.manual_seed(VERSION[family])
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family](**config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0, 0.1)
    return model.eval()


def hf_logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT_IDS).logits


def saved(model: nn.Module, tmp_path):
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def load_into_gemma_pytorch(family: str, hf: nn.Module, path, backend: str) -> tuple[GemmaPytorchLM, gs.LoadReport]:
    gp = GemmaPytorchLM(hf.config, VERSION[family])
    report = gs.load_into(gp, path, rename=maps.hf_to_gemma_pytorch(hf.config), backend=backend)
    return gp, report


# ---------------------------------------------------------------- the maps as data

def test_routes_are_plain_data_and_configs_agree():
    as_dict = {"num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16, "hidden_size": 64}
    hf_config = FAMILIES["gemma3"](kv=1)
    gp_config = SimpleNamespace(num_attention_heads=4, num_key_value_heads=1, head_dim=16, hidden_size=64)
    forward = [maps.hf_to_gemma_pytorch(c) for c in (as_dict, hf_config, gp_config)]
    assert forward[0].routes == forward[1].routes == forward[2].routes
    qkv = "model.layers.{i}.self_attn.qkv_proj.weight"
    assert forward[0].routes["model.layers.{i}.self_attn.v_proj.weight"] == (Route(qkv, dst_rows=(80, 96)),)
    assert forward[0]("model.layers.1.self_attn.k_proj.weight") == [
        Route("model.layers.1.self_attn.qkv_proj.weight", dst_rows=(64, 80))]
    assert forward[0]("model.layers.0.self_attn.q_norm.weight") == [Route("model.layers.0.self_attn.query_norm.weight")]
    assert forward[0]("model.embed_tokens.weight") == [Route("embedder.weight")]
    assert forward[0]("lm_head.weight") is None                   # tied: gemma_pytorch reuses the embedder
    assert forward[0]("model.layers.0.self_attn.bogus.weight") == "model.layers.0.self_attn.bogus.weight"

    reverse = maps.gemma_pytorch_to_hf(as_dict)
    assert reverse("model.layers.7.self_attn.qkv_proj.weight") == [
        Route("model.layers.7.self_attn.q_proj.weight", src_rows=(0, 64)),
        Route("model.layers.7.self_attn.k_proj.weight", src_rows=(64, 80)),
        Route("model.layers.7.self_attn.v_proj.weight", src_rows=(80, 96))]
    assert reverse("embedder.weight") == [Route("model.embed_tokens.weight")]
    assert all(reverse(name) is None for name in ("freqs_cis", "local_freqs_cis", "global_freqs_cis"))


def test_head_dim_defaults_and_missing_sizes():
    routes = maps.hf_to_gemma_pytorch({"num_attention_heads": 8, "hidden_size": 256}).routes   # kv = heads, 32 each
    assert routes["model.layers.{i}.self_attn.v_proj.weight"][0].dst_rows == (512, 768)
    with pytest.raises(ValueError, match="num_attention_heads"):
        maps.hf_to_gemma_pytorch({"hidden_size": 64})


def test_untied_embeddings():
    config = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": False}
    assert maps.gemma_pytorch_to_hf(config)("embedder.weight") == [Route("model.embed_tokens.weight"),
                                                                   Route("lm_head.weight")]
    # gemma_pytorch has no separate head: an untied lm_head has nowhere to go, so it stays in view
    assert maps.hf_to_gemma_pytorch(config)("lm_head.weight") == "lm_head.weight"


# ---------------------------------------------------------------- HF checkpoint -> gemma_pytorch model

@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_to_gemma_pytorch_fills_qkv_rows(tmp_path, family, backend):
    hf = hf_model(family)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    gp, report = load_into_gemma_pytorch(family, hf, tmp_path, backend)
    computed = ["local_freqs_cis", "global_freqs_cis"] if family == "gemma3" else ["freqs_cis"]
    # the rotary tables are the only tensors no HF checkpoint holds: the map names them as
    # computed at init, so a strict load passes and leaves them as they are
    assert report.missing_keys == []
    assert report.unexpected_keys == [] and report.mismatched_keys == []
    assert torch.equal(getattr(gp, computed[0]), precompute_freqs_cis(16, 256))

    ours, theirs = gp.state_dict(), hf.state_dict()
    for i in range(TINY["num_hidden_layers"]):
        attn = f"model.layers.{i}.self_attn."
        expected = torch.cat([theirs[attn + p + ".weight"] for p in ("q_proj", "k_proj", "v_proj")])
        assert torch.equal(ours[attn + "qkv_proj.weight"], expected)
        if family == "gemma3":
            assert torch.equal(ours[attn + "query_norm.weight"], theirs[attn + "q_norm.weight"])
            assert torch.equal(ours[attn + "key_norm.weight"], theirs[attn + "k_norm.weight"])
    assert torch.equal(ours["embedder.weight"], theirs["model.embed_tokens.weight"])
    same = [n for n in ours if n in theirs]
    assert len(same) == len(ours) - len(computed) - 1 - TINY["num_hidden_layers"] * (1 + 2 * (family == "gemma3"))
    for name in same:
        assert torch.equal(ours[name], theirs[name]), name


# ---------------------------------------------------------------- gemma_pytorch checkpoint -> HF model

@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_gemma_pytorch_checkpoint_round_trips_into_hf(tmp_path, family, fmt, backend):
    hf = hf_model(family)
    hf.save_pretrained(tmp_path / "hf")
    gp, _ = load_into_gemma_pytorch(family, hf, tmp_path / "hf", backend)
    if fmt == "safetensors":   # safetensors has no complex dtype: the rotary tables stay out
        path = tmp_path / "model.safetensors"
        save_file({n: t for n, t in gp.state_dict().items() if "freqs_cis" not in n}, path)
    else:                      # the layout gemma_pytorch ships: a torch zip with the tables inside
        path = tmp_path / "model.ckpt"
        torch.save({"model_state_dict": gp.state_dict()}, path)

    back = gs_hf.build_empty(hf.config, torch.float32)
    report = gs.load_into(back, path, rename=maps.gemma_pytorch_to_hf(hf.config), backend=backend)
    assert report.missing_keys == report.unexpected_keys == []
    assert back.lm_head.weight is back.model.embed_tokens.weight
    for name, tensor in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    assert torch.equal(hf_logits(back.eval()), hf_logits(hf))


# ---------------------------------------------------------------- strictness

def test_name_the_map_does_not_cover_is_an_error(tmp_path, backend):
    hf = hf_model("gemma2")
    state = {n: t.contiguous() for n, t in hf.state_dict().items() if n != "lm_head.weight"}
    state["model.layers.0.self_attn.rotary_scale"] = torch.ones(4)
    save_file(state, tmp_path / "model.safetensors")
    rename = maps.hf_to_gemma_pytorch(hf.config)
    unexpected = r"unexpected in checkpoint \(1\): model\.layers\.0\.self_attn\.rotary_scale"
    with pytest.raises(gs.MismatchError, match=unexpected):
        gs.load_into(GemmaPytorchLM(hf.config, 2), tmp_path / "model.safetensors", rename=rename, backend=backend)
    report = gs.load_into(GemmaPytorchLM(hf.config, 2), tmp_path / "model.safetensors", rename=rename, strict=False,
                          backend=backend)
    assert report.unexpected_keys == ["model.layers.0.self_attn.rotary_scale"]


def test_quantized_gemma_pytorch_checkpoint_is_not_silently_half_loaded(tmp_path, backend):
    """gemma_pytorch int8 checkpoints carry ``weight_scaler``: the HF map does not know it, so it surfaces."""
    hf = hf_model("gemma")
    gp, _ = load_into_gemma_pytorch("gemma", hf, saved(hf, tmp_path), backend)
    state = {n: t for n, t in gp.state_dict().items() if n != "freqs_cis"}
    state["model.layers.0.mlp.up_proj.weight_scaler"] = torch.ones(TINY["intermediate_size"])
    save_file(state, tmp_path / "gp.safetensors")
    with pytest.raises(gs.MismatchError, match=r"up_proj\.weight_scaler"):
        gs.load_into(gs_hf.build_empty(hf.config, torch.float32), tmp_path / "gp.safetensors",
                     rename=maps.gemma_pytorch_to_hf(hf.config), backend=backend)


def test_qkv_rows_beyond_the_checkpoint_tensor_are_refused(tmp_path, backend):
    """A map built for 2 kv heads cannot split a 1-kv-head qkv_proj: [96, 128) is past its 96 rows."""
    hf = hf_model("gemma3", kv=1)
    gp, _ = load_into_gemma_pytorch("gemma3", hf, saved(hf, tmp_path), backend)
    save_file({n: t for n, t in gp.state_dict().items() if "freqs_cis" not in n}, tmp_path / "gp.safetensors")
    two_kv = FAMILIES["gemma3"](kv=2)
    with pytest.raises(gs.MismatchError, match=r"qkv_proj\.weight': rows \[96, 128\) .* 96 rows"):
        gs.load_into(gs_hf.build_empty(two_kv, torch.float32), tmp_path / "gp.safetensors",
                     rename=maps.gemma_pytorch_to_hf(two_kv), backend=backend)


def test_fused_rows_beyond_the_model_tensor_are_refused(tmp_path, backend):
    """HF k/v of 2 kv heads do not fit the qkv_proj of a 1-kv-head gemma_pytorch model."""
    hf = hf_model("gemma3", kv=2)
    one_kv = FAMILIES["gemma3"](kv=1)
    with pytest.raises(gs.MismatchError, match=r"v_proj\.weight' -> model tensor .*qkv_proj\.weight'.* 96 rows"):
        gs.load_into(GemmaPytorchLM(one_kv, 3), saved(hf, tmp_path), rename=maps.hf_to_gemma_pytorch(hf.config),
                     strict=False, backend=backend)
