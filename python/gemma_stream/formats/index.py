"""Sharded checkpoints: ``*.index.json`` files that map tensor names to shard files.

Both ``model.safetensors.index.json`` and ``pytorch_model.bin.index.json`` share
the layout ``{"metadata": {...}, "weight_map": {name: shard}}``.
"""

from __future__ import annotations

import json
import os
from typing import Callable

from ..errors import CheckpointError
from .records import Checkpoint

__all__ = ["read_index"]


def _shard_path(index_path: str, directory: str, shard: object, name: str) -> str:
    if not isinstance(shard, str) or not shard:
        raise CheckpointError(f"{index_path}: tensor {name!r}: shard {shard!r} is not a file name")
    full = os.path.realpath(os.path.join(directory, shard))
    root = os.path.realpath(directory)
    if os.path.isabs(shard) or os.path.commonpath([full, root]) != root:
        raise CheckpointError(f"{index_path}: tensor {name!r}: shard {shard!r} escapes the directory {root}")
    if not os.path.isfile(full):
        raise CheckpointError(f"{index_path}: tensor {name!r}: shard file {shard!r} does not exist")
    return full


def read_index(index_path: str, read_shard: Callable[[str], Checkpoint]) -> Checkpoint:
    """Read an index and every shard it names with ``read_shard``."""
    index_path = os.path.abspath(index_path)
    directory = os.path.dirname(index_path)
    try:
        with open(index_path, "rb") as f:
            index = json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise CheckpointError(f"{index_path}: cannot read: {e.strerror or e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index_path}: not valid UTF-8 JSON: {e}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: no 'weight_map' object")
    wanted: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        wanted.setdefault(_shard_path(index_path, directory, shard, name), set()).add(name)
    files, records, metadata, extras = [], [], {}, {}
    seen: dict[str, str] = {}
    for shard_path in sorted(wanted):
        shard = read_shard(shard_path)
        files.append(shard_path)
        metadata.update(shard.metadata)
        extras.update(shard.extras)
        present = {r.name for r in shard.records}
        absent = sorted(wanted[shard_path] - present)
        if absent:
            raise CheckpointError(
                f"{shard_path}: tensor {absent[0]!r} is listed in {os.path.basename(index_path)} "
                f"but not stored in this shard ({len(absent)} missing)")
        for record in shard.records:
            if record.name not in wanted[shard_path]:
                continue  # stored but not indexed: the index decides, as in transformers
            if record.name in seen:
                raise CheckpointError(
                    f"{shard_path}: tensor {record.name!r} is also stored in {seen[record.name]}")
            seen[record.name] = shard_path
            records.append(record)
    index_meta = index.get("metadata")
    if isinstance(index_meta, dict):
        metadata.update({k: str(v) for k, v in index_meta.items()})
    fmt = _format_of(files)
    return Checkpoint(format=fmt, files=files, records=records, metadata=metadata, extras=extras)


def _format_of(files: list[str]) -> str:
    return "safetensors" if all(f.endswith(".safetensors") for f in files) else "torchzip"
