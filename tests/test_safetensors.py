"""safetensors reader: every validation rule has a file that breaks it."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

import gemma_stream as gs
from gemma_stream.formats import open_checkpoint


def write_raw(path, header: dict, data: bytes, header_len: int | None = None) -> str:
    raw = json.dumps(header).encode()
    n = len(raw) if header_len is None else header_len
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + raw + data)
    return str(path)


def entry(dtype="F32", shape=(2,), begin=0, end=8):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


def test_records_match_safetensors_library(tmp_path):
    sd = {"b": torch.randn(3, 5, dtype=torch.bfloat16), "a": torch.arange(7, dtype=torch.int32),
          "s": torch.tensor(2.5), "e": torch.empty(0, 4)}
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path), metadata={"format": "pt"})
    ckpt = open_checkpoint(path)
    assert ckpt.metadata == {"format": "pt"}
    infos = {t.name: t for t in gs.inspect(path)}
    assert set(infos) == set(sd)
    raw = path.read_bytes()
    for name, tensor in sd.items():
        info = infos[name]
        assert info.dtype == tensor.dtype and info.shape == tuple(tensor.shape)
        assert info.nbytes == tensor.numel() * tensor.element_size()
        if tensor.numel():
            got = torch.frombuffer(bytearray(raw[info.offset:info.offset + info.nbytes]), dtype=tensor.dtype)
            assert torch.equal(got.reshape(tensor.shape), tensor)


BAD_FILES = {
    "unknown dtype": ({"x": entry(dtype="Q7")}, b"\0" * 8, "unknown dtype"),
    "end beyond buffer": ({"x": entry(end=16, shape=(4,))}, b"\0" * 8, "beyond the data buffer"),
    "end before begin": ({"x": entry(begin=8, end=0)}, b"\0" * 8, "end before begin"),
    "length != numel*itemsize": ({"x": entry(shape=(3,))}, b"\0" * 8, "needs 12"),
    "overlap": ({"x": entry(), "y": entry(begin=4, end=12)}, b"\0" * 12, "overlap"),
    "hole": ({"x": entry(), "y": entry(begin=12, end=20)}, b"\0" * 20, "hole"),
    "trailing bytes": ({"x": entry()}, b"\0" * 12, "trailing"),
    "negative shape": ({"x": entry(shape=(-2,))}, b"\0" * 8, "non-negative"),
    "negative offset": ({"x": entry(begin=-8, end=0)}, b"\0" * 8, "non-negative"),
    "non-object entry": ({"x": [1, 2]}, b"", "not an object"),
    "bad metadata": ({"__metadata__": {"k": 1}, "x": entry()}, b"\0" * 8, "__metadata__"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_headers_raise_checkpoint_error(tmp_path, case, backend):
    header, data, message = BAD_FILES[case]
    path = write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(gs.CheckpointError, match=message) as err:
        gs.load_state_dict(path, backend=backend)
    assert "bad.safetensors" in str(err.value)
    if "x" in header and case not in ("trailing bytes", "bad metadata"):
        assert "'x'" in str(err.value) or "'y'" in str(err.value)


@pytest.mark.parametrize("raw,message", [
    (b"\x01\x02", "too short"),
    (struct.pack("<Q", 1000) + b"{}", "past the end"),
    (struct.pack("<Q", 10**12) + b"{}", "exceeds"),
    (struct.pack("<Q", 2) + b"[]", "expected an object"),
    (struct.pack("<Q", 4) + b"\xff\xfe{}", "UTF-8 JSON"),
])
def test_broken_files(tmp_path, raw, message, backend):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(raw)
    with pytest.raises(gs.CheckpointError, match=message):
        gs.load_state_dict(path, backend=backend)


def test_truncated_file_is_refused_before_any_copy(tmp_path, backend):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.randn(64, 64), "b": torch.randn(64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(gs.CheckpointError, match="t.safetensors"):
        gs.load_state_dict(path, backend=backend)


def test_file_shrinking_after_validation_is_caught_by_executor(tmp_path, backend):
    # The executors check the file they open is the one validated (size, mtime, inode), and
    # re-check every range against its size when no identity is known (a plain str path).
    path = tmp_path / "s.safetensors"
    save_file({"a": torch.randn(256, 256)}, str(path))
    ckpt = open_checkpoint(path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 4096)
    from gemma_stream.executors import get_executor
    from gemma_stream.plan import make_plan
    plan = make_plan(ckpt, {"a": torch.empty(256, 256)})
    with pytest.raises(gs.CheckpointError, match="changed after its header was read"):
        get_executor(backend).run(plan.files, plan.jobs, threads=2, chunk_bytes=1 << 16, drop_cache=False,
                                  progress=None)
    with pytest.raises(gs.CheckpointError, match="beyond the end of the file") as info:
        get_executor(backend).run([str(f) for f in plan.files], plan.jobs, threads=2, chunk_bytes=1 << 16,
                                  drop_cache=False, progress=None)
    assert (info.value.path, info.value.tensor) == (str(path), "a")


def write_sharded(tmp_path, tensors: dict, layout: dict[str, list[str]]):
    weight_map = {}
    for shard, names in layout.items():
        save_file({n: tensors[n] for n in names}, str(tmp_path / shard))
        weight_map.update({n: shard for n in names})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


def test_sharded_index_and_directory(tmp_path, backend):
    tensors = {f"w{i}": torch.randn(4, i + 1) for i in range(5)}
    index = write_sharded(tmp_path, tensors, {"model-00001-of-00002.safetensors": ["w0", "w1", "w2"],
                                              "model-00002-of-00002.safetensors": ["w3", "w4"]})
    for path in (index, tmp_path):
        out = gs.load_state_dict(path, backend=backend)
        assert set(out) == set(tensors)
        assert all(torch.equal(out[k], tensors[k]) for k in tensors)
    assert len(open_checkpoint(tmp_path).files) == 2


def test_shard_escaping_directory_is_refused(tmp_path):
    inner = tmp_path / "ckpt"
    inner.mkdir()
    save_file({"w": torch.zeros(2)}, str(tmp_path / "outside.safetensors"))
    (inner / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "../outside.safetensors"}}))
    with pytest.raises(gs.CheckpointError, match="escapes the directory"):
        gs.inspect(inner)
    (inner / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": str(tmp_path / "outside.safetensors")}}))
    with pytest.raises(gs.CheckpointError, match="escapes the directory"):
        gs.inspect(inner)


def test_index_naming_a_tensor_its_shard_lacks(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "s1.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}}))
    with pytest.raises(gs.CheckpointError, match="'b'"):
        gs.inspect(tmp_path)


def test_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(gs.CheckpointError, match="no such file"):
        gs.inspect(tmp_path / "nope.safetensors")
    with pytest.raises(gs.CheckpointError, match="no checkpoint found"):
        gs.inspect(tmp_path)


def _record_or_error(fn, *args):
    from gemma_stream.errors import CheckpointError
    try:
        record, begin, end = fn(*args)
        return ("record", record, begin, end)
    except CheckpointError as e:
        return ("error", str(e), e.path, e.tensor)


@pytest.mark.parametrize("name", ["w", "\ud800"])
def test_plain_entries_fast_check_agrees_with_the_full_check(name):
    """The reader takes plainly valid entries with C-level checks (safetensors._record) and sends
    the rest to _checked_record: both give the same record or the same error for every entry here."""
    from gemma_stream.formats import safetensors as st
    values = [0, 1, 2, 3, 4, 8, 12, 24, -1, 2 ** 62, 2 ** 64, True, 1.0, "2", None, [2]]
    entries = [entry(), entry("BF16", (2, 3), 0, 12), entry("F4", (2, 4), 0, 4), entry("F4", (2, 8), 0, 16),
               entry("F32", (-2, -3), 0, 24), entry("F32", (0, 3), 0, 0),
               entry("F32", (0, 2 ** 62, 2 ** 62), 0, 0), entry("XX"), entry(3), entry(None), "not an object",
               {"dtype": "F32", "shape": (2,), "data_offsets": [0, 8]}, {"dtype": "F32", "data_offsets": [0, 8]},
               {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 9]}, {"dtype": "F32", "shape": [2]}]
    entries += [entry("F32", (v,), 0, 8) for v in values] + [entry("F32", (2, v), 0, 24) for v in values]
    entries += [entry("F32", (2,), v, 8) for v in values] + [entry("F32", (2,), 4, v) for v in values]
    for e in entries:
        for data_len in (8, 24, 2 ** 63):
            args = ("model.safetensors", name, e, 100, data_len)
            assert _record_or_error(st._record, *args) == _record_or_error(st._checked_record, *args), (e, data_len)


def test_index_checks_every_name_though_each_shard_is_resolved_once(tmp_path):
    """read_index resolves a shard name once; every tensor name is still checked, and a bad shard
    is reported at the first tensor that names it."""
    save_file({"a": torch.zeros(2), "b": torch.zeros(2)}, str(tmp_path / "s1.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    cases = [({"a": "s1.safetensors", "b": "s1.safetensors", "\ud800": "s1.safetensors"}, "not valid Unicode"),
             ({"a": "s1.safetensors", "b": "gone.safetensors", "c": "gone.safetensors"},
              r"tensor 'b': shard file 'gone\.safetensors' does not exist"),
             ({"a": "s1.safetensors", "b": ["s1.safetensors"]}, r"tensor 'b': shard \['s1\.safetensors'\] is not"),
             ({"a": "s1.safetensors", "b": "../s1.safetensors"}, r"tensor 'b': shard '\.\./s1\.safetensors' escapes")]
    for weight_map, message in cases:
        index.write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(gs.CheckpointError, match=message):
            gs.inspect(tmp_path)
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "./s1.safetensors"}}))
    assert [r.name for r in open_checkpoint(tmp_path).records] == ["a", "b"]
