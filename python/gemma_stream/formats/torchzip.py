"""torch zip checkpoints (``torch.save`` since 1.6): ZIP directory + safe pickle walk.

The archive is read with ``struct`` and ``fileio.pread`` only: the central directory
once, then one local header per entry we use, because the payload offset depends
on the *local* extra field (torch pads it so each ``data/<key>`` starts on a
64-byte boundary).  Nothing is decompressed and nothing in ``data.pkl`` is
executed (see :mod:`.pickle_walker`).  Every tensor view is checked against its
storage and every storage against the file before records are returned.

Example::

    ckpt = read_torchzip("gemma-2b.ckpt")          # finds {"model_state_dict": ...}
    ckpt.by_name()["embedder.weight"].byte_offset
"""

from __future__ import annotations

import itertools
import math
import operator
import os
import struct
from dataclasses import dataclass
from typing import Any

from .. import fileio
from ..errors import CheckpointError
from .pickle_walker import StorageRef, TensorView, describe, walk_pickle
from .records import Checkpoint, CheckpointFile, TensorRecord, check_shape, contiguous_strides, gc_paused
from .safetensors import not_a_checkpoint

__all__ = ["read_torchzip", "ZipEntry", "read_zip_directory", "payload_offset", "STATE_DICT_KEYS"]

#: where the state dict is looked for when the top level holds no tensors, in order
STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model")
MAX_PICKLE_BYTES = 1 << 28        # data.pkl of a 2B model is ~30 KB; 256 MiB is generous
MAX_DIRECTORY_BYTES = 1 << 28     # bounds what a forged EOCD can make us read
MAX_NESTING = 8                   # dict levels flattened into "a.b.c" names

_EOCD = struct.Struct("<4sHHHHIIH")            # end of central directory, 22 bytes
_ZIP64_LOCATOR = struct.Struct("<4sIQI")        # 20 bytes, just before the EOCD
_ZIP64_EOCD = struct.Struct("<4sQHHIIQQQQ")     # 56 bytes
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")  # central directory file header, 46 bytes
_LOCAL = struct.Struct("<4sHHHHHIIIHH")         # local file header, 30 bytes
_U32_MAX, _U16_MAX = 0xFFFFFFFF, 0xFFFF

_LEGACY_HINT = (
    "this looks like a legacy torch.save file (PyTorch < 1.6, or _use_new_zipfile_serialization=False), "
    "which cannot be read without executing pickle code. Re-save it with a recent torch: "
    "torch.save(torch.load(path, weights_only=True), new_path)")


@dataclass(frozen=True)
class ZipEntry:
    """One central directory entry of a STORED (uncompressed) archive member."""

    name: str
    raw_name: bytes
    size: int
    local_header_offset: int


def _pread(fd: int, path: str, n: int, offset: int, what: str) -> bytes:
    if offset < 0 or n < 0 or offset + n >= 1 << 63:  # a forged ZIP64 offset: pread would raise OverflowError
        raise CheckpointError(f"{path}: {what} at offset {offset} lies outside any file", path=path)
    data = fileio.pread(fd, n, offset)
    if len(data) != n:
        raise CheckpointError(f"{path}: truncated: {what} needs {n} bytes at offset {offset}, got {len(data)}")
    return data


def _find_eocd(fd: int, path: str, file_size: int) -> tuple[int, tuple]:
    """Offset and fields of the End of Central Directory record (it may be followed by a comment)."""
    tail_size = min(file_size, _EOCD.size + _U16_MAX)
    tail = _pread(fd, path, tail_size, file_size - tail_size, "the zip trailer")
    pos = tail.rfind(b"PK\x05\x06")
    while pos >= 0:
        if pos + _EOCD.size <= tail_size:
            fields = _EOCD.unpack_from(tail, pos)
            if pos + _EOCD.size + fields[7] == tail_size:  # the comment must end the file
                return file_size - tail_size + pos, fields
        pos = tail.rfind(b"PK\x05\x06", 0, pos)
    head = fileio.pread(fd, 16, 0)
    if head[:4] == b"PK\x03\x04":
        raise CheckpointError(f"{path}: truncated or damaged zip archive: no end of central directory record")
    raise _not_zip(path, head)


def _not_zip(path: str, head: bytes) -> CheckpointError:
    if head[:1] == b"\x80":  # a pickle protocol opcode: torch.save's legacy (non-zip) format
        return CheckpointError(f"{path}: not a zip archive (starts with {head[:4]!r}); {_LEGACY_HINT}")
    return not_a_checkpoint(path, head)


