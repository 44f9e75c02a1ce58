"""load_into(mode="mmap") on both executors: same-dtype tensors become copy-on-write views of the
file, the rest are copied; the mapped ranges are read ahead in the background."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import gemma_stream as gs

from conftest import MiB, cached_bytes, mapped_from, set_cached


class TiedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 32, dtype=torch.bfloat16)
        self.head = nn.Linear(32, 64, bias=False, dtype=torch.bfloat16)
        self.head.weight = self.embed.weight
        self.proj = nn.Linear(32, 32, dtype=torch.bfloat16)  # stored as f32: converted, so copied
        self.register_buffer("steps", torch.zeros(3, dtype=torch.int64))
        self.proj.bias.requires_grad_(False)


def test_mmap_mode_maps_same_dtype_tensors_and_copies_the_rest(tmp_path, backend):
    torch.manual_seed(9)
    sd = {"embed.weight": torch.randn(64, 32).bfloat16(), "proj.weight": torch.randn(32, 32),
          "proj.bias": torch.randn(32).bfloat16(), "steps": torch.arange(3)}
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    with torch.device("meta"):
        model = TiedModel()
    report = gs.load_into(model, path, backend=backend, mode="mmap")
    assert sorted(report.mapped) == ["embed.weight", "proj.bias", "steps"]
    assert model.head.weight is model.embed.weight and isinstance(model.embed.weight, nn.Parameter)
    assert model.embed.weight.requires_grad and not model.proj.bias.requires_grad
    assert mapped_from(path, model.embed.weight) and mapped_from(path, model.steps)
    assert not mapped_from(path, model.proj.weight) and model.proj.weight.dtype == torch.bfloat16
    assert torch.equal(model.proj.weight, sd["proj.weight"].bfloat16())
    for name in ("embed.weight", "proj.bias", "steps"):
        assert torch.equal(model.state_dict()[name], sd[name]), name
    # copy-on-write: the model may write its weights; the file never changes
    before = path.read_bytes()
    with torch.no_grad():
        model.embed.weight.mul_(2)
    assert path.read_bytes() == before
    assert torch.equal(model.head.weight, sd["embed.weight"] * 2)


def test_mmap_views_keep_their_mapping_alive(tmp_path, backend):
    sd = {"a": torch.randn(1000), "b": torch.randn(10, 10)}
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    out = gs.load_state_dict(path, backend=backend, mode="mmap")
    converted = gs.load_state_dict(path, backend=backend, mode="mmap", dtype=torch.bfloat16, keys=["b"])
    a = out.pop("a")
    del out
    import gc
    gc.collect()
    assert mapped_from(path, a) and torch.equal(a, sd["a"])
    assert not mapped_from(path, converted["b"]) and torch.equal(converted["b"], sd["b"].bfloat16())


def test_mmap_mode_refuses_drop_and_checks_before_remapping(tmp_path, backend):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(4, 4)}, str(path))
    model = nn.Linear(4, 4, bias=False)
    with pytest.raises(ValueError, match="mmap"):
        gs.load_into(model, path, backend=backend, mode="mmap", cache="drop")
    with pytest.raises(ValueError, match="mode"):
        gs.load_state_dict(path, backend=backend, mode="zero-copy")
    weight = model.weight
    with pytest.raises(gs.MismatchError):
        gs.load_into(model, path, backend=backend, mode="mmap")  # the model wants "weight", not "w"
    assert model.weight is weight

