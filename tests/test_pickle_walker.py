"""The pickle walker on its own: plain data as pickle has it, tensor views, and hostile pickles refused."""

from __future__ import annotations

import collections
import os
import pickle
import random
import struct

import pytest
import torch

from gemma_stream.errors import CheckpointError
from gemma_stream.formats import pickle_walker
from gemma_stream.formats.pickle_walker import TensorView, describe, walk_pickle

from torch_like import FakeStorage, FakeView, members_of, pickle_like_torch


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_walker_agrees_with_pickle_on_plain_data(protocol):
    obj = {"int": [0, 1, -1, 255, 65535, -(2 ** 31), 2 ** 31, 2 ** 70, -(2 ** 70)], "float": 1.5e300,
           "text": "ünïcödé" * 50, "bytes": b"\x00\xff" * 200, "none": None, "flags": (True, False),
           "set": {1, 2, 3}, "nested": {"a": [(), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4)]}, 7: "int key"}
    obj["shared"] = obj["nested"]
    walked = walk_pickle(pickle.dumps(obj, protocol=protocol))
    assert walked == obj
    assert walked["shared"] is walked["nested"]  # the memo keeps identity


def test_walker_returns_tensor_views():
    storage = FakeStorage("7", 6, torch.BFloat16Storage)
    tree = walk_pickle(pickle_like_torch(collections.OrderedDict(t=FakeView(storage, 1, (2, 2), (2, 1)))))
    view = tree["t"]
    assert isinstance(view, TensorView) and type(tree) is dict
    assert (view.storage.key, view.storage.numel, view.dtype.name) == ("7", 6, "bf16")
    assert (view.storage_offset, view.size, view.stride) == (1, (2, 2), (2, 1))


class Evil:
    def __init__(self, reducer) -> None:
        self.reducer = reducer

    def __reduce__(self):
        return self.reducer


HOSTILE = {
    "eval": pickle.dumps(Evil((eval, ("1+1",))), protocol=2),
    "stack_global": pickle.dumps(Evil((os.system, ("true",))), protocol=4),
    "call_storage_type": pickle_like_torch(Evil((torch.FloatStorage, ()))),
    "protocol0": pickle.dumps({"a": 1}, protocol=0),
    "counter": pickle.dumps(collections.Counter(a=1), protocol=2),
    "foreign_class": pickle.dumps(Evil((Evil, (None,))), protocol=2),
    "newobj": b"\x80\x02ccollections\nOrderedDict\n)\x81.",
    "build_on_tensor": pickle_like_torch(
        {"t": Evil((torch._utils._rebuild_tensor, (FakeStorage("0", 1), 0, (1,), (1,)), {"x": 1}))}),
    "memo_miss": b"\x80\x02h\x05.",
    "unterminated": b"\x80\x02}q\x00",
    "huge_length": b"\x80\x04\x8d" + struct.pack("<Q", 2 ** 60) + b"abc",
    "deep_key": b"\x80\x02}K\x01" + b"\x85" * 100_000 + b"K\x01s.",
    "underflow": b"\x80\x02s.",
    "bad_persid": b"\x80\x02X\x06\x00\x00\x00moduleQ.",
    "empty": b"",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_walker_refuses_hostile_pickles(name):
    with pytest.raises(CheckpointError, match=r"^evil\.pkl: "):
        walk_pickle(HOSTILE[name], where="evil.pkl")


def test_walker_messages_name_the_global():
    with pytest.raises(CheckpointError, match=r"global 'builtins\.eval' is not allowed; gemma_stream never"):
        walk_pickle(HOSTILE["eval"])
    with pytest.raises(CheckpointError, match=r"calling torch\.FloatStorage is not allowed"):
        walk_pickle(HOSTILE["call_storage_type"])


def test_walker_bounds_containers(monkeypatch):
    monkeypatch.setattr(pickle_walker, "MAX_WALK_BYTES", 100 * 64)
    with pytest.raises(CheckpointError, match="more than 0 MiB of objects"):
        walk_pickle(pickle.dumps([[] for _ in range(200)], protocol=2))


def test_describe_is_short_and_cycle_safe():
    cycle: list = []
    cycle.append(cycle)
    assert len(describe(cycle)) <= 90
    assert describe(list(range(10_000)), limit=20).endswith("...")
    assert describe(2 ** 10_000) == "<10001-bit int>"
    assert describe({"a": (1, "x")}) == "{'a': (1, 'x')}"


def test_mutated_pickles_fail_only_with_checkpoint_error(tmp_path):
    path = tmp_path / "seed.pt"
    torch.save({"model_state_dict": {"w": torch.ones(2, 3).t()}, "epoch": 1, "tags": {"a"}}, path)
    seed = dict(members_of(path))["seed/data.pkl"]
    rng = random.Random(0)
    for _ in range(1000):
        data = bytearray(seed)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            if rng.random() < 0.7:
                data[at] = rng.randrange(256)
            else:
                del data[at:at + rng.randint(1, 8)]
        try:
            walk_pickle(bytes(data))
        except CheckpointError:
            pass
