"""gs.convert: torch zip / safetensors -> safetensors, streamed in blocks, on both executors.

The outputs are compared with the reference libraries: ``safetensors`` (byte for
byte with its writer where the layout allows, and by loading), ``torch.load`` and
the torch reference quantizers of ``gemma_stream.quant``.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file
from torch import nn

import gemma_stream as gs
from gemma_stream import block_writer
from gemma_stream.conversion import parse_size
from gemma_stream.quant import quantize_int4, quantize_int8

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int16, torch.int32,
          torch.int64, torch.uint8, torch.bool, torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn,
          torch.float8_e5m2, torch.complex64]


def sample(dtype: torch.dtype, shape=(5, 7)) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, dtype=torch.complex64 if dtype.is_complex else torch.float32).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, dtype=torch.int64).to(dtype)


def views() -> dict[str, torch.Tensor]:
    """Tied weights, a slice with an offset, a transposed, expanded and column-sliced view."""
    torch.manual_seed(0)
    weight = torch.randn(12, 10)
    base = torch.arange(40, dtype=torch.float32)
    return {"embedder.weight": weight, "lm_head.weight": weight, "weight_t": weight.t(), "rows": weight[3:7],
            "columns": weight[:, 2:5], "middle": base[5:25].view(4, 5), "base": base,
            "expanded": torch.randn(1, 6).expand(4, 6), "permuted": torch.randn(3, 4, 5).permute(2, 0, 1),
            "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3)}


def contiguous_copy(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone(memory_format=torch.contiguous_format) for k, v in sd.items()}


def header(path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


# --- plain conversion ---------------------------------------------------------------------


def test_ckpt_is_written_byte_for_byte_as_safetensors_writes_it(tmp_path, backend):
    sd = views()
    sd.update({str(dtype): sample(dtype) for dtype in DTYPES})
    sd["ünïcode.weight"] = torch.randn(3, 3)
    src, dst = tmp_path / "model.ckpt", tmp_path / "model.safetensors"
    torch.save({"model_state_dict": sd, "epoch": 3}, src)
    report = gs.convert(src, dst, backend=backend)
    reference = torch.load(src, weights_only=True)["model_state_dict"]
    assert report.aliases == {"lm_head.weight": "embedder.weight"}  # tied: written once, under the first name
    expected = contiguous_copy({k: v for k, v in reference.items() if k != "lm_head.weight"})
    assert dst.read_bytes() == save(expected, metadata={"format": "pt"})
    loaded = load_file(dst)
    assert set(loaded) == set(expected) and all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert report.files == [str(dst)] and report.index is None and report.backend == backend
    assert report.tensors == len(expected) and report.bytes_written == os.path.getsize(dst)
    assert report.bytes_read == sum(t.numel() * t.element_size() for t in expected.values())


def test_header_padding_alignment_and_tiling(tmp_path, backend):
    src, dst = tmp_path / "m.pt", tmp_path / "m.safetensors"
    torch.save({"a": torch.ones(3, dtype=torch.bool), "b": torch.randn(5), "c": torch.ones(2, dtype=torch.int64),
                "d": torch.randn(7).to(torch.bfloat16)}, src)
    gs.convert(src, dst, backend=backend)
    n, head = header(dst)
    assert n % 8 == 0 and next(iter(head)) == "__metadata__" and head["__metadata__"] == {"format": "pt"}
    spans = sorted((v["data_offsets"], v["dtype"]) for k, v in head.items() if k != "__metadata__")
    assert spans[0][0][0] == 0 and spans[-1][0][1] == os.path.getsize(dst) - 8 - n
    assert all(a[0][1] == b[0][0] for a, b in zip(spans, spans[1:]))
    assert all(begin % size == 0 for (begin, _), size in zip((s[0] for s in spans), (8, 4, 2, 1)))


def test_dtype_converts_floats_only(tmp_path, backend):
    sd = {str(dtype): sample(dtype) for dtype in DTYPES}
    sd["weight_t"] = torch.randn(6, 4).t()
    src, dst = tmp_path / "m.pt", tmp_path / "bf16.safetensors"
    torch.save(sd, src)
    gs.convert(src, dst, dtype=torch.bfloat16, backend=backend)
    loaded = load_file(dst)
    for name, tensor in torch.load(src, weights_only=True).items():
        want = tensor.to(torch.bfloat16) if tensor.dtype in FLOATS else tensor
        assert loaded[name].dtype == want.dtype and torch.equal(loaded[name], want), name
    gs.convert(src, dst, dtype="f16", backend=backend)  # the CLI's spelling
    assert load_file(dst)["torch.float32"].dtype == torch.float16


def test_complex128_is_skipped_with_a_warning(tmp_path, backend):
    src, dst = tmp_path / "gemma.ckpt", tmp_path / "m.safetensors"
    freqs_cis = torch.randn(4, dtype=torch.complex64)  # gemma_pytorch's buffer: safetensors stores C64
    torch.save({"model_state_dict": {"w": torch.randn(2, 2), "freqs_cis": freqs_cis,
                                     "c128": torch.randn(3, dtype=torch.complex128)}}, src)
    with pytest.warns(UserWarning, match="c128: safetensors cannot store torch.complex128"):
        report = gs.convert(src, dst, backend=backend)
    assert report.skipped == ["c128: safetensors cannot store torch.complex128"]
    loaded = load_file(dst)
    assert sorted(loaded) == ["freqs_cis", "w"] and torch.equal(loaded["freqs_cis"], freqs_cis)


def test_small_blocks_split_every_kind_of_tensor(tmp_path, backend, monkeypatch):
    """With a 4 KiB block every tensor spans many blocks: contiguous ones are cut anywhere,
    strided ones by rows, and a strided row longer than a block is cut inside the row."""
    torch.manual_seed(1)
    weight = torch.randn(96, 80)
    sd = {"weight_t": weight.t(), "columns": weight[:, 3:70], "flat": torch.randn(5000),
          "wide_rows": torch.randn(3, 6000)[:, ::2], "permuted": torch.randn(10, 12, 14).permute(1, 2, 0),
          "odd_bytes": torch.randint(0, 2, (3001,), dtype=torch.bool), "bf16": torch.randn(70, 33).to(torch.bfloat16),
          "expanded": torch.randn(1, 900).expand(7, 900)}
    src, dst = tmp_path / "m.pt", tmp_path / "m.safetensors"
    torch.save(sd, src)
    monkeypatch.setattr(block_writer, "BLOCK_BYTES", 4096)
    for dtype in (None, torch.float16):
        gs.convert(src, dst, dtype=dtype, backend=backend)
        loaded = load_file(dst)
        for name, tensor in torch.load(src, weights_only=True).items():
            want = tensor.to(dtype) if dtype is not None and tensor.dtype in FLOATS else tensor
            assert torch.equal(loaded[name], want), name


def test_safetensors_source_keeps_its_metadata(tmp_path, backend):
    sd = {"a": torch.randn(4, 4).to(torch.bfloat16), "b": torch.arange(6)}
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(sd, str(src), metadata={"source": "test"})
    gs.convert(src, dst, dtype=torch.float32, backend=backend)
    with safe_open(str(dst), "pt") as f:
        assert f.metadata() == {"source": "test", "format": "pt"}
    loaded = load_file(dst)
    assert torch.equal(loaded["a"], sd["a"].float()) and torch.equal(loaded["b"], sd["b"])


def test_key_selects_the_state_dict(tmp_path, backend):
    src, dst = tmp_path / "two.pt", tmp_path / "ema.safetensors"
    ema = {"w": torch.randn(3, 2), "v": torch.ones(2)}
    torch.save({"model": {"w": torch.zeros(3, 2)}, "ema": ema, "step": 7}, src)
    gs.convert(src, dst, state_dict_key="ema", backend=backend)
    loaded = load_file(dst)
    assert set(loaded) == set(ema) and all(torch.equal(loaded[k], v) for k, v in ema.items())


# --- sharded output -----------------------------------------------------------------------


def test_parse_size():
    assert parse_size(123) == 123 and parse_size("2GB") == 2 * 10**9 and parse_size("500MB") == 500 * 10**6
    assert parse_size("1GiB") == 1 << 30 and parse_size("1.5kb") == 1500 and parse_size("4096") == 4096
    for bad in ("2XB", "", "-1GB", "0", 0, "GB"):
        with pytest.raises(gs.GemmaStreamError, match="max_shard_size"):
            parse_size(bad)


def test_sharded_output_loads_with_safetensors_and_gs(tmp_path, backend):
    torch.manual_seed(2)
    sd = {f"layers.{i}.weight": torch.randn(16, 32) for i in range(5)}  # 2 KiB each
    sd["embed.weight"] = torch.randn(64, 32)                             # 8 KiB: bigger than a shard
    sd["norm.weight"] = torch.randn(32)
    src, out = tmp_path / "m.ckpt", tmp_path / "out"
    torch.save({"model_state_dict": sd}, src)
    report = gs.convert(src, out, max_shard_size="5KB", backend=backend)
    names = sorted(os.listdir(out))  # greedy in source order: [0, 1] [2, 3] [4] [embed] [norm]
    assert names == ["model-0000%d-of-00005.safetensors" % i for i in range(1, 6)] + ["model.safetensors.index.json"]
    assert report.files == [str(out / n) for n in names[:-1]] and report.index == str(out / names[-1])
    assert report.bytes_written == sum(os.path.getsize(out / n) for n in names)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": sum(t.numel() * 4 for t in sd.values()), "format": "pt"}
    assert set(index["weight_map"]) == set(sd)
    merged = {}
    for shard in names[:-1]:
        part = load_file(out / shard)
        assert all(index["weight_map"][k] == shard for k in part)
        assert sum(t.numel() * 4 for t in part.values()) <= 5000 or list(part) == ["embed.weight"]
        merged.update(part)
    assert [sorted(load_file(out / n)) for n in names[:2]] == [["layers.0.weight", "layers.1.weight"],
                                                               ["layers.2.weight", "layers.3.weight"]]
    assert set(merged) == set(sd) and all(torch.equal(merged[k], sd[k]) for k in sd)
    again = gs.load_state_dict(out, backend=backend)
    assert all(torch.equal(again[k], sd[k]) for k in sd)


def test_sharded_source_to_one_file(tmp_path, backend):
    shards = {"pytorch_model-00001-of-00002.bin": {"a": torch.randn(3, 3)},
              "pytorch_model-00002-of-00002.bin": {"b": torch.randn(2).to(torch.bfloat16).expand(3, 2)}}
    weight_map, expected = {}, {}
    for file_name, sd in shards.items():
        torch.save(sd, tmp_path / file_name)
        weight_map.update(dict.fromkeys(sd, file_name))
        expected.update(torch.load(tmp_path / file_name, weights_only=True))
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    out = tmp_path / "out"
    out.mkdir()
    report = gs.convert(tmp_path, out, backend=backend)  # a directory: out/model.safetensors
    assert report.files == [str(out / "model.safetensors")]
    loaded = load_file(out / "model.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())


# --- quantized output ---------------------------------------------------------------------


def quantizable() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    w = torch.randn(37, 256)
    w[0] = 0          # a zero row
    w[1] = 3.5        # a constant row
    w[2, ::3] = 65504
    return {"model.embedder.weight": torch.randn(50, 128).to(torch.bfloat16),
            "model.layers.0.mlp.up_proj.weight": w,
            "model.layers.0.self_attn.o_proj.weight": torch.randn(64, 128).to(torch.float16),
            "model.layers.0.self_attn.qkv_proj.weight": torch.randn(128, 96).t(),      # strided source
            "model.layers.0.input_layernorm.weight": torch.randn(128),                 # 1-D: kept
            "model.layers.0.mlp.down_proj.weight": torch.randn(16, 96),                # int4 G=64 does not fit
            "model.layers.0.mlp.up_proj.bias": torch.randn(37),
            "model.layers.0.table": torch.randn(8, 64),                                 # not a weight
            "model.layers.0.int_weight.weight": torch.ones(4, 64, dtype=torch.int8)}   # not a float


def reference_outputs(name: str, w: torch.Tensor, scheme: str, group_size: int) -> dict[str, torch.Tensor]:
    base = name[:-len("weight")]
    if scheme == "int8":
        q, s = quantize_int8(w, torch.float32)
        return {name: q, f"{base}weight_scaler": s}
    q, s, z = quantize_int4(w, group_size, torch.bfloat16)
    return {name: q, f"{base}weight_scale": s, f"{base}weight_zero": z}


@pytest.mark.parametrize("scheme,group_size", [("int8", 128), ("int4", 32), ("int4", 64)])
@pytest.mark.parametrize("block_bytes", [None, 2048])
def test_quantized_output_equals_the_reference(tmp_path, backend, monkeypatch, scheme, group_size, block_bytes):
    sd = quantizable()
    src, dst = tmp_path / "m.ckpt", tmp_path / "q.safetensors"
    torch.save({"model_state_dict": sd}, src)
    if block_bytes:
        monkeypatch.setattr(block_writer, "BLOCK_BYTES", block_bytes)
    report = gs.convert(src, dst, quantize=scheme, group_size=group_size, backend=backend)
    quantized = [n for n, t in sd.items() if n.endswith(".weight") and t.dim() == 2 and t.dtype in FLOATS
                 and (scheme == "int8" or t.shape[1] % group_size == 0)]
    assert sorted(report.quantized) == sorted(quantized)
    assert report.unquantized == ([] if scheme == "int8" or group_size == 32 else
                                  ["model.layers.0.mlp.down_proj.weight: K=96 is not a multiple of group_size=64"])
    expected = {}
    for name, tensor in sd.items():
        expected.update(reference_outputs(name, tensor, scheme, group_size) if name in quantized else {name: tensor})
    loaded = load_file(dst)
    assert set(loaded) == set(expected)
    for name, want in expected.items():
        assert loaded[name].dtype == want.dtype and torch.equal(loaded[name], want), name
    with safe_open(str(dst), "pt") as f:
        assert f.metadata() == {"format": "pt", "gemma_stream.quantize": scheme,
                                "gemma_stream.group_size": str(group_size),
                                "gemma_stream.scale_dtype": "float32" if scheme == "int8" else "bfloat16"}
    again = gs.load_state_dict(dst, backend=backend)
    assert all(torch.equal(again[k], v) for k, v in expected.items())


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_file_loads_into_a_quantized_model_as_copies(tmp_path, backend, scheme):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Embedding(40, 128), nn.Linear(128, 64), nn.LayerNorm(64), nn.Linear(64, 32, bias=False))
    src, dst = tmp_path / "m.ckpt", tmp_path / "q.safetensors"
    torch.save({"model_state_dict": model.state_dict()}, src)
    gs.convert(src, dst, quantize=scheme, group_size=64, backend=backend)
    with torch.device("meta"):
        direct, copied = (gs.quantize_(nn.Sequential(nn.Embedding(40, 128), nn.Linear(128, 64), nn.LayerNorm(64),
                                                     nn.Linear(64, 32, bias=False)), scheme, group_size=64)
                          for _ in range(2))
    gs.load_into(direct, src, backend=backend)           # quantized on read from the float file
    report = gs.load_into(copied, dst, backend=backend)  # plain copies of the converted file
    assert report.bytes_read == os.path.getsize(dst) - 8 - header(dst)[0]
    for name, tensor in direct.state_dict().items():
        assert torch.equal(copied.state_dict()[name], tensor), name


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("block_bytes", [None, 1024])
def test_non_finite_weight_is_refused_and_nothing_is_left(tmp_path, backend, monkeypatch, strided, block_bytes):
    w = torch.randn(20, 64)
    w[17, 5] = float("nan")
    src, dst = tmp_path / "m.pt", tmp_path / "q.safetensors"
    torch.save({"proj.weight": w.t().contiguous().t() if strided else w}, src)
    dst.write_bytes(b"an older file")
    if block_bytes:  # the bad row is then in a later block: its number still counts from the tensor's start
        monkeypatch.setattr(block_writer, "BLOCK_BYTES", block_bytes)
    with pytest.raises(gs.CheckpointError, match="m.pt: tensor 'proj.weight': row 17 holds NaN or infinity"):
        gs.convert(src, dst, quantize="int8", backend=backend)
    assert dst.read_bytes() == b"an older file"
    assert sorted(os.listdir(tmp_path)) == ["m.pt", "q.safetensors"]  # no temporary file left


def test_a_failure_removes_the_directories_it_created(tmp_path, backend):
    w = torch.randn(4, 64)
    w[2, 0] = float("inf")
    src = tmp_path / "m.pt"
    torch.save({"proj.weight": w}, src)
    for dst, shard_size in ((tmp_path / "new" / "deeper" / "q.safetensors", None), (tmp_path / "shards", "1KB")):
        with pytest.raises(gs.CheckpointError, match="row 2 holds NaN or infinity"):
            gs.convert(src, dst, quantize="int8", max_shard_size=shard_size, backend=backend)
    assert sorted(os.listdir(tmp_path)) == ["m.pt"]


# --- options, errors, progress ------------------------------------------------------------


def test_bad_arguments(tmp_path):
    src = tmp_path / "m.pt"
    torch.save({"w": torch.randn(2, 64)}, src)
    for kwargs, message in (({"dtype": torch.float64}, "dtype must be"), ({"dtype": "int8"}, "dtype must be"),
                            ({"quantize": "int3"}, "quantize must be"),
                            ({"quantize": "int4", "group_size": 48}, "group_size must be one of"),
                            ({"max_shard_size": "lots"}, "max_shard_size")):
        with pytest.raises(gs.GemmaStreamError, match=message):
            gs.convert(src, tmp_path / "out.safetensors", **kwargs)
    (tmp_path / "file").write_text("x")
    with pytest.raises(gs.GemmaStreamError, match="but this is a file"):
        gs.convert(src, tmp_path / "file", max_shard_size="1GB")
    with pytest.raises(gs.CheckpointError, match="no such file"):
        gs.convert(tmp_path / "missing.pt", tmp_path / "out.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["file", "m.pt"]


def test_progress_reaches_the_total_and_can_cancel(tmp_path, backend, monkeypatch):
    src, dst = tmp_path / "m.pt", tmp_path / "m.safetensors"
    torch.save({"a": torch.randn(64, 64), "b": torch.randn(64, 64).t()}, src)
    monkeypatch.setattr(block_writer, "BLOCK_BYTES", 4096)
    seen = []
    gs.convert(src, dst, backend=backend, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (2 * 64 * 64 * 4, 2 * 64 * 64 * 4)
    os.unlink(dst)
    with pytest.raises(gs.GemmaStreamError, match="cancelled"):
        gs.convert(src, dst, backend=backend, progress=lambda done, total: done < 8000)
    assert sorted(os.listdir(tmp_path)) == ["m.pt"]


# --- peak memory --------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import json, sys, torch
    import gemma_stream as gs

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    src, dst, backend, option = sys.argv[1:5]
    kwargs = {"dtype": {"dtype": torch.bfloat16}, "int8": {"quantize": "int8"}, "none": {}}[option]
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the RSS now
        f.write("5")
    report = gs.convert(src, dst, backend=backend, **kwargs)
    print(json.dumps({"growth": status("VmHWM") - base, "read": report.bytes_read}))
""")


@pytest.fixture(scope="module")
def big_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("convert_mem") / "model.ckpt"
    sd = {"embed.weight": torch.randn(16384, 2048)}                   # 128 MiB: one tensor, two blocks
    sd.update({f"layers.{i}.weight": torch.randn(1024, 2048) for i in range(8)})
    sd["layers.0.weight"] = sd["layers.0.weight"].t().contiguous().t()  # a strided source in the mix
    torch.save({"model_state_dict": sd}, path)
    return str(path)


@pytest.mark.parametrize("option", ["dtype", "int8"])
def test_peak_rss_stays_near_one_block(big_ckpt, tmp_path, backend, option):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(gs.__file__)))
    out = subprocess.run([sys.executable, "-c", CHILD, big_ckpt, str(tmp_path / "out.safetensors"), backend, option],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["read"] == 192 << 20
    # generous: a 64 MiB block plus the executor's chunk buffers, far below the 192 MiB source
    assert result["growth"] < 150 << 20, result
