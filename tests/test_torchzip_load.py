"""torch.save checkpoints end to end through the public API, on both executors.

Every test compares with ``torch.load(path, weights_only=True)`` tensor by tensor
(``torch.equal``); the record-level reader tests live in test_torchzip.py.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch
from torch import nn

import gemma_stream as gs
from gemma_stream.executors import python as python_executor

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int16, torch.int32,
          torch.int64, torch.uint8, torch.bool, torch.complex64, torch.complex128, torch.uint16, torch.uint32,
          torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2]
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def sample(dtype: torch.dtype, shape=(5, 7)) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, dtype=torch.complex64 if dtype.is_complex else torch.float32).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, dtype=torch.int64).to(dtype)


def assert_matches_torch_load(path, got: dict[str, torch.Tensor], state_key: str | None = None,
                              dtype: torch.dtype | None = None) -> dict:
    reference = torch.load(path, weights_only=True)
    if state_key is not None:
        reference = reference[state_key]
    expected = {k: v for k, v in reference.items() if isinstance(v, torch.Tensor)}
    assert set(got) == set(expected)
    for name, want in expected.items():
        if dtype is not None and want.dtype in FLOATS:
            want = want.to(dtype)
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        assert got[name].is_contiguous(), name
        assert torch.equal(got[name], want), name
    return expected


def views_of_shared_storages() -> dict[str, torch.Tensor]:
    """Tied weights, offsets, transposes, expands and column slices, as torch.save keeps them."""
    torch.manual_seed(0)
    weight = torch.randn(12, 10)
    base = torch.arange(40, dtype=torch.float32)
    return {
        "embedder.weight": weight, "lm_head.weight": weight,          # tied: one storage, same view
        "weight_t": weight.t(),                                        # transposed: strides (1, 10)
        "rows": weight[3:7],                                           # storage offset 30
        "columns": weight[:, 2:5],                                     # column slice: strides (10, 1)
        "column": weight[:, 4:5],
        "base": base, "middle": base[5:25].view(4, 5),                 # a slice with an offset, reshaped
        "expanded": torch.randn(1, 6).expand(4, 6),                    # stride 0
        "permuted": torch.randn(3, 4, 5, dtype=torch.bfloat16).permute(2, 0, 1),
        "every_other": torch.arange(30, dtype=torch.int16)[::3],
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3), "tail": base[40:],
    }


# --- load_state_dict agrees with torch.load -------------------------------------------------


def test_every_dtype(tmp_path, backend):
    path = tmp_path / "dtypes.pt"
    torch.save({str(dtype): sample(dtype) for dtype in DTYPES}, path)  # default torch.save settings
    expect = assert_matches_torch_load(path, gs.load_state_dict(path, backend=backend))
    assert {t.dtype for t in expect.values()} == set(DTYPES)


def test_every_dtype_with_dtype_conversion(tmp_path, backend):
    path = tmp_path / "dtypes.pt"
    torch.save({str(dtype): sample(dtype) for dtype in DTYPES}, path)
    for dtype in FLOATS:  # floats are converted on read, everything else is loaded as stored
        assert_matches_torch_load(path, gs.load_state_dict(path, backend=backend, dtype=dtype), dtype=dtype)


def test_views_of_shared_storages(tmp_path, backend):
    path = tmp_path / "views.pt"
    torch.save(views_of_shared_storages(), path)
    got = gs.load_state_dict(path, backend=backend)
    assert_matches_torch_load(path, got)
    # as with torch.load, the tied pair is one tensor; other views become their own tensors
    assert got["embedder.weight"] is got["lm_head.weight"]
    assert got["rows"].data_ptr() != got["embedder.weight"].data_ptr()
    assert_matches_torch_load(path, gs.load_state_dict(path, backend=backend, dtype=torch.bfloat16),
                              dtype=torch.bfloat16)


def test_nested_model_state_dict_and_ordered_dict(tmp_path, backend):
    torch.manual_seed(1)
    module = nn.Sequential(nn.Linear(6, 4), nn.LayerNorm(4), nn.Embedding(9, 3))
    state = module.state_dict()
    assert isinstance(state, collections.OrderedDict)
    path = tmp_path / "gemma.ckpt"
    torch.save({"model_state_dict": state, "epoch": 3}, path)
    got = gs.load_state_dict(path, backend=backend)
    assert list(got) == list(state)
    assert_matches_torch_load(path, got, state_key="model_state_dict")
    plain = tmp_path / "plain.bin"
    torch.save(state, plain)  # a bare OrderedDict at the top level
    assert_matches_torch_load(plain, gs.load_state_dict(plain, backend=backend))


def test_key_selects_another_state_dict(tmp_path, backend):
    path = tmp_path / "two.pt"
    torch.save({"model": {"w": torch.randn(3, 2)}, "ema": {"w": torch.randn(3, 2), "v": torch.ones(2)}}, path)
    assert_matches_torch_load(path, gs.load_state_dict(path, backend=backend), state_key="model")
    assert_matches_torch_load(path, gs.load_state_dict(path, backend=backend, state_dict_key="ema"), state_key="ema")
    with pytest.raises(gs.CheckpointError, match="key 'nope' is missing"):
        gs.load_state_dict(path, backend=backend, state_dict_key="nope")


def test_keys_reads_only_a_subset(tmp_path, backend):
    path = tmp_path / "views.pt"
    torch.save(views_of_shared_storages(), path)
    got = gs.load_state_dict(path, backend=backend, keys=["weight_t", "middle"])
    reference = torch.load(path, weights_only=True)
    assert set(got) == {"weight_t", "middle"}
    assert all(torch.equal(got[k], reference[k]) for k in got)


def test_sharded_index_directory(tmp_path, backend):
    torch.manual_seed(2)
    shards = {"pytorch_model-00001-of-00002.bin": {"embed.weight": torch.randn(50, 24), "proj.bias": torch.randn(24)},
              "pytorch_model-00002-of-00002.bin": {"proj.weight": torch.randn(24, 24).t(),
                                                   "norm.weight": torch.randn(24), "norm.bias": torch.randn(24),
                                                   "position": torch.arange(8)}}
    weight_map, reference = {}, {}
    for file_name, sd in shards.items():
        torch.save(sd, tmp_path / file_name)
        weight_map.update(dict.fromkeys(sd, file_name))
        reference.update(torch.load(tmp_path / file_name, weights_only=True))
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    got = gs.load_state_dict(tmp_path, backend=backend)
    assert set(got) == set(reference) and all(torch.equal(got[k], reference[k]) for k in got)
    with torch.device("meta"):
        model = Tiny(tied=True)
    report = gs.load_into(model, tmp_path, backend=backend)
    assert len(report.files) == 2 and not report.missing_keys
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference["embed.weight" if name == "head.weight" else name]), name


# --- load_into ------------------------------------------------------------------------------


class Tiny(nn.Module):
    """HF-shaped toy: an embedding (optionally tied to the LM head), a buffer, a frozen bias."""

    def __init__(self, vocab=50, dim=24, dtype=torch.float32, tied=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, dtype=dtype)
        self.proj = nn.Linear(dim, dim, dtype=dtype)
        self.norm = nn.LayerNorm(dim, dtype=dtype)
        self.head = nn.Linear(dim, vocab, bias=False, dtype=dtype)
        if tied:
            self.head.weight = self.embed.weight
        self.register_buffer("position", torch.arange(8, dtype=torch.int64))
        self.proj.bias.requires_grad_(False)


def gemma_style_ckpt(path, transposed: bool = True) -> dict[str, torch.Tensor]:
    """A gemma_pytorch-style file {"model_state_dict": ..., "epoch": 3} in f32, head tied to the embedding."""
    torch.manual_seed(3)
    sd = {k: v.detach().clone() for k, v in Tiny(tied=True).state_dict().items()}
    sd["head.weight"] = sd["embed.weight"]  # tied in the file too: one storage
    if transposed:
        sd["proj.weight"] = sd["proj.weight"].t().contiguous().t()  # same values, strided in the file
    torch.save({"model_state_dict": sd, "epoch": 3}, path)
    return sd


@pytest.mark.parametrize("dtype", FLOATS)
def test_load_into_meta_model_converts_on_read(tmp_path, backend, dtype):
    path = tmp_path / "model.ckpt"
    sd = gemma_style_ckpt(path)
    with torch.device("meta"):
        model = Tiny(dtype=dtype, tied=True)
    report = gs.load_into(model, path, backend=backend)
    assert report.backend == backend and not report.missing_keys and not report.unexpected_keys
    assert report.skipped_keys == ["head.weight"] or report.skipped_keys == ["embed.weight"]
    assert model.head.weight is model.embed.weight and isinstance(model.proj.weight, nn.Parameter)
    assert not model.proj.bias.requires_grad and model.proj.weight.requires_grad
    for name, tensor in model.state_dict().items():
        want = sd[name].to(dtype) if sd[name].is_floating_point() else sd[name]
        assert tensor.dtype == want.dtype and torch.equal(tensor, want), name


def test_load_into_untied_model_reads_the_tied_storage_twice(tmp_path, backend):
    path = tmp_path / "model.ckpt"
    sd = gemma_style_ckpt(path)
    model = Tiny(tied=False)
    report = gs.load_into(model, path, backend=backend)
    assert not report.skipped_keys and model.head.weight.data_ptr() != model.embed.weight.data_ptr()
    assert torch.equal(model.head.weight, sd["embed.weight"]) and torch.equal(model.proj.weight, sd["proj.weight"])


def test_strict_rename_and_report(tmp_path, backend):
    path = tmp_path / "model.ckpt"
    sd = gemma_style_ckpt(path, transposed=False)
    with torch.device("meta"):
        model = Tiny(tied=True)
    model.extra = nn.Linear(2, 2, bias=False, device="meta")
    with pytest.raises(gs.MismatchError, match=r"missing in checkpoint \(1\): extra.weight"):
        gs.load_into(model, path, backend=backend)
    assert model.embed.weight.is_meta  # refused before allocating anything
    with pytest.warns(gs.UninitializedWarning, match="extra.weight"):
        report = gs.load_into(model, path, backend=backend, strict=False)
    assert report.missing_keys == ["extra.weight"] and report.uninitialized == ["extra.weight"]
    assert torch.equal(model.proj.weight, sd["proj.weight"])

    renamed = Tiny(tied=True)
    renamed.proj = nn.Linear(24, 24)
    renamed.proj.bias.requires_grad_(False)
    with pytest.raises(gs.MismatchError, match=r"unexpected in checkpoint \(1\): proj.weight"):
        gs.load_into(renamed, path, backend=backend, rename={"proj.weight": "extra"})
    report = gs.load_into(renamed, path, backend=backend, rename=lambda n: None if n == "position" else n,
                          strict=False)
    assert report.missing_keys == ["position"] and "position" in report.skipped_keys

    wrong = Tiny(vocab=51, tied=True)
    with pytest.raises(gs.MismatchError, match=r"embed.weight: checkpoint shape \[50, 24\] vs model"):
        gs.load_into(wrong, path, backend=backend)


def test_load_into_key_and_dtype_mismatch(tmp_path, backend):
    path = tmp_path / "two.ckpt"
    sd = {k: v.detach().clone() for k, v in Tiny().state_dict().items()}
    torch.save({"model_state_dict": {"junk": torch.ones(1)}, "ema": sd}, path)
    model = Tiny()
    report = gs.load_into(model, path, backend=backend, state_dict_key="ema")
    assert not report.missing_keys and torch.equal(model.embed.weight, sd["embed.weight"])
    sd["position"] = sd["position"].float()
    torch.save(sd, path)
    with pytest.raises(gs.MismatchError, match="position: checkpoint dtype torch.float32 cannot be loaded"):
        gs.load_into(Tiny(), path, backend=backend)


# --- strided views are chunked ---------------------------------------------------------------


def big_strided_views() -> dict[str, torch.Tensor]:
    """Views of a few MiB each, so a 1 MiB chunk splits every one of them several times."""
    torch.manual_seed(4)
    weight = torch.randn(1024, 1536)  # 6 MiB
    return {
        "weight_t": weight.t(),
        "columns": weight[:, 100:900],
        "every_other_column": weight[:, ::2],
        "rows_t": weight[200:900].t(),
        "bf16_t": torch.randn(2048, 1024).to(torch.bfloat16).t(),
        "permuted": torch.randn(64, 128, 96).permute(2, 0, 1),
        "expanded": torch.randn(1, 2048).expand(600, 2048),
        "wide_rows": torch.randn(4, 700_000)[:, ::2],  # one row spans more than a chunk
        "windows": torch.arange(3_000_000, dtype=torch.float32).as_strided((2_000_000, 3), (1, 1)),
        "int16_t": torch.randint(-100, 100, (1500, 1100), dtype=torch.int16).t(),
    }


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_strided_views_with_a_small_chunk(tmp_path, backend, monkeypatch, dtype):
    path = tmp_path / "strided.pt"
    torch.save(big_strided_views(), path)
    monkeypatch.setenv("GEMMA_STREAM_CHUNK_MB", "1")
    assert_matches_torch_load(path, gs.load_state_dict(path, backend=backend, dtype=dtype), dtype=dtype)


def test_python_strided_reads_are_split(tmp_path, monkeypatch):
    """The fallback really reads a strided view in several bounded pieces (the C++ side is
    held to the same bytes by the test above)."""
    path = tmp_path / "t.pt"
    weight = torch.randn(1024, 1024)  # 4 MiB
    torch.save({"weight_t": weight.t()}, path)
    reads = []
    real_read = python_executor._read

    def spy(fd, file, nbytes, offset):
        reads.append(nbytes)
        return real_read(fd, file, nbytes, offset)

    monkeypatch.setattr(python_executor, "_read", spy)
    monkeypatch.setenv("GEMMA_STREAM_CHUNK_MB", "1")
    got = gs.load_state_dict(path, backend="python")
    assert torch.equal(got["weight_t"], weight.t())
    assert len(reads) >= 4 and max(reads) <= 1 << 20, reads
    assert sum(reads) >= weight.numel() * 4


# --- a pickle that would run code ----------------------------------------------------------


def evil_checkpoint(path, payload_obj, protocol: int) -> bytes:
    """A STORED zip laid out like torch.save's whose data.pkl holds ``payload_obj``."""
    data_pkl = pickle.dumps(payload_obj, protocol=protocol)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return data_pkl


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("nested", [False, True])
def test_malicious_pickle_runs_nothing(tmp_path, backend, protocol, nested):
    marker = tmp_path / "MARKER"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    obj = {"w": Exploit()}
    if nested:
        obj = {"model_state_dict": {"scale": 0.5, "layers": [1, {"evil": Exploit()}]}, "epoch": 3}
    path = tmp_path / "evil.ckpt"
    data_pkl = evil_checkpoint(path, obj, protocol)
    with pytest.raises(gs.CheckpointError, match=r"global '(posix|nt)\.system' is not allowed"):
        gs.load_into(nn.Linear(2, 2), path, backend=backend)
    with pytest.raises(gs.CheckpointError, match="is not allowed"):
        gs.load_state_dict(path, backend=backend)
    with pytest.raises(gs.CheckpointError, match="is not allowed"):
        gs.inspect(path)
    assert not marker.exists()
    pickle.loads(data_pkl)  # the control: unpickling the same bytes does run the payload
    assert marker.exists()


