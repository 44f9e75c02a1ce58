"""torch zip reader, at the record level (the pickle walker alone: test_pickle_walker.py).

Records are checked against ``torch.load(weights_only=True)`` bit for bit by
rebuilding every tensor from the raw file bytes at ``byte_offset`` with the
record's shape and strides; every error class has a test that builds the bad file.
"""

from __future__ import annotations

import collections
import json
import os
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from gemma_stream.errors import CheckpointError
from gemma_stream.formats import open_checkpoint
from gemma_stream.formats.records import contiguous_strides
from gemma_stream.formats.torchzip import read_torchzip
from gemma_stream.fuzz.builders import local_header

from torch_like import FakeStorage, FakeView, crafted, members_of, write_zip

# --- helpers ------------------------------------------------------------------------


def tensor_from_record(record) -> torch.Tensor:
    """The tensor a record describes, built from the file's bytes (not from torch.load)."""
    dtype = record.dtype.torch
    if record.numel == 0:
        return torch.empty(record.shape, dtype=dtype)
    strides = record.strides or contiguous_strides(record.shape)
    span = sum((n - 1) * s for n, s in zip(record.shape, strides)) + 1
    with open(record.file, "rb") as f:
        f.seek(record.byte_offset)
        raw = bytearray(f.read(span * record.dtype.itemsize))
    flat = torch.frombuffer(raw, dtype=dtype)
    return torch.as_strided(flat, record.shape, strides)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (NaNs and float8 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def check_against_torch(path, key: str | None = None, state_key: str | None = None, reference=None):
    """Read ``path`` and compare every record with ``torch.load(weights_only=True)`` (or ``reference``)."""
    ckpt = read_torchzip(str(path), key=key)
    if reference is None:
        reference = torch.load(path, weights_only=True)
    if state_key is not None:
        reference = reference[state_key]
    expected = {k: v for k, v in reference.items() if isinstance(v, torch.Tensor)}
    assert {r.name for r in ckpt.records} == set(expected)
    for record in ckpt.records:
        want = expected[record.name]
        assert record.dtype.torch == want.dtype, record.name
        assert record.shape == tuple(want.shape), record.name
        assert record.file == os.path.abspath(path)
        assert same_bits(tensor_from_record(record), want), record.name
    offsets = [r.byte_offset for r in ckpt.records]
    assert offsets == sorted(offsets)
    return ckpt


# --- agreement with torch.load ------------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int16, torch.int32,
          torch.int64, torch.uint8, torch.bool, torch.complex64, torch.complex128,
          # saved as UntypedStorage + _rebuild_tensor_v3(dtype)
          torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2]


def sample(dtype: torch.dtype, shape=(3, 5)) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, dtype=torch.float32 if not dtype.is_complex else dtype).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, dtype=torch.int64).to(dtype)


def test_every_dtype_matches_torch_load(tmp_path):
    sd = {str(dtype): sample(dtype) for dtype in DTYPES}
    path = tmp_path / "dtypes.pt"
    torch.save(sd, path)  # default settings: zip serialization, protocol 2, 64-byte alignment
    ckpt = check_against_torch(path)
    assert {r.dtype.torch for r in ckpt.records} == set(DTYPES)
    assert all(r.byte_offset % 64 == 0 and r.strides is None for r in ckpt.records)
    assert ckpt.format == "torchzip" and ckpt.extras == {} and ckpt.metadata == {}


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_module_state_dict_every_protocol(tmp_path, protocol):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Embedding(5, 2))
    sd = model.state_dict()  # an OrderedDict with `_metadata` set through BUILD
    path = tmp_path / f"p{protocol}.bin"
    torch.save(sd, path, pickle_protocol=protocol)
    # torch.load(weights_only=True) warns on protocol 3 and cannot read FRAME (4, 5): compare with sd
    ckpt = check_against_torch(path, reference=sd if protocol > 2 else None)
    assert [r.name for r in ckpt.records] == list(sd)  # one storage each, saved in order


def test_tied_weights_share_one_storage(tmp_path):
    embedding = torch.randn(10, 4)
    path = tmp_path / "tied.pt"
    torch.save({"embedder.weight": embedding, "lm_head.weight": embedding}, path)
    a, b = check_against_torch(path).records
    assert (a.storage, a.byte_offset) == (b.storage, b.byte_offset)


