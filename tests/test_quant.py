"""Quantize-on-read (FORMATS.md "gemma_stream quantized layouts"), on both executors.

Every layout test compares what ``gs.load_into`` wrote with the torch reference
quantizers applied to the original tensors, bit for bit.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import gemma_stream as gs
from gemma_stream.quant import int4_cpu as cpu4
from gemma_stream import quant
from gemma_stream.quant import dequantize, quantize_int4, quantize_int8
from gemma_stream.quant.modules import QuantWeight, default_scale_dtype, is_cpu_layout

FLOATS = [torch.bfloat16, torch.float16, torch.float32]
NAMES = {"int8": ("weight", "weight_scaler"), "int4": ("weight", "weight_scale", "weight_zero")}


def edge_weight(n: int, k: int, group: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Gaussian rows plus the cases the contract calls out: zero rows, constant rows and
    groups, +-65504, tiny and huge magnitudes, exact halves."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    w[0] = 0
    w[1] = 3.5
    w[2, ::3] = 65504
    w[2, 1::7] = -65504
    w[3] *= 1e-3
    w[4, :group] = -2.0                 # one constant group in a normal row
    w[5] = torch.arange(k) % 4 - 1.5    # many exact halves
    w[6] *= 1e4
    w[7] *= 1e-7                        # an f16 int8 scale underflows to 0 here: 0 / 0
    w[7, ::5] = 0
    return w.to(dtype)


def reference(w: torch.Tensor, scheme: str, group_size: int, scale_dtype: torch.dtype) -> tuple:
    return quantize_int8(w, scale_dtype) if scheme == "int8" else quantize_int4(w, group_size, scale_dtype)


class Layers(nn.Module):
    """Two linears (one with an odd row count, one with K = G) and an embedding."""

    def __init__(self, k: int, group: int):
        super().__init__()
        self.wide = nn.Linear(k, 48)
        self.odd = nn.Linear(k, 37, bias=False)
        self.narrow = nn.Linear(group, 33, bias=False)
        self.embed = nn.Embedding(29, k)


def write_layers(tmp_path, k: int, group: int, dtype: torch.dtype) -> tuple[str, dict]:
    sd = {"wide.weight": edge_weight(48, k, group, dtype, 1), "wide.bias": torch.randn(48).to(dtype),
          "odd.weight": edge_weight(37, k, group, dtype, 2), "narrow.weight": edge_weight(33, group, group, dtype, 3),
          "embed.weight": edge_weight(29, k, group, dtype, 4)}
    path = str(tmp_path / "layers.safetensors")
    save_file(sd, path)
    return path, sd


def assert_matches_reference(model: nn.Module, sd: dict, scheme: str, group_size: int, scale_dtype: torch.dtype):
    state = model.state_dict()
    for module in ("wide", "odd", "narrow", "embed"):
        want = reference(sd[f"{module}.weight"], scheme, group_size, scale_dtype)
        for name, expected in zip(NAMES[scheme], want):
            got = state[f"{module}.{name}"]
            assert got.dtype == expected.dtype and torch.equal(got, expected), f"{module}.{name}"
    assert torch.equal(state["wide.bias"], sd["wide.bias"].float())


# ---------------------------------------------------------------- bit-exact quantize-on-read

@pytest.mark.parametrize("src_dtype", FLOATS)
@pytest.mark.parametrize("group_size", quant.GROUP_SIZES)
def test_int4_on_read_matches_reference(tmp_path, backend, src_dtype, group_size):
    path, sd = write_layers(tmp_path, 2 * group_size, group_size, src_dtype)
    with torch.device("meta"):
        model = Layers(2 * group_size, group_size)
    report = gs.load_into(model, path, quantize="int4", group_size=group_size, backend=backend)
    assert report.backend == backend and not report.missing_keys
    assert isinstance(model.odd, gs.QuantLinear) and isinstance(model.embed, gs.QuantEmbedding)
    assert_matches_reference(model, sd, "int4", group_size, torch.bfloat16)


@pytest.mark.parametrize("src_dtype", FLOATS)
@pytest.mark.parametrize("scale_dtype", FLOATS)
def test_int8_on_read_matches_reference(tmp_path, backend, src_dtype, scale_dtype):
    path, sd = write_layers(tmp_path, 96, 32, src_dtype)
    with torch.device("meta"):
        model = Layers(96, 32)
    gs.quantize_(model, "int8", scale_dtype=scale_dtype)
    gs.load_into(model, path, backend=backend)
    assert_matches_reference(model, sd, "int8", 0, scale_dtype)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16])
def test_int4_scale_dtypes(tmp_path, backend, scale_dtype):
    path, sd = write_layers(tmp_path, 128, 64, torch.bfloat16)
    with torch.device("meta"):
        model = Layers(128, 64)
    gs.quantize_(model, "int4", group_size=64, scale_dtype=scale_dtype)
    gs.load_into(model, path, backend=backend)
    assert_matches_reference(model, sd, "int4", 64, scale_dtype)


@pytest.mark.parametrize("k, scale_dtype", [(256, None), (200, torch.float16), (2240, torch.float16),
                                            (2240, torch.float32)])
def test_executors_agree_on_random_rows(tmp_path, k, scale_dtype):
    """Many random rows of every magnitude: native and python write identical bytes.

    K = 200 leaves a tail after the native kernels' 32-wide int8 blocks; K = 2240 with
    G = 32 gives 70 groups per row (more than the native int4 kernel's block of 64);
    f16 scales underflow and overflow at the extremes."""
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(301, k, generator=gen) * torch.logspace(-6, 4, 301)[:, None]
    w[::7] *= 10.0
    path = str(tmp_path / "w.safetensors")
    save_file({"layer.weight": w.bfloat16()}, path)
    for scheme in ("int8", "int4"):
        if scheme == "int4" and k % 32:
            continue
        states = []
        for backend in ("native", "python"):
            model = nn.Sequential()
            model.add_module("layer", nn.Linear(k, 301, bias=False, device="meta"))
            gs.quantize_(model, scheme, group_size=32, scale_dtype=scale_dtype)
            gs.load_into(model, path, backend=backend)
            states.append(model.state_dict())
        default = torch.float32 if scheme == "int8" else torch.bfloat16
        want = reference(w.bfloat16(), scheme, 32, scale_dtype or default)
        for name, expected in zip(NAMES[scheme], want):
            assert torch.equal(states[0][f"layer.{name}"], expected) and torch.equal(states[1][f"layer.{name}"], expected)


@pytest.mark.skipif(not gs.native_available(), reason="native extension not built")
def test_portable_quant_kernels_agree(tmp_path):
    """The native quantizers' portable loops (what non-AVX2 machines run) pass the same tests."""
    env = dict(os.environ, GEMMA_STREAM_NO_AVX2="1")
    probe = "from gemma_stream.executors.native import quant_kernels; print(quant_kernels())"
    kernels = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert kernels.stdout.strip() == "portable"
    test = f"{__file__}::test_executors_agree_on_random_rows"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test, "--basetemp",
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("k, col", [(64, 5), (2240, 2200)])  # 2200: past the first 64 groups of 32
def test_non_finite_source_is_a_checkpoint_error(tmp_path, backend, scheme, bad, k, col):
    w = torch.randn(40, k)
    w[23, col] = bad
    path = str(tmp_path / "bad.safetensors")
    save_file({"proj.weight": w.bfloat16()}, path)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(k, 40, bias=False, device="meta"))
    with pytest.raises(gs.CheckpointError, match=r"proj\.weight.*row 23"):
        gs.load_into(model, path, quantize=scheme, group_size=32, backend=backend)


