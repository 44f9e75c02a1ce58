"""load_into / load_state_dict behaviour, on both executors."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import gemma_stream as gs
from gemma_stream.formats import open_checkpoint
from gemma_stream.plan import make_plan

FLOATS = [torch.float32, torch.float16, torch.bfloat16]


class Tiny(nn.Module):
    """HF-shaped toy: embedding tied to the LM head, a buffer, a frozen layer."""

    def __init__(self, vocab=50, dim=24, dtype=torch.float32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, dtype=dtype)
        self.proj = nn.Linear(dim, dim, dtype=dtype)
        self.norm = nn.LayerNorm(dim, dtype=dtype)
        self.head = nn.Linear(dim, vocab, bias=False, dtype=dtype)
        self.head.weight = self.embed.weight
        self.register_buffer("position", torch.arange(8, dtype=torch.int64))
        self.proj.bias.requires_grad_(False)


def reference_state(dtype=torch.float32, tied_in_file=False):
    torch.manual_seed(0)
    src = Tiny(dtype=dtype)
    sd = {k: v.detach().clone() for k, v in src.state_dict().items()}
    if not tied_in_file:
        del sd["head.weight"]
    return sd


def test_load_into_meta_model_keeps_ties_classes_and_grad(tmp_path, backend):
    sd = reference_state()
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    with torch.device("meta"):
        model = Tiny()
    report = gs.load_into(model, path, backend=backend)
    assert report.backend == backend and not report.missing_keys and not report.unexpected_keys
    assert report.bytes_read == sum(t.numel() * t.element_size() for t in sd.values())
    assert model.head.weight is model.embed.weight
    assert isinstance(model.proj.weight, nn.Parameter) and model.proj.weight.requires_grad
    assert not model.proj.bias.requires_grad
    for name, tensor in model.state_dict().items():
        assert tensor.device.type == "cpu"
        assert torch.equal(tensor, sd.get(name, sd["embed.weight"])), name


def test_meta_tensors_laid_out_otherwise_keep_their_layout_and_values(tmp_path, backend):
    # a parameter built transposed on meta: its allocation keeps the layout, so a job planned on it,
    # or on rows of it (a fused target), writes each element where the model reads it
    w = torch.arange(12.0).reshape(3, 4)
    q, k = torch.arange(8.0).reshape(2, 4) + 100, torch.arange(4.0).reshape(1, 4) + 200
    path = tmp_path / "m.safetensors"
    save_file({"w": w, "q": q, "k": k}, str(path))
    model = nn.Module()
    model.w = nn.Parameter(torch.empty(4, 3, device="meta").t())
    model.qk = nn.Parameter(torch.empty(4, 3, device="meta").t())
    gs.load_into(model, path, backend=backend,
                 rename={"q": gs.Route("qk", dst_rows=(0, 2)), "k": gs.Route("qk", dst_rows=(2, 3))})
    assert model.w.stride() == (1, 3) and model.qk.stride() == (1, 3)
    assert torch.equal(model.w, w) and torch.equal(model.qk, torch.cat([q, k]))
    # an overlapping meta layout (an expanded row) is allocated dense: filled whole it loads, in parts it cannot
    model = nn.Module()
    model.w = nn.Parameter(torch.empty(1, 4, device="meta").expand(3, 4))
    gs.load_into(model, path, backend=backend, strict=False)
    assert torch.equal(model.w, w)
    model.qk = nn.Parameter(torch.empty(1, 4, device="meta").expand(3, 4))
    with pytest.raises(gs.MismatchError, match="'qk' has overlapping strides"):
        gs.load_into(model, path, backend=backend, strict=False,
                     rename={"w": None, "q": gs.Route("qk", dst_rows=(0, 2)), "k": gs.Route("qk", dst_rows=(2, 3))})


def test_tied_weight_present_twice_is_loaded_once(tmp_path, backend):
    sd = reference_state(tied_in_file=True)
    sd["head.weight"] = sd["head.weight"].clone()
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    model = Tiny()
    report = gs.load_into(model, path, backend=backend)
    assert report.skipped_keys == ["head.weight"] or report.skipped_keys == ["embed.weight"]
    assert model.head.weight is model.embed.weight
    assert torch.equal(model.embed.weight, sd["embed.weight"])


def test_load_into_existing_tensors_in_place(tmp_path, backend):
    sd = reference_state()
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    model = Tiny()
    before = model.proj.weight.data_ptr()
    gs.load_into(model, path, backend=backend)
    assert model.proj.weight.data_ptr() == before
    assert torch.equal(model.proj.weight, sd["proj.weight"])


@pytest.mark.parametrize("src", FLOATS)
@pytest.mark.parametrize("dst", FLOATS)
def test_conversion_on_read_is_bit_identical_to_tensor_to(tmp_path, backend, src, dst):
    torch.manual_seed(1)
    values = torch.randn(5000) * 1000
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, 65504.0, 65520.0, -1e-8, 3e-39, 1e-45,
                             6e-5, 6.1e-5, 2.0**-24, 2.0**-25, 1.5 * 2.0**-24, 1e38, -3.4e38])
    w = torch.cat([values, specials, torch.randn(1000) * 1e-6]).to(src)
    path = tmp_path / "w.safetensors"
    save_file({"w": w}, str(path))
    out = gs.load_state_dict(path, dtype=dst, backend=backend, threads=2)["w"]
    want = w.to(dst)
    assert out.dtype == dst
    assert torch.equal(out.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("src", FLOATS)
@pytest.mark.parametrize("dst", FLOATS)
def test_nan_survives_conversion(tmp_path, backend, src, dst):
    w = torch.full((300,), math.nan, dtype=src)
    w[::2] = -w[::2]
    w[5] = 1.0
    path = tmp_path / "w.safetensors"
    save_file({"w": w}, str(path))
    out = gs.load_state_dict(path, dtype=dst, backend=backend)["w"]
    assert torch.equal(torch.isnan(out), torch.isnan(w)) and out[5] == 1.0
    want = w.to(dst)
    if not (src == torch.float16 and dst == torch.float32):
        assert torch.equal(out.view(torch.uint8), want.view(torch.uint8))
    else:
        # torch's own f16->f32 NaN payload differs between its vector body and its
        # scalar tail (which even drops the sign); we follow the vector body everywhere.
        body = (len(w) // 64) * 64
        assert torch.equal(out[:body].view(torch.int32), want[:body].view(torch.int32))


def test_every_safetensors_dtype_same_dtype_copy(tmp_path, backend):
    sd = {
        "bool": torch.tensor([True, False, True]),
        "u8": torch.arange(200, dtype=torch.uint8), "i8": torch.arange(-50, 50, dtype=torch.int8),
        "i16": torch.arange(-300, 300, dtype=torch.int16), "i32": torch.arange(1000, dtype=torch.int32),
        "i64": torch.arange(10, dtype=torch.int64) * 2**40, "f64": torch.randn(9, dtype=torch.float64),
        "f16": torch.randn(3, 3).half(), "bf16": torch.randn(4, 4).bfloat16(), "f32": torch.randn(2, 5),
        "u16": torch.arange(10, dtype=torch.int32).to(torch.uint16),
        "u32": torch.arange(10, dtype=torch.int64).to(torch.uint32),
        "u64": torch.arange(10, dtype=torch.int64).to(torch.uint64),
        "f8e4m3": torch.randn(16).to(torch.float8_e4m3fn), "f8e5m2": torch.randn(16).to(torch.float8_e5m2),
        "scalar": torch.tensor(3.25), "empty": torch.empty(0, 7),
    }
    path = tmp_path / "all.safetensors"
    save_file(sd, str(path))
    out = gs.load_state_dict(path, backend=backend)
    ref = load_file(str(path))
    assert set(out) == set(sd)
    for k in sd:
        assert out[k].dtype == ref[k].dtype and out[k].shape == ref[k].shape, k
        assert torch.equal(out[k].reshape(-1).view(torch.uint8), ref[k].reshape(-1).view(torch.uint8)), k
    # dtype= converts only floating tensors among f16/bf16/f32
    conv = gs.load_state_dict(path, dtype=torch.bfloat16, backend=backend)
    assert conv["f32"].dtype == torch.bfloat16 and conv["i32"].dtype == torch.int32
    assert conv["f64"].dtype == torch.float64 and conv["bool"].dtype == torch.bool


def test_unsupported_conversion_is_a_mismatch_naming_both_dtypes(tmp_path, backend):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(6, dtype=torch.int32).reshape(2, 3)}, str(path))
    model = nn.Module()
    model.register_buffer("w", torch.zeros(2, 3))
    with pytest.raises(gs.MismatchError, match=r"'?w'?.*torch.int32.*torch.float32"):
        gs.load_into(model, path, backend=backend)


def test_strict_errors_list_names_and_shapes_before_copying(tmp_path, backend):
    sd = reference_state()
    sd["extra.weight"] = torch.zeros(3)
    del sd["norm.bias"]
    sd["proj.weight"] = torch.zeros(24, 23)
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    model = Tiny()
    nn.init.constant_(model.embed.weight, 7.0)
    with pytest.raises(gs.MismatchError) as err:
        gs.load_into(model, path, backend=backend)
    msg = str(err.value)
    assert "norm.bias" in msg and "extra.weight" in msg and "[24, 23]" in msg and "[24, 24]" in msg
    assert bool((model.embed.weight == 7.0).all()), "nothing may be copied before the error"


def test_non_strict_loads_what_matches_and_reports_the_rest(tmp_path, backend):
    sd = reference_state()
    sd["extra.weight"] = torch.zeros(3)
    del sd["norm.bias"]
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    model = Tiny()
    report = gs.load_into(model, path, strict=False, backend=backend)
    assert report.missing_keys == ["norm.bias"]
    assert report.unexpected_keys == ["extra.weight"]
    assert "proj.weight" in report.loaded and report.seconds >= 0
    assert torch.equal(model.proj.weight, sd["proj.weight"])


def test_rename_dict_and_callable(tmp_path, backend):
    sd = {"model." + k: v for k, v in reference_state().items()}
    sd["model.junk"] = torch.zeros(1)
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    model = Tiny()

    def strip(name):
        return None if name == "model.junk" else name.removeprefix("model.")
    report = gs.load_into(model, path, rename=strip, backend=backend)
    assert report.skipped_keys == ["model.junk"]
    assert torch.equal(model.proj.weight, sd["model.proj.weight"])
    mapping = {k: k.removeprefix("model.") for k in sd}
    mapping["model.junk"] = None
    model2 = Tiny()
    gs.load_into(model2, path, rename=mapping, backend=backend)
    assert torch.equal(model2.norm.weight, sd["model.norm.weight"])


def test_routes_fill_fused_rows_and_split_rows(tmp_path, backend):
    q, k, v = torch.randn(8, 6), torch.randn(4, 6), torch.randn(4, 6)
    path = tmp_path / "m.safetensors"
    save_file({"q": q, "k": k, "v": v}, str(path))
    model = nn.Module()
    model.qkv = nn.Linear(6, 16, bias=False)
    spans = {"q": (0, 8), "k": (8, 12), "v": (12, 16)}
    gs.load_into(model, path, rename=lambda n: gs.Route("qkv.weight", dst_rows=spans[n]), backend=backend)
    assert torch.equal(model.qkv.weight, torch.cat([q, k, v]))
    # a fused target only partly covered is missing
    with pytest.raises(gs.MismatchError, match="qkv.weight"):
        gs.load_into(model, path, rename=lambda n: gs.Route("qkv.weight", dst_rows=spans[n]) if n != "v" else None,
                     backend=backend)
    # and the reverse: one checkpoint tensor split into three targets
    save_file({"qkv": torch.cat([q, k, v])}, str(tmp_path / "f.safetensors"))
    split = nn.Module()
    for name, n in (("q", 8), ("k", 4), ("v", 4)):
        split.register_buffer(name, torch.zeros(n, 6))
    gs.load_into(split, tmp_path / "f.safetensors", backend=backend,
                 rename=lambda n: [gs.Route(t, src_rows=spans[t]) for t in "qkv"])
    assert torch.equal(split.q, q) and torch.equal(split.k, k) and torch.equal(split.v, v)


def test_keys_reads_only_selected(tmp_path, backend):
    sd = reference_state()
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    out = gs.load_state_dict(path, keys=["proj.weight", "position"], backend=backend)
    assert set(out) == {"proj.weight", "position"}
    with pytest.raises(gs.GemmaStreamError, match="nope"):
        gs.load_state_dict(path, keys=["nope"], backend=backend)


def test_large_tensor_is_chunked_and_progress_reports_bytes(tmp_path, backend, monkeypatch):
    monkeypatch.setenv("GEMMA_STREAM_CHUNK_MB", "1")
    w = torch.randn(1500, 1024)  # ~6 MiB: several 1 MiB chunks
    path = tmp_path / "w.safetensors"
    save_file({"w": w, "b": torch.randn(3)}, str(path))
    seen = []
    model = nn.Module()
    model.register_buffer("w", torch.empty(1500, 1024, dtype=torch.bfloat16))
    model.register_buffer("b", torch.empty(3))
    gs.load_into(model, path, backend=backend, progress=lambda done, total: seen.append((done, total)))
    assert torch.equal(model.w, w.bfloat16())
    assert seen and seen[-1][0] == seen[-1][1] == w.numel() * 4 + 12


def test_progress_returning_false_cancels_loudly(tmp_path, backend, monkeypatch):
    monkeypatch.setenv("GEMMA_STREAM_CHUNK_MB", "1")
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(4096, 1024)}, str(path))
    model = nn.Module()
    model.register_buffer("w", torch.empty(4096, 1024))
    with pytest.raises(gs.GemmaStreamError, match="cancelled"):
        gs.load_into(model, path, backend=backend, threads=1, progress=lambda done, total: False)


def test_non_contiguous_destination_is_staged(tmp_path, backend):
    w = torch.randn(6, 10)
    path = tmp_path / "w.safetensors"
    save_file({"w": w}, str(path))
    model = nn.Module()
    model.register_buffer("w", torch.zeros(10, 6).t())  # a transposed (non-contiguous) destination
    gs.load_into(model, path, backend=backend)
    assert torch.equal(model.w, w)


def test_backend_environment_variable(monkeypatch, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(3)}, str(path))
    model = nn.Module()
    model.register_buffer("w", torch.zeros(3))
    monkeypatch.setenv("GEMMA_STREAM_BACKEND", "python")
    assert gs.load_into(model, path).backend == "python"
    monkeypatch.setenv("GEMMA_STREAM_BACKEND", "native")
    assert gs.load_into(model, path).backend == "native"
    assert gs.load_into(model, path, backend="python").backend == "python"


def test_executors_agree_on_a_mixed_plan(tmp_path):
    torch.manual_seed(3)
    sd = {f"t{i}": torch.randn(37, 129).to(FLOATS[i % 3]) for i in range(9)}
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    results = []
    for backend in ("native", "python"):
        targets = {k: torch.empty(37, 129, dtype=FLOATS[(i + 1) % 3]) for i, k in enumerate(sd)}
        plan = make_plan(open_checkpoint(path), targets)
        from gemma_stream.executors import get_executor
        get_executor(backend).run(plan.files, plan.jobs, threads=2, chunk_bytes=4096, drop_cache=False,
                                  progress=None)
        results.append(targets)
    for k in sd:
        assert torch.equal(results[0][k].view(torch.uint8), results[1][k].view(torch.uint8))


def test_public_names():
    for name in ("load_into", "load_state_dict", "inspect", "native_available", "GemmaStreamError",
                 "CheckpointError", "MismatchError", "LoadReport", "TensorInfo", "BACKEND"):
        assert hasattr(gs, name)
    assert issubclass(gs.GemmaStreamError, ValueError)
    assert issubclass(gs.CheckpointError, gs.GemmaStreamError) and issubclass(gs.MismatchError, gs.GemmaStreamError)
    assert gs.native_available() and gs.BACKEND == "native"


def test_strict_mismatch_on_meta_model_allocates_nothing(tmp_path, backend):
    sd = reference_state()
    del sd["norm.bias"]
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    with torch.device("meta"):
        model = Tiny()
    with pytest.raises(gs.MismatchError, match="norm.bias"):
        gs.load_into(model, path, backend=backend)
    assert all(t.is_meta for t in model.state_dict().values())


def test_split_routes_must_read_every_row(tmp_path, backend):
    path = tmp_path / "f.safetensors"
    save_file({"qkv": torch.randn(16, 6)}, str(path))
    split = nn.Module()
    split.register_buffer("q", torch.zeros(8, 6))
    split.register_buffer("k", torch.zeros(4, 6))
    with pytest.raises(gs.MismatchError, match="rest would be dropped"):
        gs.load_into(split, path, backend=backend,
                     rename=lambda n: [gs.Route("q", src_rows=(0, 8)), gs.Route("k", src_rows=(8, 12))])


def test_rename_map_may_name_computed_buffers(tmp_path, backend):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(3)}, str(path))
    model = nn.Module()
    model.register_buffer("w", torch.zeros(3))
    model.register_buffer("freqs_cis", torch.ones(4))

    class Map(dict):
        computed = ("freqs_cis",)
    report = gs.load_into(model, path, rename=Map(), backend=backend)
    assert report.missing_keys == [] and torch.equal(model.freqs_cis, torch.ones(4))


def test_complex64_written_by_safetensors(tmp_path, backend):
    x = torch.randn(4, 3, dtype=torch.complex64)
    save_file({"freqs_cis": x}, str(tmp_path / "c.safetensors"))
    assert torch.equal(gs.load_state_dict(tmp_path / "c.safetensors", backend=backend)["freqs_cis"], x)


def test_meta_tensors_left_unfilled_are_an_error(tmp_path, backend):
    sd = reference_state()
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    with torch.device("meta"):
        model = Tiny()
        model.register_buffer("inv_freq", torch.ones(4), persistent=False)
    with pytest.raises(gs.MismatchError, match=r"1 tensors of the model are on meta.*inv_freq.*gs.init_empty"):
        gs.load_into(model, path, backend=backend)
    assert model.inv_freq.is_meta and all(p.is_meta for p in model.parameters())  # refused before allocating
    with pytest.warns(gs.UninitializedWarning, match="inv_freq"):
        report = gs.load_into(model, path, backend=backend, strict=False)
    assert report.uninitialized == ["inv_freq"]
    assert not model.inv_freq.is_meta


def test_init_empty_computes_buffers_and_leaves_parameters_on_meta(tmp_path, backend):
    sd = reference_state()
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    with gs.init_empty():
        model = Tiny()
        model.register_buffer("inv_freq", torch.arange(4.0), persistent=False)
    assert all(p.is_meta for p in model.parameters()) and torch.equal(model.inv_freq, torch.arange(4.0))
    report = gs.load_into(model, path, backend=backend)
    assert report.uninitialized == [] and torch.equal(model.inv_freq, torch.arange(4.0))
    assert model.head.weight is model.embed.weight  # the tie made in __init__ is kept
    for name, tensor in sd.items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_one_module_walk_serves_every_step_of_a_load(tmp_path):
    """load_into walks the model's modules once (modules.module_walk) and each step reads that walk
    as it read its own: a module registered under two names (a tied head) is visited once where
    named_modules() visits it once, its tensors are swapped under both names, and quantized
    targets are found the same."""
    from gemma_stream.modules import _unique, meta_tensors, module_walk, quant_targets
    from gemma_stream.quant import quantize_

    def build():
        with torch.device("meta"):
            model = nn.Sequential(nn.Embedding(64, 32), nn.Sequential(nn.Linear(32, 32), nn.LayerNorm(32)))
            model.head = model[0]          # the same module under a second name
        return model

    model = build()
    walk = module_walk(model)
    assert list(_unique(walk)) == list(model.named_modules())
    assert [p for p, _ in walk] == [p for p, _ in model.named_modules(remove_duplicate=False)]
    assert meta_tensors(model, walk).keys() == meta_tensors(model).keys()
    quantize_(model, "int8")
    walk = module_walk(model)
    assert quant_targets(model, walk).keys() == quant_targets(model).keys() and quant_targets(model)

    source = build().to_empty(device="cpu")
    torch.manual_seed(0)
    for p in source.parameters():
        p.data.normal_()
    save_file({k: v.contiguous() for k, v in source.state_dict().items() if not k.startswith("head.")},
              str(tmp_path / "m.safetensors"))
    model = build()
    gs.load_into(model, str(tmp_path / "m.safetensors"))
    assert model.head is model[0] and torch.equal(model.head.weight, source[0].weight)
    assert all(not t.is_meta for t in model.state_dict().values())
