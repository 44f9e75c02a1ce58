"""The copy engine: conversion kernels, scheduling, cache policy; on both executors."""

from __future__ import annotations

import ctypes
import mmap
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import gemma_stream as gs

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
MiB = 1 << 20


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


# ---------------------------------------------------------------- page cache

def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return libc


def cached_bytes(path) -> int:
    """Bytes of the file in the page cache, from mincore on a mapping that is never read."""
    libc, size = _libc(), os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        pages = (ctypes.c_ubyte * ((size + 4095) // 4096))()
        try:
            assert libc.mincore(addr, size, pages) == 0, os.strerror(ctypes.get_errno())
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(p & 1 for p in bytes(pages)) * 4096


def set_cached(path, cached: bool) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if cached:
            # small reads leave large folios that straddle the engine's chunk edges
            while os.read(fd, 64 << 10):
                pass
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    """24 MiB over tensors of mixed sizes and dtypes; skips where the page cache cannot be observed."""
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("cache") / "w.safetensors"
    sd = {"embed": torch.randn(2048, 2048), "small": torch.randn(7, 3),
          "mid": torch.randn(1000, 1024).bfloat16(), "tail": torch.randn(4_000_000).half()}
    save_file(sd, str(path))
    set_cached(path, False)
    if cached_bytes(path) > 2 * MiB:
        pytest.skip("this file system keeps pages after POSIX_FADV_DONTNEED (tmpfs?)")
    return path, sd


@pytest.mark.parametrize("warm", [True, False], ids=["warm", "cold"])
@pytest.mark.parametrize("convert", [False, True], ids=["same-dtype", "to-bf16"])
@pytest.mark.page_cache
def test_cache_drop_leaves_at_most_one_chunk_in_the_page_cache(big_file, backend, monkeypatch, warm, convert):
    monkeypatch.setenv("GEMMA_STREAM_CHUNK_MB", "1")
    path, sd = big_file
    set_cached(path, warm)
    out = gs.load_state_dict(path, backend=backend, threads=2, cache="drop",
                             dtype=torch.bfloat16 if convert else None)
    left = cached_bytes(path)
    assert torch.equal(out["embed"], sd["embed"].bfloat16() if convert else sd["embed"])
    assert left <= 1 * MiB, f"{left} bytes of {os.path.getsize(path)} still cached"


@pytest.mark.page_cache
def test_cache_keep_leaves_the_file_cached(big_file, backend):
    """The control for the drop test: the same measurement sees a kept file."""
    path, _ = big_file
    set_cached(path, False)
    gs.load_state_dict(path, backend=backend, cache="keep")
    assert cached_bytes(path) >= 0.9 * os.path.getsize(path)


@pytest.mark.page_cache
def test_cache_auto_keeps_a_file_that_fits_and_drops_one_that_does_not(big_file, backend, monkeypatch):
    """The default policy: keep when file + model fit in MemAvailable, drop when they cannot (then the
    file's pages go straight to the model instead of pushing out the model's first pages)."""
    monkeypatch.setenv("GEMMA_STREAM_CHUNK_MB", "1")
    path, sd = big_file
    size = os.path.getsize(path)
    model = nn.Module()
    for name, tensor in sd.items():
        model.register_buffer(name, torch.empty_like(tensor))
    set_cached(path, True)
    report = gs.load_into(model, path, backend=backend, threads=2)          # default: auto
    assert report.cache == "keep" and cached_bytes(path) >= 0.9 * size
    import gemma_stream.api as api
    data = sum(t.nbytes for t in sd.values())
    monkeypatch.setattr(api, "mem_available", lambda: 2 * data - 1)      # bytes read + bytes written do not fit
    report = gs.load_into(model, path, backend=backend, threads=2, cache="auto")
    # drop's contract: at most one chunk budget (2 threads x 1 MiB) left; the folio holding the header,
    # read by the format reader and only partly inside the dropped span, may stay (1 MiB + 12 KiB seen)
    assert report.cache == "drop" and cached_bytes(path) <= 2 * MiB
    assert all(torch.equal(getattr(model, name), tensor) for name, tensor in sd.items())
    monkeypatch.setattr(api, "mem_available", lambda: 2 * data)
    set_cached(path, True)
    assert gs.load_into(model, path, backend=backend, threads=2).cache == "keep"
    monkeypatch.setattr(api, "mem_available", lambda: 1)
    assert gs.load_into(model, path, backend=backend, threads=2, cache="keep").cache == "keep"  # explicit wins
    assert cached_bytes(path) >= 0.9 * size
    with pytest.raises(ValueError, match="cache"):
        gs.load_into(model, path, backend=backend, cache="evict")


def test_cache_auto_counts_what_is_written_not_what_is_read():
    """A quantized or converted load writes fewer bytes than it reads: the decision uses both."""
    from gemma_stream.plan import Plan, choose_cache

    class Job:
        def __init__(self, nbytes, dst, scale=None, zero=None):
            self.nbytes, self.dst, self.scale, self.zero = nbytes, dst, scale, zero

    plan = Plan(files=[], jobs=[Job(1000, torch.empty(250, dtype=torch.int8), torch.empty(10, dtype=torch.float32))])
    assert plan.dst_nbytes == 290
    assert choose_cache(plan, "auto", 1290) == "keep"
    assert choose_cache(plan, "auto", 1289) == "drop"
    assert choose_cache(plan, "auto", None) == "keep"          # no /proc/meminfo: the safe default
    assert choose_cache(plan, "drop", 1 << 40) == "drop"
    on_device = Plan(files=[], jobs=[Job(1000, torch.empty(500, dtype=torch.int16, device="meta"))])
    assert on_device.dst_nbytes == 0 and choose_cache(on_device, "auto", 1000) == "keep"   # (stands in for cuda)
    with pytest.raises(ValueError):
        choose_cache(plan, "sometimes", 0)


def test_cache_drop_releases_pages_as_the_load_goes(big_file, monkeypatch):
    """Mid-load, too: starting from a cached file, what is still cached never exceeds what is left to
    read by more than a few MiB (one chunk and the 2 MiB folio it may straddle). Sampled from the
    progress callback, which the Python executor calls per chunk (the native one every 100 ms, too
    rarely for a load this small; both share the policy)."""
    monkeypatch.setenv("GEMMA_STREAM_CHUNK_MB", "1")
    path, _ = big_file
    set_cached(path, True)
    size, samples = os.path.getsize(path), []
    model = nn.Module()
    for name, shape, dtype in [("embed", (2048, 2048), torch.float32), ("small", (7, 3), torch.float32),
                               ("mid", (1000, 1024), torch.bfloat16), ("tail", (4_000_000,), torch.float16)]:
        model.register_buffer(name, torch.empty(shape, dtype=dtype))
    gs.load_into(model, path, backend="python", threads=1, cache="drop",
                 progress=lambda done, total: samples.append((done, cached_bytes(path))))
    assert len(samples) > 10
    for done, cached in samples:
        assert cached <= size - done + 4 * MiB, (done, cached, size)


# ---------------------------------------------------------------- mode="mmap"

def mapped_from(path, tensor: torch.Tensor) -> bool:
    """True when the tensor's memory lies in a private (copy-on-write) mapping of ``path``."""
    real = os.path.realpath(path)
    with open("/proc/self/maps") as maps:
        lines = maps.read().splitlines()
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[5] == real:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= tensor.data_ptr() < hi:
                return fields[1][3] == "p"
    return False


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
