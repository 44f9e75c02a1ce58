"""The pickle walker's opcode handlers, cost model and opcode tables.

:mod:`.pickle_walker` runs the opcodes ``torch.save`` writes inline (its hot
loop); every other opcode, and the checks they share (lengths before slices,
the memory budget, the global allowlist), live here as methods of
:class:`OpcodeHandlers`, the walker's base class.  Nothing here imports, calls
or instantiates anything named by the pickle.
"""

from __future__ import annotations

import struct
import sys
from typing import Any, Callable

from ..errors import CheckpointError
from .torch_globals import ALLOWED, REDUCERS, SCALARS, Global, StorageRef, TensorView, describe

# What objects cost, in estimated bytes of CPython memory (charged against the walker's budget,
# pickle_walker.MAX_WALK_BYTES)
SLOT = 8                 # a pointer: a stack or list slot, a tuple item
DICT_ITEM = 64           # a dict or set entry, growth included
OBJECT = 56              # a new container, float, large int or string header
RECORD = 96              # a TensorView or StorageRef (slots) or an empty dict, pymalloc rounding included
CONTAINER = 256          # what any other REDUCE builds before its items (an empty set is 216 bytes)
MEMO_SLOT = 16           # a memo list slot, list growth included


class OpcodeHandlers:
    """Handlers of the opcodes the walker does not run inline, and the helpers they share.

    State (set by the walker): ``data``, ``where``, ``pos``, ``stack``, ``marks``,
    ``memo``, ``sparse_memo``, ``used`` and its budget ``max_bytes``.
    """

    data: bytes
    where: str
    pos: int
    stack: list[Any]
    marks: list[int]
    memo: list[Any]
    sparse_memo: dict[int, Any]
    used: int
    max_bytes: int

    # -- helpers -------------------------------------------------------------------
    def fail(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.where}: {message}")

    def charge(self, nbytes: int) -> None:
        """Count ``nbytes`` against the walk's budget *before* they are allocated."""
        self.used += nbytes
        if self.used > self.max_bytes:
            raise self.fail(f"the pickle needs more than {self.max_bytes >> 20} MiB of objects to walk (at offset "
                            f"{self.pos - 1}); refusing to allocate more")

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise self.fail(f"truncated: needs {n} bytes at offset {self.pos}, {len(self.data)} in total")
        chunk, self.pos = self.data[self.pos:end], end
        return chunk

    def unpack(self, fmt: struct.Struct) -> Any:
        pos = self.pos
        if pos + fmt.size > len(self.data):
            raise self.fail(f"truncated: needs {fmt.size} bytes at offset {pos}, {len(self.data)} in total")
        self.pos = pos + fmt.size
        return fmt.unpack_from(self.data, pos)[0]

    def push(self, value: Any, container: bool = False) -> None:
        if container:
            self.charge(SLOT + OBJECT)
        self.stack.append(value)

    def pop_mark(self) -> list[Any]:  # also the POP_MARK opcode
        if not self.marks:
            raise self.fail(f"opcode at offset {self.pos - 1} needs a MARK and there is none")
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def hashable(self, key: Any) -> Any:
        # Only scalars (and flat tuples of them) may be dict keys or set items: hashing a
        # deeply nested tuple from an adversarial pickle could overflow the C stack.
        if isinstance(key, SCALARS) or (isinstance(key, tuple) and all(isinstance(k, SCALARS) for k in key)):
            return key
        raise self.fail(f"a {type(key).__name__} used as a dict key or set item is not supported")

    def text(self, raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"string at offset {self.pos - len(raw)} is not valid UTF-8") from None

    def lookup_global(self, module: str, name: str) -> Global:
        module = {"__builtin__": "builtins"}.get(module, module)  # protocol-2 spelling
        found = ALLOWED.get(f"{module}.{name}")
        if found is None:
            raise self.fail(f"global '{module}.{name}' is not allowed; gemma_stream never executes pickle code "
                            f"(only plain tensors, dicts and scalars are supported)")
        return found

    # -- framing, stack and constants ------------------------------------------------
    def proto(self) -> None:
        if self.unpack(U8) > 5:
            raise self.fail(f"pickle protocol {self.data[self.pos - 1]} is newer than 5")

    def frame(self) -> None:  # a length hint only: the whole pickle is one buffer already
        if self.unpack(U64) > len(self.data) - self.pos:
            raise self.fail("FRAME runs past the end of the pickle (truncated)")

    def stop(self) -> object:
        return STOP

    def mark(self) -> None:
        self.charge(OBJECT)   # the int index and its slot
        self.marks.append(len(self.stack))

    def pop(self) -> None:
        if self.stack:
            self.stack.pop()
        else:
            self.pop_mark()

    def dup(self) -> None:
        self.charge(SLOT)
        self.push(self.stack[-1])

    def number(self) -> None:  # BININT, BININT1, BININT2, BINFLOAT
        value = self.unpack(NUMBER_FORMATS[self.data[self.pos - 1]])
        self.charge(SLOT if type(value) is int and -5 <= value <= 256 else SLOT + OBJECT)  # small ints are shared
        self.stack.append(value)

    def long(self) -> None:  # LONG1, LONG4: little-endian two's complement of a given length
        length = self.unpack(LENGTH_FORMATS[self.data[self.pos - 1]])
        self.charge(SLOT + OBJECT + max(length, 0))
        self.push(int.from_bytes(self.take(length), "little", signed=True))

    def string(self) -> None:  # (SHORT_)BINUNICODE(8) are text; (SHORT_)BINBYTES(8), BYTEARRAY8 bytes
        code = self.data[self.pos - 1]
        length = self.unpack(LENGTH_FORMATS[code])
        self.charge(SLOT + OBJECT + length)
        raw = self.take(length)
        if code in TEXT_OPCODES:  # the str replaces the bytes; a non-ASCII one may be up to 4x larger
            text = self.text(raw)
            self.charge(max(0, sys.getsizeof(text) - OBJECT - length))
            self.stack.append(text)
        else:
            self.stack.append(raw)

    # -- containers ------------------------------------------------------------------
    def empty_container(self) -> None:  # EMPTY_LIST, EMPTY_DICT, EMPTY_SET
        self.push(EMPTY[self.data[self.pos - 1]](), container=True)

    def frozenset_op(self) -> None:
        items = self.pop_mark()
        self.charge(DICT_ITEM * len(items))
        self.push(frozenset(self.hashable(item) for item in items), container=True)

    def set_pairs(self, target: Any, items: list[Any]) -> Any:
        if not isinstance(target, dict) or len(items) % 2:
            raise self.fail(f"SETITEM(S) on a {type(target).__name__} with {len(items)} values")
        self.charge(DICT_ITEM * (len(items) // 2))
        for i in range(0, len(items), 2):
            target[self.hashable(items[i])] = items[i + 1]
        return target

    def setitem(self) -> None:
        value, key = self.stack.pop(), self.stack.pop()
        self.set_pairs(self.stack[-1], [key, value])

    def setitems(self) -> None:
        items = self.pop_mark()
        self.set_pairs(self.stack[-1], items)

    def append(self) -> None:  # APPEND, APPENDS to a list; ADDITEMS to a set
        code = self.data[self.pos - 1]
        items = [self.stack.pop()] if code == 0x61 else self.pop_mark()  # APPEND "a"
        target = self.stack[-1]
        self.charge((SLOT if isinstance(target, list) else DICT_ITEM) * len(items))
        if isinstance(target, list) and code != 0x90:
            target.extend(items)
        elif isinstance(target, set) and code == 0x90:
            target.update(self.hashable(item) for item in items)
        else:
            raise self.fail(f"opcode {bytes([code])!r} adds items to a {type(target).__name__}")

    # -- memo --------------------------------------------------------------------------
    def put_at(self, index: int, value: Any) -> int:
        """A memo store out of sequence; returns the bytes to charge."""
        if index < len(self.memo):
            self.memo[index] = value
            return 0
        self.sparse_memo[index] = value
        return DICT_ITEM + OBJECT

    def get_at(self, index: int, pos: int) -> Any:
        """A memo read past the sequential entries."""
        if index in self.sparse_memo:
            return self.sparse_memo[index]
        raise self.fail(f"memo entry {index} read at offset {pos} was never stored")

    def memoize(self) -> None:  # MEMOIZE (protocol 4): the next index
        if self.sparse_memo:
            raise self.fail(f"MEMOIZE at offset {self.pos - 1} after a memo index out of sequence")
        self.charge(MEMO_SLOT)
        self.memo.append(self.stack[-1])

    # -- globals, calls, persistent ids ------------------------------------------------
    def global_op(self) -> None:
        end_module = self.data.find(b"\n", self.pos, self.pos + 256)
        end_name = self.data.find(b"\n", end_module + 1, end_module + 257) if end_module >= 0 else -1
        if end_name < 0:
            raise self.fail(f"GLOBAL at offset {self.pos - 1} is not two short newline-terminated lines")
        module, name = self.text(self.data[self.pos:end_module]), self.text(self.data[end_module + 1:end_name])
        self.pos = end_name + 1
        self.charge(SLOT)
        self.push(self.lookup_global(module, name))

    def stack_global(self) -> None:
        name, module = self.stack.pop(), self.stack.pop()
        if not isinstance(module, str) or not isinstance(name, str):
            raise self.fail("STACK_GLOBAL needs two strings")
        self.charge(SLOT)
        self.push(self.lookup_global(module, name))

    def binpersid(self) -> None:
        pid = self.stack.pop()
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise self.fail(f"persistent id {describe(pid)} is not ('storage', type, key, location, numel)")
        _, storage_type, key, location, numel = pid
        if not (isinstance(storage_type, Global) and storage_type.is_storage_type and storage_type.dtype):
            raise self.fail(f"persistent id names {describe(storage_type)}, not a supported storage type")
        if not isinstance(key, str) or not isinstance(location, str) or type(numel) is not int or numel < 0:
            raise self.fail(f"persistent id {describe(pid)} has a malformed key, location or numel")
        self.charge(RECORD)
        self.push(StorageRef(key, storage_type.dtype, location, numel))

    def reduce(self) -> None:
        args, func = self.stack.pop(), self.stack.pop()
        handler = REDUCERS.get(func.qualname) if isinstance(func, Global) else None
        if handler is None:
            raise self.fail(f"calling {describe(func)} is not allowed; gemma_stream never executes pickle code")
        if not isinstance(args, tuple):
            raise self.fail(f"arguments of {func.qualname} are a {type(args).__name__}, not a tuple")
        # what a handler builds: a record, or a copy of its argument (a dict, set, tuple or bytes)
        source = args[0] if len(args) == 1 and isinstance(args[0], (dict, list, tuple, str)) else ()
        self.charge(CONTAINER + DICT_ITEM * len(source) + (len(source) if isinstance(source, str) else 0))
        self.push(handler(self, args), container=True)

    def build(self) -> None:
        state, target = self.stack.pop(), self.stack[-1]
        # Module.state_dict() OrderedDicts carry `_metadata` (module versions) as instance
        # state, and python attributes on tensors arrive the same way: both are ignored.
        if isinstance(target, dict) and isinstance(state, (dict, type(None))):
            return
        if isinstance(target, TensorView) and (state is None or state == () or state == {}):
            return
        raise self.fail(f"BUILD (setting state) on a {type(target).__name__} is not allowed")


STOP = object()
#: REDUCE targets whose result is a record (or an empty dict, or its argument): within RECORD
RECORD_REDUCERS = frozenset(name for name in REDUCERS if name.startswith("torch.") and name != "torch.Size") | {
    "collections.OrderedDict"}
U8, U16, U32, I32, U64 = (struct.Struct(f) for f in ("<B", "<H", "<I", "<i", "<Q"))
LENGTH_FORMATS = {ord("X"): U32, 0x8C: U8, 0x8D: U64, ord("B"): U32, ord("C"): U8, 0x8E: U64,
                   0x96: U64, 0x8A: U8, 0x8B: I32}
TEXT_OPCODES = frozenset((ord("X"), 0x8C, 0x8D))
NUMBER_FORMATS = {ord("J"): I32, ord("K"): U8, ord("M"): U16, ord("G"): struct.Struct(">d")}
CONSTANTS = {ord("N"): None, 0x88: True, 0x89: False, ord(")"): ()}
EMPTY: dict[int, Callable[[], Any]] = {ord("]"): list, ord("}"): dict, 0x8F: set}
OPCODES: dict[int, str] = {}  # opcode -> name of the _Walker method that handles it
for _method, _codes in {
    "proto": b"\x80", "frame": b"\x95", "stop": b".", "mark": b"(", "pop": b"0", "pop_mark": b"1", "dup": b"2",
    "number": b"JMG", "long": b"\x8a\x8b", "string": b"\x8dBC\x8e\x96",
    "empty_container": b"]}\x8f", "frozenset_op": b"\x91",
    "setitem": b"s", "setitems": b"u", "append": b"ae\x90", "memoize": b"\x94",
    "global_op": b"c", "stack_global": b"\x93", "binpersid": b"Q", "reduce": b"R", "build": b"b",
}.items():
    OPCODES.update(dict.fromkeys(_codes, _method))