def test_non_finite_row_is_numbered_in_the_checkpoint_tensor(tmp_path, backend):
    """A fused checkpoint tensor split into q/k/v (src_rows): the row named is the fused tensor's."""
    w = torch.randn(80, 64)
    w[70, 3] = float("nan")   # row 6 of the v part (rows 64-79)
    path = str(tmp_path / "fused.safetensors")
    save_file({"qkv.weight": w.bfloat16()}, path)
    model = nn.Module()
    for name, rows in (("q", 48), ("k", 16), ("v", 16)):
        model.add_module(name, nn.Linear(64, rows, bias=False, device="meta"))
    spans = {"q": (0, 48), "k": (48, 64), "v": (64, 80)}
    with pytest.raises(gs.CheckpointError, match=r"qkv\.weight.*row 70 holds NaN"):
        gs.load_into(model, path, quantize="int8", backend=backend,
                     rename=lambda n: [gs.Route(f"{t}.weight", src_rows=spans[t]) for t in "qkv"])


# ---------------------------------------------------------------- fused rows, pre-quantized, round trip

class Fused(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(64, 48 + 16 + 16, bias=False)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_fused_qkv_rows_from_separate_tensors(tmp_path, backend, scheme):
    parts = {"q": torch.randn(48, 64), "k": torch.randn(16, 64) * 10, "v": torch.randn(16, 64) * 1e-3}
    path = str(tmp_path / "qkv.safetensors")
    save_file({n: t.bfloat16() for n, t in parts.items()}, path)
    spans = {"q": (0, 48), "k": (48, 64), "v": (64, 80)}
    with torch.device("meta"):
        model = Fused()
    report = gs.load_into(model, path, quantize=scheme, group_size=32, backend=backend,
                          rename=lambda n: gs.Route("qkv.weight", dst_rows=spans[n]))
    assert not report.missing_keys
    state = model.state_dict()
    for name, (lo, hi) in spans.items():
        want = reference(parts[name].bfloat16(), scheme, 32, default_scale_dtype(scheme))
        for tensor_name, expected in zip(NAMES[scheme], want):
            assert torch.equal(state[f"qkv.{tensor_name}"][lo:hi], expected), (name, tensor_name)


def test_missing_fused_part_is_reported(tmp_path, backend):
    save_file({"q": torch.randn(48, 64), "k": torch.randn(16, 64)}, str(tmp_path / "qk.safetensors"))
    spans = {"q": (0, 48), "k": (48, 64)}
    with torch.device("meta"):
        model = Fused()
    with pytest.raises(gs.MismatchError, match="qkv.weight"):
        gs.load_into(model, tmp_path / "qk.safetensors", quantize="int8", backend=backend,
                     rename=lambda n: gs.Route("qkv.weight", dst_rows=spans[n]))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_prequantized_checkpoint_is_copied(tmp_path, backend, scheme):
    w = edge_weight(40, 128, 64, torch.float32)
    tensors = reference(w, scheme, 64, default_scale_dtype(scheme))
    sd = {f"proj.{name}": t for name, t in zip(NAMES[scheme], tensors)}
    sd["proj.bias"] = torch.randn(40)
    path = str(tmp_path / "pre.safetensors")
    save_file(sd, path)
    with torch.device("meta"):
        model = nn.Sequential()
        model.add_module("proj", nn.Linear(128, 40))
    report = gs.load_into(model, path, quantize=scheme, group_size=64, backend=backend)
    assert report.bytes_read == sum(t.numel() * t.element_size() for t in sd.values())
    assert sorted(report.loaded) == sorted(sd)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, sd[name]), name


