"""Copy mode's read-ahead (gemma_stream.readahead): which bytes it asks for, and when it runs."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import gemma_stream as gs
from gemma_stream import fileio, readahead
from gemma_stream.benchmark.writers import evict
from gemma_stream.formats import open_checkpoint
from gemma_stream.plan import make_plan

MiB = 1 << 20


def _meta_model(sd: dict[str, torch.Tensor]) -> nn.Module:
    model = nn.Module()
    for name, tensor in sd.items():
        model.register_buffer(name, torch.empty_like(tensor, device="meta"))
    return model


def _recorded_willneed(monkeypatch) -> list[tuple[int, int]]:
    asked: list[tuple[int, int]] = []
    real = fileio.advise_willneed

    def record(fd: int, offset: int, nbytes: int) -> bool:
        asked.append((offset, nbytes))
        return real(fd, offset, nbytes)

    monkeypatch.setattr(fileio, "advise_willneed", record)
    return asked


def test_ranges_are_the_plans_bytes_in_file_order(tmp_path):
    """Every job's source bytes, in file order, neighbours joined; a skipped tensor's bytes far from
    the others are not asked for, and a transposed view asks for its span."""
    path = tmp_path / "m.safetensors"
    sd = {"a": torch.randn(64, 64), "b": torch.randn(8), "b_gap": torch.zeros(1 << 19), "c": torch.randn(32, 16)}
    save_file(sd, str(path))
    ckpt = open_checkpoint(str(path))
    records = ckpt.by_name()
    targets = {"a": torch.empty(64, 64), "b": torch.empty(8), "c": torch.empty(32, 16)}
    plan = make_plan(ckpt, targets, rename={"b_gap": None})
    ranges = readahead.readahead_ranges(plan)
    ends = {name: r.byte_offset + r.nbytes for name, r in records.items()}
    expected = sorted((records[n].byte_offset, ends[n]) for n in ("a", "b", "c"))
    joined = []   # what MERGE_GAP joins: a and b sit side by side; c lies 2 MiB past them
    for start, end in expected:
        if joined and start <= joined[-1][1] + readahead.MERGE_GAP:
            joined[-1] = (joined[-1][0], max(joined[-1][1], end))
        else:
            joined.append((start, end))
    assert [(s, e) for _, s, e, _ in ranges] == joined
    assert len(joined) == 2 and all(f == str(path) for f, *_ in ranges)


@pytest.mark.parametrize("cache, policy, size, expect", [
    ("keep", "on", 1, True),          # "on": whatever the size
    ("keep", "off", 64 * MiB, False),
    ("drop", "on", 64 * MiB, False),  # the pages would come back behind the engine's drops
    ("keep", "auto", 1, False),       # too little to read for a read-ahead to help
    ("keep", "cold", 64 * MiB, True),  # "auto" on a cold file (its residency faked)
    ("keep", "big", 64 * MiB, False),  # the same past MAX_AUTO_PLAN_BYTES (lowered to 32 MiB here)
    ("keep", "big-on", 64 * MiB, True),
])
def test_when_the_read_ahead_starts(tmp_path, monkeypatch, cache, policy, size, expect):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(max(1, size // 4))}, str(path))
    ckpt = open_checkpoint(str(path))
    plan = make_plan(ckpt, {"w": torch.empty(max(1, size // 4))})
    if policy in ("cold", "big", "big-on"):
        monkeypatch.setattr(readahead.pagecache, "resident_fraction", lambda *args, **kwargs: 0.0)
        monkeypatch.setattr(readahead, "mem_available", lambda: 1 << 40)
        if policy != "cold":
            monkeypatch.setattr(readahead, "MAX_AUTO_PLAN_BYTES", 32 * MiB)
        policy = "on" if policy == "big-on" else "auto"
    started = readahead.start_copy_readahead(plan, cache, policy)
    assert (started is not None) == expect
    if started is not None:
        assert started.method == "willneed" and started.wait(10)


@pytest.mark.page_cache
def test_a_cold_copy_load_reads_ahead_and_a_warm_one_does_not(big_file, backend, monkeypatch):
    """Cold, load_into and load_state_dict ask for the file's bytes ahead of the engine (the
    report's ``prefetch``); once the file is cached, "auto" leaves it alone; "off" never starts.
    The weights are the file's bytes in every case."""
    path, sd = big_file
    asked = _recorded_willneed(monkeypatch)
    monkeypatch.setattr(readahead, "MIN_READAHEAD_BYTES", MiB)   # the test file is 24 MiB
    evict([path])
    model = _meta_model(sd)
    report = gs.load_into(model, path, backend=backend)
    assert report.prefetch is not None and report.prefetch.wait(30)
    assert asked and asked == sorted(asked)                       # front to back
    covered = sum(n for _, n in asked)
    assert covered >= os.path.getsize(path) - 4096 * 4 or report.prefetch._cancel.is_set()
    assert all(torch.equal(getattr(model, name), tensor) for name, tensor in sd.items())

    asked.clear()
    cold = gs.load_state_dict(path, backend=backend)              # warm now: nothing to read ahead
    assert cold.report.prefetch is None and not asked
    assert all(torch.equal(cold[name], tensor) for name, tensor in sd.items())

    monkeypatch.setenv("GEMMA_STREAM_PREFETCH", "off")
    evict([path])
    sd2 = gs.load_state_dict(path, backend=backend)
    assert sd2.report.prefetch is None and not asked
    assert all(torch.equal(sd2[name], tensor) for name, tensor in sd.items())


