"""The engine's page-cache policy on both executors: cache="drop" / "keep" / "auto", and drops
as the load goes. The page-cache probes and the 24 MiB file are in conftest.py."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import gemma_stream as gs

from conftest import MiB, cached_bytes, set_cached


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
