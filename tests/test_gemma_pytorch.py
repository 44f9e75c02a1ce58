"""gemma_pytorch-shaped models (tests/gemma_pytorch_like.py): built empty, loaded from .ckpt and
from HF checkpoints through the maps, and quantized on read into their own int8 layers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import gemma_pytorch_like as gp
import gemma_stream as gs
from gemma_stream.quant import quantize_int8

IDS = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))


def random_float_model(arch: int, dtype=torch.float32, seed: int = 0) -> gp.GemmaForCausalLM:
    torch.manual_seed(seed)
    model = gp.build(gp.Config(architecture=arch, dtype=dtype))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape) * (0.1 if "norm" in name else 0.5))
    return model


def save_ckpt(model, path) -> dict[str, torch.Tensor]:
    """gemma_pytorch's own format: a torch zip of {"model_state_dict": ...}, freqs_cis included."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"model_state_dict": sd}, path)
    return sd


@pytest.mark.parametrize("arch", [1, 2, 3])
def test_ckpt_round_trip_into_a_model_built_empty(tmp_path, arch, backend):
    src = random_float_model(arch, torch.bfloat16)
    sd = save_ckpt(src, tmp_path / "model.ckpt")
    with gs.init_empty(), gp.default_dtype(torch.bfloat16):
        model = gp.GemmaForCausalLM(gp.Config(architecture=arch, dtype=torch.bfloat16))
    assert model.embedder.weight.is_meta and not model.state_dict(keep_vars=True)[
        "local_freqs_cis" if arch == 3 else "freqs_cis"].is_meta
    report = gs.load_into(model, tmp_path / "model.ckpt", backend=backend)
    assert not report.missing_keys and not report.uninitialized
    for name, tensor in sd.items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert torch.equal(model(IDS), src(IDS))


def hf_gemma(arch: int):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                  hidden_activation="gelu_pytorch_tanh")
    if arch == 1:
        cfg = transformers.GemmaConfig(**common)
    else:
        cfg = transformers.Gemma3TextConfig(**common, query_pre_attn_scalar=16, sliding_window=64,
                                            layer_types=["sliding_attention", "full_attention"],
                                            final_logit_softcapping=None, attn_logit_softcapping=None,
                                            rope_theta=1_000_000.0, rope_local_base_freq=10_000.0)
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.1 if "norm" in name else 0.5)
    return cfg, model