def _directory_bounds(fd: int, path: str, file_size: int) -> tuple[int, int, int, int]:
    """(entry count, central directory offset, size, end of the region it may occupy)."""
    eocd_offset, (_, disk, cd_disk, _, count, cd_size, cd_offset, _) = _find_eocd(fd, path, file_size)
    limit = eocd_offset
    if eocd_offset >= _ZIP64_LOCATOR.size:
        sig, _, z64_offset, _ = _ZIP64_LOCATOR.unpack(
            _pread(fd, path, _ZIP64_LOCATOR.size, eocd_offset - _ZIP64_LOCATOR.size, "the ZIP64 locator"))
        if sig == b"PK\x06\x07":  # torch (miniz) always writes ZIP64 records
            if z64_offset + _ZIP64_EOCD.size > eocd_offset - _ZIP64_LOCATOR.size:
                raise CheckpointError(f"{path}: ZIP64 end of central directory offset {z64_offset} is out of range")
            (sig, _, _, _, disk, cd_disk, _, count, cd_size, cd_offset) = _ZIP64_EOCD.unpack(
                _pread(fd, path, _ZIP64_EOCD.size, z64_offset, "the ZIP64 end of central directory"))
            if sig != b"PK\x06\x06":
                raise CheckpointError(f"{path}: no ZIP64 end of central directory record at offset {z64_offset}")
            limit = z64_offset
        elif _U32_MAX in (cd_size, cd_offset) or count == _U16_MAX:
            raise CheckpointError(f"{path}: zip directory needs ZIP64 records but has no ZIP64 locator")
    if disk or cd_disk:
        raise CheckpointError(f"{path}: multi-volume zip archives are not supported")
    if cd_size > MAX_DIRECTORY_BYTES or cd_offset + cd_size > limit:
        raise CheckpointError(
            f"{path}: central directory [{cd_offset}, {cd_offset + cd_size}) does not fit before offset {limit}")
    return count, cd_offset, cd_size, limit


def _zip64_extra(path: str, name: str, extra: bytes, wanted: list[bool]) -> list[int]:
    """Values of the ZIP64 extra field (id 1) for the 32-bit fields that were 0xFFFFFFFF."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        if tag == 1:
            count = sum(wanted)
            if length < 8 * count or pos + 4 + 8 * count > len(extra):
                break
            return list(struct.unpack_from(f"<{count}Q", extra, pos + 4))
        pos += 4 + length
    raise CheckpointError(f"{path}: entry {name!r}: sizes need a ZIP64 extra field and it is missing or short")


def read_zip_directory(fd: int, path: str, file_size: int) -> tuple[dict[str, ZipEntry], int]:
    """Parse the central directory: (entries by name, offset where the directory starts).

    Every entry must be STORED and unencrypted, and names must be unique.
    """
    count, cd_offset, cd_size, _ = _directory_bounds(fd, path, file_size)
    directory = _pread(fd, path, cd_size, cd_offset, "the central directory")
    entries: dict[str, ZipEntry] = {}
    pos = 0
    for index in range(count):
        if pos + _CENTRAL.size > cd_size:
            raise CheckpointError(f"{path}: central directory ends after {index} of {count} entries")
        (sig, _, _, flags, method, _, _, _, csize, size, name_len, extra_len, comment_len, disk, _, attributes,
         lho) = _CENTRAL.unpack_from(directory, pos)
        if sig != b"PK\x01\x02":
            raise CheckpointError(f"{path}: central directory entry {index} has a bad signature")
        raw_name = directory[pos + 46:pos + 46 + name_len]
        extra = directory[pos + 46 + name_len:pos + 46 + name_len + extra_len]
        pos += _CENTRAL.size + name_len + extra_len + comment_len
        if pos > cd_size:
            raise CheckpointError(f"{path}: central directory entry {index} runs past the directory")
        name = raw_name.decode("utf-8" if flags & 0x800 else "cp437", errors="replace")
        wanted = [size == _U32_MAX, csize == _U32_MAX, lho == _U32_MAX]
        if any(wanted):
            values = iter(_zip64_extra(path, name, extra, wanted))
            size, csize, lho = (next(values) if w else v for w, v in zip(wanted, (size, csize, lho)))
        if flags & 1:
            raise CheckpointError(f"{path}: entry {name!r} is encrypted")
        if attributes & 0x10 or name.endswith("/"):
            # torch's reader (miniz) extracts a directory entry as nothing: its tensors would load as zeros
            raise CheckpointError(f"{path}: entry {name!r} is marked as a directory (external attributes "
                                  f"{attributes:#x}); torch.save never writes one")
        if disk:
            raise CheckpointError(f"{path}: entry {name!r} starts on disk {disk}; multi-volume zip archives are "
                                  f"not supported")
        if method != 0:
            raise CheckpointError(
                f"{path}: entry {name!r} is compressed (method {method}); torch.save stores every entry "
                f"uncompressed, so this file was re-zipped: re-save it with torch.save")
        if csize != size:
            raise CheckpointError(f"{path}: entry {name!r} is stored but its sizes differ ({csize} != {size})")
        if name in entries:
            raise CheckpointError(f"{path}: entry {name!r} appears twice in the zip directory")
        entries[name] = ZipEntry(name, raw_name, size, lho)
    return entries, cd_offset


def payload_offset(fd: int, path: str, entry: ZipEntry, end_limit: int) -> int:
    """Absolute offset of an entry's bytes, from its local header; checked to end by ``end_limit``."""
    n = _LOCAL.size + len(entry.raw_name)
    header = _pread(fd, path, n, entry.local_header_offset, f"local header of {entry.name!r}")
    sig, _, _, method, _, _, _, _, _, name_len, extra_len = _LOCAL.unpack_from(header)
    if sig != b"PK\x03\x04" or method != 0 or header[_LOCAL.size:] != entry.raw_name:
        raise CheckpointError(
            f"{path}: local header of {entry.name!r} at offset {entry.local_header_offset} "
            f"does not match the central directory")
    start = entry.local_header_offset + _LOCAL.size + name_len + extra_len
    if start + entry.size > end_limit:
        raise CheckpointError(
            f"{path}: entry {entry.name!r} bytes [{start}, {start + entry.size}) run past offset {end_limit} "
            f"(file truncated or damaged)")
    return start


