"""gemma_stream.hf.from_pretrained against transformers' own from_pretrained, bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import gemma_stream as gs  # noqa: E402
import gemma_stream.hf as gs_hf  # noqa: E402

from conftest import mapped_from  # noqa: E402

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            head_dim=16, max_position_embeddings=128)
FAMILIES = {
    "gemma": lambda: transformers.GemmaConfig(**TINY, num_key_value_heads=2),
    "gemma2": lambda: transformers.Gemma2Config(**TINY, num_key_value_heads=2, sliding_window=4),
    # one sliding and one full layer, so both of Gemma 3's rotary tables exist
    "gemma3": lambda: transformers.Gemma3TextConfig(**TINY, num_key_value_heads=1, sliding_window=4,
                                                    layer_types=["sliding_attention", "full_attention"]),
}
INPUT_IDS = torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(0))


def random_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model; norms get noise too (transformers inits them to zero)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0, 0.1)
    return model.eval()


def reference(path, dtype: torch.dtype | None) -> torch.nn.Module:
    kwargs = {} if dtype is None else {"dtype": dtype}
    return transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT_IDS).logits


def assert_same_model(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    assert type(ours) is type(theirs)
    assert not ours.training
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert ours_sd.keys() == theirs_sd.keys()
    for name, tensor in theirs_sd.items():
        assert ours_sd[name].dtype == tensor.dtype and torch.equal(ours_sd[name], tensor), name
    ours_buffers, theirs_buffers = dict(ours.named_buffers()), dict(theirs.named_buffers())
    assert ours_buffers.keys() == theirs_buffers.keys()
    for name, buffer in theirs_buffers.items():  # non-persistent ones (inv_freq, embed_scale) included
        assert ours_buffers[name].dtype == buffer.dtype and torch.equal(ours_buffers[name], buffer), name
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert torch.equal(logits(ours), logits(theirs))


def save_bin(model: torch.nn.Module, path, shards: int) -> None:
    """``pytorch_model*.bin`` as transformers < 5 wrote them (tied lm_head saved as a view of the embedding)."""
    model.config.save_pretrained(path)
    state = model.state_dict()
    if shards == 1:
        torch.save(state, os.path.join(path, "pytorch_model.bin"))
        return
    weight_map = {}
    names = list(state)
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({n: state[n] for n in names[i::shards]}, os.path.join(path, file))
        weight_map.update({n: file for n in names[i::shards]})
    with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.fixture(scope="module", params=list(FAMILIES))
def sharded_f32(request, tmp_path_factory):
    """(family, directory) of a float32 model saved as sharded safetensors."""
    path = tmp_path_factory.mktemp(request.param)
    random_model(request.param).save_pretrained(path, max_shard_size="40KB")
    assert os.path.isfile(path / "model.safetensors.index.json")
    return request.param, path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_safetensors_logits_identical(sharded_f32, dtype, backend):
    _, path = sharded_f32
    model, report = gs_hf.from_pretrained(path, dtype=dtype, backend=backend, return_report=True)
    assert report.backend == backend and len(report.files) > 2
    assert_same_model(model, reference(path, dtype))


@pytest.mark.page_cache
@pytest.mark.parametrize("cache", ["drop", "keep"])
def test_cache_policy_reaches_the_loader(sharded_f32, cache, backend):
    _, path = sharded_f32
    model, report = gs_hf.from_pretrained(path, dtype=torch.bfloat16, backend=backend, cache=cache,
                                          return_report=True)
    assert report.cache == cache
    assert_same_model(model, reference(path, torch.bfloat16))
    _, report = gs_hf.from_pretrained(path, backend=backend, return_report=True)
    assert report.cache == "keep"   # the default, auto: a directory this small fits in memory


def test_mmap_mode_maps_same_dtype_weights_and_keeps_ties(tmp_path, backend):
    random_model("gemma").to(torch.bfloat16).save_pretrained(tmp_path)
    model, report = gs_hf.from_pretrained(tmp_path, backend=backend, mode="mmap", return_report=True)
    files = report.files
    assert len(report.mapped) == len(report.loaded) > 0
    embed = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is embed
    assert any(mapped_from(f, embed) for f in files)
    assert_same_model(model, reference(tmp_path, None))
    # converting to float32 needs copies: nothing is mapped, the logits still match
    model, report = gs_hf.from_pretrained(tmp_path, dtype=torch.float32, backend=backend, mode="mmap",
                                          return_report=True)
    assert report.mapped == []
    assert_same_model(model, reference(tmp_path, torch.float32))


@pytest.mark.parametrize("family", ["gemma", "gemma3"])
def test_bf16_checkpoint_default_dtype_follows_config(tmp_path, family, backend):
    random_model(family).to(torch.bfloat16).save_pretrained(tmp_path)
    model = gs_hf.from_pretrained(tmp_path, backend=backend)
    assert model.dtype == torch.bfloat16
    assert_same_model(model, reference(tmp_path, None))
    # and up-converted on read
    assert_same_model(gs_hf.from_pretrained(tmp_path, dtype="float32", backend=backend),
                      reference(tmp_path, torch.float32))


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pytorch_model_bin(tmp_path, shards, dtype, backend):
    save_bin(random_model("gemma2"), tmp_path, shards)
    model, report = gs_hf.from_pretrained(tmp_path, dtype=dtype, backend=backend, return_report=True)
    assert all(f.endswith(".bin") for f in report.files) and len(report.files) == shards
    assert_same_model(model, reference(tmp_path, dtype))


def test_parameters_stay_on_meta_until_loaded_and_buffers_are_computed():
    config = FAMILIES["gemma3"]()
    model = gs_hf.build_empty(config, torch.bfloat16)
    assert all(p.is_meta for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    real = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    buffers = dict(model.named_buffers())
    assert buffers.keys() == dict(real.named_buffers()).keys() and len(buffers) >= 5
    for name, buffer in real.named_buffers():
        assert not buffers[name].is_meta and torch.equal(buffers[name], buffer), name


def test_needs_a_local_directory_with_config(tmp_path):
    with pytest.raises(gs.GemmaStreamError, match="no config.json"):
        gs_hf.from_pretrained(tmp_path / "google/gemma-2b")


def test_config_and_checkpoint_shape_mismatch_raises(tmp_path, backend):
    random_model("gemma").save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        config = json.load(f)
    config["intermediate_size"] = 96
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(gs.MismatchError, match=r"mlp\.up_proj\.weight"):
        gs_hf.from_pretrained(tmp_path, backend=backend)


def test_missing_tensor_raises(tmp_path, backend):
    from safetensors.torch import load_file, save_file
    random_model("gemma").save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(gs.MismatchError, match=r"missing in checkpoint \(1\): model\.layers\.1\.self_attn\.k_proj"):
        gs_hf.from_pretrained(tmp_path, backend=backend)


def test_tied_names_with_different_values_are_refused(tmp_path, backend):
    from safetensors.torch import load_file, save_file
    random_model("gemma").save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    gs_hf.from_pretrained(tmp_path, backend=backend)  # equal values: loaded once, still tied
    state["lm_head.weight"][3, 5] += 1
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(gs.MismatchError, match="tie_word_embeddings"):
        gs_hf.from_pretrained(tmp_path, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_int8_logits_stay_close(sharded_f32, dtype, backend):
    family, path = sharded_f32
    theirs = logits(reference(path, dtype)).float()
    model = gs_hf.from_pretrained(path, dtype=dtype, quantize="int8", backend=backend)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.int8
    ours = logits(model).float()
    error = ((ours - theirs).norm() / theirs.norm()).item()
    print(f"\n{family} {dtype} int8: relative logits error {error:.4f}, max abs {(ours - theirs).abs().max():.4f}")
    assert error < 0.05
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantize_matches_the_reference_quantizer(tmp_path, backend, scheme):
    """The error is the quantizer's own: same logits as float weights set to dequant(quantize(w)), the
    scaled embedding (and the lm_head tied to it) included."""
    from gemma_stream.quant import dequantize, quantize_int4, quantize_int8
    random_model("gemma3").save_pretrained(tmp_path, max_shard_size="40KB")
    fake_quant = reference(tmp_path, torch.float32)
    with torch.no_grad():
        for module in fake_quant.model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                parts = quantize_int8(module.weight) if scheme == "int8" else quantize_int4(module.weight, 32)
                module.weight.copy_(dequantize(parts))
    expected = logits(fake_quant)
    ours = logits(gs_hf.from_pretrained(tmp_path, dtype=torch.float32, quantize=scheme, group_size=32,
                                        backend=backend))
    assert ((ours - expected).norm() / expected.norm()).item() < 1e-5


@pytest.mark.parametrize("scheme, group_size, bound", [("int8", 128, 0.05), ("int4", 32, 0.4)])
def test_quantize_takes_the_scaled_embedding_and_its_tied_head(sharded_f32, scheme, group_size, bound):
    """Gemma's *ScaledWordEmbedding is quantized, the lm_head tied to it shares its quantized tensors, the
    embed_scale computed at build time is kept; both executors give the same bytes and the same logits."""
    family, path = sharded_f32
    float_model = reference(path, torch.bfloat16)
    models = {backend: gs_hf.from_pretrained(path, dtype=torch.bfloat16, quantize=scheme, group_size=group_size,
                                             backend=backend) for backend in ("native", "python")}
    for model in models.values():
        embed = model.model.embed_tokens
        assert isinstance(embed, gs.QuantEmbedding) and embed.weight.dtype in (torch.int8, torch.uint8)
        quantized = dict(embed.named_parameters())
        assert len(quantized) == (2 if scheme == "int8" else 3)
        assert all(quantized[name] is tensor for name, tensor in model.lm_head.named_parameters())
        assert torch.equal(embed.embed_scale, float_model.model.embed_tokens.embed_scale)
        assert model.gs_quantize_report.skipped == {}
        assert model.gs_quantize_report.tied == [("model.embed_tokens", "lm_head")]
    native_state, python_state = models["native"].state_dict(), models["python"].state_dict()
    assert all(torch.equal(tensor, python_state[name]) for name, tensor in native_state.items())
    ours, theirs = logits(models["native"]), logits(float_model)
    assert torch.equal(ours, logits(models["python"]))
    ours, theirs = ours.float(), theirs.float()
    error = ((ours - theirs).norm() / theirs.norm()).item()
    print(f"\n{family} bf16 {scheme} (embedding and lm_head quantized too): relative logits error {error:.4f}, "
          f"argmax agreement {(ours.argmax(-1) == theirs.argmax(-1)).float().mean():.2f}")
    assert error < bound


def test_importing_gemma_stream_does_not_import_transformers():
    code = ("import sys, gemma_stream, gemma_stream.maps, gemma_stream.hf; "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_init_empty_and_load_into_give_from_pretrained_logits(tmp_path, family, backend):
    """The README's recipe with transformers' own classes: build inside gs.init_empty, then load_into."""
    random_model(family).save_pretrained(tmp_path)
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    with gs.init_empty():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    assert model.model.embed_tokens.weight.is_meta
    report = gs.load_into(model, tmp_path, backend=backend)
    assert report.uninitialized == []
    assert_same_model(model.eval(), reference(tmp_path, torch.float32))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_plain_meta_model_is_refused_naming_the_rotary_buffers(tmp_path, family, backend):
    random_model(family).save_pretrained(tmp_path)
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(gs.MismatchError, match=r"on meta.*inv_freq.*gs\.init_empty\(\)"):
        gs.load_into(model, tmp_path, backend=backend)
    assert model.model.embed_tokens.weight.is_meta   # nothing was allocated
    with pytest.warns(gs.UninitializedWarning, match="inv_freq"):
        report = gs.load_into(model, tmp_path, backend=backend, strict=False)
    assert any("inv_freq" in name for name in report.uninitialized)
