"""Hostile, changing and half-written files, and the one error contract, on both executors.

Each defect of issue 14 has a test here that builds the bad file (or changes the
file under a load) and checks the exception type, its attributes and that no
wrong byte is ever returned.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import gemma_stream as gs
from gemma_stream import api, cli
from gemma_stream.errors import CheckpointError, InternalError, UsageError
from gemma_stream.executors import get_executor
from gemma_stream.formats import open_checkpoint
from gemma_stream.plan import CopyJob
from gemma_stream.progress import progress_callback
from torch_like import FakeStorage, FakeView, crafted

PACKAGE_ROOT = str(Path(gs.__file__).resolve().parent.parent)


def write_raw(path, header: dict | bytes, data: bytes = b"") -> str:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


def replace_after_planning(monkeypatch, victim: str, replacement: str) -> None:
    """Rename ``replacement`` over ``victim`` right after the load validated its header."""
    real = api.open_checkpoint

    def open_then_replace(*args, **kwargs):
        ckpt = real(*args, **kwargs)
        os.replace(replacement, victim)
        return ckpt
    monkeypatch.setattr(api, "open_checkpoint", open_then_replace)


# --- 1. a file replaced during a load --------------------------------------------------------


@pytest.mark.parametrize("mode", ["copy", "mmap"])
def test_file_renamed_over_the_path_during_a_load_is_refused(tmp_path, monkeypatch, backend, mode):
    path, other = str(tmp_path / "model.safetensors"), str(tmp_path / "new.safetensors")
    save_file({"a": torch.zeros(64), "b": torch.zeros(32)}, path)
    save_file({"b": torch.ones(64), "a": torch.ones(32)}, other)   # same size, other offsets
    assert os.path.getsize(path) == os.path.getsize(other)
    replace_after_planning(monkeypatch, path, other)
    with pytest.raises(CheckpointError, match="changed after its header was read") as info:
        gs.load_state_dict(path, backend=backend, mode=mode)
    assert info.value.path == path


def test_shard_renamed_over_during_a_load_is_refused(tmp_path, monkeypatch, backend):
    shards = {"model-1.safetensors": {"a": torch.zeros(16)}, "model-2.safetensors": {"b": torch.zeros(16)}}
    for name, tensors in shards.items():
        save_file(tensors, str(tmp_path / name))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}))
    save_file({"b": torch.ones(16)}, str(tmp_path / "evil.safetensors"))
    replace_after_planning(monkeypatch, str(tmp_path / "model-2.safetensors"), str(tmp_path / "evil.safetensors"))
    model = torch.nn.Module()
    model.register_buffer("a", torch.empty(16))
    model.register_buffer("b", torch.empty(16))
    with pytest.raises(CheckpointError, match="model-2.safetensors: the file changed"):
        gs.load_into(model, tmp_path, backend=backend)


def test_torch_zip_rewritten_in_place_during_a_load_is_refused(tmp_path, monkeypatch, backend):
    path = str(tmp_path / "model.pt")
    torch.save({"w": torch.zeros(8, 8)}, path)
    real = api.open_checkpoint

    def open_then_touch(*args, **kwargs):
        ckpt = real(*args, **kwargs)
        os.utime(path, ns=(0, 12345))   # what an in-place rewrite changes even at the same size
        return ckpt
    monkeypatch.setattr(api, "open_checkpoint", open_then_touch)
    with pytest.raises(CheckpointError, match="changed after its header was read"):
        gs.load_state_dict(path, backend=backend)


def test_file_deleted_between_planning_and_copying_raises_the_same_error(tmp_path, monkeypatch, backend):
    path = str(tmp_path / "model.safetensors")
    save_file({"a": torch.zeros(64)}, path)
    real = api.open_checkpoint

    def open_then_delete(*args, **kwargs):
        ckpt = real(*args, **kwargs)
        os.unlink(path)
        return ckpt
    monkeypatch.setattr(api, "open_checkpoint", open_then_delete)
    with pytest.raises(CheckpointError, match="cannot open: No such file") as info:
        gs.load_state_dict(path, backend=backend)
    assert info.value.path == path


# --- 2. mode="mmap" and a file that changes after the load --------------------------------------


def test_mmap_weights_survive_a_file_renamed_over_the_path(tmp_path, backend):
    path, other = str(tmp_path / "model.safetensors"), str(tmp_path / "new.safetensors")
    save_file({"a": torch.arange(1024, dtype=torch.float32)}, path)
    sd = gs.load_state_dict(path, backend=backend, mode="mmap")
    save_file({"a": torch.zeros(1024)}, other)
    os.replace(other, path)          # the documented safe way to update a checkpoint under a server
    assert torch.equal(sd["a"], torch.arange(1024, dtype=torch.float32))


def test_mmap_weights_of_a_file_truncated_in_place_raise_sigbus(tmp_path):
    """The documented hazard (api.load_into, README): truncating a mapped file kills the reader."""
    path = str(tmp_path / "model.safetensors")
    save_file({"a": torch.ones(1 << 16)}, path)
    code = textwrap.dedent(f"""
        import os, gemma_stream as gs
        sd = gs.load_state_dict({path!r}, mode="mmap")
        os.truncate({path!r}, 4096)
        print(float(sd["a"].sum()))
    """)
    env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT, GEMMA_STREAM_PREFETCH="off")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGBUS, proc.stderr


# --- 3. pickle memory amplification -----------------------------------------------------------

BOMBS = {
    "mark": "b'(' * n",
    "empty_lists": "b']' * n",
    "memo": "b'N' + b'\\x94' * n",
    "dup": "b'N' + b'2' * n",
    "one_tuples": "b'N' + b'\\x85' * n",
    "mark_pop": "b'(1' * (n // 2)",
    "strings": "b'(' + b'\\x8c\\x05hello' * (n // 7)",
}


def test_pickle_bombs_at_the_size_limit_stay_under_64_mib_and_50_mb_per_s():
    """Each bomb is a data.pkl as large as the reader accepts; walked in a child that reports its peak."""
    code = textwrap.dedent("""
        import sys, time
        from gemma_stream.errors import CheckpointError
        from gemma_stream.formats.pickle_walker import walk_pickle
        from gemma_stream.formats.torchzip import MAX_PICKLE_BYTES as n
        from gemma_stream.fuzz import rss_kib
        data = bytearray(b'\\x80\\x02')
        data += (%s)[:n - 2]
        data = bytes(data)
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')   # the peak RSS restarts from here: the bomb's own bytes are not counted
        before = rss_kib('VmRSS')
        start = time.process_time()   # CPU seconds: other processes on the machine do not count
        try:
            walk_pickle(data)
        except CheckpointError as e:
            message = str(e)
        seconds = time.process_time() - start
        extra = (rss_kib('VmHWM') - before) * 1024
        print(len(data), seconds, extra, message)
    """)
    env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT)
    for name, expression in BOMBS.items():
        proc = subprocess.run([sys.executable, "-c", code % expression], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, (name, proc.stderr)
        size, seconds, extra, message = proc.stdout.split(" ", 3)
        assert int(extra) < 64 << 20, (name, int(extra) >> 20, message)
        assert int(size) / float(seconds) >= 50e6, (name, seconds, message)
        assert "refusing" in message or "opcodes" in message, (name, message)


def test_a_legitimate_pickle_within_the_budget_still_parses(tmp_path):
    # 30,000 tensors: past the ~18,000 the budget allowed before the memo became a list
    path = tmp_path / "many.pt"
    torch.save({f"model.layers.{i}.mlp.weight": torch.zeros(1) for i in range(30_000)}, path)
    assert len(open_checkpoint(path).records) == 30_000


# --- 4. zero-sized tensors with huge dimensions -----------------------------------------------


@pytest.mark.parametrize("shape", [[0, 2**62, 2**62], [0, 2**63], [0, 2**70]])
def test_zero_sized_safetensors_with_huge_dims_are_refused(tmp_path, backend, shape):
    path = write_raw(tmp_path / "z.safetensors", {"x": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}})
    with pytest.raises(CheckpointError, match="beyond 64 bits") as info:
        gs.load_state_dict(path, backend=backend)
    assert info.value.tensor == "x"
    with pytest.raises(CheckpointError):
        gs.inspect(path)


def test_zero_sized_safetensors_with_dims_that_fit_load_empty(tmp_path, backend):
    path = write_raw(tmp_path / "z.safetensors", {"x": {"dtype": "F32", "shape": [0, 2**40], "data_offsets": [0, 0]}})
    with safe_open(path, "pt") as f:
        want = f.get_tensor("x")
    got = gs.load_state_dict(path, backend=backend)["x"]
    assert got.shape == want.shape == (0, 2**40)


def test_zero_sized_torch_zip_with_huge_dims_is_refused(tmp_path, backend):
    path = crafted(tmp_path / "z.pt", {"x": FakeView(FakeStorage("0", 0), 0, (0, 2**70), (1, 1))}, {"0": b""})
    with pytest.raises(CheckpointError, match="beyond 64 bits"):
        gs.load_state_dict(path, backend=backend)


# --- 5. exception types that leaked -----------------------------------------------------------


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


LEAKS = {
    "dtype list": {"x": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}},
    "dtype object": {"x": {"dtype": {"F32": 1}, "shape": [1], "data_offsets": [0, 4]}},
    "deep header": b'{"x": ' + _nested(100_000) + b"}",
    "huge integer": b'{"x": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}',
    "lone surrogate name": b'{"\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
}


@pytest.mark.parametrize("case", sorted(LEAKS))
def test_malformed_headers_raise_checkpoint_error_naming_the_file(tmp_path, backend, case):
    path = write_raw(tmp_path / "bad.safetensors", LEAKS[case], b"\0" * 4)
    with pytest.raises(CheckpointError) as info:
        gs.load_state_dict(path, backend=backend)
    assert "bad.safetensors" in str(info.value) and info.value.path == path
    with pytest.raises(CheckpointError):
        gs.inspect(path)
    assert cli.main(["inspect", path]) == 2


@pytest.mark.parametrize("weight_map", [
    b'{"weight_map": ' + _nested(100_000) + b"}",
    json.dumps({"weight_map": {"a": "model\0.safetensors"}}).encode(),
    b'{"weight_map": {"\\udc80": "model.safetensors"}}',
    b'{"weight_map": {"a": "' + b"9" * 5000 + b'"}}'.replace(b'"9', b"9").replace(b'9"', b"9"),
])
def test_malformed_indexes_raise_checkpoint_error(tmp_path, backend, weight_map):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_bytes(weight_map)
    with pytest.raises(CheckpointError, match="index.json"):
        gs.load_state_dict(tmp_path, backend=backend)


def test_pickle_key_that_is_a_huge_integer_is_refused(tmp_path, backend):
    path = crafted(tmp_path / "k.pt", {10**5000: FakeView(FakeStorage("0", 1), 0, (1,), (1,))}, {"0": b"\0" * 4})
    with pytest.raises(CheckpointError, match="bit integer"):
        gs.load_state_dict(path, backend=backend)


# --- 6. the backends agree --------------------------------------------------------------------


def test_bool_bytes_are_stored_as_0_or_1_on_every_path(tmp_path, backend):
    raw = bytes([2, 0, 3, 1, 255, 2])
    contiguous = write_raw(tmp_path / "b.safetensors",
                           {"b": {"dtype": "BOOL", "shape": [6], "data_offsets": [0, 6]}}, raw)
    strided = crafted(tmp_path / "b.pt", {"b": FakeView(FakeStorage("0", 6, torch.BoolStorage), 0, (3, 2), (1, 3))},
                      {"0": raw})
    for path in (contiguous, strided):
        want = torch.load(path, weights_only=True)["b"] if path.endswith(".pt") else \
            torch.frombuffer(bytearray(raw), dtype=torch.bool)
        got = gs.load_state_dict(path, backend=backend)["b"]
        assert torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8).clamp(max=1))
        model = torch.nn.Module()
        model.register_buffer("b", torch.empty(want.shape, dtype=torch.bool))
        gs.load_into(model, path, backend=backend)
        reference = torch.empty(want.shape, dtype=torch.bool).copy_(want)   # what load_state_dict(torch.load) does
        assert torch.equal(model.b.view(torch.uint8), reference.view(torch.uint8))


def test_one_storage_with_two_dtypes_is_refused(tmp_path, backend):
    storage_f32, storage_i32 = FakeStorage("0", 4), FakeStorage("0", 4, torch.IntStorage)
    path = crafted(tmp_path / "two.pt", {"a": FakeView(storage_f32, 0, (4,), (1,)),
                                        "b": FakeView(storage_i32, 0, (4,), (1,))}, {"0": b"\0" * 16})
    with pytest.raises(CheckpointError, match="declared as 4 x i32 here and as 4 x f32") as info:
        gs.load_state_dict(path, backend=backend)
    assert info.value.tensor == "b"


# --- 7. clear words, one symlink rule, every safetensors dtype --------------------------------


@pytest.mark.parametrize("name", ["notes.txt", "model.safetensors", "model.bin"])
def test_a_text_file_is_called_what_it_is(tmp_path, name):
    path = tmp_path / name
    path.write_text("This is a README, not weights.\n" * 10)
    with pytest.raises(CheckpointError, match=r"not a safetensors or PyTorch zip checkpoint: it starts with "
                                              r"b'This is a README'"):
        gs.inspect(path)


def test_symlinks_are_followed_and_index_names_confined(tmp_path, backend):
    # the Hugging Face cache layout: snapshot files are links into blobs/
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    save_file({"a": torch.arange(4.0)}, str(blobs / "111"))
    save_file({"b": torch.arange(3.0)}, str(blobs / "222"))
    (blobs / "333").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}))
    for link, blob in (("model-1.safetensors", "111"), ("model-2.safetensors", "222"),
                       ("model.safetensors.index.json", "333")):
        os.symlink(f"../../blobs/{blob}", snapshot / link)
    sd = gs.load_state_dict(snapshot, backend=backend)
    assert torch.equal(sd["a"], torch.arange(4.0)) and torch.equal(sd["b"], torch.arange(3.0))
    # a single linked file is followed by the same rule
    single = tmp_path / "single"
    single.mkdir()
    os.symlink(blobs / "111", single / "model.safetensors")
    assert torch.equal(gs.load_state_dict(single, backend=backend)["a"], torch.arange(4.0))
    # but an index may not name a file outside its directory
    (snapshot / "model.safetensors.index.json").unlink()
    (snapshot / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../blobs/111"}}))
    with pytest.raises(CheckpointError, match="escapes the directory"):
        gs.load_state_dict(snapshot, backend=backend)


NEW_DTYPES = [torch.float8_e8m0fnu, torch.float4_e2m1fn_x2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz]


@pytest.mark.parametrize("dtype", NEW_DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["copy", "mmap"])
def test_every_dtype_safetensors_writes_loads_as_stored(tmp_path, backend, dtype, mode):
    path = str(tmp_path / "d.safetensors")
    stored = torch.arange(24, dtype=torch.uint8).view(dtype).reshape(4, 6)
    save_file({"x": stored}, path)
    with safe_open(path, "pt") as f:
        want = f.get_tensor("x")
    got = gs.load_state_dict(path, backend=backend, mode=mode)["x"]
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    (info,) = gs.inspect(path)
    assert info.dtype == dtype and info.shape == tuple(want.shape)
    model = torch.nn.Module()
    model.register_buffer("x", torch.empty(want.shape, dtype=dtype))
    gs.load_into(model, path, backend=backend, mode=mode)
    assert torch.equal(model.x.view(torch.uint8), want.view(torch.uint8))


def test_f4_with_an_odd_last_dimension_is_refused(tmp_path):
    path = write_raw(tmp_path / "f4.safetensors", {"x": {"dtype": "F4", "shape": [2, 3], "data_offsets": [0, 3]}},
                     b"abc")
    with pytest.raises(CheckpointError, match="divisible by 2"):
        gs.inspect(path)


# --- the error contract -----------------------------------------------------------------------


def _job(**changes) -> CopyJob:
    from gemma_stream.dtypes import DTYPES
    fields = dict(target="w", name="w", op="copy", file_index=0, src_offset=8, src_dtype=DTYPES["f32"],
                  shape=(1,), src_strides=None, dst=torch.empty(1))
    fields.update(changes)
    return CopyJob(**fields)


def test_a_planner_bug_is_an_internal_error_not_the_files_fault(tmp_path, backend):
    path = str(tmp_path / "m.safetensors")
    save_file({"w": torch.ones(1)}, path)
    files = open_checkpoint(path).files
    with pytest.raises(InternalError) as info:
        get_executor(backend).run(files, [_job(file_index=5)], threads=1, chunk_bytes=1 << 20, drop_cache=False,
                                  progress=None)
    assert not isinstance(info.value, gs.GemmaStreamError)


def test_quantization_failure_carries_path_tensor_and_row(tmp_path, backend):
    weight = torch.randn(16, 128)
    weight[11, 5] = float("nan")
    path = str(tmp_path / "q.safetensors")
    save_file({"0.weight": weight}, path)
    model = torch.nn.Sequential(torch.nn.Linear(128, 16, bias=False))
    with pytest.raises(CheckpointError, match="row 11 holds NaN") as info:
        gs.load_into(model, path, backend=backend, quantize="int8")
    assert (info.value.path, info.value.tensor, info.value.row) == (path, "0.weight", 11)


@pytest.mark.parametrize("call", [
    lambda: get_executor("gpu"),
    lambda: gs.load_state_dict("x", mode="fast"),
    lambda: gs.load_state_dict("x", cache="sometimes"),
    lambda: progress_callback(5, 10, "x"),
])
def test_bad_arguments_are_usage_errors_and_still_value_errors(call):
    with pytest.raises(UsageError) as info:
        call()
    assert isinstance(info.value, ValueError) and isinstance(info.value, gs.GemmaStreamError)


def test_environment_setting_is_a_usage_error(tmp_path, monkeypatch):
    save_file({"w": torch.ones(1)}, str(tmp_path / "m.safetensors"))
    monkeypatch.setenv("GEMMA_STREAM_CHUNK_MB", "lots")
    with pytest.raises(UsageError, match="GEMMA_STREAM_CHUNK_MB"):
        gs.load_state_dict(tmp_path / "m.safetensors")


def test_cli_exits_2_for_a_bad_file_and_3_for_a_bug(tmp_path, monkeypatch, capsys):
    path = tmp_path / "junk.safetensors"
    path.write_text("hello")
    assert cli.main(["inspect", str(path)]) == 2
    assert "not a safetensors or PyTorch zip checkpoint" in capsys.readouterr().err
    save_file({"w": torch.ones(1)}, str(path))

    def bug(*args, **kwargs):
        raise InternalError("gemma_stream bug: planted")
    monkeypatch.setattr(cli, "open_checkpoint", bug)
    assert cli.main(["inspect", str(path)]) == 3
    assert "internal error" in capsys.readouterr().err


# --- found by the fuzzer (benchmarks/RELIABILITY.md) --------------------------------------------


def _central_entry_offset(data: bytes, name: bytes) -> int:
    pos = data.find(b"PK\x01\x02")
    while pos >= 0:
        name_len = struct.unpack_from("<H", data, pos + 28)[0]
        if data[pos + 46:pos + 46 + name_len] == name:
            return pos
        pos = data.find(b"PK\x01\x02", pos + 4)
    raise AssertionError(name)


def test_zip_entry_marked_as_a_directory_is_refused(tmp_path, backend):
    """torch.load (miniz) reads such an entry as zeros; we would have returned its bytes: refuse it."""
    path = tmp_path / "dir.pt"
    torch.save({"w": torch.randn(6, 4)}, path)
    data = bytearray(path.read_bytes())
    entry = _central_entry_offset(data, b"dir/data/0")
    data[entry + 38] = 0xFF   # external attributes: the MS-DOS directory bit
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="marked as a directory"):
        gs.load_state_dict(path, backend=backend)


def test_zip64_offset_past_2_63_is_refused(tmp_path, backend):
    """A ZIP64 local header offset that os.pread cannot take leaked OverflowError."""
    from torch_like import members_of, write_zip
    source = tmp_path / "src.pt"
    torch.save({"w": torch.randn(3)}, source)
    path = write_zip(tmp_path / "z64.pt", members_of(source), zip64=True)
    data = bytearray(Path(path).read_bytes())
    entry = _central_entry_offset(data, b"src/byteorder")
    name_len = struct.unpack_from("<H", data, entry + 28)[0]
    struct.pack_into("<Q", data, entry + 46 + name_len + 4 + 16, 2**63 + 5)   # the extra field's offset
    Path(path).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="outside any file"):
        gs.load_state_dict(path, backend=backend)
