"""verify's checks of the files themselves: every byte range inside its file, and SHA-256 per file."""

from __future__ import annotations

import hashlib
import os
from typing import Callable

from ..errors import CheckpointError
from ..formats import Checkpoint, TensorRecord, resolve_path
from ..formats.records import CheckpointFile
from ..layout import span_elements

__all__ = ["record_extent", "check_ranges", "checkpoint_files", "sha256_file"]

HASH_CHUNK_BYTES = 8 << 20

OnBytes = Callable[[int], None]


def record_extent(record: TensorRecord) -> int:
    """Bytes from ``byte_offset`` to the end of the last element the record reads."""
    return span_elements(record.shape, record.strides) * record.dtype.itemsize


def check_ranges(ckpt: Checkpoint) -> None:
    """Re-check every tensor's byte range against its file's size, as the executors do before copying.

    The readers already validated the headers; this is the loader's second line of
    defence, run up front so ``verify`` reports what a load would trip over.
    """
    sizes = {}
    for path in ckpt.files:
        try:
            st = os.stat(path)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot stat: {e.strerror or e}", path=path) from e
        if isinstance(path, CheckpointFile):
            path.check(st)   # the file whose header was read, not one renamed over it since
        sizes[path] = st.st_size
    for r in ckpt.records:
        size = sizes.get(r.file)
        if size is None:
            raise CheckpointError(f"{r.file}: tensor {r.name!r} lives in a file the checkpoint does not list",
                                  path=r.file, tensor=r.name)
        end = r.byte_offset + record_extent(r)
        if r.byte_offset < 0 or end > size:
            raise CheckpointError(f"{r.file}: tensor {r.name!r}: bytes [{r.byte_offset}, {end}) lie outside "
                                  f"the file ({size} bytes)", path=r.file, tensor=r.name)


def checkpoint_files(path: str | os.PathLike, ckpt: Checkpoint) -> list[str]:
    """Every file the checkpoint at ``path`` consists of: its index (if any), then the data files."""
    resolved = resolve_path(path)
    return ([resolved] if resolved.endswith(".index.json") else []) + list(ckpt.files)


def sha256_file(path: str, *, on_bytes: OnBytes | None = None, chunk_bytes: int = HASH_CHUNK_BYTES) -> str:
    """SHA-256 of a file read sequentially in ``chunk_bytes`` pieces into one reused buffer."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk_bytes)
    view = memoryview(buffer)
    try:
        with open(path, "rb", buffering=0) as f:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while n := f.readinto(buffer):
                digest.update(view[:n])  # hashlib releases the GIL on large buffers
                if on_bytes is not None:
                    on_bytes(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}", path=path) from e
    return digest.hexdigest()
