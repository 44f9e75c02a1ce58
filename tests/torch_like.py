"""Hand-made torch checkpoints for the tests: a data.pkl pickled the way torch pickles it (storages
as persistent ids, tensors as ``_rebuild_tensor_v2``), zipped by the fuzzer's torch-like writer.

Shared by test_torchzip.py, test_pickle_walker.py and test_hostile.py.
"""

from __future__ import annotations

import collections
import io
import pickle
from pathlib import Path

import torch

from gemma_stream.fuzz.builders import torch_like_zip, zip_members


class FakeStorage:
    """Stands for a storage in a hand-made data.pkl (becomes a persistent id)."""

    def __init__(self, key: str, numel: int, storage_type=torch.FloatStorage) -> None:
        self.key, self.numel, self.storage_type = key, numel, storage_type


class FakeView:
    """Pickles as torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)."""

    def __init__(self, storage: FakeStorage, offset: int, size, stride, metadata=None) -> None:
        self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())
        if metadata is not None:
            self.args += (metadata,)

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class TorchLikePickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, FakeStorage):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


def pickle_like_torch(obj, protocol: int = 2) -> bytes:
    buffer = io.BytesIO()
    TorchLikePickler(buffer, protocol=protocol).dump(obj)
    return buffer.getvalue()


def write_zip(path, members: list[tuple[str, bytes]], zip64: bool = False, align: int = 64,
              phantoms: tuple[tuple[str, bytes, int], ...] = ()) -> str:
    """``torch_like_zip`` (the fuzzer's writer) written to ``path``."""
    Path(path).write_bytes(torch_like_zip(members, zip64=zip64, align=align, phantoms=phantoms))
    return str(path)


def crafted(path, obj, storages: dict[str, bytes], byteorder: bytes | None = b"little", protocol: int = 2) -> str:
    """A torch-style checkpoint with a hand-made data.pkl and the given storage payloads."""
    members = [("archive/data.pkl", pickle_like_torch(obj, protocol)), ("archive/version", b"3\n")]
    if byteorder is not None:
        members.append(("archive/byteorder", byteorder))
    members += [(f"archive/data/{key}", data) for key, data in storages.items()]
    return write_zip(path, members)


def members_of(path) -> list[tuple[str, bytes]]:
    return zip_members(Path(path).read_bytes())