@pytest.mark.parametrize("arch", [1, 3])
def test_hf_checkpoint_through_the_map_gives_transformers_logits(tmp_path, arch, backend):
    cfg, hf = hf_gemma(arch)
    hf.save_pretrained(tmp_path / "hf")
    rename = gs.maps.hf_to_gemma_pytorch(cfg)
    with torch.device("meta"):  # plain meta: the rotary tables would be garbage
        bare = gp.build(gp.Config(architecture=arch))
    table = "local_freqs_cis" if arch == 3 else "freqs_cis"
    with pytest.raises(gs.MismatchError, match=rf"on meta.*{table}.*gs.init_empty"):
        gs.load_into(bare, tmp_path / "hf", rename=rename, backend=backend)
    with gs.init_empty():
        model = gp.build(gp.Config(architecture=arch))
    gs.load_into(model, tmp_path / "hf", rename=rename, backend=backend)
    with torch.no_grad():
        want = hf(IDS).logits
    torch.testing.assert_close(model(IDS), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_model_quantizes_a_float_checkpoint_on_read(tmp_path, arch, dtype, backend):
    src = random_float_model(arch, torch.float32)
    sd = save_ckpt(src, tmp_path / "model.ckpt")
    with gs.init_empty():
        model = gp.build(gp.Config(architecture=arch, dtype=dtype, quant=True))
    report = gs.load_into(model, tmp_path / "model.ckpt", backend=backend)
    assert not report.uninitialized and not report.missing_keys
    got = model.state_dict()
    for name, tensor in sd.items():
        if name.endswith(".weight") and tensor.dim() == 2:  # every Linear / Embedding: int8 + per-row scaler
            q, s = quantize_int8(tensor, scale_dtype=dtype)
            assert got[name].dtype == torch.int8 and torch.equal(got[name], q), name
            assert torch.equal(got[name + "_scaler"], s), name
        else:
            assert torch.equal(got[name], tensor.to(got[name].dtype)), name
    if dtype == torch.float32:
        ref = src(IDS)
        assert (model(IDS) - ref).norm() <= 0.15 * ref.norm()   # int8 noise through random layers


def test_int8_model_from_hf_safetensors_through_the_map(tmp_path, backend):
    cfg, hf = hf_gemma(1)
    hf.save_pretrained(tmp_path / "hf")
    with gs.init_empty():
        model = gp.build(gp.Config(architecture=1, quant=True))
    gs.load_into(model, tmp_path / "hf", rename=gs.maps.hf_to_gemma_pytorch(cfg), backend=backend)
    hf_sd = hf.state_dict()
    qkv = torch.cat([hf_sd[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"])
    q, s = quantize_int8(qkv)
    assert torch.equal(model.model.layers[0].self_attn.qkv_proj.weight, q)   # fused rows quantized on read
    assert torch.equal(model.model.layers[0].self_attn.qkv_proj.weight_scaler, s)
    with torch.no_grad():
        want = hf(IDS).logits
    assert (model(IDS) - want).norm() <= 0.15 * want.norm()


def test_quantize_refuses_gemma_pytorch_float_layers(tmp_path):
    with gs.init_empty():
        model = gp.build(gp.Config())
    with pytest.raises(gs.GemmaStreamError, match=r"not torch.nn.Linear/Embedding.*quant=True"):
        gs.quantize_(model, "int8")
    src = random_float_model(1)
    save_ckpt(src, tmp_path / "model.ckpt")
    with pytest.raises(gs.GemmaStreamError, match="quant=True"):
        gs.load_into(model, tmp_path / "model.ckpt", quantize="int8")
    assert model.embedder.weight.is_meta   # refused before anything was allocated


def test_quantize_int8_accepts_gemma_pytorch_int8_layers_and_int4_does_not(tmp_path, backend):
    src = random_float_model(1)
    save_ckpt(src, tmp_path / "model.ckpt")
    with gs.init_empty():
        model = gp.build(gp.Config(quant=True))
    with pytest.raises(gs.GemmaStreamError, match="only int8"):
        gs.quantize_(model, "int4")
    gs.load_into(model, tmp_path / "model.ckpt", quantize="int8", backend=backend)
    assert "embedder" in model.gs_quantize_report.quantized
    assert torch.equal(model.embedder.weight, quantize_int8(src.embedder.weight)[0])


def test_a_model_without_quantizable_layers_is_an_error():
    model = torch.nn.Sequential(torch.nn.LayerNorm(8))
    with pytest.raises(gs.GemmaStreamError, match="no layer to quantize"):
        gs.quantize_(model, "int8")


CHILD = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, sys.argv[3])
    import gemma_pytorch_like as gp
    import gemma_stream as gs

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    cfg = gp.Config(architecture=int(sys.argv[4]), vocab_size=32768, hidden_size=1024, intermediate_size=2048,
                    num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=128,
                    dtype=torch.bfloat16, quant=True)
    with gs.init_empty():
        model = gp.build(cfg)
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    gs.load_into(model, sys.argv[1], backend=sys.argv[2], strict=False)  # freqs_cis is not in the file
    peak = status("VmHWM") - base
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()
                      if not t.is_complex())
    print(json.dumps({"peak": peak, "model": model_bytes}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to reset VmHWM")
@pytest.mark.parametrize("arch", [1, 3])
def test_quantize_on_read_peak_is_the_int8_model(tmp_path, arch, backend):
    """An f32 checkpoint ~4x the int8 model: holding any float copy would blow the bound."""
    cfg = gp.Config(architecture=arch, vocab_size=32768, hidden_size=1024, intermediate_size=2048,
                    num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=128)
    with gs.init_empty():
        meta = gp.build(cfg)
    sd = {name: torch.randn(t.shape) if t.dim() == 2 else torch.zeros(t.shape)
          for name, t in meta.state_dict(keep_vars=True).items() if not t.is_complex()}
    save_file(sd, str(tmp_path / "model.safetensors"))
    del sd
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(gs.__file__)))
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "model.safetensors"), backend,
                          os.path.dirname(__file__), str(arch)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # the fallback holds per thread a bounce buffer of up to one chunk and its quantizers' float
    # temporaries of about one more (executors/python.py): 2 x 2 x 16 MiB, 45-69 MiB measured over the
    # model; a float copy of the weights would add ~200 MiB
    slack = (64 << 20) if backend == "native" else (96 << 20)
    assert result["peak"] <= 1.05 * result["model"] + slack, result
