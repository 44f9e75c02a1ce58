"""gemma_stream.capture: a load_weights' copies of streamed tensors recorded and done by the engine.

Each test runs the same toy ``load_weights`` twice into fresh parameters: once as
torch runs it (the reference) and once under ``CopyCapture`` with the engine
doing the recorded copies, and asserts the parameters are bit-identical, plus
what was captured (so a capture that silently does nothing fails too).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import gemma_stream as gs
from gemma_stream.api import _execute
from gemma_stream.capture import CopyCapture
from gemma_stream.formats import open_checkpoint
from gemma_stream.stream import stream_checkpoint


def checkpoint(tmp_path, fmt: str = "safetensors") -> str:
    torch.manual_seed(0)
    sd = {
        "q": torch.randn(8, 16), "k": torch.randn(4, 16), "v": torch.randn(4, 16),
        "wide": torch.randn(6, 10), "norm": torch.randn(16), "scalar": torch.tensor([2.5]),
        "ids": torch.arange(12, dtype=torch.int64).reshape(3, 4), "half": torch.randn(5, 3).half(),
    }
    if fmt == "safetensors":
        path = tmp_path / "m.safetensors"
        save_file(sd, str(path))
    else:
        path = tmp_path / "m.bin"
        torch.save(sd, str(path))
    return str(path)


def params(dtype=torch.float32) -> dict[str, torch.Tensor]:
    return {"qkv": torch.zeros(16, 16, dtype=dtype), "wide_left": torch.zeros(6, 5, dtype=dtype),
            "wide_rows": torch.zeros(3, 10, dtype=dtype), "norm": torch.zeros(16, dtype=dtype),
            "scalar": torch.zeros(1), "ids": torch.zeros(3, 4, dtype=torch.int64), "half": torch.zeros(5, 3)}


def fused_loader(p, stream) -> None:
    """Fused q/k/v rows, a block of columns and of rows (tensor-parallel narrows), a dtype change."""
    for name, w in stream:
        if name in ("q", "k", "v"):
            start = {"q": 0, "k": 8, "v": 12}[name]
            p["qkv"].narrow(0, start, w.shape[0]).copy_(w)
        elif name == "wide":
            p["wide_left"].copy_(w.narrow(1, 0, 5))
            p["wide_rows"].copy_(w.narrow(0, 3, 3))
        else:
            p[name].data.copy_(w)


def run_both(path, loader, *, backend, dtype=torch.float32, stream_dtype=None, **stream_kw):
    stream_kw["dtype"] = stream_dtype
    reference = params(dtype)
    ckpt = open_checkpoint(path)
    loader(reference, stream_checkpoint(ckpt, mode="mmap", backend=backend, **stream_kw))
    got = params(dtype)
    capture = CopyCapture(ckpt, lambda plan: _execute(plan, threads=2, backend=backend, progress=None,
                                                      cache="keep", desc="test"))
    stream = stream_checkpoint(ckpt, mode="mmap", backend=backend, prefault=False, **stream_kw)
    with capture:
        loader(got, capture.watch(stream))
    capture.flush()
    for name in reference:
        assert reference[name].dtype == got[name].dtype
        assert torch.equal(reference[name].view(torch.uint8), got[name].view(torch.uint8)), name
    return capture.stats


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_fused_rows_columns_and_blocks_are_captured(tmp_path, backend, fmt):
    stats = run_both(checkpoint(tmp_path, fmt), fused_loader, backend=backend, window_bytes=256)
    # every copy is of a watched tensor or a block of it: all nine are the engine's, in one plan
    assert stats["captured"] == 9 and stats["ran"] == 0 and stats["flushes"] == 1
    assert stats["captured_bytes"] == 4 * (16 * 16 + 30 + 30 + 16 + 1) + 8 * 12 + 2 * 15


def test_conversion_to_bf16_matches_torch(tmp_path, backend):
    stats = run_both(checkpoint(tmp_path), fused_loader, backend=backend, dtype=torch.bfloat16)
    assert stats["captured"] == 9


def test_a_source_written_before_its_copy_is_copied_by_torch(tmp_path, backend):
    def scaled(p, stream):
        for name, w in stream:
            if name == "norm":
                w.mul_(3)          # the mapping is private: the file keeps the old values
            if name == "half":
                w = w.float() + 1  # a new tensor: torch copies it
            if name in p:
                p[name].copy_(w)

    stats = run_both(checkpoint(tmp_path), scaled, backend=backend)
    assert stats["ran"] == 2 and stats["captured"] == 2      # norm and half by torch; scalar, ids captured


def test_ops_on_a_pending_destination_run_the_copies_first(tmp_path, backend):
    sums = []

    def reads_back(p, stream):
        for name, w in stream:
            if name == "q":
                p["qkv"][:8].copy_(w)
                sums.append(p["qkv"][:8].sum().item())   # reads the rows: the copy must be done
                p["qkv"][:8].mul_(2)                     # and writes them
            elif name == "k":
                p["qkv"][8:12].copy_(w)
                p["qkv"][8:12].copy_(w + 1)              # a second copy into the same rows wins
            elif name == "v":
                p["qkv"][12:].copy_(w)
                p["qkv"][14:].zero_()                    # part of a pending copy
            elif name == "norm":
                p["norm"].copy_(w)
                p["scalar"].fill_(7)                     # another parameter: no flush needed

    stats = run_both(checkpoint(tmp_path), reads_back, backend=backend)
    assert len(sums) == 2 and sums[0] == sums[1] != 0
    # file order is ids, k, norm, q, scalar, v: flushes at k's second copy, q's read (norm's copy and q's)
    # and v's zero_, nothing left for the end
    assert stats["flushes"] == 3 and stats["captured"] == 4 and stats["ran"] == 1


def test_broadcasts_views_and_foreign_tensors_run_as_torch(tmp_path, backend):
    def odd(p, stream):
        for name, w in stream:
            if name == "norm":
                p["qkv"].copy_(w)                         # broadcast over 16 rows
            elif name == "ids":
                p["ids"].copy_(w.view(torch.float64).view(torch.int64).t().contiguous().t())
            elif name == "q":
                p["wide_rows"].copy_(torch.ones(3, 10))   # not from the stream
            elif name == "half":
                p["half"].copy_(w)                        # f16 -> f32: captured

    stats = run_both(checkpoint(tmp_path), odd, backend=backend)
    assert stats["captured"] == 1 and stats["ran"] == 3


def test_an_error_in_load_weights_copies_nothing_more(tmp_path, backend):
    ckpt = open_checkpoint(checkpoint(tmp_path))
    runs = []
    capture = CopyCapture(ckpt, runs.append)

    def failing(p, stream):
        for name, w in stream:
            if name == "q":
                p["qkv"][:8].copy_(w)
                raise ValueError("the engine's own error")

    with pytest.raises(ValueError, match="engine's own"), capture:
        failing(params(), capture.watch(stream_checkpoint(ckpt, mode="mmap", backend=backend, prefault=False)))
    assert capture.stats["captured"] == 1 and runs == []


def test_iter_tensors_still_yields_the_values_without_prefault(tmp_path, backend):
    path = checkpoint(tmp_path)
    ckpt = open_checkpoint(path)
    got = dict(stream_checkpoint(ckpt, mode="mmap", backend=backend, prefault=False, window_bytes=64))
    for name, tensor in gs.load_state_dict(path).items():
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("captured", [True, False])
def test_the_stream_faults_windows_in_only_while_torch_does_the_copies(tmp_path, monkeypatch, captured):
    from gemma_stream import stream as stream_module

    faulted = []
    monkeypatch.setattr(stream_module.pagecache, "populate_read", lambda address, n: faulted.append(n))
    ckpt = open_checkpoint(checkpoint(tmp_path))
    capture = CopyCapture(ckpt, lambda plan: _execute(plan, threads=1, backend="python", progress=None,
                                                      cache="keep", desc="test"))
    stream = stream_checkpoint(ckpt, mode="mmap", prefault=capture.reads_ahead, window_bytes=64)
    p = params()
    with capture:
        for name, w in capture.watch(stream):
            if name in p:
                p[name].copy_(w if captured else w.clone())
    capture.flush()
    assert (capture.stats["captured"] == 4) == captured
    # windows are read ahead one at a time: once torch has copied the first tensors, later windows are faulted
    assert (faulted == []) == captured


def test_a_caller_reading_back_every_copy_stops_the_capture(tmp_path, backend):
    torch.manual_seed(1)
    path = tmp_path / "many.safetensors"
    save_file({f"t{i:02d}": torch.randn(4, 4) for i in range(40)}, str(path))
    ckpt = open_checkpoint(str(path))
    capture = CopyCapture(ckpt, lambda plan: _execute(plan, threads=1, backend=backend, progress=None,
                                                      cache="keep", desc="test"))
    got, sums = {}, []
    with capture:
        for name, w in capture.watch(stream_checkpoint(ckpt, mode="mmap", backend=backend)):
            got[name] = torch.empty(4, 4)
            got[name].copy_(w)
            sums.append(got[name].sum().item())       # a read of the pending copy: a flush each time
    capture.flush()
    reference = gs.load_state_dict(str(path))
    assert all(torch.equal(got[n], reference[n]) for n in reference)
    assert sums == [reference[n].sum().item() for n in sorted(reference)]
    assert not capture.capturing and capture.stats["flushes"] == 16 and capture.stats["captured"] == 16
    assert capture.stats["ran"] == 24


def test_a_stream_that_converts_is_no_source(tmp_path, backend):
    """A bf16 stream of an f32 file copied into f32 parameters keeps torch's rounding: not captured."""
    stats = run_both(checkpoint(tmp_path), fused_loader, backend=backend, dtype=torch.float32,
                     stream_dtype=torch.bfloat16)
    assert stats["captured"] == 1 and stats["ran"] == 8     # the int64 ids only


@pytest.mark.parametrize("when", [2, 7])
def test_a_file_changed_under_the_stream_or_before_the_copies_names_file_and_tensor(tmp_path, backend, when):
    import os

    path = tmp_path / "m.safetensors"
    save_file({f"t{i}": torch.randn(64, 64) for i in range(8)}, str(path))
    ckpt = open_checkpoint(str(path))
    capture = CopyCapture(ckpt, lambda plan: _execute(plan, threads=2, backend=backend, progress=None,
                                                      cache="keep", desc="test"))
    dst = {f"t{i}": torch.empty(64, 64) for i in range(8)}
    stream = stream_checkpoint(ckpt, mode="mmap", backend=backend, prefault=False, window_bytes=1 << 14)
    with pytest.raises(gs.CheckpointError) as info:
        with capture:
            for i, (name, w) in enumerate(capture.watch(stream)):
                dst[name].copy_(w)
                if i == when:      # mid-stream, or after the last tensor and before the recorded copies run
                    os.truncate(path, os.path.getsize(path) // 2)
        capture.flush()
    assert str(path) in str(info.value) and info.value.tensor is not None
    assert repr(info.value.tensor) in str(info.value)
