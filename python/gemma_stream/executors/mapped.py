"""Zero-copy views for ``mode="mmap"``: tensors that live in a private mapping of the file.

Each file is mapped once, copy-on-write (``MAP_PRIVATE``, as ``torch.load(mmap=True)``
does): a write to a tensor gives that page a private copy and never reaches the
file. Every view holds a reference to its file's storage, so the mapping lives
exactly as long as some tensor uses it. Nothing is read here; pages come in
from the page cache when first touched.
"""

from __future__ import annotations

import os

import torch

from ..formats.records import contiguous_strides

__all__ = ["FileViews"]


class FileViews:
    """Maps files on first use and cuts tensors out of them."""

    def __init__(self, files: list[str]):
        self.files = files
        self._storages: dict[int, torch.UntypedStorage] = {}

    def _storage(self, file_index: int) -> torch.UntypedStorage:
        storage = self._storages.get(file_index)
        if storage is None:
            path = self.files[file_index]
            storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=os.path.getsize(path))
            self._storages[file_index] = storage
        return storage

    def view(self, file_index: int, byte_offset: int, dtype: torch.dtype, shape: tuple[int, ...],
             strides: tuple[int, ...] | None) -> torch.Tensor:
        """The tensor at ``byte_offset`` (a multiple of the item size) of one file."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        assert byte_offset % itemsize == 0, "the planner maps only aligned tensors"
        storage = self._storage(file_index)
        return torch.empty(0, dtype=dtype).set_(storage, byte_offset // itemsize, shape,
                                                strides if strides is not None else contiguous_strides(shape))