def test_slice_with_storage_offset(tmp_path):
    base = torch.arange(10, dtype=torch.float32)
    path = tmp_path / "slice.pt"
    torch.save({"base": base, "middle": base[3:7], "alone": torch.arange(20.0)[5:9]}, path)
    records = check_against_torch(path).by_name()
    assert records["middle"].storage == records["base"].storage
    assert records["middle"].byte_offset == records["base"].byte_offset + 3 * 4
    assert records["alone"].byte_offset % 64 == 5 * 4  # torch saves the whole storage


def test_transposed_and_expanded_views_keep_strides(tmp_path):
    weight = torch.randn(3, 4, dtype=torch.bfloat16)
    path = tmp_path / "views.pt"
    torch.save({"w_t": weight.t(), "row": torch.ones(3).expand(4, 3), "col": weight[:, 1:2],
                "contig_size1": torch.randn(4, 1).t()}, path)
    records = check_against_torch(path).by_name()
    assert records["w_t"].strides == (1, 4) and not records["w_t"].is_contiguous
    assert records["row"].strides == (0, 1)
    assert records["col"].strides == (4, 1)
    assert records["contig_size1"].strides is None


def test_empty_and_scalar_tensors(tmp_path):
    path = tmp_path / "empty.pt"
    base = torch.arange(6.0)
    torch.save({"empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5), "tail": base[6:], "base": base}, path)
    records = check_against_torch(path).by_name()
    assert records["empty"].numel == 0 and records["scalar"].shape == ()
    assert records["tail"].byte_offset == records["base"].byte_offset  # kept inside the file


def test_parameters_and_tensor_attributes(tmp_path):
    tagged = torch.randn(2, 2)
    tagged.note = "python attribute"  # saved through torch._tensor._rebuild_from_type_v2
    path = tmp_path / "param.pt"
    torch.save({"p": torch.nn.Parameter(torch.randn(3)), "tagged": tagged}, path)
    check_against_torch(path)


def test_nested_model_state_dict_and_extras(tmp_path):
    sd = collections.OrderedDict(w=torch.randn(2, 3), step_size=0.5, name="layer")
    path = tmp_path / "gemma.ckpt"
    torch.save({"model_state_dict": sd, "epoch": 3, "config": {"layers": 18}}, path)
    ckpt = check_against_torch(path, state_key="model_state_dict")
    assert ckpt.extras == {"step_size": "0.5", "name": "'layer'", "epoch": "3", "config": "{'layers': 18}"}
    assert ckpt.metadata == {"state_dict_key": "model_state_dict"}


def test_key_selects_another_state_dict(tmp_path):
    path = tmp_path / "two.pt"
    torch.save({"ema": {"w": torch.ones(2)}, "model": {"w": torch.zeros(3), "b": torch.ones(1)}}, path)
    assert {r.name for r in check_against_torch(path, state_key="model").records} == {"w", "b"}
    ckpt = check_against_torch(path, key="ema", state_key="ema")
    assert ckpt.extras == {"model": "{'w': tensor(f32[3]), 'b': tensor(f32[1])}"}
    with pytest.raises(CheckpointError, match=r"key 'missing' is missing; top-level keys: 'ema', 'model'"):
        read_torchzip(str(path), key="missing")


def test_dotted_key_and_nested_dicts_are_flattened(tmp_path):
    path = tmp_path / "nested.pt"
    torch.save({"run": {"weights": {"encoder": {"w": torch.ones(2)}, "head": torch.zeros(1)}}}, path)
    ckpt = read_torchzip(str(path), key="run.weights")
    assert sorted(r.name for r in ckpt.records) == ["encoder.w", "head"]
    with pytest.raises(CheckpointError, match="no state dict found.*'run'"):
        read_torchzip(str(path))


def test_open_checkpoint_and_sharded_index(tmp_path):
    shards = {"pytorch_model-00001-of-00002.bin": {"a": torch.randn(2, 2)},
              "pytorch_model-00002-of-00002.bin": {"b": torch.randn(3).to(torch.bfloat16)}}
    weight_map = {}
    for file_name, sd in shards.items():
        torch.save(sd, tmp_path / file_name)
        weight_map.update(dict.fromkeys(sd, file_name))
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.format == "torchzip" and len(ckpt.files) == 2
    for record in ckpt.records:
        want = shards[os.path.basename(record.file)][record.name]
        assert same_bits(tensor_from_record(record), want)


def test_zip64_directory(tmp_path):
    original = tmp_path / "plain.pt"
    torch.save({"w": torch.randn(4, 4), "v": torch.arange(5)}, original)
    path = write_zip(tmp_path / "zip64.pt", members_of(original), zip64=True)
    with zipfile.ZipFile(path) as z:  # the stdlib agrees the crafted file is valid ZIP64
        assert z.read("plain/data/0") == zipfile.ZipFile(original).read("plain/data/0")
    check_against_torch(path)


def test_many_tensors_parse_quickly(tmp_path):
    path = tmp_path / "many.pt"
    torch.save({f"model.layers.{i}.w": torch.zeros(2) for i in range(2000)}, path)
    assert len(read_torchzip(str(path)).records) == 2000


@pytest.fixture(params=["native", "caller"])
def header_reads(request, monkeypatch):
    """How a zip of many storages has its local headers read: by the native engine in one call, or
    one pread each by the reader itself (the pure-Python path, GEMMA_STREAM_BACKEND=python)."""
    import gemma_stream as gs
    if request.param == "native" and not gs.native_available():
        pytest.skip("needs the native engine")
    if request.param == "caller":
        monkeypatch.setenv("GEMMA_STREAM_BACKEND", "python")
    return request.param


class _RecordingNative:
    """The native module, with read_ranges recorded (and replaced, when ``reply`` is given)."""

    def __init__(self, real, reply=None):
        self.real, self.reply, self.calls = real, reply, []

    def read_ranges(self, path, offsets, lengths, threads, identity=None):
        import threading
        self.calls.append((threading.current_thread().name, list(offsets)))
        if self.reply is not None:
            return self.reply(offsets, lengths)
        return self.real.read_ranges(path, offsets, lengths, threads, identity)

    def BackgroundAdvice(self, path, offsets, lengths):   # noqa: N802 (the native class's name)
        self.advised = getattr(self, "advised", []) + list(offsets)
        return self.real.BackgroundAdvice(path, offsets, lengths)

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.mark.parametrize("threads", ["1", "4"])
def test_local_headers_read_on_threads_give_the_same_records(tmp_path, monkeypatch, threads, header_reads):
    """A zip of more storages than fileio.PARALLEL_READS: its local headers are read on the
    loader's threads (by the native engine or one pread each), each record still placed at its own
    storage's bytes."""
    monkeypatch.setenv("GEMMA_STREAM_THREADS", threads)
    path = tmp_path / "many.pt"
    torch.save({f"layers.{i}.w": torch.randn(i % 5 + 1, 3) for i in range(700)}, path)
    check_against_torch(path)


@pytest.mark.parametrize("cold", [True, False])
def test_the_native_engine_reads_every_local_header_in_one_call_asked_for_before_the_walk(tmp_path, monkeypatch,
                                                                                          cold):
    """With the native engine, one read_ranges call on the caller's thread reads every storage's local
    header (a Python thread reading them waited for the walk's GIL, NOTES.md 39); a cold file has
    every header asked for on a native thread before the pickle is walked, so the disk reads them
    meanwhile."""
    import threading
    import gemma_stream as gs
    from gemma_stream import executors, fileio
    from gemma_stream.formats import torchzip
    if not gs.native_available():
        pytest.skip("needs the native engine")
    events = []
    recording = _RecordingNative(executors.native_module())
    real_read, real_walk = recording.read_ranges, torchzip.walk_pickle

    def read_ranges(*args):
        events.append("read")
        return real_read(*args)

    def walk_pickle(*args, **kwargs):
        events.append("walk")
        return real_walk(*args, **kwargs)

    def advice(path, offsets, lengths):
        events.append(("advise", len(offsets)))
        return recording.real.BackgroundAdvice(path, offsets, lengths)

    recording.read_ranges, recording.BackgroundAdvice = read_ranges, advice
    monkeypatch.setattr(executors, "_native", recording)
    monkeypatch.setattr(torchzip, "walk_pickle", walk_pickle)
    monkeypatch.setattr(torchzip, "_is_cold", lambda path, headers: cold)
    monkeypatch.setattr(fileio, "advise_ranges", lambda fd, ranges: events.append(("python advice", len(ranges))))
    path = tmp_path / "many.pt"
    torch.save({f"layers.{i}.w": torch.randn(i % 5 + 1, 3) for i in range(300)}, path)
    check_against_torch(path)
    with zipfile.ZipFile(path) as z:
        headers = sorted(z.getinfo(f"many/data/{i}").header_offset for i in range(300))
    assert [(name, sorted(offsets)) for name, offsets in recording.calls] == [(threading.current_thread().name, headers)]
    expected = ([("advise", 300)] if cold else []) + ["walk", "read"]
    assert events[-len(expected):] == expected and (cold or ("advise", 300) not in events), events
    assert not any(e[0] == "python advice" for e in events if isinstance(e, tuple)), events


@pytest.mark.parametrize("reply", ["fails", "garbage"])
def test_a_failed_native_header_read_leaves_the_reading_to_the_reader(tmp_path, monkeypatch, reply):
    """The natively read headers are not trusted: a read that fails, or bytes that are
    not the headers, leave each storage to the reader's own reads and checks."""
    import gemma_stream as gs
    from gemma_stream import executors
    if not gs.native_available():
        pytest.skip("needs the native engine")

    def answer(offsets, lengths):
        if reply == "fails":
            raise OSError("the disk went away")
        return bytes(sum(lengths)), list(lengths)

    recording = _RecordingNative(executors.native_module(), answer)
    monkeypatch.setattr(executors, "_native", recording)
    path = tmp_path / "many.pt"
    torch.save({f"layers.{i}.w": torch.randn(i % 5 + 1, 3) for i in range(300)}, path)
    check_against_torch(path)
    assert len(recording.calls) == 1


@pytest.mark.parametrize("cold", [True, False])
def test_a_cold_zip_asks_for_all_its_local_headers_first(tmp_path, monkeypatch, cold, header_reads):
    """Cold, every local header is asked for (WILLNEED) before the first is read, so the disk
    queues them all; warm, none is: the reads find them cached."""
    from gemma_stream import fileio, pagecache
    from gemma_stream.benchmark.writers import evict
    path = tmp_path / "many.pt"
    # 25 MiB: reading the directory and data.pkl must not bring the whole file in with them
    torch.save({f"w{i}": torch.full((16384,), float(i)) for i in range(400)}, path)
    if cold:
        evict([path])
        if pagecache.resident_fraction([path]) not in (None, 0.0) and pagecache.resident_fraction([path]) > 0.5:
            pytest.skip("this file system keeps pages after POSIX_FADV_DONTNEED (tmpfs?)")
    else:
        path.read_bytes()
    asked = []
    monkeypatch.setattr(fileio, "advise_willneed", lambda fd, offset, n: asked.append(offset) or True)
    recording = None
    if header_reads == "native":   # asked on a native thread (_native.BackgroundAdvice)
        from gemma_stream import executors
        recording = _RecordingNative(executors.native_module())
        monkeypatch.setattr(executors, "_native", recording)
    check_against_torch(path)
    with zipfile.ZipFile(path) as z:
        headers = sorted(z.getinfo(f"many/data/{i}").header_offset for i in range(400))
    asked += getattr(recording, "advised", [])
    assert sorted(asked) == (headers if cold else [])


@pytest.mark.parametrize("threads", ["1", "4"])
def test_the_first_bad_local_header_is_the_one_refused(tmp_path, monkeypatch, threads, header_reads):
    monkeypatch.setenv("GEMMA_STREAM_THREADS", threads)
    source = tmp_path / "many.pt"
    torch.save({f"w{i}": torch.full((2,), float(i)) for i in range(600)}, source)
    data = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as z:
        for key in ("many/data/250", "many/data/590"):   # the second one in another thread's run
            offset = z.getinfo(key).header_offset
            data[offset:offset + 4] = b"PK\x07\x08"
    path = tmp_path / "bad.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"local header of 'many/data/250' at offset \d+ does not match"):
        read_torchzip(str(path))


# --- files that must be refused ----------------------------------------------------------


def test_legacy_torch_save_is_refused(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"legacy torch.save.*weights_only=True"):
        read_torchzip(str(path))


@pytest.mark.parametrize("content, message", [
    (b"", "file is empty"),
    (b"hello world, not a checkpoint" * 10, r"not a safetensors or PyTorch zip checkpoint: it starts with b'hello world"),
    (b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.", "legacy torch.save")])
def test_non_zip_files_are_refused(tmp_path, content, message):
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        read_torchzip(str(path))


@pytest.mark.parametrize("only", [None, "archive/data/0"])
def test_compressed_entries_are_refused(tmp_path, only):
    source = tmp_path / "archive.pt"
    torch.save({"w": torch.zeros(100)}, source)
    path = tmp_path / "deflated.pt"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members_of(source):
            stored = only is not None and name != only
            z.writestr(name, data, compress_type=zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED)
    with pytest.raises(CheckpointError, match=f"entry '{only or 'archive/data.pkl'}' is compressed"):
        read_torchzip(str(path))


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, -1])
def test_truncated_files_are_refused(tmp_path, keep):
    source = tmp_path / "full.pt"
    torch.save({"w": torch.randn(64, 64)}, source)
    data = source.read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[:int(len(data) * keep) if keep > 0 else keep])
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        read_torchzip(str(path))


def test_malicious_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "MARKER"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    for protocol in (2, 4):
        path = crafted(tmp_path / f"evil{protocol}.pt", {"w": Exploit()}, {}, protocol=protocol)
        with pytest.raises(CheckpointError, match=r"global '(posix|nt)\.system' is not allowed"):
            read_torchzip(path)
    assert not marker.exists()


def storage_bytes(n: int) -> bytes:
    return torch.arange(n, dtype=torch.float32).numpy().tobytes()


def test_crafted_file_matches_torch_load(tmp_path):
    storage = FakeStorage("0", 12)
    obj = {"x": FakeView(storage, 2, (2, 3), (1, 2)), "y": FakeView(storage, 0, (12,), (1,))}
    path = crafted(tmp_path / "ok.pt", obj, {"0": storage_bytes(12)})
    check_against_torch(path)


@pytest.mark.parametrize("view, storages, message", [
    (((10,), 2, (6,), (2,)), {"0": 40}, r"tensor 'x': storage '0' holds 10 elements but the view needs 13"),
    (((10,), 0, (3,), (-1,)), {"0": 40}, r"tensor 'x': negative size, stride or storage offset"),
    (((10,), -1, (3,), (1,)), {"0": 40}, r"tensor 'x': negative size"),
    (((10,), 0, (3, 2), (1,)), {"0": 40}, r"size \[3, 2\] and stride \[1\] differ in length"),
    (((10,), 0, (3,), (1,)), {"0": 20}, r"storage '0' declares 40 bytes but data/0 holds 20"),
    (((10,), 0, (3,), (1,)), {"1": 40}, r"storage '0' has no 'data/0' entry"),
])
def test_views_outside_their_storage_are_refused(tmp_path, view, storages, message):
    (numel,), offset, size, stride = view
    obj = {"x": FakeView(FakeStorage("0", numel), offset, size, stride)}
    path = crafted(tmp_path / "bad.pt", obj, {k: b"\0" * n for k, n in storages.items()})
    with pytest.raises(CheckpointError, match=message) as info:
        read_torchzip(path)
    assert str(info.value).startswith(path)


def test_big_endian_and_conj_are_refused(tmp_path):
    obj = {"x": FakeView(FakeStorage("0", 2), 0, (2,), (1,))}
    path = crafted(tmp_path / "big.pt", obj, {"0": storage_bytes(2)}, byteorder=b"big")
    with pytest.raises(CheckpointError, match="big-endian checkpoints are not supported"):
        read_torchzip(path)
    path = tmp_path / "conj.pt"
    torch.save({"c": torch.randn(3, dtype=torch.complex64).conj()}, path)
    with pytest.raises(CheckpointError, match="conj/neg bit"):
        read_torchzip(str(path))


def test_overlapping_storages_are_refused(tmp_path):
    # data/1's local header and bytes hide inside data/0's payload: two storages alias
    hidden = storage_bytes(4)
    outer = local_header("archive/data/1", hidden) + hidden
    obj = {"x": FakeView(FakeStorage("0", len(outer) // 4), 0, (2,), (1,)),
           "y": FakeView(FakeStorage("1", 4), 0, (4,), (1,))}
    path = crafted(tmp_path / "overlap.pt", obj, {"0": outer})
    with zipfile.ZipFile(path) as z:
        offset = z.getinfo("archive/data/0").header_offset
    name_len, extra_len = struct.unpack_from("<HH", Path(path).read_bytes(), offset + 26)
    start = offset + 30 + name_len + extra_len  # where data/0's bytes, and data/1's header, begin
    members = members_of(path)
    write_zip(path, members, phantoms=(("archive/data/1", hidden, start),))
    with pytest.raises(CheckpointError, match="storages '0' and '1' overlap in the file"):
        read_torchzip(path)
