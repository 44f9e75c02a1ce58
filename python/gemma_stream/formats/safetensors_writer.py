"""safetensors writing: header bytes, shard and index names, files that appear whole.

The reading side (:mod:`.safetensors`) validates; this side writes what the
reference implementation writes, byte for byte: compact JSON with ``__metadata__``
first, padded with spaces so the data buffer starts 8-byte aligned, tensors laid
out by dtype (larger items first, so each starts aligned) then by name.

Example::

    head, offsets = header_bytes([("w", DTYPES["bf16"], (4, 8))], {"format": "pt"})
    with AtomicFiles(["/out/model.safetensors"]) as files:
        fd = files.create(0, head, len(head) + 64)
        pwrite_all(fd, memoryview(data), len(head) + offsets[0])
"""

from __future__ import annotations

import json
import math
import os
import secrets
import struct

from ..dtypes import DType
from ..fileio import open_flags, write_at

__all__ = ["header_bytes", "shard_names", "index_bytes", "AtomicFiles", "pwrite_all", "SINGLE_FILE", "INDEX_FILE"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: the reference writer's layout order: its Dtype enum, descending
_DTYPE_ORDER = {code: rank for rank, code in enumerate(["U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16",
                                                        "U16", "I16", "F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2",
                                                        "F8_E5M2FNUZ", "F8_E8M0", "F4", "I8", "U8", "BOOL"])}


def header_bytes(tensors: list[tuple[str, DType, tuple[int, ...]]],
                 metadata: dict[str, str]) -> tuple[bytes, list[int]]:
    """The file's first bytes (length + JSON) and each tensor's offset in the data buffer."""
    entries: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offsets = [0] * len(tensors)
    cursor = 0
    for i in sorted(range(len(tensors)), key=lambda i: (_DTYPE_ORDER[tensors[i][1].safetensors], tensors[i][0])):
        name, dtype, shape = tensors[i]
        nbytes = math.prod(shape) * dtype.itemsize
        stored = list(shape[:-1]) + [shape[-1] * 2] if dtype.safetensors == "F4" else list(shape)  # 4-bit values
        entries[name] = {"dtype": dtype.safetensors, "shape": stored, "data_offsets": [cursor, cursor + nbytes]}
        offsets[i], cursor = cursor, cursor + nbytes
    raw = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


def shard_names(count: int) -> list[str]:
    """``model-00001-of-00003.safetensors``, ... (transformers' names)."""
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def index_bytes(weight_map: dict[str, str], total_size: int, metadata: dict[str, str]) -> bytes:
    """``model.safetensors.index.json``: ``{"metadata": {"total_size": ..}, "weight_map": {..}}``."""
    body = {"metadata": {"total_size": total_size, **metadata}, "weight_map": weight_map}
    return json.dumps(body, indent=2).encode("utf-8")


class AtomicFiles:
    """Temp files beside their final names: renamed into place, in order, when the block
    exits cleanly (put an index last so no reader sees it before its shards), removed otherwise."""

    def __init__(self, finals: list[str]):
        self.finals = finals
        tag = f"{os.getpid()}.{secrets.token_hex(4)}"
        self.temps = [os.path.join(os.path.dirname(p), f".{os.path.basename(p)}.{tag}.tmp") for p in finals]
        self.fds: list[int] = []

    def create(self, i: int, head: bytes, size: int) -> int:
        """Create file ``i`` with ``size`` bytes (sparse) starting with ``head``; returns its fd."""
        fd = os.open(self.temps[i], open_flags(os.O_RDWR | os.O_CREAT | os.O_EXCL), 0o666)
        self.fds.append(fd)
        os.ftruncate(fd, size)
        pwrite_all(fd, memoryview(head), 0)
        return fd

    def __enter__(self) -> "AtomicFiles":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        if exc_type is None:
            for temp, final in zip(self.temps, self.finals):
                os.replace(temp, final)
            return
        for temp in self.temps:
            if os.path.exists(temp):
                os.unlink(temp)


def pwrite_all(fd: int, data: memoryview, position: int) -> None:
    while data:
        written = write_at(fd, data, position)
        data, position = data[written:], position + written
