"""Write synthetic Gemma-shaped checkpoints without holding the model in memory.

Every tensor's bytes come from one 16 MiB block of Gaussian values (in the checkpoint dtype), read
from a per-tensor starting point, so writing costs about what the disk costs and the process stays
small whatever the model size.  Formats: a single ``model.safetensors``, sharded safetensors with an
index (what ``save_pretrained`` writes), and a torch zip ``model.ckpt`` holding
``{"model_state_dict": ...}`` as gemma_pytorch ships it.  A ``config.json`` (transformers'
GemmaConfig) sits next to the safetensors so the directory is also a Hugging Face model directory.
"""

from __future__ import annotations

import collections
import errno
import json
import math
import os
import pickle
import struct
import zipfile
import zlib

import torch

from .. import fileio, pagecache
from .shapes import GemmaShape, hf_parts, tensor_specs

__all__ = ["DTYPES", "plan_shards", "write_safetensors", "write_sharded", "write_ckpt", "write_config", "evict", "cached_fraction",
           "warm_up"]

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
_ST_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
_BLOCK_BYTES = 16 << 20
_IO_BYTES = 64 << 20


class _Source:
    """Gaussian bytes for any tensor: a rotating window over one random block."""

    def __init__(self, dtype: torch.dtype, seed: int = 0):
        itemsize = torch.empty((), dtype=dtype).element_size()
        gen = torch.Generator().manual_seed(seed)
        block = torch.randn(_BLOCK_BYTES // itemsize, generator=gen, dtype=torch.float32).to(dtype)
        self.itemsize = itemsize
        self.block = memoryview(block.view(torch.uint8).numpy()).cast("B")
        self._keep = block

    def pieces(self, parts: list[tuple[str, int]]):
        """Yield memoryviews (<= 16 MiB each) for a tensor made of ``parts`` [(hf_name, numel), ...].

        The bytes depend on the Hugging Face name only, so every format and naming holds the same
        values: gemma_pytorch's ``qkv_proj`` is exactly ``cat(q_proj, k_proj, v_proj)``.
        """
        size = len(self.block)
        for part, numel in parts:
            nbytes = numel * self.itemsize
            pos = (zlib.crc32(part.encode()) * self.itemsize) % size
            while nbytes > 0:
                n = min(nbytes, size - pos)
                yield self.block[pos:pos + n]
                nbytes -= n
                pos = 0


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _parts(shape: GemmaShape | None, name: str, tensor_shape: tuple[int, ...]) -> list[tuple[str, int]]:
    """Where a tensor's bytes come from: a Gemma shape's Hugging Face parts, or the tensor itself (mixes)."""
    return hf_parts(shape, name, tensor_shape) if shape is not None else [(name, math.prod(tensor_shape))]


def _write_tensors(f, source: _Source, shape: GemmaShape | None, specs) -> None:
    for name, tensor_shape in specs:
        for piece in source.pieces(_parts(shape, name, tensor_shape)):
            f.write(piece)


def _safetensors_header(specs, dtype: torch.dtype) -> bytes:
    header: dict = {"__metadata__": {"format": "pt", "generator": "gemma_stream.benchmark"}}
    offset = 0
    for name, shape in specs:
        nbytes = math.prod(shape) * _itemsize(dtype)
        header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)   # the data buffer starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text


def _finish(f, durable: bool) -> None:
    f.flush()
    if durable:
        os.fsync(f.fileno())   # dirty pages cannot be evicted: cold runs need them on disk


def write_safetensors(path: str, shape: GemmaShape | None, dtype: torch.dtype, naming: str = "hf",
                      specs=None, seed: int = 0, durable: bool = True) -> int:
    """Write one safetensors file; returns its size in bytes (``durable``: fsync it).

    ``specs``: ``[(name, shape)]`` to write instead of ``shape``'s tensors (``shape=None``: a mix).
    """
    specs = tensor_specs(shape, naming) if specs is None else specs
    source = _Source(dtype, seed)
    with open(path, "wb") as f:
        f.write(_safetensors_header(specs, dtype))
        _write_tensors(f, source, shape, specs)
        _finish(f, durable)
    return os.path.getsize(path)