def _archive_prefix(path: str, entries: dict[str, ZipEntry]) -> str:
    found = [n[:-len("data.pkl")] for n in entries if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(found) != 1:
        raise CheckpointError(f"{path}: expected one '<archive>/data.pkl' entry, found {len(found)}; "
                              f"is this a torch.save checkpoint?")
    return found[0]


def _select_state_dict(path: str, tree: Any, key: str | None) -> tuple[dict, str | None]:
    """The dict of tensors to load and the top-level key it came from (None: the top level)."""
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path}: data.pkl holds {describe(tree, 40)}, not a dict of tensors")
    available = ", ".join(describe(k, 40) for k in list(tree)[:20]) + (", ..." if len(tree) > 20 else "")
    if key is not None:
        node: Any = tree.get(key)
        top = key
        if key not in tree:  # "a.b": a path through nested dicts
            node, top = tree, key.split(".")[0]
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            what = "is missing" if node is None else f"holds {describe(node, 40)}, not a dict"
            raise CheckpointError(f"{path}: key {key!r} {what}; top-level keys: {available}")
        return node, top
    if any(isinstance(v, TensorView) for v in tree.values()):
        return tree, None
    for candidate in STATE_DICT_KEYS:
        if isinstance(tree.get(candidate), dict):
            return tree[candidate], candidate
    raise CheckpointError(f"{path}: no state dict found (no tensors at the top level and none of "
                          f"{', '.join(STATE_DICT_KEYS)}); top-level keys: {available}; pass state_dict_key=")


def _flatten(node: dict, prefix: str, depth: int, tensors: dict[str, TensorView], extras: dict[str, str],
             path: str) -> None:
    for k, value in node.items():
        if isinstance(k, int) and k.bit_length() > 64:  # str() would be refused past 4,300 digits
            raise CheckpointError(f"{path}: a key under {prefix or 'the top level'!r} is a {k.bit_length()}-bit "
                                  f"integer; tensor names must be text", path=path)
        name = f"{prefix}{k}"
        if isinstance(value, TensorView):
            if name in tensors:
                raise CheckpointError(f"{path}: tensor name {name!r} appears twice after flattening")
            tensors[name] = value
        elif isinstance(value, dict) and value and depth < MAX_NESTING:
            _flatten(value, f"{name}.", depth + 1, tensors, extras, path)
        else:
            extras[name] = describe(value)


