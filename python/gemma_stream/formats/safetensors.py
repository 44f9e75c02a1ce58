"""safetensors reader: header parsing and validation, nothing else.

Layout: u64 little-endian header length N, N bytes of UTF-8 JSON, data buffer.
Every rule the reference implementation enforces is checked here, so the rest
of the pipeline can trust the records.
"""

from __future__ import annotations

import json
import math
import os
import struct

from ..dtypes import from_safetensors
from ..errors import CheckpointError
from .records import Checkpoint, TensorRecord

__all__ = ["read_safetensors", "read_header", "MAX_HEADER_BYTES"]

#: the reference implementation refuses headers over 100 MB
MAX_HEADER_BYTES = 100_000_000


def read_header(path: str) -> tuple[dict, int, int]:
    """Return (header JSON object, data buffer start, file size)."""
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: file is {file_size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
            if 8 + n > file_size:
                raise CheckpointError(f"{path}: header length {n} runs past the end of the file ({file_size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: header is not valid UTF-8 JSON: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is a JSON {type(header).__name__}, expected an object")
    return header, 8 + n, file_size


def _record(path: str, name: str, entry, data_start: int, data_len: int) -> tuple[TensorRecord, int, int]:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: entry is not an object")
    dtype = from_safetensors(entry.get("dtype"))
    if dtype is None:
        raise CheckpointError(f"{where}: unknown dtype {entry.get('dtype')!r}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    offsets = entry.get("data_offsets")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets)):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} is not a pair of non-negative integers")
    begin, end = offsets
    if end < begin:
        raise CheckpointError(f"{where}: data_offsets [{begin}, {end}) end before begin")
    if end > data_len:
        raise CheckpointError(
            f"{where}: data_offsets [{begin}, {end}) end beyond the data buffer ({data_len} bytes)")
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes:
        raise CheckpointError(
            f"{where}: data_offsets [{begin}, {end}) hold {end - begin} bytes, but shape {shape} "
            f"of {dtype.safetensors} needs {nbytes}")
    record = TensorRecord(name=name, dtype=dtype, shape=tuple(shape), file=path,
                          byte_offset=data_start + begin)
    return record, begin, end


def read_safetensors(path: str) -> Checkpoint:
    """Parse and validate one safetensors file."""
    path = os.path.abspath(path)
    header, data_start, file_size = read_header(path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    data_len = file_size - data_start
    spans = []
    records = []
    for name, entry in header.items():
        record, begin, end = _record(path, name, entry, data_start, data_len)
        records.append(record)
        spans.append((begin, end, name))
    # Ranges must tile the buffer: no overlap (two tensors aliasing bytes) and
    # no hole (bytes nobody accounts for), as the reference reader demands.
    spans.sort()
    cursor, previous = 0, None
    for begin, end, name in spans:
        if begin < cursor:
            raise CheckpointError(
                f"{path}: tensor {name!r}: data_offsets [{begin}, {end}) overlap tensor {previous!r} "
                f"which ends at {cursor}")
        if begin > cursor:
            raise CheckpointError(
                f"{path}: tensor {name!r}: data_offsets [{begin}, {end}) leave a hole [{cursor}, {begin}) "
                f"in the data buffer")
        cursor, previous = end, name
    if cursor != data_len:
        raise CheckpointError(
            f"{path}: tensors cover {cursor} bytes but the data buffer holds {data_len} (trailing bytes)")
    records.sort(key=lambda r: r.byte_offset)
    return Checkpoint(format="safetensors", files=[path], records=records, metadata=dict(metadata))
