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
from .records import Checkpoint, CheckpointFile, TensorRecord, check_shape, gc_paused
from .torch_globals import describe

__all__ = ["read_safetensors", "read_header", "read_header_file", "parse_json", "check_text", "not_a_checkpoint",
           "MAX_HEADER_BYTES"]

#: the reference implementation refuses headers over 100 MB
MAX_HEADER_BYTES = 100_000_000


def not_a_checkpoint(path: str, head: bytes) -> CheckpointError:
    """The words for a file that is neither format, showing what it starts with."""
    return CheckpointError(f"{path}: not a safetensors or PyTorch zip checkpoint: it starts with {head[:16]!r}",
                           path=path)


def parse_json(raw: bytes, path: str, what: str) -> object:
    """``json.loads`` whose every failure is a :class:`CheckpointError` naming the file.

    Besides malformed JSON this covers nesting deep enough to exhaust the
    interpreter's recursion limit and integers over Python's 4,300-digit limit.
    """
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise CheckpointError(f"{path}: {what} is nested too deeply", path=path) from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: {what} is not valid UTF-8 JSON: {e}", path=path) from None
    except ValueError as e:  # JSONDecodeError, and integers past sys.get_int_max_str_digits()
        raise CheckpointError(f"{path}: {what} is not valid UTF-8 JSON: {e}", path=path) from None


def check_text(path: str, text: str, what: str) -> str:
    """Refuse strings that are not valid Unicode (JSON allows a lone surrogate escape; safetensors does not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointError(f"{path}: {what} {ascii(text)[:200]} is not valid Unicode (a lone surrogate)",
                              path=path) from None
    return text


def read_header(path: str) -> tuple[dict, int, int]:
    """Return (header JSON object, data buffer start, file size).

    ``path`` comes back as a :class:`CheckpointFile` through :func:`read_header_file`;
    this form keeps the old signature.
    """
    header, data_start, file_size, _ = read_header_file(path)
    return header, data_start, file_size


def read_header_file(path: str) -> tuple[dict, int, int, CheckpointFile]:
    """(header JSON object, data buffer start, file size, the validated file)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            file_size = st.st_size
            head = f.read(16)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors or PyTorch zip checkpoint: it is {file_size} bytes, "
                                      f"too short for a safetensors header, and holds {head!r}", path=path)
            (n,) = struct.unpack("<Q", head[:8])
            if (n > MAX_HEADER_BYTES or 8 + n > file_size) and head[8:9] != b"{":
                raise not_a_checkpoint(path, head)
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit",
                                      path=path)
            if 8 + n > file_size:
                raise CheckpointError(f"{path}: header length {n} runs past the end of the file ({file_size} bytes)",
                                      path=path)
            raw = head[8:8 + n]
            if len(raw) < n:
                raw += f.read(n - len(raw))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}", path=path) from e
    header = parse_json(raw, path, "header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is a JSON {type(header).__name__}, expected an object", path=path)
    return header, 8 + n, file_size, CheckpointFile(path, st)


#: dtypes whose header shape counts values packed several to a byte: torch's shape counts bytes
_PACKED = {"F4": 2}


def _record(path: str, name: str, entry, data_start: int, data_len: int) -> tuple[TensorRecord, int, int]:
    """The record of one header entry, and its [begin, end) in the data buffer.

    An entry that is plainly valid (a known dtype, non-negative int dims, offsets in order
    inside the buffer that hold exactly the shape's bytes, at least one byte) is taken with C-level
    checks; anything else goes through :func:`_checked_record`, which names what is wrong.  The
    per-element generator checks were half of reading a 1,000-tensor header.
    """
    if type(entry) is dict:
        dtype = from_safetensors(entry.get("dtype"))
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if (dtype is not None and dtype.torch is not None and dtype.safetensors not in _PACKED
                and type(shape) is list and type(offsets) is list and len(offsets) == 2
                and type(offsets[0]) is int and type(offsets[1]) is int
                and tuple(map(type, shape)).count(int) == len(shape) and (not shape or min(shape) >= 0)):
            begin, end = offsets
            shape = tuple(shape)
            nbytes = math.prod(shape) * dtype.itemsize
            # nbytes > 0: every dim is >= 1, so no stride can pass 64 bits (check_shape's refusal)
            if 0 <= begin and 0 < nbytes == end - begin and end <= data_len:
                check_text(path, name, "tensor name")
                return TensorRecord(name=name, dtype=dtype, shape=shape, file=path, byte_offset=data_start + begin), \
                    begin, end
    return _checked_record(path, name, entry, data_start, data_len)


def _checked_record(path: str, name: str, entry, data_start: int, data_len: int) -> tuple[TensorRecord, int, int]:
    check_text(path, name, "tensor name")
    where = f"{path}: tensor {name!r}"

    def fail(message: str) -> CheckpointError:
        return CheckpointError(f"{where}: {message}", path=path, tensor=name)

    if not isinstance(entry, dict):
        raise fail("entry is not an object")
    dtype = from_safetensors(entry.get("dtype"))
    if dtype is None or dtype.torch is None:
        raise fail(f"unknown dtype {describe(entry.get('dtype'), 60)}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise fail(f"shape {describe(shape, 60)} is not a list of non-negative integers")
    offsets = entry.get("data_offsets")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and 0 <= o < 1 << 64 for o in offsets)):
        raise fail(f"data_offsets {describe(offsets, 60)} is not a pair of non-negative integers")
    check_shape(tuple(shape), dtype.itemsize, where, path, name)
    begin, end = offsets
    if end < begin:
        raise fail(f"data_offsets [{begin}, {end}) end before begin")
    if end > data_len:
        raise fail(f"data_offsets [{begin}, {end}) end beyond the data buffer ({data_len} bytes)")
    per_byte = _PACKED.get(dtype.safetensors, 1)
    if per_byte > 1:  # torch's shape counts whole bytes: the last dimension must divide
        if not shape or shape[-1] % per_byte:
            raise fail(f"shape {shape} of {dtype.safetensors} needs a last dimension divisible by {per_byte}")
        shape = shape[:-1] + [shape[-1] // per_byte]
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes:
        raise fail(f"data_offsets [{begin}, {end}) hold {end - begin} bytes, but shape {entry['shape']} "
                   f"of {dtype.safetensors} needs {nbytes}")
    record = TensorRecord(name=name, dtype=dtype, shape=tuple(shape), file=path,
                          byte_offset=data_start + begin)
    return record, begin, end


def read_safetensors(path: str) -> Checkpoint:
    """Parse and validate one safetensors file."""
    with gc_paused():
        return _read_safetensors(path)


def _read_safetensors(path: str) -> Checkpoint:
    header, data_start, file_size, path = read_header_file(os.path.abspath(path))
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata   # an empty list or string is refused, as safetensors does
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings", path=path)
    for k, v in metadata.items():
        check_text(path, k, "__metadata__ key")
        check_text(path, v, "__metadata__ value")
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
                f"which ends at {cursor}", path=path, tensor=name)
        if begin > cursor:
            raise CheckpointError(
                f"{path}: tensor {name!r}: data_offsets [{begin}, {end}) leave a hole [{cursor}, {begin}) "
                f"in the data buffer", path=path, tensor=name)
        cursor, previous = end, name
    if cursor != data_len:
        raise CheckpointError(
            f"{path}: tensors cover {cursor} bytes but the data buffer holds {data_len} (trailing bytes)", path=path)
    records.sort(key=lambda r: r.byte_offset)
    return Checkpoint(format="safetensors", files=[path], records=records, metadata=dict(metadata))
