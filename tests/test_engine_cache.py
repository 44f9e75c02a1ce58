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


def test_cache_auto_drops_a_large_cold_plan_only():
    """choose_cache's ``cold``: drop above COLD_DROP_BYTES, keep at or below it and for a warm file;
    an explicit policy wins."""
    from gemma_stream.plan import COLD_DROP_BYTES, Plan, choose_cache

    class Job:
        def __init__(self, nbytes):
            self.nbytes, self.dst, self.scale, self.zero = nbytes, torch.empty(0), None, None

    big, small = Plan(files=[], jobs=[Job(COLD_DROP_BYTES + 1)]), Plan(files=[], jobs=[Job(COLD_DROP_BYTES)])
    roomy = 1 << 50
    assert choose_cache(big, "auto", roomy, cold=True) == "drop"
    assert choose_cache(big, "auto", None, cold=True) == "drop"      # no MemAvailable needed
    assert choose_cache(big, "auto", roomy) == "keep"                # warm, or shared: stays cached
    assert choose_cache(small, "auto", roomy, cold=True) == "keep"   # small enough to keep
    assert choose_cache(big, "keep", roomy, cold=True) == "keep"


@pytest.fixture()
def cold_drop_at_zero(monkeypatch):
    """Every plan counts as large: the 24 MiB file takes the large-cold-file path."""
    import gemma_stream.plan as planner
    monkeypatch.setattr(planner, "COLD_DROP_BYTES", 0)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)


def _empty_like(sd) -> nn.Module:
    model = nn.Module()
    for name, tensor in sd.items():
        model.register_buffer(name, torch.empty_like(tensor))
    return model


@pytest.mark.page_cache
def test_cache_auto_drops_a_large_cold_file_and_keeps_a_warm_one(big_file, backend, cold_drop_at_zero):
    path, sd = big_file
    model = _empty_like(sd)
    set_cached(path, False)
    report = gs.load_into(model, path, backend=backend, threads=2)
    assert report.cache == "drop" and cached_bytes(path) <= 3 * MiB
    assert all(torch.equal(getattr(model, name), tensor) for name, tensor in sd.items())
    set_cached(path, True)   # a warm file is not thrown out
    assert gs.load_into(model, path, backend=backend, threads=2).cache == "keep"
    assert cached_bytes(path) >= 0.9 * os.path.getsize(path)
    set_cached(path, False)
    out = gs.load_state_dict(path, backend=backend, threads=2)
    assert out.report.cache == "drop" and torch.equal(out["tail"], sd["tail"])
    set_cached(path, False)   # mapped weights live in the page cache: never dropped
    report = gs.load_state_dict(path, backend=backend, mode="mmap").report
    assert report.cache == "keep"
    if report.prefetch is not None:   # its read-ahead would fill the page cache behind the next test
        report.prefetch.wait(60)


@pytest.mark.page_cache
@pytest.mark.parametrize("local", ["2", None], ids=["local-ranks", "process-group"])
def test_cache_auto_keeps_a_large_cold_file_other_ranks_may_read(big_file, cold_drop_at_zero, monkeypatch, local):
    """Ranks on one node share the page cache: a cold file read by several of them stays cached,
    whether the launcher said so (LOCAL_WORLD_SIZE) or, without it, a process group of 2 ranks is up."""
    import torch.distributed as dist
    path, sd = big_file
    if local is None:
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    set_cached(path, False)
    assert gs.load_state_dict(path, threads=2).report.cache == "keep"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")   # the launcher's word wins: one rank on this node
    set_cached(path, False)
    assert gs.load_state_dict(path, threads=2).report.cache == "drop"


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


@pytest.mark.page_cache
def test_cache_auto_keeps_a_cold_zip_of_many_tensors(tmp_path, cold_drop_at_zero):
    """A torch zip whose reader asked for every local header ahead keeps its pages: dropping measured
    slower there (NOTES.md 41); a zip of a few tensors drops like any large cold file."""
    from gemma_stream import fileio
    many = {f"t{i}": torch.full((1 << 16,), float(i)) for i in range(fileio.PARALLEL_READS)}   # 64 MiB
    for name, sd in (("many", many), ("few", {"a": torch.arange(4.0 * MiB), "b": torch.ones(4 * MiB)})):
        path = tmp_path / f"{name}.pt"
        torch.save(sd, path)
        set_cached(path, False)
        if cached_bytes(path) > MiB:
            pytest.skip("this file system keeps pages after POSIX_FADV_DONTNEED (tmpfs?)")
        out = gs.load_state_dict(path, threads=2)
        assert out.report.cache == ("keep" if name == "many" else "drop")
        assert all(torch.equal(out[k], v) for k, v in sd.items())
