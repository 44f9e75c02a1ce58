"""A pickle opcode walker that never executes anything.

``torch.save`` writes its object tree as a pickle whose only "code" is a handful
of well-known globals (``_rebuild_tensor_v2``, storage types, ``OrderedDict``).
This module interprets the opcodes itself: every GLOBAL must be on the allowlist
of :mod:`.torch_globals` and becomes an inert :class:`Global` marker, and REDUCE
is answered by that module's small handlers, which build inert values
(:class:`TensorView`, dicts, tuples).
Nothing from the pickle is imported, called or instantiated, so a malicious
``data.pkl`` can at worst produce a :class:`~gemma_stream.errors.CheckpointError`.

Example::

    tree = walk_pickle(data_pkl_bytes, where="model.ckpt: data.pkl")
    tree["model_state_dict"]["embedder.weight"]  # -> TensorView(...)
"""

from __future__ import annotations

import gc
import struct
import sys
from typing import Any, Callable

from ..errors import CheckpointError
from .torch_globals import ALLOWED, REDUCERS, SCALARS, Global, StorageRef, TensorView, describe

__all__ = ["Global", "StorageRef", "TensorView", "walk_pickle", "describe", "MAX_WALK_BYTES"]

#: One budget for everything the walker holds, in estimated bytes of Python objects: stack
#: slots, marks, memo entries, containers and their items, strings and integers, tensor
#: records (CPython's sizes, dict growth included).  Nothing is refunded, so it bounds the
#: peak from above; an adversarial ``data.pkl`` of any size up to the pickle limit is parsed
#: or refused within about this much extra memory (tests/test_hostile.py measures the
#: bombs).  A torch.save state dict is charged about 1.3 KB per tensor (0.7 KB real: memo
#: entries in a list, records with slots): 48 MiB is ~37k tensors per file (one file of the
#: largest public checkpoints holds a few thousand).
MAX_WALK_BYTES = 48 << 20
#: Opcodes walked before refusing: bounds the time of pickles that allocate nothing
#: (MARK/POP_MARK loops).  A state dict takes ~32 per tensor: ~47k tensors.
MAX_OPCODES = 1_500_000
_SLOT = 8                 # a pointer: a stack or list slot, a tuple item
_DICT_ITEM = 64           # a dict or set entry, growth included
_OBJECT = 56              # a new container, float, large int or string header
_RECORD = 96              # a TensorView or StorageRef (slots) or an empty dict, pymalloc rounding included
_CONTAINER = 256          # what any other REDUCE builds before its items (an empty set is 216 bytes)
_MEMO_SLOT = 16           # a memo list slot, list growth included


