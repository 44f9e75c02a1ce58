"""The contract between executors/native.py and csrc/bindings.cc: the typed job batch, and the
facts both sides state (dtype codes, op codes, page and folio sizes, the AVX2 switch)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import gemma_stream as gs
from gemma_stream import fileio
from gemma_stream.config import config
from gemma_stream.dtypes import CONVERTIBLE, DTYPES
from gemma_stream.errors import InternalError
from gemma_stream.formats import open_checkpoint
from gemma_stream.modules import quant_targets
from gemma_stream.plan import make_plan

pytestmark = pytest.mark.skipif(not gs.native_available(), reason="native extension not built")

if gs.native_available():
    from gemma_stream import _native
    from gemma_stream.executors import native


def test_dtype_codes_match_the_engine():
    """Every code the engine knows has the same name, size and convertibility in dtypes.py, and
    every Python dtype's code names an engine dtype of its size (the byte-moved ones are u8)."""
    table = _native.dtype_table()
    assert [code for _, code, _, _ in table] == list(range(len(table)))
    for name, code, itemsize, convertible in table:
        assert DTYPES[name].code == code, name
        assert DTYPES[name].itemsize == itemsize, name
        assert (name in CONVERTIBLE) == convertible, name
    for dtype in DTYPES.values():
        engine_name, _, engine_itemsize, _ = table[dtype.code]
        assert engine_itemsize == dtype.itemsize, dtype.name
        assert engine_name in (dtype.name, "u8"), dtype.name


def test_op_codes_page_and_folio_sizes_match_the_engine():
    assert native._OPS == _native.OPS == {"copy": 0, "int8": 1, "int4": 2}
    assert (fileio.PAGE_BYTES, fileio.FOLIO_BYTES) == (_native.PAGE_BYTES, _native.FOLIO_BYTES)


def _plan(tmp_path, tensors, model_tensors, rename=None, quant=None):
    path = str(tmp_path / "m.safetensors")
    save_file(tensors, path)
    return make_plan(open_checkpoint(path), model_tensors, rename=rename, quant=quant)


@pytest.mark.parametrize("waste, block_rows", [(float("inf"), 0), (0.0, 1)])
def test_encode_names_every_field(tmp_path, monkeypatch, waste, block_rows):
    """Columns 1-3 of a matrix (a strided job, converted) and a plain tensor: each column holds the job's
    field.  With no gap budget the strided job reads its rows apart (block_rows=1)."""
    from gemma_stream import plan as plan_module
    monkeypatch.setattr(plan_module, "COALESCE_WASTE", waste)
    tensors = {"a": torch.arange(5, dtype=torch.int32), "t": torch.randn(6, 4)}
    dst = {"a": torch.empty(5, dtype=torch.int32), "t": torch.empty(6, 2, dtype=torch.bfloat16)}
    rename = gs.PartialRoutes(lambda n: gs.Route("t", src_cols=(1, 3)) if n == "t" else n)
    plan = _plan(tmp_path, tensors, dst, rename)
    batch = native.encode(plan.jobs)
    assert len(batch) == len(plan.jobs) == 2 and any(job.src_strides for job in plan.jobs)
    for i, job in enumerate(plan.jobs):
        assert batch.name[i] == job.name and batch.file[i] == job.file_index
        assert batch.src_offset[i] == job.src_offset and batch.src_dtype[i] == job.src_dtype.code
        assert tuple(batch.shape[i]) == job.shape
        assert tuple(batch.src_strides[i]) == (job.src_strides or ())
        assert batch.dst[i] == job.dst.data_ptr() and batch.dst_dtype[i] == DTYPES[job.dst_dtype.name].code
        assert batch.op[i] == _native.OPS["copy"] and batch.scale[i] == batch.zero[i] == 0
        assert batch.first_row[i] == job.first_row and batch.group_size[i] == 0
        assert batch.block_rows[i] == job.block_rows == (block_rows if job.src_strides else 0)


def test_quant_jobs_carry_scales(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(64, 8, bias=False))
    gs.quantize_(model, "int4", group_size=32)
    plan = _plan(tmp_path, {"0.weight": torch.randn(8, 64)}, model.state_dict(keep_vars=True),
                 quant=quant_targets(model))
    (job,) = plan.jobs
    batch = native.encode(plan.jobs)
    assert batch.op == [_native.OPS["int4"]] and batch.group_size == [32]
    assert batch.scale == [job.scale.data_ptr()] and batch.zero == [job.zero.data_ptr()]
    assert batch.scale_dtype == [DTYPES[{torch.bfloat16: "bf16", torch.float32: "f32"}[job.scale.dtype]].code]


def test_encode_refuses_a_non_contiguous_destination(tmp_path):
    plan = _plan(tmp_path, {"w": torch.randn(4, 6)}, {"w": torch.empty(6, 4).t()})
    plan.jobs[0].dst = torch.empty(6, 4).t()
    with pytest.raises(InternalError, match="contiguous CPU destinations"):
        native.encode(plan.jobs)


def _batch(**changes):
    columns = dict(op=[0], file=[0], src_offset=[0], src_dtype=[1], shape=[[4]], src_strides=[[]], dst=[1],
                   dst_dtype=[1], scale=[0], zero=[0], scale_dtype=[11], group_size=[0], name=["x"], first_row=[0],
                   block_rows=[0])
    columns.update(changes)
    return _native.JobBatch(**columns)


