"""The pickle walker on its own: plain data as pickle has it, tensor views, and hostile pickles refused."""

from __future__ import annotations

import collections
import io
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


# ---------------------------------------------------------------- the fast path (pickle_fast.py)

def _seed_state_dict() -> dict:
    """A torch.save state dict that exercises the fast path and its edges: 0-3 dims (and 4, which it
    leaves to the general path), shared storages, strided views, several dtypes, a Parameter, nesting,
    and more than 256 memo entries (LONG_BINPUT / LONG_BINGET)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=g)
    tensors: dict = {"scalar": torch.tensor(2.5), "big": torch.zeros(300, 300, dtype=torch.bfloat16)}
    for i in range(40):
        shape = [(3,), (2, 5), (2, 3, 4), (1, 2, 1, 2)][i % 4]
        dtype = [torch.bfloat16, torch.float32, torch.int64, torch.bool][i // 10]
        tensors[f"layers.{i}.w"] = torch.zeros(shape, dtype=dtype)
    tensors.update({"view_t": base.t(), "view_row": base[2], "view_col": base[:, 1], "base": base,
                    "param": torch.nn.Parameter(torch.ones(3)), "empty": torch.empty(0, 3),
                    "grad.0": torch.ones(2, requires_grad=True), "grad.1": torch.ones(2, requires_grad=True)})
    return {"model_state_dict": tensors, "epoch": 3, "nested": {"a": {"b": torch.ones(2, dtype=torch.float16)}}}


def _data_pkl(tmp_path) -> bytes:
    path = tmp_path / "seed.pt"
    torch.save(_seed_state_dict(), path)
    return next(blob for name, blob in members_of(path) if name.endswith("/data.pkl"))


class _FreshLocationPickler(pickle.Pickler):
    """As torch.save pickles fake tensors (the benchmark's writer): a new location string per storage,
    so each is written out (BINUNICODE + PUT) instead of read back from the memo."""

    def persistent_id(self, obj):
        if isinstance(obj, FakeStorage):
            return ("storage", obj.storage_type, obj.key, "".join(("cp", "u")), obj.numel)
        return None


def _fresh_location_pkl(numels: tuple[int, ...] = tuple(range(40)), dims: int = 2) -> bytes:
    """Tensors ``w.<i>`` of ``numel`` elements each (a negative or huge one is left as given), 1-4 dims."""
    views = {}
    for i, numel in enumerate(numels):
        size, stride = (max(numel, 0) // 4, 4, 1, 1)[:dims], (4, 1 + i // 1000, 1, 1)[:dims]   # new tuples
        views[f"w.{i}"] = FakeView(FakeStorage(str(i), numel, torch.BFloat16Storage), i % 2, size, stride)
    buffer = io.BytesIO()
    _FreshLocationPickler(buffer, protocol=2).dump(collections.OrderedDict(views))
    return buffer.getvalue()


@pytest.mark.parametrize("case", ["negative numel", "huge numel", "huge offset", "0 dims", "1 dim", "3 dims",
                                  "4 dims", "key not decimal", "non-ASCII name", "deep memo"])
def test_fast_path_edges_agree_with_the_general_path(case, monkeypatch):
    data = {"negative numel": lambda: _fresh_location_pkl((8, 8, -1, 8)),
            "huge numel": lambda: _fresh_location_pkl((8, 8, 2 ** 31, 2 ** 40, 8)),
            "huge offset": lambda: _fresh_location_pkl((8, 8, 8)).replace(b"Q\x4b\x01", b"QJ\xff\xff\xff\x7f"),
            "0 dims": lambda: _fresh_location_pkl((8, 8, 8), dims=0),
            "1 dim": lambda: _fresh_location_pkl((8, 8, 8), dims=1),
            "3 dims": lambda: _fresh_location_pkl((8, 8, 8), dims=3),
            "4 dims": lambda: _fresh_location_pkl((8, 8, 8), dims=4),
            "key not decimal": lambda: _fresh_location_pkl((8, 8, 8)).replace(b"X\x01\x00\x00\x002", b"X\x01\x00\x00\x00z"),
            "non-ASCII name": lambda: _fresh_location_pkl((8, 8, 8)).replace(b"X\x03\x00\x00\x00w.2", b"X\x03\x00\x00\x00\xc3\xa92"),
            "deep memo": lambda: _fresh_location_pkl(tuple(range(0, 400, 4))),
            }[case]()
    fast, general = _walk_both(data)
    assert fast == general, (fast[:2], general[:2])
    # opcodes are counted only in pickles longer than the limit: there too, the same count
    monkeypatch.setattr(pickle_walker, "MAX_OPCODES", len(data) - 1)
    fast, general = _walk_both(data)
    assert fast == general, (fast[:2], general[:2])


def _canonical(value, seen: dict, depth: int = 0):
    """A comparable picture of a walked tree: records by field, containers by content, and which
    mutable containers are the same object (``seen``: id -> first index)."""
    from gemma_stream.formats.torch_globals import Global, StorageRef
    if depth > 60:
        return "..."
    if isinstance(value, TensorView):
        return ("view", _canonical(value.storage, seen, depth + 1), value.dtype.name, value.storage_offset,
                value.size, value.stride)
    if isinstance(value, StorageRef):
        return ("storage", value.key, value.dtype.name, value.location, value.numel)
    if isinstance(value, Global):
        return ("global", value.qualname)
    if isinstance(value, (dict, list, set)):
        if id(value) in seen:
            return ("same as", seen[id(value)])
        seen[id(value)] = len(seen)
        if isinstance(value, dict):
            return ("dict", [(_canonical(k, seen, depth + 1), _canonical(v, seen, depth + 1)) for k, v in value.items()])
        items = [_canonical(v, seen, depth + 1) for v in value]
        return (type(value).__name__, sorted(map(repr, items)) if isinstance(value, set) else items)
    if isinstance(value, (tuple, frozenset)):
        items = [_canonical(v, seen, depth + 1) for v in value]
        return (type(value).__name__, sorted(map(repr, items)) if isinstance(value, frozenset) else items)
    return (type(value).__name__, value)


def _walk_both(data: bytes) -> tuple:
    """(outcome of the fast path, outcome of the general path): the tree, the memo, the budget used
    and the opcodes counted, or the error's words."""
    outcomes = []
    for fast in (True, False):
        walker = pickle_walker._Walker(data, "x.pkl", fast)
        try:
            with pickle_walker.gc_paused():
                tree = walker.run()
            seen: dict = {}
            outcomes.append(("tree", _canonical(tree, seen), _canonical(walker.memo, seen),
                             _canonical(walker.sparse_memo, seen), walker.used, walker.opcodes))
        except CheckpointError as e:
            outcomes.append(("error", str(e)))
        except (IndexError, TypeError, ValueError, KeyError, AttributeError, OverflowError, RecursionError,
                struct.error) as e:   # what walk_pickle turns into CheckpointError, at walker.pos
            outcomes.append(("error", type(e).__name__, walker.pos))
    return tuple(outcomes)


def test_fast_path_takes_the_regular_entries(tmp_path, monkeypatch):
    from gemma_stream.formats import pickle_fast
    data = _data_pkl(tmp_path)
    taken = []
    real = pickle_fast.take_entries

    def counting(*args):
        out = real(*args)
        if out is not None:
            taken.append(out[2])
        return out
    monkeypatch.setattr(pickle_walker, "take_entries", counting)
    fast, general = _walk_both(data)
    assert fast == general and fast[0] == "tree"
    # every tensor after the first of its dtype and shape class, except 4-D ones, parameters and views
    # reached through a memo entry of another tensor, goes the fast way
    assert sum(taken) > 20 * 25, taken


@pytest.mark.parametrize("limit", ["budget", "opcodes"])
def test_fast_path_stops_where_the_general_path_refuses(tmp_path, monkeypatch, limit):
    data = _data_pkl(tmp_path)
    walker = pickle_walker._Walker(data, "x.pkl", False)
    walker.run()
    full = walker.used if limit == "budget" else len(data)
    for fraction in (0.1, 0.35, 0.6, 0.9, 0.999):
        if limit == "budget":
            monkeypatch.setattr(pickle_walker, "MAX_WALK_BYTES", int(full * fraction))
        else:   # counting starts when the pickle is longer than the limit
            monkeypatch.setattr(pickle_walker, "MAX_OPCODES", int(full * fraction * 0.3))
        fast, general = _walk_both(data)
        assert fast == general and fast[0] == "error", (fraction, fast)


def test_fast_path_agrees_with_the_general_path_on_mutated_pickles(tmp_path):
    """Both paths on thousands of mutations of a torch.save data.pkl: the same tree and memo (records,
    shared containers, budget used, opcodes counted) or the same error, word for word."""
    from gemma_stream.fuzz.mutators import _mutate_pickle
    seeds = [_data_pkl(tmp_path), _fresh_location_pkl()]
    assert all(_walk_both(seed)[0][0] == "tree" for seed in seeds)
    rng = random.Random(15)
    outcomes = {"tree": 0, "error": 0}
    for case in range(1600):
        seed = seeds[case % 4 // 2]
        if case % 2:
            data = _mutate_pickle(seed, rng)
        else:   # a few bytes inside the tensor entries, where the fast path matches
            data = bytearray(seed)
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] = rng.choice([rng.randrange(256), 0, 1, 0x71, 0x72, 0x68, 0x6A, 0x4B,
                                                             0x4D, 0x4A, 0x88, 0x89, 0x85, 0x86, 0x87, 0x29])
            data = bytes(data)
        fast, general = _walk_both(data)
        assert fast == general, (case, fast[:2], general[:2])
        outcomes[fast[0]] += 1
    assert outcomes["tree"] > 100 and outcomes["error"] > 100, outcomes
