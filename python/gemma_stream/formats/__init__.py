"""Format readers: checkpoint path -> validated :class:`Checkpoint`.

``open_checkpoint`` is the only entry point the rest of the package uses.  It
accepts a file, an ``*.index.json`` or a directory holding one of them.
"""

from __future__ import annotations

import glob
import os

from ..errors import CheckpointError
from .index import read_index
from .records import Checkpoint, TensorRecord, contiguous_strides
from .safetensors import read_safetensors

__all__ = ["open_checkpoint", "resolve_path", "Checkpoint", "TensorRecord", "contiguous_strides"]

#: file names looked for in a directory, best first
_DIRECTORY_CANDIDATES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
    "model.ckpt",
)
_TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def resolve_path(path: str | os.PathLike) -> str:
    """The checkpoint file or index a path stands for.

    Symbolic links are followed wherever they point, here and for the shards an
    index names (the Hugging Face cache links every file of a snapshot into
    ``blobs/``); what an index may *name* is confined to its directory (see
    :func:`.index.read_index`).
    """
    path = os.fspath(path)
    if "\0" in path:
        raise CheckpointError(f"{path!r}: a path cannot contain a NUL character", path=path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if not os.path.isdir(path):
        return os.path.abspath(path)
    for name in _DIRECTORY_CANDIDATES:
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    for pattern in ("*.safetensors.index.json", "*.bin.index.json", "*.safetensors", "*.ckpt", "*.pt",
                    "*.pth", "*.bin"):
        found = sorted(glob.glob(os.path.join(path, pattern)))
        if len(found) == 1:
            return os.path.abspath(found[0])
        if len(found) > 1:
            raise CheckpointError(
                f"{path}: {len(found)} files match {pattern} and no index names them; pass one file")
    raise CheckpointError(f"{path}: no checkpoint found (looked for .safetensors, .index.json, .bin, .ckpt, .pt)")


def _read_torchzip(path: str, key: str | None) -> Checkpoint:
    from .torchzip import read_torchzip  # the zip reader is only imported when needed
    return read_torchzip(path, key=key)


def _read_file(path: str, key: str | None) -> Checkpoint:
    try:
        if path.endswith(".safetensors"):
            return read_safetensors(path)
        if path.endswith(_TORCH_SUFFIXES):
            return _read_torchzip(path, key)
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read: {e.strerror or e}", path=path) from e
        if magic[:2] == b"PK":
            return _read_torchzip(path, key)
        return read_safetensors(path)
    except CheckpointError as e:
        if e.path is None:  # every reader error names its file in the text; the attribute too
            e.path = path
        raise


def open_checkpoint(path: str | os.PathLike, *, key: str | None = None) -> Checkpoint:
    """Read and validate the checkpoint at ``path`` (file, index or directory).

    ``key`` selects the state dict inside a torch zip checkpoint (default: found
    automatically); it is ignored for safetensors.
    """
    resolved = resolve_path(path)
    if resolved.endswith(".index.json"):
        return read_index(resolved, lambda shard: _read_file(shard, key))
    return _read_file(resolved, key)