def _record(path: str, name: str, view: TensorView, payload: int) -> TensorRecord:
    """The record of one view, after checking it lies inside its storage's declared numel."""
    size, stride, offset = view.size, view.stride, view.storage_offset
    ndim = len(size)
    # min/max over the tuples run in C: generator checks per dimension were a third of a
    # many-tensor read.  The messages below are built only on failure.
    if ndim != len(stride) or offset < 0 or offset >= 1 << 63 or (ndim and (
            min(size) < 0 or min(stride) < 0 or max(stride) >= 1 << 63 or max(size) >= 1 << 63)):
        _refuse_view(path, name, view)
    itemsize = view.dtype.itemsize
    numel = math.prod(size)
    if ndim > 1 or numel * itemsize >= 1 << 63:
        check_shape(size, itemsize, f"{path}: tensor {name!r}", path, name)
    capacity = view.storage.numel * view.storage.dtype.itemsize // itemsize
    if numel == 0:
        byte_offset = payload  # nothing is read; keep the offset inside the file for range checks
    else:
        needed = offset + 1 + (sum(map(operator.mul, map(operator.sub, size, _ONES), stride)) if ndim else 0)
        if needed > capacity:
            raise CheckpointError(
                f"{path}: tensor {name!r}: storage {view.storage.key!r} holds {capacity} elements but the view "
                f"needs {needed}", path=path, tensor=name)
        byte_offset = payload + offset * itemsize
    contiguous = numel == 0 or ndim <= 1 and (not ndim or stride[0] == 1 or size[0] == 1) or \
        all(s == w or n == 1 for n, s, w in zip(size, stride, contiguous_strides(size)))
    return TensorRecord(name=name, dtype=view.dtype, shape=size, file=path, byte_offset=byte_offset,
                        strides=None if contiguous else stride, storage=view.storage.key)


_ONES = itertools.repeat(1)   # map() stops at the shortest iterable


def _refuse_view(path: str, name: str, view: TensorView) -> None:
    where = f"{path}: tensor {name!r}"
    size, stride, offset = view.size, view.stride, view.storage_offset
    if len(size) != len(stride):
        raise CheckpointError(f"{where}: size {describe(list(size))} and stride {describe(list(stride))} differ in length",
                              path=path, tensor=name)
    if any(n < 0 for n in size) or any(s < 0 for s in stride) or offset < 0:
        raise CheckpointError(f"{where}: negative size, stride or storage offset "
                              f"(size {describe(list(size))}, stride {describe(list(stride))}, offset {describe(offset)})",
                              path=path, tensor=name)
    check_shape(size, view.dtype.itemsize, where, path, name)
    raise CheckpointError(f"{where}: stride {describe(list(stride))} or storage offset {describe(offset)} is beyond "
                          f"64 bits", path=path, tensor=name)


def _storage_ranges(fd: int, path: str, entries: dict[str, ZipEntry], prefix: str,
                    tensors: dict[str, TensorView], end_limit: int) -> dict[str, int]:
    """Payload offset of each storage used; each data/<key> holds at least the declared bytes."""
    ranges: dict[str, tuple[int, int]] = {}
    declared_as: dict[str, tuple[str, StorageRef]] = {}
    for name, view in tensors.items():
        ref = view.storage
        first_name, first = declared_as.setdefault(ref.key, (name, ref))
        if (first.dtype, first.numel) != (ref.dtype, ref.numel):
            # torch.load types a storage by its first reference and would rebuild this tensor in that
            # dtype; torch.save never writes this ("Cannot save multiple tensors or storages that view
            # the same data as different types"): refuse rather than reinterpret the bytes
            raise CheckpointError(
                f"{path}: tensor {name!r}: storage {ref.key!r} is declared as {ref.numel} x {ref.dtype.name} "
                f"here and as {first.numel} x {first.dtype.name} by tensor {first_name!r}; torch.save never "
                f"writes one storage with two types", path=path, tensor=name)
        entry = entries.get(f"{prefix}data/{ref.key}")
        if entry is None:
            raise CheckpointError(f"{path}: tensor {name!r}: storage {ref.key!r} has no 'data/{ref.key}' entry",
                                  path=path, tensor=name)
        declared = ref.numel * ref.dtype.itemsize
        if entry.size < declared:
            raise CheckpointError(f"{path}: tensor {name!r}: storage {ref.key!r} declares {declared} bytes "
                                  f"but data/{ref.key} holds {entry.size}", path=path, tensor=name)
        if ref.key not in ranges:
            ranges[ref.key] = (payload_offset(fd, path, entry, end_limit), entry.size)
    spans = sorted((start, start + size, key) for key, (start, size) in ranges.items())
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:  # a forged directory could alias two storages
            raise CheckpointError(f"{path}: storages {first!r} and {second!r} overlap in the file")
    return {key: start for key, (start, _) in ranges.items()}


