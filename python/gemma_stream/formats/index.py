"""Sharded checkpoints: ``*.index.json`` files that map tensor names to shard files.

Both ``model.safetensors.index.json`` and ``pytorch_model.bin.index.json`` share
the layout ``{"metadata": {...}, "weight_map": {name: shard}}``.
"""

from __future__ import annotations

import os
from typing import Callable

from ..errors import CheckpointError
from .records import Checkpoint
from .safetensors import check_text, parse_json
from .torch_globals import describe

#: an index of 100k tensors is ~10 MB; the same bound as a safetensors header
MAX_INDEX_BYTES = 100_000_000

__all__ = ["read_index"]


def _shard_path(index_path: str, directory: str, shard: object, name: str) -> str:
    """The shard's path: a name inside the index's directory, symbolic links followed.

    The rule is lexical, as for the checkpoint path itself: an index may not name
    a file outside its directory (absolute, ``..``, NUL), but a file in the
    directory may be a link to anywhere, which is how the Hugging Face cache
    stores every snapshot (``snapshots/<rev>/x.safetensors -> ../../blobs/<sha>``).
    """
    def fail(message: str) -> CheckpointError:
        return CheckpointError(f"{index_path}: tensor {name!r}: {message}", path=index_path, tensor=name)

    if not isinstance(shard, str) or not shard or "\0" in shard:
        raise fail(f"shard {describe(shard, 80)} is not a file name")
    check_text(index_path, shard, "shard name")
    full = os.path.normpath(os.path.join(directory, shard))
    if os.path.isabs(shard) or os.path.commonpath([full, directory]) != directory or full == directory:
        raise fail(f"shard {shard!r} escapes the directory {directory}")
    if not os.path.isfile(full):
        raise fail(f"shard file {shard!r} does not exist")
    return full


def read_index(index_path: str, read_shard: Callable[[str], Checkpoint]) -> Checkpoint:
    """Read an index and every shard it names with ``read_shard``."""
    index_path = os.path.abspath(index_path)
    directory = os.path.normpath(os.path.dirname(index_path))
    try:
        with open(index_path, "rb") as f:
            raw = f.read(MAX_INDEX_BYTES + 1)
    except OSError as e:
        raise CheckpointError(f"{index_path}: cannot read: {e.strerror or e}", path=index_path) from e
    if len(raw) > MAX_INDEX_BYTES:
        raise CheckpointError(f"{index_path}: index is larger than {MAX_INDEX_BYTES} bytes", path=index_path)
    index = parse_json(raw, index_path, "index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: no 'weight_map' object", path=index_path)
    wanted: dict[str, set[str]] = {}
    # each shard name is resolved once (a stat and path checks): per tensor it was 60% of reading
    # a 1,000-tensor index; the first tensor naming a bad shard is still the one the error names
    resolved: dict[str, str] = {}
    for name, shard in weight_map.items():
        check_text(index_path, name, "tensor name")
        full = resolved.get(shard) if type(shard) is str else None
        if full is None:
            full = _shard_path(index_path, directory, shard, name)
            resolved[shard] = full
        wanted.setdefault(full, set()).add(name)
    files, records, metadata, extras = [], [], {}, {}
    seen: dict[str, str] = {}
    for shard_path in sorted(wanted):
        shard = read_shard(shard_path)
        files.extend(shard.files)   # CheckpointFile: the identity each executor checks
        metadata.update(shard.metadata)
        extras.update(shard.extras)
        present = {r.name for r in shard.records}
        absent = sorted(wanted[shard_path] - present)
        if absent:
            raise CheckpointError(
                f"{shard_path}: tensor {absent[0]!r} is listed in {os.path.basename(index_path)} "
                f"but not stored in this shard ({len(absent)} missing)", path=shard_path, tensor=absent[0])
        for record in shard.records:
            if record.name not in wanted[shard_path]:
                continue  # stored but not indexed: the index decides, as in transformers
            if record.name in seen:
                raise CheckpointError(
                    f"{shard_path}: tensor {record.name!r} is also stored in {seen[record.name]}",
                    path=shard_path, tensor=record.name)
            seen[record.name] = shard_path
            records.append(record)
    index_meta = index.get("metadata")
    if isinstance(index_meta, dict):
        metadata.update({check_text(index_path, k, "metadata key"):
                         check_text(index_path, v, "metadata value") if isinstance(v, str) else describe(v, 200)
                         for k, v in index_meta.items()})
    fmt = _format_of(files)
    return Checkpoint(format=fmt, files=files, records=records, metadata=metadata, extras=extras)


def _format_of(files: list[str]) -> str:
    return "safetensors" if all(f.endswith(".safetensors") for f in files) else "torchzip"