class _Walker:
    """Stack machine for the binary pickle opcodes (protocols 2 to 5).

    The opcodes torch.save writes are handled inline in :meth:`run`; the others by
    methods named in ``_OPCODES``.  Both check lengths *before* slicing (the methods
    through :meth:`take`), so no length field can make us allocate more than the
    pickle itself.  The stack is one flat list
    and a MARK is an index into it (a new list per MARK let 10 MiB of MARK
    bytes cost 737 MB and 8.9 s).
    """

    def __init__(self, data: bytes, where: str) -> None:
        self.data, self.where, self.pos = data, where, 0
        self.stack: list[Any] = []
        self.marks: list[int] = []
        # torch.save numbers memo entries 0, 1, 2, ...: those live in a list (8 bytes each); any
        # other index goes to a dict, so a huge LONG_BINPUT index allocates nothing
        self.memo: list[Any] = []
        self.sparse_memo: dict[int, Any] = {}
        self.used = 0            # estimated bytes of objects created (see MAX_WALK_BYTES)
        self.opcodes = 0
        self.ops = {code: getattr(self, name) for code, name in _OPCODES.items()}

    # -- helpers -------------------------------------------------------------------
    def fail(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.where}: {message}")

    def charge(self, nbytes: int) -> None:
        """Count ``nbytes`` against the walk's budget *before* they are allocated."""
        self.used += nbytes
        if self.used > MAX_WALK_BYTES:
            raise self.fail(f"the pickle needs more than {MAX_WALK_BYTES >> 20} MiB of objects to walk (at offset "
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
            self.charge(_SLOT + _OBJECT)
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

    def run(self) -> Any:
        # The opcodes of torch.save's protocol-2 pickle (30 per tensor) are handled inline, with
        # the stack, memo, position and budget in locals: a method call per opcode made the walk
        # 4.5 MB/s.  Every other opcode goes through its method with ``self.pos``/``self.used``
        # synced around the call.  Each inline branch checks lengths before reading, as ``take``.
        data, ops, size = self.data, self.ops, len(self.data)
        stack, marks, memo, sparse = self.stack, self.marks, self.memo, self.sparse_memo
        push, u32_at, reducers = stack.append, _U32.unpack_from, REDUCERS
        limit, max_opcodes = MAX_WALK_BYTES, MAX_OPCODES
        pos, used, opcodes, nmemo = self.pos, self.used, self.opcodes, len(memo)
        counting = size - pos + opcodes > max_opcodes
        try:
            while pos < size:
                code = data[pos]
                pos += 1
                if code == 0x72:  # LONG_BINPUT
                    if pos + 4 > size:
                        raise self.fail(f"truncated: needs 4 bytes at offset {pos}, {size} in total")
                    index = u32_at(data, pos)[0]
                    pos += 4
                    if index == nmemo:       # torch.save numbers its memo 0, 1, 2, ...: a list slot
                        memo.append(stack[-1])
                        nmemo += 1
                        used += _MEMO_SLOT
                    else:
                        used += self.put_at(index, stack[-1])
                elif code == 0x4B:  # BININT1
                    if pos >= size:
                        raise self.fail(f"truncated: needs 1 bytes at offset {pos}, {size} in total")
                    push(data[pos])
                    pos += 1
                    used += _SLOT
                elif code == 0x68:  # BINGET
                    if pos >= size:
                        raise self.fail(f"truncated: needs 1 bytes at offset {pos}, {size} in total")
                    index = data[pos]
                    pos += 1
                    push(memo[index] if index < nmemo else self.get_at(index, pos))
                    used += _SLOT
                elif code == 0x28:  # MARK
                    used += _OBJECT   # the int index and its slot
                    marks.append(len(stack))
                elif code == 0x58 or code == 0x8C:  # BINUNICODE, SHORT_BINUNICODE
                    width = 4 if code == 0x58 else 1
                    if pos + width > size:
                        raise self.fail(f"truncated: needs {width} bytes at offset {pos}, {size} in total")
                    length = u32_at(data, pos)[0] if width == 4 else data[pos]
                    pos += width
                    used += _SLOT + _OBJECT + length
                    if used > limit:
                        break   # refused below, before the string is made
                    end = pos + length
                    if end > size:
                        raise self.fail(f"truncated: needs {length} bytes at offset {pos}, {size} in total")
                    raw = data[pos:end]
                    pos = end
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        raise self.fail(f"string at offset {pos - length} is not valid UTF-8") from None
                    if not text.isascii():  # a non-ASCII str may be up to 4x the bytes
                        used += max(0, sys.getsizeof(text) - _OBJECT - length)
                    push(text)
                elif code == 0x74 or code == 0x85 or code == 0x86 or code == 0x87:  # TUPLE, TUPLE1/2/3
                    if code == 0x74:
                        if not marks:
                            raise self.fail(f"opcode at offset {pos - 1} needs a MARK and there is none")
                        start = marks.pop()
                    else:
                        start = len(stack) - (code - 0x84)
                        if start < 0:
                            raise self.fail(f"TUPLE{code - 0x84} at offset {pos - 1} needs {code - 0x84} values "
                                            f"on the stack")
                    items = tuple(stack[start:])
                    del stack[start:]
                    used += _SLOT + _OBJECT + _SLOT * len(items)
                    push(items)
                elif code == 0x71:  # BINPUT
                    if pos >= size:
                        raise self.fail(f"truncated: needs 1 bytes at offset {pos}, {size} in total")
                    index = data[pos]
                    pos += 1
                    if index == nmemo:
                        memo.append(stack[-1])
                        nmemo += 1
                        used += _MEMO_SLOT
                    else:
                        used += self.put_at(index, stack[-1])
                elif code == 0x6A:  # LONG_BINGET
                    if pos + 4 > size:
                        raise self.fail(f"truncated: needs 4 bytes at offset {pos}, {size} in total")
                    index = u32_at(data, pos)[0]
                    pos += 4
                    push(memo[index] if index < nmemo else self.get_at(index, pos))
                    used += _SLOT
                elif code == 0x89 or code == 0x88 or code == 0x4E or code == 0x29:  # NEWFALSE/TRUE, NONE, ()
                    push(_CONSTANTS[code])
                    used += _SLOT
                elif code == 0x52 and len(stack) >= 2 and type(stack[-2]) is Global and type(stack[-1]) is tuple \
                        and len(stack[-1]) != 1 and stack[-2].qualname in _RECORD_REDUCERS:
                    # REDUCE building a tensor record or an empty dict; other calls (which may copy
                    # an argument) are charged by ``reduce``
                    used += _RECORD + _SLOT + _OBJECT
                    if used > limit:
                        break
                    args = stack.pop()
                    self.pos, self.used = pos, used
                    stack[-1] = reducers[stack[-1].qualname](self, args)
                    used = self.used
                elif code == 0x51 and stack and type(stack[-1]) is tuple and len(stack[-1]) == 5:  # BINPERSID
                    tag, storage_type, key, location, numel = stack[-1]
                    if not (tag == "storage" and type(storage_type) is Global and storage_type.is_storage_type
                            and storage_type.dtype and type(key) is str and type(location) is str
                            and type(numel) is int and numel >= 0):
                        self.pos = pos
                        self.binpersid()   # raises, naming what is wrong
                    used += _RECORD
                    if used > limit:
                        break
                    stack[-1] = StorageRef(key, storage_type.dtype, location, numel)
                else:
                    self.pos, self.used = pos, used
                    handler = ops.get(code)
                    if handler is None:
                        raise self.fail(f"opcode {bytes([code])!r} at offset {pos - 1} is not supported")
                    if handler() is _STOP:
                        if len(stack) != 1 or marks:
                            raise self.fail(f"STOP with {len(stack)} values on the stack")
                        return stack[0]
                    pos, used, nmemo = self.pos, self.used, len(memo)
                if used > limit:
                    break
                if counting:   # each opcode is at least a byte: a shorter pickle cannot pass the limit
                    opcodes += 1
                    if opcodes > max_opcodes:
                        raise self.fail(f"more than {max_opcodes} opcodes (at offset {pos - 1}); a state dict "
                                        f"takes about 32 per tensor: refusing to walk further")
        finally:
            self.pos, self.opcodes = pos, opcodes
            self.used = max(self.used, used)
        if used > limit:
            self.used = 0
            self.charge(used)  # raises the budget's refusal, naming the offset
        raise self.fail("pickle ends without a STOP opcode (truncated)")

    # -- framing, stack and constants ------------------------------------------------
    def proto(self) -> None:
        if self.unpack(_U8) > 5:
            raise self.fail(f"pickle protocol {self.data[self.pos - 1]} is newer than 5")

    def frame(self) -> None:  # a length hint only: the whole pickle is one buffer already
        if self.unpack(_U64) > len(self.data) - self.pos:
            raise self.fail("FRAME runs past the end of the pickle (truncated)")

    def stop(self) -> object:
        return _STOP

    def mark(self) -> None:
        self.charge(_OBJECT)   # the int index and its slot
        self.marks.append(len(self.stack))

    def pop(self) -> None:
        if self.stack:
            self.stack.pop()
        else:
            self.pop_mark()

    def dup(self) -> None:
        self.charge(_SLOT)
        self.push(self.stack[-1])

    def number(self) -> None:  # BININT, BININT1, BININT2, BINFLOAT
        value = self.unpack(_NUMBER_FORMATS[self.data[self.pos - 1]])
        self.charge(_SLOT if type(value) is int and -5 <= value <= 256 else _SLOT + _OBJECT)  # small ints are shared
        self.stack.append(value)

    def long(self) -> None:  # LONG1, LONG4: little-endian two's complement of a given length
        length = self.unpack(_LENGTH_FORMATS[self.data[self.pos - 1]])
        self.charge(_SLOT + _OBJECT + max(length, 0))
        self.push(int.from_bytes(self.take(length), "little", signed=True))

    def string(self) -> None:  # (SHORT_)BINUNICODE(8) are text; (SHORT_)BINBYTES(8), BYTEARRAY8 bytes
        code = self.data[self.pos - 1]
        length = self.unpack(_LENGTH_FORMATS[code])
        self.charge(_SLOT + _OBJECT + length)
        raw = self.take(length)
        if code in _TEXT_OPCODES:  # the str replaces the bytes; a non-ASCII one may be up to 4x larger
            text = self.text(raw)
            self.charge(max(0, sys.getsizeof(text) - _OBJECT - length))
            self.stack.append(text)
        else:
            self.stack.append(raw)

    # -- containers ------------------------------------------------------------------
    def empty_container(self) -> None:  # EMPTY_LIST, EMPTY_DICT, EMPTY_SET
        self.push(_EMPTY[self.data[self.pos - 1]](), container=True)

    def frozenset_op(self) -> None:
        items = self.pop_mark()
        self.charge(_DICT_ITEM * len(items))
        self.push(frozenset(self.hashable(item) for item in items), container=True)

    def set_pairs(self, target: Any, items: list[Any]) -> Any:
        if not isinstance(target, dict) or len(items) % 2:
            raise self.fail(f"SETITEM(S) on a {type(target).__name__} with {len(items)} values")
        self.charge(_DICT_ITEM * (len(items) // 2))
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
        self.charge((_SLOT if isinstance(target, list) else _DICT_ITEM) * len(items))
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
        return _DICT_ITEM + _OBJECT

    def get_at(self, index: int, pos: int) -> Any:
        """A memo read past the sequential entries."""
        if index in self.sparse_memo:
            return self.sparse_memo[index]
        raise self.fail(f"memo entry {index} read at offset {pos} was never stored")

    def memoize(self) -> None:  # MEMOIZE (protocol 4): the next index
        if self.sparse_memo:
            raise self.fail(f"MEMOIZE at offset {self.pos - 1} after a memo index out of sequence")
        self.charge(_MEMO_SLOT)
        self.memo.append(self.stack[-1])

    # -- globals, calls, persistent ids ------------------------------------------------
    def global_op(self) -> None:
        end_module = self.data.find(b"\n", self.pos, self.pos + 256)
        end_name = self.data.find(b"\n", end_module + 1, end_module + 257) if end_module >= 0 else -1
        if end_name < 0:
            raise self.fail(f"GLOBAL at offset {self.pos - 1} is not two short newline-terminated lines")
        module, name = self.text(self.data[self.pos:end_module]), self.text(self.data[end_module + 1:end_name])
        self.pos = end_name + 1
        self.charge(_SLOT)
        self.push(self.lookup_global(module, name))

    def stack_global(self) -> None:
        name, module = self.stack.pop(), self.stack.pop()
        if not isinstance(module, str) or not isinstance(name, str):
            raise self.fail("STACK_GLOBAL needs two strings")
        self.charge(_SLOT)
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
        self.charge(_RECORD)
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
        self.charge(_CONTAINER + _DICT_ITEM * len(source) + (len(source) if isinstance(source, str) else 0))
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


_STOP = object()
#: REDUCE targets whose result is a record (or an empty dict, or its argument): within _RECORD
_RECORD_REDUCERS = frozenset(name for name in REDUCERS if name.startswith("torch.") and name != "torch.Size") | {
    "collections.OrderedDict"}
_U8, _U16, _U32, _I32, _U64 = (struct.Struct(f) for f in ("<B", "<H", "<I", "<i", "<Q"))
_LENGTH_FORMATS = {ord("X"): _U32, 0x8C: _U8, 0x8D: _U64, ord("B"): _U32, ord("C"): _U8, 0x8E: _U64,
                   0x96: _U64, 0x8A: _U8, 0x8B: _I32}
_TEXT_OPCODES = frozenset((ord("X"), 0x8C, 0x8D))
_NUMBER_FORMATS = {ord("J"): _I32, ord("K"): _U8, ord("M"): _U16, ord("G"): struct.Struct(">d")}
_CONSTANTS = {ord("N"): None, 0x88: True, 0x89: False, ord(")"): ()}
_EMPTY: dict[int, Callable[[], Any]] = {ord("]"): list, ord("}"): dict, 0x8F: set}
_OPCODES: dict[int, str] = {}  # opcode -> name of the _Walker method that handles it
for _method, _codes in {
    "proto": b"\x80", "frame": b"\x95", "stop": b".", "mark": b"(", "pop": b"0", "pop_mark": b"1", "dup": b"2",
    "number": b"JMG", "long": b"\x8a\x8b", "string": b"\x8dBC\x8e\x96",
    "empty_container": b"]}\x8f", "frozenset_op": b"\x91",
    "setitem": b"s", "setitems": b"u", "append": b"ae\x90", "memoize": b"\x94",
    "global_op": b"c", "stack_global": b"\x93", "binpersid": b"Q", "reduce": b"R", "build": b"b",
}.items():
    _OPCODES.update(dict.fromkeys(_codes, _method))


def walk_pickle(data: bytes, where: str = "data.pkl") -> Any:
    """Interpret a pickle made of plain containers, scalars and tensors, without executing it.

    Returns the object tree with tensors as :class:`TensorView` and OrderedDicts as
    dicts.  Any global, call or opcode outside the allowlist raises
    :class:`CheckpointError` whose message starts with ``where``::

        walk_pickle(zip_entry_bytes, where="model.ckpt: data.pkl")
    """
    walker = _Walker(bytes(data), where)
    collecting = gc.isenabled()
    gc.disable()  # the walk makes ~30 objects per tensor and no garbage: the collector only costs time
    try:
        return walker.run()
    except CheckpointError:
        raise
    except IndexError:
        raise walker.fail(f"stack underflow at offset {walker.pos - 1}") from None
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError, RecursionError, struct.error) as e:
        raise walker.fail(f"malformed pickle at offset {walker.pos - 1}: {type(e).__name__}: {e}") from None
    finally:
        if collecting:
            gc.enable()