@pytest.mark.page_cache
def test_a_meta_model_counts_before_it_is_allocated(big_file, monkeypatch):
    """load_into decides keep or drop once, before it allocates a model built on meta: the bytes
    it is about to allocate count, so a load that will drop the file never reads it ahead (the
    pages would come back behind the engine's drops)."""
    path, sd = big_file
    data = sum(t.nbytes for t in sd.values())
    monkeypatch.setenv("GEMMA_STREAM_PREFETCH", "on")
    monkeypatch.setattr(gs.api, "mem_available", lambda: 2 * data - 1)   # file + model do not fit
    asked = _recorded_willneed(monkeypatch)
    model = _meta_model(sd)
    report = gs.load_into(model, path)
    assert report.cache == "drop" and report.prefetch is None and not asked
    assert all(torch.equal(getattr(model, name), tensor) for name, tensor in sd.items())
    monkeypatch.setattr(gs.api, "mem_available", lambda: 2 * data)       # they fit: kept, read ahead
    model = _meta_model(sd)
    report = gs.load_into(model, path)
    assert report.cache == "keep" and report.prefetch is not None and report.prefetch.wait(30)
    assert all(torch.equal(getattr(model, name), tensor) for name, tensor in sd.items())


def test_the_read_ahead_stops_when_the_load_fails(tmp_path, monkeypatch):
    """A load that fails in the engine (the file shrank under it) cancels the read-ahead."""
    path = tmp_path / "m.safetensors"
    sd = {"w": torch.randn(256, 256)}
    save_file(sd, str(path))
    monkeypatch.setenv("GEMMA_STREAM_PREFETCH", "on")
    started = []
    real = readahead.start_copy_readahead

    def spy(*args, **kwargs):
        handle = real(*args, **kwargs)
        started.append(handle)
        os.truncate(path, 1000)   # after the plan: the engine finds the file changed
        return handle

    monkeypatch.setattr(readahead, "start_copy_readahead", spy)
    monkeypatch.setattr(gs.api, "start_copy_readahead", spy)
    with pytest.raises(gs.CheckpointError):
        gs.load_state_dict(path)
    assert started and started[0] is not None and started[0]._cancel.is_set()


@pytest.mark.parametrize("tensors, reads_ahead", [(8, True), (300, False)])
def test_a_zip_of_many_storages_is_not_read_ahead(tmp_path, monkeypatch, tensors, reads_ahead):
    """Its reader asks for every local header at open (cold), and a plan read-ahead on top of
    that measured slower; a zip of few storages is read ahead like any file."""
    monkeypatch.setenv("GEMMA_STREAM_PREFETCH", "on")
    path = tmp_path / "m.pt"
    sd = {f"w{i}": torch.randn(64) for i in range(tensors)}
    torch.save(sd, path)
    out = gs.load_state_dict(path)
    assert (out.report.prefetch is not None) == reads_ahead
    assert all(torch.equal(out[name], tensor) for name, tensor in sd.items())


def test_a_file_whose_residency_cannot_be_probed_still_loads(tmp_path, monkeypatch):
    """mincore needs a mapping; where the file system refuses one, the read-ahead goes on unknowing."""
    from gemma_stream import pagecache
    path = tmp_path / "m.safetensors"
    sd = {"w": torch.randn(64, 64)}
    save_file(sd, str(path))
    monkeypatch.setattr(readahead, "MIN_READAHEAD_BYTES", 1)

    def refuse(*args, **kwargs):
        raise OSError(19, "mmap: No such device")

    monkeypatch.setattr(pagecache, "resident_fraction", refuse)
    out = gs.load_state_dict(path)
    assert torch.equal(out["w"], sd["w"])


def test_only_the_front_of_the_plan_is_read_ahead(tmp_path):
    """READAHEAD_BYTES of the plan's bytes, from the front, however large the plan."""
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(1 << 20), "b": torch.zeros(1 << 20)}, str(path))   # 4 MiB each
    ckpt = open_checkpoint(str(path))
    plan = make_plan(ckpt, {"a": torch.empty(1 << 20), "b": torch.empty(1 << 20)})
    whole = readahead.readahead_ranges(plan)
    assert sum(e - s for _, s, e, _ in whole) == 8 * MiB
    front = readahead.readahead_ranges(plan, 5 * MiB)
    assert [(s, e) for _, s, e, _ in front] == [(whole[0][1], whole[0][1] + 5 * MiB)]
    assert readahead.readahead_ranges(plan, 0) == []
