"""The copy engine's data path on both executors: conversion kernels bit-exact with torch, any
thread count, unaligned and already-touched destinations."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import gemma_stream as gs

FLOATS = [torch.float32, torch.float16, torch.bfloat16]


def all_half_patterns(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)


def f32_patterns() -> torch.Tensor:
    """Random bit patterns (every class: NaNs, infs, subnormals, rounding ties) plus edge values."""
    gen = torch.Generator().manual_seed(7)
    bits = torch.randint(-(1 << 31), 1 << 31, (1 << 18,), generator=gen, dtype=torch.int64).to(torch.int32)
    # halfway cases for bf16 and f16 rounding, around every exponent
    exps = torch.arange(0, 256, dtype=torch.int32) << 23
    ties = torch.cat([exps | 0x8000, exps | 0x18000, exps | 0x1000, exps | 0x3000, exps | 0x7FFF, exps | 0x0FFF])
    edges = torch.tensor([0x477FEFFF, 0x477FF000, 0x477FF001, 0x38800000, 0x387FFFFF, 0x33000000, 0x33000001,
                          0x32FFFFFF, 0x33800000, 0x7F800000, 0x7F800001, 0x7FC00000, 0x7FFFFFFF], dtype=torch.int32)
    out = torch.cat([bits, ties, -ties, edges, edges | (-0x80000000)])
    return out[: len(out) // 64 * 64].view(torch.float32)  # whole vectors: torch's scalar tail differs on NaNs


@pytest.mark.parametrize("dst", FLOATS)
def test_conversion_kernels_bit_exact_on_every_half_and_many_floats(tmp_path, backend, dst):
    sd = {"f16": all_half_patterns(torch.float16), "bf16": all_half_patterns(torch.bfloat16), "f32": f32_patterns()}
    path = tmp_path / "w.safetensors"
    save_file(sd, str(path))
    out = gs.load_state_dict(path, dtype=dst, backend=backend, threads=2)
    for name, src in sd.items():
        got, want = out[name], src.to(dst)
        assert got.dtype == dst
        same = got.view(torch.uint8).view(-1, dst.itemsize) == want.view(torch.uint8).view(-1, dst.itemsize)
        bad = (~same.all(dim=1)).nonzero().flatten()
        assert bad.numel() == 0, (f"{name}->{dst}: {bad.numel()} differ, first input bits "
                                  f"{src.view(torch.int16 if src.itemsize == 2 else torch.int32)[bad[:4]].tolist()}")


@pytest.mark.parametrize("threads", [1, 3, 7])
def test_any_thread_count_splits_uneven_work_exactly(tmp_path, backend, monkeypatch, threads):
    monkeypatch.setenv("GEMMA_STREAM_CHUNK_MB", "1")
    torch.manual_seed(3)
    sd = {f"t{i}": torch.randn(int(n)) for i, n in enumerate([5, 700_000, 1, 300_000, 2_000_000, 17, 90_000])}
    sd["b"] = torch.randn(1000, 333).bfloat16()
    path = tmp_path / "w.safetensors"
    save_file(sd, str(path))
    out = gs.load_state_dict(path, backend=backend, threads=threads)
    want = load_file(str(path))
    assert out.keys() == want.keys()
    for name in want:
        assert torch.equal(out[name].view(torch.uint8), want[name].view(torch.uint8)), name


def test_loading_into_unaligned_and_already_touched_memory(tmp_path, backend):
    """The engine prefaults whole pages inside each destination; neighbours must stay untouched."""
    w = torch.randn(3000, 257)
    path = tmp_path / "w.safetensors"
    save_file({"w": w}, str(path))
    arena = torch.full((w.numel() + 2048,), 7.0)  # destination starts 4 bytes into a page, sentinels around it
    model = nn.Module()
    model.register_buffer("w", arena[1:1 + w.numel()].view(3000, 257))
    gs.load_into(model, path, backend=backend)
    assert torch.equal(model.w, w)
    assert arena[0] == 7.0 and bool((arena[1 + w.numel():] == 7.0).all())