# --- peak memory ---------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import json, sys, torch
    from torch import nn
    import gemma_stream as gs

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    path, backend, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
    with torch.device("meta"):
        model = nn.Module()
        model.embed = nn.Embedding(16384, 2048, dtype=dtype)
        model.layers = nn.ModuleList(nn.Linear(2048, 2048, bias=False, dtype=dtype) for _ in range(8))
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the RSS now
        f.write("5")
    gs.load_into(model, path, backend=backend)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"peak": status("VmHWM") - base, "model": model_bytes}))
""")


@pytest.fixture(scope="module")
def big_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("mem") / "model.ckpt"
    sd = {"embed.weight": torch.randn(16384, 2048)}
    sd.update({f"layers.{i}.weight": torch.randn(2048, 2048) for i in range(8)})
    sd["layers.0.weight"] = sd["layers.0.weight"].t()  # one strided source in the mix
    torch.save({"model_state_dict": sd}, path)
    return str(path)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_peak_rss_on_a_ckpt(big_ckpt, backend, dtype):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(gs.__file__)))
    out = subprocess.run([sys.executable, "-c", CHILD, big_ckpt, backend, dtype], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # generous: 1.10x model + 96 MiB (the benchmark holds the 1.03x + 64 MiB target)
    assert result["peak"] <= 1.10 * result["model"] + (96 << 20), result


def test_key_is_a_deprecated_name_of_state_dict_key(tmp_path, backend):
    """``key=`` sat one letter from ``keys=``; the old spelling still works, with a warning."""
    path = tmp_path / "two.ckpt"
    sd = {k: v.detach().clone() for k, v in Tiny().state_dict().items()}
    torch.save({"model_state_dict": {"junk": torch.ones(1)}, "ema": sd}, path)
    with pytest.warns(DeprecationWarning, match=r"gs.load_state_dict\(key=...\) is deprecated; use state_dict_key"):
        loaded = gs.load_state_dict(path, backend=backend, key="ema")
    assert torch.equal(loaded["embed.weight"], sd["embed.weight"])
    with pytest.warns(DeprecationWarning, match="gs.inspect"):
        assert {t.name for t in gs.inspect(path, key="ema")} == set(sd)
    with pytest.warns(DeprecationWarning, match="gs.load_into"):
        gs.load_into(Tiny(), path, backend=backend, key="ema")
    with pytest.raises(gs.UsageError, match="pass state_dict_key= only"):
        gs.load_state_dict(path, backend=backend, key="ema", state_dict_key="ema")


def test_convert_module_is_gemma_stream_conversion():
    """``gs.convert`` is the function; the module moved to ``gemma_stream.conversion`` and the old
    module path still imports, with a warning."""
    import importlib

    import gemma_stream.conversion as conversion

    assert gs.convert is conversion.convert and callable(gs.convert)
    with pytest.warns(DeprecationWarning, match="gemma_stream.convert is now gemma_stream.conversion"):
        from gemma_stream.convert import parse_size
    assert parse_size is conversion.parse_size
    assert importlib.import_module("gemma_stream.convert") is not conversion