def plan_shards(specs, itemsize: int, max_shard_bytes: int) -> list[list]:
    """Tensors in file order into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def write_sharded(directory: str, shape: GemmaShape | None, dtype: torch.dtype, naming: str = "hf",
                  max_shard_bytes: int = 2 * 10**9, seed: int = 0, durable: bool = True, specs=None) -> list[str]:
    """Write ``model-0000i-of-0000n.safetensors`` shards and ``model.safetensors.index.json``."""
    specs = tensor_specs(shape, naming) if specs is None else specs
    itemsize = _itemsize(dtype)
    shards = plan_shards(specs, itemsize, max_shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        write_safetensors(os.path.join(directory, name), shape, dtype, naming, specs=shard, seed=seed,
                          durable=durable)
    weight_map = {spec[0]: name for name, shard in zip(names, shards) for spec in shard}
    total = sum(math.prod(s[1]) for s in specs) * itemsize
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return [os.path.join(directory, n) for n in names]


class _StorageKeys(pickle.Unpickler):
    """Reads our own data.pkl (trusted: we just wrote it) to map tensor name -> storage key."""

    def find_class(self, module, name):
        if name == "_rebuild_tensor_v2":
            return lambda storage, offset, size, stride, *rest: (storage, offset)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        return lambda *args, **kwargs: None

    def persistent_load(self, pid):
        return pid[2]   # ('storage', storage_type, key, location, numel)


def write_ckpt(path: str, shape: GemmaShape | None, dtype: torch.dtype, naming: str = "gemma_pytorch", seed: int = 0,
               durable: bool = True, specs=None, key: str | None = "model_state_dict") -> int:
    """Write a torch.save zip of ``{key: {...}}`` (``key=None``: the state dict itself) tensor by tensor.

    ``torch.serialization.skip_data`` lays out the archive (pickle, aligned records) from fake
    tensors without their bytes; the bytes are then written into each record's place.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    specs = tensor_specs(shape, naming) if specs is None else specs
    with FakeTensorMode():
        state = {name: torch.empty(tensor_shape, dtype=dtype) for name, tensor_shape in specs}
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save({key: state} if key else state, path)
    del state
    offsets = _record_offsets(path)
    with zipfile.ZipFile(path) as archive:
        pkl = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
        prefix = pkl[: -len("data.pkl")]
        located = _StorageKeys(archive.open(pkl)).load()
        located = located[key] if key else located
    source = _Source(dtype, seed)
    fd = os.open(path, fileio.open_flags(os.O_WRONLY))   # binary mode on Windows
    try:
        for name, tensor_shape in specs:
            key, storage_offset = located[name]
            if storage_offset != 0:
                raise RuntimeError(f"{path}: tensor {name!r} unexpectedly at storage offset {storage_offset}")
            pos = offsets[prefix + "data/" + key]
            for piece in source.pieces(_parts(shape, name, tensor_shape)):
                pos += fileio.write_at(fd, piece, pos)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    return os.path.getsize(path)


def _record_offsets(path: str) -> dict[str, int]:
    """Payload offset of every zip entry, from its local header (the central directory lacks it)."""
    out = {}
    with open(path, "rb") as f, zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            f.seek(info.header_offset)
            local = f.read(30)
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            out[info.filename] = info.header_offset + 30 + name_len + extra_len
    return out


def write_config(directory: str, shape: GemmaShape, dtype: torch.dtype) -> None:
    """config.json for transformers' GemmaForCausalLM (tied embeddings, like google/gemma-2b)."""
    fields = dict(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                  num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                  num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, tie_word_embeddings=True)
    try:
        from transformers import GemmaConfig
    except ImportError:   # the directory is still a valid checkpoint; only transformers loaders need this file
        config = dict(fields, architectures=["GemmaForCausalLM"], model_type="gemma", torch_dtype=str(dtype)[6:])
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        return
    config = GemmaConfig(**fields)
    config.architectures = ["GemmaForCausalLM"]
    config.dtype = dtype
    config.save_pretrained(directory)


# ---------------------------------------------------------------- page cache control

def evict(paths) -> None:
    """Drop the files' pages from the page cache (they were fsynced, so none is dirty)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            fileio.drop_cache(fd, 0, 0)   # a no-op where the OS cannot drop pages (Windows)
        finally:
            os.close(fd)


def warm_up(paths) -> None:
    """Read the files once so that they sit in the page cache."""
    buf = bytearray(_IO_BYTES)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def cached_fraction(paths) -> float:
    """Fraction of the files' pages resident in the page cache (mincore, :mod:`gemma_stream.pagecache`)."""
    fraction = pagecache.resident_fraction(paths)
    if fraction is None:
        raise OSError(errno.ENOSYS, "mincore is not available here: the page cache cannot be observed")
    return fraction
