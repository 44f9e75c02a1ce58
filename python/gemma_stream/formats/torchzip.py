"""torch zip checkpoints (``torch.save`` since 1.6): ZIP directory + safe pickle walk.

The archive's directory and local headers are read by :mod:`.zip_archive`
(``struct`` and ``fileio.pread`` only, nothing decompressed); nothing in
``data.pkl`` is executed (see :mod:`.pickle_walker`).  Every tensor view is checked against its
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
from typing import Any

from .. import fileio, pagecache
from ..config import config
from ..errors import CheckpointError
from .pickle_walker import StorageRef, TensorView, describe, walk_pickle
from .records import Checkpoint, CheckpointFile, TensorRecord, check_shape, contiguous_strides, gc_paused
from .zip_archive import (EOCD_BYTES, LocalHeaderReads, ZipEntry, not_zip, payload_offset, payload_offsets,
                          read_exact, read_zip_directory)

__all__ = ["read_torchzip", "ZipEntry", "read_zip_directory", "payload_offset", "STATE_DICT_KEYS"]

#: where the state dict is looked for when the top level holds no tensors, in order
STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model")
MAX_PICKLE_BYTES = 1 << 28        # data.pkl of a 2B model is ~30 KB; 256 MiB is generous
MAX_NESTING = 8                   # dict levels flattened into "a.b.c" names

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


def _shape_facts(path: str, name: str, view: TensorView) -> tuple[int, int, bool]:
    """(numel, elements the view spans from its offset, C-contiguous) of a view's size and stride,
    after refusing sizes and strides torch cannot hold."""
    size, stride = view.size, view.stride
    ndim = len(size)
    # min/max over the tuples run in C: generator checks per dimension were a third of a
    # many-tensor read.  The messages below are built only on failure.
    if ndim != len(stride) or (ndim and (
            min(size) < 0 or min(stride) < 0 or max(stride) >= 1 << 63 or max(size) >= 1 << 63)):
        _refuse_view(path, name, view)
    itemsize = view.dtype.itemsize
    numel = math.prod(size)
    if ndim > 1 or numel * itemsize >= 1 << 63:
        check_shape(size, itemsize, f"{path}: tensor {name!r}", path, name)
    span = 1 + (sum(map(operator.mul, map(operator.sub, size, _ONES), stride)) if ndim else 0)
    contiguous = numel == 0 or ndim <= 1 and (not ndim or stride[0] == 1 or size[0] == 1) or \
        all(s == w or n == 1 for n, s, w in zip(size, stride, contiguous_strides(size)))
    return numel, span, contiguous


def _records(path: str, tensors: dict[str, TensorView], offsets: dict[str, int]) -> list[TensorRecord]:
    """The record of each view, after checking it lies inside its storage's declared numel.

    :func:`_shape_facts` is cached by (size, stride, itemsize) across the checkpoint's views: most
    tensors share a handful of shapes, and the checks were a fifth of reading a zip.  One loop with
    its lookups in locals: a call per tensor was a sixth of reading a many-tensor zip.
    """
    facts_of: dict[tuple, tuple[int, int, bool]] = {}
    records = []
    append, get_facts = records.append, facts_of.get
    for name, view in tensors.items():
        offset = view.storage_offset
        if offset < 0 or offset >= 1 << 63:
            _refuse_view(path, name, view)
        dtype, size, stride, storage = view.dtype, view.size, view.stride, view.storage
        itemsize = dtype.itemsize
        key = (size, stride, itemsize)
        facts = get_facts(key)
        if facts is None:
            facts = facts_of[key] = _shape_facts(path, name, view)
        numel, span, contiguous = facts
        payload = offsets[storage.key]
        if numel == 0:
            byte_offset = payload  # nothing is read; keep the offset inside the file for range checks
        else:
            capacity = storage.numel * storage.dtype.itemsize // itemsize
            if offset + span > capacity:
                raise CheckpointError(
                    f"{path}: tensor {name!r}: storage {storage.key!r} holds {capacity} elements but the view "
                    f"needs {offset + span}", path=path, tensor=name)
            byte_offset = payload + offset * itemsize
        append(TensorRecord(name, dtype, size, path, byte_offset, None if contiguous else stride, storage.key))
    return records


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
                    tensors: dict[str, TensorView], end_limit: int, threads: int, cold: bool,
                    reads: LocalHeaderReads | None) -> dict[str, int]:
    """Payload offset of each storage used; each data/<key> holds at least the declared bytes.
    The local headers are read on ``threads`` threads, or come from ``reads``."""
    declared_as: dict[str, tuple[str, StorageRef]] = {}
    used: dict[str, ZipEntry] = {}
    data_prefix = f"{prefix}data/"
    for name, view in tensors.items():
        ref = view.storage
        key = ref.key
        first = declared_as.get(key)
        if first is not None:   # another view of a storage already placed: only its type must agree
            first_name, first_ref = first
            if first_ref is not ref and (first_ref.dtype, first_ref.numel) != (ref.dtype, ref.numel):
                # torch.load types a storage by its first reference and would rebuild this tensor in that
                # dtype; torch.save never writes this ("Cannot save multiple tensors or storages that view
                # the same data as different types"): refuse rather than reinterpret the bytes
                raise CheckpointError(
                    f"{path}: tensor {name!r}: storage {ref.key!r} is declared as {ref.numel} x {ref.dtype.name} "
                    f"here and as {first_ref.numel} x {first_ref.dtype.name} by tensor {first_name!r}; torch.save "
                    f"never writes one storage with two types", path=path, tensor=name)
            continue
        declared_as[key] = name, ref
        entry = entries.get(data_prefix + key)
        if entry is None:
            raise CheckpointError(f"{path}: tensor {name!r}: storage {ref.key!r} has no 'data/{ref.key}' entry",
                                  path=path, tensor=name)
        declared = ref.numel * ref.dtype.itemsize
        if entry.size < declared:
            raise CheckpointError(f"{path}: tensor {name!r}: storage {ref.key!r} declares {declared} bytes "
                                  f"but data/{ref.key} holds {entry.size}", path=path, tensor=name)
        used[key] = entry
    # one batch of local headers: the same checks, in the same order, as one payload_offset each
    starts = payload_offsets(fd, path, list(used.values()), end_limit, threads, cold=cold, reads=reads)
    spans = sorted((start, start + entry.size, key) for start, (key, entry) in zip(starts, used.items()))
    for (_, end, first_key), (start, _, second) in zip(spans, spans[1:]):
        if start < end:  # a forged directory could alias two storages
            raise CheckpointError(f"{path}: storages {first_key!r} and {second!r} overlap in the file")
    return dict(zip(used, starts))


def _data_entries(entries: dict[str, ZipEntry], prefix: str) -> list[ZipEntry]:
    data_prefix = f"{prefix}data/"
    return [e for name, e in entries.items() if name.startswith(data_prefix)]


def _is_cold(path: str, headers: int) -> bool:
    """Whether to ask for the local headers before reading them: many of them, and the file not
    cached (a sample of its pages; where that cannot be known, ask: the advice is a hint)."""
    return headers >= fileio.PARALLEL_READS and not pagecache.is_warm([path], samples=64)


def _check_byteorder(fd: int, path: str, entries: dict[str, ZipEntry], prefix: str, end_limit: int) -> None:
    entry = entries.get(f"{prefix}byteorder")
    if entry is None:
        return  # torch < 1.10 wrote no byteorder record; those files are little-endian
    if entry.size > 16:
        raise CheckpointError(f"{path}: byteorder record is {entry.size} bytes")
    order = read_exact(fd, path, entry.size, payload_offset(fd, path, entry, end_limit), "byteorder").strip()
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


_FILE_ORDER = operator.attrgetter("byte_offset", "name")   # views of one storage by name


def _read_torchzip(path: str, key: str | None) -> Checkpoint:
    try:
        fd = fileio.open_read(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open: {e.strerror or e}", path=path) from e
    try:
        st = os.fstat(fd)
        path = CheckpointFile(path, st)   # the records' file: executors check they read this very file
        file_size = st.st_size
        if file_size < EOCD_BYTES:
            if file_size == 0:
                raise CheckpointError(f"{path}: file is empty, not a checkpoint", path=path)
            raise not_zip(path, fileio.pread(fd, 16, 0))
        entries, data_end = read_zip_directory(fd, path, file_size)
        prefix = _archive_prefix(path, entries)
        storages = _data_entries(entries, prefix)
        threads = config().default_threads
        cold = _is_cold(path, len(storages))
        # every storage's local header, asked for now when the file is cold (the disk reads them while
        # the pickle is walked), read in one native call when they are wanted
        reads = LocalHeaderReads.start(path, path.identity, storages, threads, cold)
        _check_byteorder(fd, path, entries, prefix, data_end)
        pkl = entries[f"{prefix}data.pkl"]
        if pkl.size > MAX_PICKLE_BYTES:
            raise CheckpointError(f"{path}: data.pkl is {pkl.size} bytes, over the {MAX_PICKLE_BYTES}-byte limit")
        pkl_bytes = read_exact(fd, path, pkl.size, payload_offset(fd, path, pkl, data_end), "data.pkl")
        tree = walk_pickle(pkl_bytes, where=f"{path}: data.pkl")
        state_dict, top_key = _select_state_dict(path, tree, key)
        tensors: dict[str, TensorView] = {}
        extras: dict[str, str] = {}
        _flatten(state_dict, "", 0, tensors, extras, path)
        offsets = _storage_ranges(fd, path, entries, prefix, tensors, data_end, threads, cold, reads)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}", path=path) from e
    finally:
        fileio.close(fd)
    if top_key is not None:  # siblings such as "epoch"; a clash with a state-dict entry is renamed
        for k, value in tree.items():
            if k != top_key:
                extras[f"{k}" if f"{k}" not in extras else f"[top level] {k}"] = describe(value)
    records = _records(path, tensors, offsets)
    records.sort(key=_FILE_ORDER)
    metadata = {"state_dict_key": top_key} if top_key is not None else {}
    return Checkpoint(format="torchzip", files=[path], records=records, metadata=metadata, extras=extras)
