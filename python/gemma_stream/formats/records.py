"""What every format reader produces: validated tensor records.

A reader checks every byte range against its file before it returns; the
planner and the executors trust these records (the C++ core re-checks ranges
against the file size as a second line of defence).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..dtypes import DType
from ..errors import CheckpointError

__all__ = ["TensorRecord", "Checkpoint", "CheckpointFile", "contiguous_strides", "check_shape", "check_open_file",
           "open_validated", "gc_paused"]

#: torch sizes and strides are int64
_INT64_LIMIT = 1 << 63


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a reader builds its records.

    A header of thousands of tensors makes tens of thousands of objects and no cycles, so
    every collection the allocations trigger only rescans the heap (with torch imported, a
    large one): reading an 8,000-tensor safetensors header took 125 ms of CPU with the
    collector and 39 ms without.  Left as found when the caller had paused it already::

        with gc_paused():
            header = json.loads(raw)
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def check_shape(shape: tuple[int, ...], itemsize: int, where: str, path: str | None = None,
                tensor: str | None = None) -> None:
    """Refuse sizes torch cannot represent: a dimension, or a contiguous stride in bytes, past int64.

    A zero-sized tensor may still carry huge dimensions (``[0, 2**62, 2**62]``);
    ``torch.empty`` then fails computing strides, so those are refused here
    rather than leaking torch's ``RuntimeError`` later.
    """
    extent = itemsize
    for size in shape:
        extent *= max(size, 1)
        if size >= _INT64_LIMIT or extent >= _INT64_LIMIT:
            raise CheckpointError(f"{where}: shape {list(shape)} has a size or stride beyond 64 bits", path=path,
                                  tensor=tensor)


class CheckpointFile(str):
    """A checkpoint file's path that remembers which file was validated under it.

    ``identity`` is ``(st_dev, st_ino, st_size, st_mtime_ns)`` of the open file
    whose header the reader parsed.  Executors and ``mode="mmap"`` compare it with
    the file they open, so bytes never come from a file renamed over the path (or
    rewritten) after validation: a change raises :class:`CheckpointError`.

    >>> f = CheckpointFile("model.safetensors", os.stat("model.safetensors"))
    >>> f.identity[2]   # the size
    """

    identity: tuple[int, int, int, int]

    def __new__(cls, path: str, st: os.stat_result) -> "CheckpointFile":
        self = super().__new__(cls, path)
        self.identity = identity_of(st)
        return self

    def __reduce__(self):
        return _rebuild_file, (str(self), self.identity)

    def check(self, st: os.stat_result) -> None:
        """Raise :class:`CheckpointError` unless ``st`` describes the validated file."""
        found = identity_of(st)
        if found != self.identity:
            what = ", ".join(f"{name} {a} -> {b}" for name, a, b in
                             zip(("device", "inode", "size", "mtime_ns"), self.identity, found) if a != b)
            raise CheckpointError(f"{self}: the file changed after its header was read ({what}); "
                                  f"it was replaced or rewritten during the load: load it again",
                                  path=str(self))


def identity_of(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _rebuild_file(path: str, identity: tuple[int, int, int, int]) -> CheckpointFile:
    self = str.__new__(CheckpointFile, path)
    self.identity = identity
    return self


def check_open_file(path: str, fd: int) -> None:
    """Identity check of a descriptor just opened on ``path`` (a no-op for a plain ``str`` path)."""
    if isinstance(path, CheckpointFile):
        path.check(os.fstat(fd))


def open_validated(path: str) -> int:
    """A read-only descriptor on ``path``, checked to be the validated file (same words as the C++ engine).

    Every failure is a :class:`CheckpointError` naming the file; the caller closes the descriptor
    with ``fileio.close``.
    """
    from .. import fileio
    try:
        fd = fileio.open_read(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open: {e.strerror or e}", path=path) from e
    try:
        check_open_file(path, fd)
    except BaseException:
        fileio.close(fd)
        raise
    return fd


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


@dataclass(frozen=True)
class TensorRecord:
    """One tensor of a checkpoint: where its bytes are and how to read them.

    ``byte_offset`` is the absolute file offset of element ``[0, ..., 0]``.
    ``strides`` are in elements; ``None`` means C-contiguous.  ``storage``
    identifies the underlying storage when several records may share one
    (torch zip views); it is ``None`` for safetensors.
    """

    name: str
    dtype: DType
    shape: tuple[int, ...]
    file: str
    byte_offset: int
    strides: tuple[int, ...] | None = None
    storage: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def is_contiguous(self) -> bool:
        if self.strides is None:
            return True
        return all(
            stride == want or size == 1
            for size, stride, want in zip(self.shape, self.strides, contiguous_strides(self.shape))
        )


@dataclass
class Checkpoint:
    """A checkpoint as the readers see it: files, records and side information."""

    format: str                                   # "safetensors" | "torchzip"
    files: list[str]
    records: list[TensorRecord]
    metadata: dict[str, str] = field(default_factory=dict)
    #: non-tensor entries of a torch zip (name -> short repr), listed by inspect
    extras: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        """How messages name the checkpoint: its file, or how many shards."""
        return self.files[0] if len(self.files) == 1 else f"{len(self.files)} shards"

    def by_name(self) -> dict[str, TensorRecord]:
        return {r.name: r for r in self.records}
