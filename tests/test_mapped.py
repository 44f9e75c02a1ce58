"""mode="mmap" views and their read-ahead (gemma_stream.mapped), on real files."""

from __future__ import annotations

import os
import time

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import gemma_stream as gs
from gemma_stream import mapped, pagecache
from gemma_stream.benchmark.writers import evict

MiB = 1 << 20


# big_file: conftest.py's 24 MiB file of mixed tensors (skips where the page cache cannot be observed)


@pytest.mark.page_cache
@pytest.mark.parametrize("method", ["fault", "willneed"])
def test_mmap_mode_reads_the_mapped_ranges_ahead_in_the_background(big_file, backend, monkeypatch, method):
    """Cold, mode="mmap" starts a read-ahead of the mapped bytes in file order (touching weights in
    the model's order would read the file piecemeal): after ``report.prefetch.wait()`` the file comes
    into the page cache without a single weight being touched. GEMMA_STREAM_PREFETCH=off turns it off.
    "fault" touches one page per readahead window (the kernel reads the window around it); with a
    small window, "willneed" asks for the ranges instead."""
    path, sd = big_file
    size = os.path.getsize(path)
    window = mapped.readahead_window(str(path))
    if method == "fault" and (window is None or window < MiB):
        pytest.skip(f"this device's readahead window is {window} bytes: faults would read too little")
    if method == "willneed":
        monkeypatch.setattr(mapped, "readahead_window", lambda path: 128 << 10)

    def fresh_model():
        model = nn.Module()
        for name, tensor in sd.items():
            model.register_buffer(name, torch.empty_like(tensor, device="meta"))
        return model

    monkeypatch.setenv("GEMMA_STREAM_PREFETCH", "off")
    evict([path])
    model = fresh_model()
    report = gs.load_into(model, path, backend=backend, mode="mmap")
    assert report.prefetch is None and report.cache == "keep"
    assert pagecache.resident_bytes(path) < 0.5 * size                   # nothing read ahead, nothing touched
    assert all(torch.equal(getattr(model, name), tensor) for name, tensor in sd.items())

    monkeypatch.setenv("GEMMA_STREAM_PREFETCH", "auto")
    del model, report   # pages still mapped by a live view stay cached whatever evict asks
    evict([path])
    model = fresh_model()
    report = gs.load_into(model, path, backend=backend, mode="mmap")
    assert sorted(report.mapped) == sorted(sd)
    assert report.prefetch is not None and report.prefetch.wait(timeout=30)
    assert report.prefetch.method == method
    assert report.prefetch.nbytes >= size - 4096              # every tensor's bytes, joined into ranges
    deadline = time.monotonic() + 30
    while pagecache.resident_bytes(path) < 0.9 * size and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pagecache.resident_bytes(path) >= 0.9 * size
    assert all(torch.equal(getattr(model, name), tensor) for name, tensor in sd.items())

    # warm now: "auto" leaves the pages to the first touches (there is nothing to read ahead)
    while pagecache.resident_fraction([path]) < 0.95 and time.monotonic() < deadline:
        time.sleep(0.05)
    model = fresh_model()
    report = gs.load_into(model, path, backend=backend, mode="mmap")
    assert report.prefetch is None and sorted(report.mapped) == sorted(sd)
    assert all(torch.equal(getattr(model, name), tensor) for name, tensor in sd.items())


def test_mmap_prefetch_joins_ranges_in_file_order_and_respects_memory(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(1024), "b": torch.zeros(2048), "c": torch.zeros(10)}, str(path))
    views = mapped.FileViews([str(path)])
    views.view(0, 4096 + 8192, torch.float32, (10,), None)       # made out of order
    views.view(0, 4096, torch.float32, (1024,), None)
    views.view(0, 4096 + 4096, torch.float32, (1024,), None)     # adjacent: joined
    views.view(0, 4096, torch.float32, (4, 4), (1, 4))           # transposed, inside the first range
    views.view(0, 100_000, torch.float32, (0,), None)            # empty: no range
    (file, start, end, base), = views.ranges()
    assert (file, start, end) == (str(path), 4096, 4096 + 8192 + 40)
    assert base == views._storages[0].data_ptr()                 # where the file is mapped
    monkeypatch.setattr(pagecache, "is_warm", lambda paths, samples=None: False)   # as if cold
    monkeypatch.setattr(mapped, "mem_available", lambda: 100)
    assert views.prefetch("auto") is None                        # does not fit with a fifth to spare
    assert views.prefetch("off") is None
    started = views.prefetch("on")
    assert started is not None and started.wait(10) and started.done
    monkeypatch.setenv("GEMMA_STREAM_PREFETCH", "sometimes")
    with pytest.raises(ValueError, match="GEMMA_STREAM_PREFETCH"):
        gs.load_state_dict(path, mode="mmap")


def test_mmap_prefetch_decides_warm_on_a_sample_of_pages_first(tmp_path, monkeypatch):
    """"auto" asks whether the files are cached on ``RESIDENCY_SAMPLES`` pages per file before it
    joins any range (a whole-file mincore cost as much as the rest of a warm 1 GiB load); warm, no
    read-ahead; where residency cannot be known (None), the read-ahead starts as for a cold file."""
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"m{i}.safetensors"))
        save_file({"a": torch.zeros(4096)}, paths[-1])
    views = mapped.FileViews(paths)
    views.view(1, 4096, torch.float32, (1024,), None)
    views.view(0, 4096, torch.float32, (1024,), None)
    asked = []

    def is_warm(files, samples=None):
        asked.append((list(files), samples))
        return answer

    monkeypatch.setattr(pagecache, "is_warm", is_warm)
    monkeypatch.setattr(mapped, "mem_available", lambda: 1 << 40)
    monkeypatch.setattr(views, "ranges", lambda: pytest.fail("ranges joined for a warm file"))
    answer = True
    assert views.prefetch("auto") is None
    assert asked == [(sorted(paths), pagecache.RESIDENCY_SAMPLES)]
    monkeypatch.undo()
    monkeypatch.setattr(pagecache, "is_warm", is_warm)
    monkeypatch.setattr(mapped, "mem_available", lambda: 1 << 40)
    for answer in (False, None):   # cold, or cannot tell
        started = views.prefetch("auto")
        assert started is not None and started.wait(10) and started.done
    assert views.prefetch("off") is None and len(asked) == 3        # "off" asks nothing