def test_gemma_pytorch_int8_with_bf16_scaler(tmp_path, backend):
    q, s = quantize_int8(torch.randn(24, 64), torch.bfloat16)
    path = str(tmp_path / "gp.safetensors")
    save_file({"proj.weight": q, "proj.weight_scaler": s}, path)
    with torch.device("meta"):
        model = nn.Sequential()
        model.add_module("proj", nn.Linear(64, 24, bias=False))
    gs.load_into(model, path, quantize="int8", backend=backend)
    assert torch.equal(model.proj.weight, q) and torch.equal(model.proj.weight_scaler, s.float())


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_state_dict_round_trip(tmp_path, backend, scheme):
    path, sd = write_layers(tmp_path, 128, 64, torch.bfloat16)
    with torch.device("meta"):
        model = Layers(128, 64)
    gs.load_into(model, path, quantize=scheme, group_size=64, backend=backend)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    before = model.wide(x)  # int4: repacked for the CPU kernel by now
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert_matches_reference(model, sd, scheme, 64, default_scale_dtype(scheme))
    saved = str(tmp_path / "quantized.safetensors")
    save_file(state, saved)
    with torch.device("meta"):
        again = Layers(128, 64)
    report = gs.load_into(again, saved, quantize=scheme, group_size=64, backend=backend)
    assert report.bytes_read == sum(t.numel() * t.element_size() for t in state.values())
    assert all(torch.equal(again.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(again.wide(x), before)
    # torch's own load_state_dict into a materialized quantized model
    third = gs.quantize_(Layers(128, 64), scheme, group_size=64)
    third.load_state_dict(state)
    assert torch.equal(third.wide(x), before) and torch.equal(third.embed(torch.tensor([3])), model.embed(torch.tensor([3])))


def test_reload_into_repacked_model_and_keep_vars(tmp_path, backend):
    path, sd = write_layers(tmp_path, 128, 64, torch.bfloat16)
    with torch.device("meta"):
        model = Layers(128, 64)
    gs.load_into(model, path, quantize="int4", group_size=64, backend=backend)
    assert is_cpu_layout(model.wide.weight) == (cpu4.layout() is not None)
    gs.load_into(model, path, backend=backend)  # second load writes the live tensors again
    assert_matches_reference(model, sd, "int4", 64, torch.bfloat16)
    live = model.state_dict(keep_vars=True)["wide.weight"]
    assert live is model.wide.weight and not is_cpu_layout(live)
    assert torch.equal(live, quantize_int4(sd["wide.weight"], 64)[0])


# ---------------------------------------------------------------- forward

@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("rows", [64, 80, 37])   # 80 leaves a 16-row tail block; 37 cannot use the kernel
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_quant_linear_forward_matches_dequantized(scheme, rows, x_dtype):
    torch.manual_seed(0)
    linear = nn.Linear(256, rows)
    layer = gs.quantize_(nn.Sequential(linear), scheme, group_size=64)[0]
    layer.gs_post_load()
    x = torch.randn(2, 5, 256).to(x_dtype)
    want = x.float() @ dequantize(layer).t() + linear.bias.float()
    got = layer(x)
    assert got.dtype == x_dtype and got.shape == (2, 5, rows)
    assert (got.float() - want).norm() <= 1e-2 * want.norm()
    if scheme == "int4":
        assert is_cpu_layout(layer.weight) == (rows % 16 == 0 and cpu4.layout() is not None)


@pytest.mark.parametrize("k", [8, 33, 4097, 48])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_int8_forward_any_k_and_offset_input(k, rows):
    """torch's int8 kernel needs K % 16 == 0 and aligned rows; other shapes take the fallback."""
    torch.manual_seed(0)
    layer = gs.quantize_(nn.Sequential(nn.Linear(k, rows)), "int8")[0]
    base = torch.randn(301 * (k + 1)).bfloat16()
    for x in (base[: 300 * k].view(300, k), base[1: 1 + 3 * k].view(3, k), base[:k].view(1, k)):
        want = x.float() @ dequantize(layer).t() + layer.bias.float()
        assert (layer(x).float() - want).norm() <= 1e-2 * want.norm()


def test_int4_kernel_is_available_on_this_torch():
    """FORMATS.md: torch's CPU int4 op computes x @ ((q - 8) * s + z).T; the probe checks it."""
    assert cpu4.layout() is not None


def test_quant_linear_with_grad_input_uses_fallback():
    layer = gs.quantize_(nn.Sequential(nn.Linear(64, 32)), "int4", group_size=32)[0]
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("rows", [320, 304, 37])
def test_quant_embedding_gathers_rows(scheme, rows):
    torch.manual_seed(0)
    model = nn.Module()
    model.embed = nn.Embedding(rows, 128, dtype=torch.bfloat16)
    model.head = nn.Linear(128, rows, bias=False, dtype=torch.bfloat16)
    model.head.weight = model.embed.weight
    gs.quantize_(model, scheme, group_size=64)
    model.head.gs_post_load()  # int4: the shared storage now holds the kernel layout
    ids = torch.tensor([[0, 1, rows - 1], [rows // 2, min(63, rows - 2), min(64, rows - 3)]])
    got = model.embed(ids)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 3, 128)
    assert torch.equal(got, dequantize(model.embed)[ids].bfloat16())
    with pytest.raises(IndexError):
        model.embed(torch.tensor([rows]))


def test_concurrent_repacks_of_a_shared_int4_weight_happen_once():
    """Post-load hooks (run on worker threads by load_into) and first forwards of modules
    sharing one int4 weight may reach it together: it must be repacked exactly once."""
    import threading

    torch.manual_seed(0)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    for _ in range(5):
        model = nn.Module()
        model.a = nn.Linear(128, 256, bias=False, dtype=torch.bfloat16)
        model.b = nn.Linear(128, 256, bias=False, dtype=torch.bfloat16)
        model.b.weight = model.a.weight
        gs.quantize_(model, "int4", group_size=64)
        assert model.a.weight is model.b.weight
        want = dequantize(model.a)
        barrier = threading.Barrier(4)

        def first_use(call):
            barrier.wait()
            call()

        calls = [model.a.gs_post_load, model.b.gs_post_load, lambda: model.a(x), lambda: model.b(x)]
        workers = [threading.Thread(target=first_use, args=(c,)) for c in calls]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert torch.equal(dequantize(model.a), want) and torch.equal(dequantize(model.b), want)
        ref = x.float() @ want.t()
        assert (model.a(x).float() - ref).norm() <= 1e-2 * ref.norm()


def test_int4_repack_matches_torch_and_round_trips(monkeypatch):
    layout = cpu4.layout()
    if layout is None:
        pytest.skip("no CPU int4 kernel in this torch")
    for native in (True, False):
        if not native:
            monkeypatch.setattr(cpu4, "native_repack", lambda to_kernel: None)
        for n, k in ((64, 32), (16, 64), (304, 256), (1040, 128)):
            plain = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
            w = plain.clone()
            cpu4.repack_(w, layout, to_kernel=True)
            assert torch.equal(w, cpu4.torch_pack(cpu4.split_nibbles(plain))), (native, n, k)
            rows = torch.tensor([0, n - 1, n // 3, 17 % n])
            assert torch.equal(cpu4.gather_rows(w, layout, rows), cpu4.split_nibbles(plain[rows]))
            cpu4.repack_(w, layout, to_kernel=False)
            assert torch.equal(w, plain)


# ---------------------------------------------------------------- quantize_

def test_quantize_on_meta_allocates_nothing_and_reports():
    with torch.device("meta"):
        model = Layers(96, 64)
    gs.quantize_(model, "int4", group_size=64, skip=["embed"])
    report = model.gs_quantize_report
    assert report.quantized == ["narrow"]
    assert report.skipped == {"wide": "K=96 is not a multiple of group_size=64",
                              "odd": "K=96 is not a multiple of group_size=64", "embed": "skipped by the caller"}
    assert all(t.is_meta for t in model.state_dict().values())
    assert model.narrow.weight.shape == (33, 32) and model.narrow.weight_scale.shape == (33, 1)
    assert model.narrow.weight.dtype == torch.uint8 and model.narrow.weight_scale.dtype == torch.bfloat16
    assert type(model.wide) is nn.Linear and type(model.embed) is nn.Embedding


def test_quantize_skip_predicate_patterns_and_custom_forward():
    class Scaled(nn.Embedding):
        def forward(self, input):
            return super().forward(input) * 2

    model = nn.Module()
    model.a = nn.Linear(32, 8)
    model.b = nn.Sequential(nn.Linear(32, 8), nn.Linear(8, 8))
    model.e = Scaled(10, 32)
    gs.quantize_(model, "int8", skip=lambda name, module: module.out_features == 8 and name.startswith("b.1"))
    assert isinstance(model.a, gs.QuantLinear) and isinstance(model.b[0], gs.QuantLinear)
    assert type(model.b[1]) is nn.Linear and type(model.e) is Scaled
    assert "overrides forward" in model.gs_quantize_report.skipped["e"]
    gs.quantize_(model, "int8", skip="b.*")  # already quantized modules stay as they are
    assert type(model.b[1]) is nn.Linear


class GemmaLikeScaledWordEmbedding(nn.Embedding):
    """transformers' Gemma*TextScaledWordEmbedding written out: the scale is a non-persistent buffer."""

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, embed_scale=1.0):
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.scalar_embed_scale = embed_scale
        self.embed_scale = nn.Buffer(torch.tensor(embed_scale), persistent=False)

    def forward(self, input_ids):
        return super().forward(input_ids) * self.embed_scale.to(self.weight.dtype)


class BartLikeScaledWordEmbedding(nn.Embedding):
    def __init__(self, num_embeddings, embedding_dim, embed_scale=1.0):
        super().__init__(num_embeddings, embedding_dim)
        self.embed_scale = embed_scale   # a Python float, multiplied unrounded

    def forward(self, input_ids):
        return super().forward(input_ids) * self.embed_scale


class UnroundedScaledWordEmbedding(GemmaLikeScaledWordEmbedding):
    def forward(self, input_ids):   # the float32 buffer as is: other bits than Gemma's in bf16
        return nn.Embedding.forward(self, input_ids) * self.embed_scale


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_scaled_word_embedding_is_quantized_bit_exact(scheme, dtype):
    torch.manual_seed(0)
    model = nn.Module()
    model.embed = GemmaLikeScaledWordEmbedding(320, 128, 0, embed_scale=128 ** 0.5)  # 11.31...: not a bf16
    model.embed.weight.data = model.embed.weight.data.to(dtype)  # the float32 scale is rounded to dtype per call
    model.head = nn.Linear(128, 320, bias=False, dtype=dtype)
    model.head.weight = model.embed.weight
    scale = model.embed.embed_scale
    gs.quantize_(model, scheme, group_size=64)
    assert type(model.embed) is quant.QuantScaledEmbedding and isinstance(model.embed, gs.QuantEmbedding)
    assert model.head.weight is model.embed.weight
    report = model.gs_quantize_report
    assert report.quantized == ["embed", "head"] and report.tied == [("embed", "head")] and report.skipped == {}
    assert model.embed.embed_scale is scale and "embed.embed_scale" not in model.state_dict()
    model.head.gs_post_load()  # int4: the shared storage now holds the kernel layout
    # the float module on the dequantized weight, with the same buffer
    ref = GemmaLikeScaledWordEmbedding(320, 128, 0, embed_scale=128 ** 0.5)
    ref.weight.data = dequantize(model.embed).to(dtype)
    ids = torch.randperm(320, generator=torch.Generator().manual_seed(0)).reshape(4, 80)   # every row
    with torch.no_grad():
        assert torch.equal(model.embed(ids), ref(ids))
        model.half(), ref.half()  # the buffer follows, as in the float module (and so do the scales)
        ref.weight.data = dequantize(model.embed).half()
        assert model.embed.embed_scale.dtype == torch.float16 and torch.equal(model.embed(ids), ref(ids))


def test_scaled_embedding_look_alikes_stay_float():
    model = nn.Module()
    model.bart = BartLikeScaledWordEmbedding(10, 32, embed_scale=3.3)
    model.unrounded = UnroundedScaledWordEmbedding(10, 32, embed_scale=3.3).bfloat16()
    model.plain = nn.Embedding(10, 32)
    gs.quantize_(model, "int8")
    assert type(model.bart) is BartLikeScaledWordEmbedding and type(model.unrounded) is UnroundedScaledWordEmbedding
    assert model.gs_quantize_report.skipped == {"bart": "BartLikeScaledWordEmbedding overrides forward",
                                                "unrounded": "UnroundedScaledWordEmbedding overrides forward"}
    assert type(model.plain) is gs.QuantEmbedding


def test_quantize_materialized_model_matches_reference():
    torch.manual_seed(0)
    model = Layers(128, 64).bfloat16()
    weights = {name: module.weight.detach().clone() for name, module in model.named_children()}
    gs.quantize_(model, "int4", group_size=64)
    state = model.state_dict()
    for name, w in weights.items():
        for tensor_name, expected in zip(NAMES["int4"], quantize_int4(w, 64)):
            assert torch.equal(state[f"{name}.{tensor_name}"], expected)
    assert model.embed.dtype == torch.bfloat16


def test_quantize_materialized_non_finite_names_the_module():
    model = nn.Sequential(nn.Linear(32, 4))
    with torch.no_grad():
        model[0].weight[2, 3] = float("nan")
    with pytest.raises(gs.GemmaStreamError, match=r"0\.weight: row 2"):
        gs.quantize_(model, "int8")


def test_tie_with_a_float_module_keeps_both_float():
    model = nn.Module()
    model.embed = nn.Embedding(50, 64, device="meta")
    model.head = nn.Linear(64, 50, bias=False, device="meta")
    model.head.weight = model.embed.weight
    with pytest.raises(gs.GemmaStreamError, match="no layer to quantize.*embed: tied to head, which stays float"):
        gs.quantize_(model, "int8", skip=["head"])   # nothing left to quantize: never a silent no-op
    assert type(model.embed) is nn.Embedding and model.head.weight is model.embed.weight


def test_bad_arguments():
    model = nn.Sequential(nn.Linear(64, 8))
    with pytest.raises(gs.GemmaStreamError, match="int8"):
        gs.quantize_(model, "int3")
    with pytest.raises(gs.GemmaStreamError, match="group_size"):
        gs.quantize_(model, "int4", group_size=48)
    with pytest.raises(gs.GemmaStreamError, match="scale_dtype"):
        gs.quantize_(model, "int8", scale_dtype=torch.float64)


# ---------------------------------------------------------------- a tiny HF-shaped model with ties

class Block(nn.Module):
    def __init__(self, d: int, kv: int, ff: int):
        super().__init__()
        self.self_attn = nn.Module()
        for name, rows in (("q_proj", d), ("k_proj", kv), ("v_proj", kv)):
            setattr(self.self_attn, name, nn.Linear(d, rows, bias=False))
        self.self_attn.o_proj = nn.Linear(kv, d, bias=False)
        self.mlp = nn.Module()
        self.mlp.gate_proj, self.mlp.up_proj = nn.Linear(d, ff, bias=False), nn.Linear(d, ff, bias=False)
        self.mlp.down_proj = nn.Linear(ff, d, bias=False)
        self.input_layernorm = nn.LayerNorm(d)

    def forward(self, x):
        h = self.input_layernorm(x)
        attn = self.self_attn
        x = x + attn.o_proj(attn.v_proj(h) * torch.sigmoid(attn.k_proj(h))) + attn.q_proj(h) * 0.1
        return x + self.mlp.down_proj(nn.functional.gelu(self.mlp.gate_proj(h)) * self.mlp.up_proj(h))


class TinyCausalLM(nn.Module):
    """HF names: model.embed_tokens tied to lm_head, model.layers.N.{self_attn,mlp}.*, model.norm."""

    def __init__(self, vocab=272, d=128, kv=64, ff=256, layers=2):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, d)
        self.model.layers = nn.ModuleList([Block(d, kv, ff) for _ in range(layers)])
        self.model.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, ids):
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(self.model.norm(x))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_tiny_hf_model_keeps_ties_and_runs(tmp_path, backend, scheme):
    torch.manual_seed(0)
    src = TinyCausalLM().bfloat16()
    sd = {k: v.detach().clone() for k, v in src.state_dict().items() if k != "lm_head.weight"}
    path = str(tmp_path / "model.safetensors")
    save_file(sd, path)
    with torch.device("meta"):
        model = TinyCausalLM().bfloat16()
    report = gs.load_into(model, path, quantize=scheme, group_size=64, backend=backend)
    assert not report.missing_keys and not report.unexpected_keys
    assert isinstance(model.lm_head, gs.QuantLinear) and isinstance(model.model.embed_tokens, gs.QuantEmbedding)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.gs_quantize_report.tied == [("model.embed_tokens", "lm_head")]
    assert model.gs_quantize_report.skipped == {}
    # the reference: the float model with every quantized weight replaced by its dequantized value
    deq = TinyCausalLM().bfloat16()
    deq.load_state_dict({**sd, **{f"{name}.weight": dequantize(module).bfloat16()
                                  for name, module in model.named_modules() if isinstance(module, QuantWeight)}},
                        strict=False)
    ids = torch.randint(0, 272, (2, 7))
    with torch.no_grad():
        got, want, full = model(ids).float(), deq(ids).float(), src(ids).float()
    assert (got - want).norm() <= 5e-2 * want.norm()
    assert (got - full).norm() <= (0.05 if scheme == "int8" else 0.3) * full.norm()


def test_transformers_tiny_gemma(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GemmaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    torch.manual_seed(0)
    src = transformers.GemmaForCausalLM(cfg).to(torch.bfloat16).eval()
    sd = {k: v.detach().clone() for k, v in src.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, str(tmp_path / "model.safetensors"))
    with gs.init_empty():  # parameters on meta, rotary inv_freq and embed_scale computed for real
        model = transformers.GemmaForCausalLM(cfg).to(torch.bfloat16).eval()
    report = gs.load_into(model, tmp_path / "model.safetensors", quantize="int8")
    assert model.lm_head.weight is model.model.embed_tokens.weight and report.uninitialized == []
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        got, want = model(ids).logits.float(), src(ids).logits.float()
    assert (got - want).norm() <= 0.1 * want.norm()


# ---------------------------------------------------------------- quality

def sqnr_db(w: torch.Tensor, deq: torch.Tensor) -> float:
    return 20 * math.log10(w.norm() / (w - deq).norm())


def test_sqnr_on_gaussian_weights():
    """FORMATS.md: about 41 dB int8 per row; 22 / 21 / 20 / 19 dB int4 with G = 32 / 64 / 128 / 256."""
    w = torch.randn(1024, 4096, generator=torch.Generator().manual_seed(0))
    assert 40.0 <= sqnr_db(w, dequantize(quantize_int8(w))) <= 42.5
    for group, expected in zip(quant.GROUP_SIZES, (22, 21, 20, 19)):
        got = sqnr_db(w, dequantize(quantize_int4(w, group)))
        assert abs(got - expected) <= 1.5, (group, got)