def _check_byteorder(fd: int, path: str, entries: dict[str, ZipEntry], prefix: str, end_limit: int) -> None:
    entry = entries.get(f"{prefix}byteorder")
    if entry is None:
        return  # torch < 1.10 wrote no byteorder record; those files are little-endian
    if entry.size > 16:
        raise CheckpointError(f"{path}: byteorder record is {entry.size} bytes")
    order = _pread(fd, path, entry.size, payload_offset(fd, path, entry, end_limit), "byteorder").strip()
    if order == b"big":
        raise CheckpointError(f"{path}: big-endian checkpoints are not supported; re-save it on a "
                              f"little-endian machine")
    if order != b"little":
        raise CheckpointError(f"{path}: byteorder record is {order!r}, expected b'little'")


def read_torchzip(path: str, key: str | None = None) -> Checkpoint:
    """Read and validate a ``torch.save`` zip checkpoint without loading any tensor data.

    ``key`` selects the state dict (a top-level key, or a dotted path through
    nested dicts); by default the top level is used if it holds tensors, else the
    first of :data:`STATE_DICT_KEYS` present.  Non-tensor entries, and the siblings
    of the state dict, are listed in ``Checkpoint.extras``.  Views keep their element
    strides (``None`` when the view is C-contiguous, size-1 dims ignored) and
    ``storage`` is the ``data/<key>`` they read, shared by tied weights::

        ckpt = read_torchzip("model.ckpt")
        [(r.name, r.dtype, r.shape) for r in ckpt.records]
        ckpt.extras  # e.g. {"epoch": "3"}
    """
    with gc_paused():   # tens of objects per tensor and no cycles (records.gc_paused)
        return _read_torchzip(os.path.abspath(os.fspath(path)), key)


def _read_torchzip(path: str, key: str | None) -> Checkpoint:
    try:
        fd = fileio.open_read(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open: {e.strerror or e}", path=path) from e
    try:
        st = os.fstat(fd)
        path = CheckpointFile(path, st)   # the records' file: executors check they read this very file
        file_size = st.st_size
        if file_size < _EOCD.size:
            if file_size == 0:
                raise CheckpointError(f"{path}: file is empty, not a checkpoint", path=path)
            raise _not_zip(path, fileio.pread(fd, 16, 0))
        entries, data_end = read_zip_directory(fd, path, file_size)
        prefix = _archive_prefix(path, entries)
        _check_byteorder(fd, path, entries, prefix, data_end)
        pkl = entries[f"{prefix}data.pkl"]
        if pkl.size > MAX_PICKLE_BYTES:
            raise CheckpointError(f"{path}: data.pkl is {pkl.size} bytes, over the {MAX_PICKLE_BYTES}-byte limit")
        pkl_bytes = _pread(fd, path, pkl.size, payload_offset(fd, path, pkl, data_end), "data.pkl")
        tree = walk_pickle(pkl_bytes, where=f"{path}: data.pkl")
        state_dict, top_key = _select_state_dict(path, tree, key)
        tensors: dict[str, TensorView] = {}
        extras: dict[str, str] = {}
        _flatten(state_dict, "", 0, tensors, extras, path)
        offsets = _storage_ranges(fd, path, entries, prefix, tensors, data_end)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}", path=path) from e
    finally:
        fileio.close(fd)
    if top_key is not None:  # siblings such as "epoch"; a clash with a state-dict entry is renamed
        for k, value in tree.items():
            if k != top_key:
                extras[f"{k}" if f"{k}" not in extras else f"[top level] {k}"] = describe(value)
    records = [_record(path, name, view, offsets[view.storage.key]) for name, view in tensors.items()]
    records.sort(key=lambda r: (r.byte_offset, r.name))
    metadata = {"state_dict_key": top_key} if top_key is not None else {}
    return Checkpoint(format="torchzip", files=[path], records=records, metadata=metadata, extras=extras)