@pytest.mark.parametrize("changes, message", [
    ({"src_dtype": [99]}, "unknown src_dtype code 99"),
    ({"dst_dtype": [-1]}, "unknown dst_dtype code -1"),
    ({"op": [3]}, "unknown op code 3"),
    ({"name": ["x", "y"]}, "columns differ in length"),
    ({"block_rows": [-1]}, "negative block_rows"),
])
def test_the_engine_refuses_a_malformed_batch(tmp_path, changes, message):
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(16))
    with pytest.raises(_native.JobError, match=message):
        _native.run([str(path)], _batch(**changes), 1, 1 << 20, False, None)


def test_avx2_switch_comes_from_config(monkeypatch):
    """GEMMA_STREAM_NO_AVX2 is read by config.py; the engine reads no environment."""
    monkeypatch.setenv("GEMMA_STREAM_NO_AVX2", "1")
    assert config().avx2 is False and native.quant_kernels() == "portable"
    monkeypatch.setenv("GEMMA_STREAM_NO_AVX2", "0")
    assert config().avx2 is True and native.quant_kernels() == _native.quant_kernels(True)
    assert _native.quant_kernels(False) == "portable"


@pytest.mark.parametrize("threads", [1, 4])
def test_read_ranges_reads_each_range_back_to_back(tmp_path, threads):
    """_native.read_ranges: every range's bytes in order, one after another; a range is cut at the
    end of the file (its unread tail zeroed) and one past the end reads nothing."""
    from gemma_stream.executors import native_module
    native = native_module()
    path = tmp_path / "f.bin"
    data = bytes(range(256)) * 40
    path.write_bytes(data)
    ranges = [(off, n) for off, n in ((i * 37 % 9000, i % 50 + 1) for i in range(600))]
    ranges += [(len(data) - 5, 12), (len(data) + 3, 4), (0, 0)]
    buf, got = native.read_ranges(str(path), [o for o, _ in ranges], [n for _, n in ranges], threads)
    at = 0
    for (offset, n), length in zip(ranges, got):
        assert length == max(0, min(n, len(data) - offset))
        assert buf[at:at + length] == data[offset:offset + length] and buf[at + length:at + n] == bytes(n - length)
        at += n
    assert len(buf) == at


def test_read_ranges_refuses_another_file(tmp_path):
    """With an identity, the file opened must be the one it describes; a missing file is an OSError."""
    import os

    from gemma_stream.executors import native_module
    from gemma_stream.formats.records import identity_of
    native = native_module()
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 100)
    identity = identity_of(os.stat(path))
    assert native.read_ranges(str(path), [10], [5], 1, identity)[0] == b"xxxxx"
    replacement = tmp_path / "g.bin"
    replacement.write_bytes(b"y" * 100)
    os.replace(replacement, path)
    with pytest.raises(OSError, match="changed after its header was read"):
        native.read_ranges(str(path), [10], [5], 1, identity)
    with pytest.raises(OSError, match="cannot open"):
        native.read_ranges(str(tmp_path / "missing.bin"), [0], [1], 1)


def test_background_advice_asks_for_each_range_on_its_own_thread(tmp_path):
    """_native.BackgroundAdvice: returns at once, asks for every range (POSIX_FADV_WILLNEED) on a
    native thread, and wait() joins it; the ranges of an evicted file come back into the page cache.
    A missing file, or ranges past the end, ask for nothing and raise nothing (a hint)."""
    import sys
    import time

    from gemma_stream import pagecache
    from gemma_stream.benchmark.writers import evict
    from gemma_stream.executors import native_module
    native = native_module()
    advice = native.BackgroundAdvice(str(tmp_path / "missing.bin"), [0], [4096])
    advice.wait()
    advice.wait()   # joined once; a second wait returns
    path = tmp_path / "f.bin"
    page = 4096
    path.write_bytes(bytes(range(256)) * (64 * page // 256))   # 64 pages
    evict([path])
    if not sys.platform.startswith("linux") or (pagecache.resident_fraction([path]) or 0.0) > 0.5:
        pytest.skip("needs Linux and a file system that drops pages on POSIX_FADV_DONTNEED")
    wanted = [3, 17, 40, 63]
    advice = native.BackgroundAdvice(str(path), [p * page for p in wanted] + [1 << 40], [page] * 5)
    advice.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:   # asked for, not waited for: the reads may still be in flight
        if all(_page_cached(path, p * page) for p in wanted):
            break
        time.sleep(0.01)
    assert all(_page_cached(path, p * page) for p in wanted)
    del advice   # the destructor of a joined advice does nothing more


def _page_cached(path, offset: int) -> bool:
    """Whether the page at ``offset`` of ``path`` is in the page cache (mincore on an untouched mapping)."""
    import ctypes
    import mmap
    import os
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                               ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, 4096, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
        assert address not in (None, ctypes.c_void_p(-1).value)
        vector = (ctypes.c_ubyte * 1)()
        try:
            assert libc.mincore(address, 4096, vector) == 0
        finally:
            libc.munmap(address, 4096)
        return bool(vector[0] & 1)
    finally:
        os.close(fd)
