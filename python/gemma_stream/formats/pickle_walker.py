"""A pickle opcode walker that never executes anything.

``torch.save`` writes its object tree as a pickle whose only "code" is a handful
of well-known globals (``_rebuild_tensor_v2``, storage types, ``OrderedDict``).
This module interprets the opcodes itself: every GLOBAL must be on the allowlist
of :mod:`.torch_globals` and becomes an inert :class:`Global` marker, and REDUCE
is answered by that module's small handlers, which build inert values
(:class:`TensorView`, dicts, tuples).
Nothing from the pickle is imported, called or instantiated, so a malicious
``data.pkl`` can at worst produce a :class:`~gemma_stream.errors.CheckpointError`.
torch.save's regular per-tensor runs are taken whole by :mod:`.pickle_fast`, with the
same result; everything else goes opcode by opcode.

Example::

    tree = walk_pickle(data_pkl_bytes, where="model.ckpt: data.pkl")
    tree["model_state_dict"]["embedder.weight"]  # -> TensorView(...)
"""

from __future__ import annotations

import struct
import sys
from typing import Any

from ..errors import CheckpointError
from .pickle_fast import take_entries
from .pickle_ops import (CONSTANTS, MEMO_SLOT, OBJECT, OPCODES, RECORD, RECORD_REDUCERS, SLOT, STOP, U32,
                         OpcodeHandlers)
from .records import gc_paused
from .torch_globals import REDUCERS, Global, StorageRef, TensorView, describe

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


class _Walker(OpcodeHandlers):
    """Stack machine for the binary pickle opcodes (protocols 2 to 5).

    The opcodes torch.save writes are handled inline in :meth:`run`; the others by
    methods named in ``OPCODES``.  Both check lengths *before* slicing (the methods
    through :meth:`take`), so no length field can make us allocate more than the
    pickle itself.  The stack is one flat list
    and a MARK is an index into it (a new list per MARK let 10 MiB of MARK
    bytes cost 737 MB and 8.9 s).
    """

    def __init__(self, data: bytes, where: str, fast: bool = True) -> None:
        self.data, self.where, self.pos = data, where, 0
        self.fast = fast         # take torch.save's regular tensor entries whole (pickle_fast.py)
        self.stack: list[Any] = []
        self.marks: list[int] = []
        # torch.save numbers memo entries 0, 1, 2, ...: those live in a list (8 bytes each); any
        # other index goes to a dict, so a huge LONG_BINPUT index allocates nothing
        self.memo: list[Any] = []
        self.sparse_memo: dict[int, Any] = {}
        self.used = 0            # estimated bytes of objects created (see MAX_WALK_BYTES)
        self.max_bytes = MAX_WALK_BYTES
        self.opcodes = 0
        self.ops = {code: getattr(self, name) for code, name in OPCODES.items()}

    def run(self) -> Any:
        # The opcodes of torch.save's protocol-2 pickle (30 per tensor) are handled inline, with
        # the stack, memo, position and budget in locals: a method call per opcode made the walk
        # 4.5 MB/s.  Every other opcode goes through its method with ``self.pos``/``self.used``
        # synced around the call.  Each inline branch checks lengths before reading, as ``take``.
        data, ops, size = self.data, self.ops, len(self.data)
        stack, marks, memo = self.stack, self.marks, self.memo
        push, u32_at, reducers = stack.append, U32.unpack_from, REDUCERS
        limit, max_opcodes, fast = MAX_WALK_BYTES, MAX_OPCODES, self.fast
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
                        used += MEMO_SLOT
                    else:
                        used += self.put_at(index, stack[-1])
                elif code == 0x4B:  # BININT1
                    if pos >= size:
                        raise self.fail(f"truncated: needs 1 bytes at offset {pos}, {size} in total")
                    push(data[pos])
                    pos += 1
                    used += SLOT
                elif code == 0x68:  # BINGET
                    if pos >= size:
                        raise self.fail(f"truncated: needs 1 bytes at offset {pos}, {size} in total")
                    index = data[pos]
                    pos += 1
                    push(memo[index] if index < nmemo else self.get_at(index, pos))
                    used += SLOT
                elif code == 0x28:  # MARK
                    used += OBJECT   # the int index and its slot
                    marks.append(len(stack))
                elif code == 0x58 or code == 0x8C:  # BINUNICODE, SHORT_BINUNICODE
                    if fast and code == 0x58:   # maybe torch.save's tensor entries: taken whole (pickle_fast.py)
                        taken = take_entries(data, pos - 1, stack, memo, used, limit,
                                             max_opcodes - opcodes if counting else None)
                        if taken is not None:
                            pos, used, walked = taken
                            nmemo = len(memo)
                            opcodes += walked if counting else 0
                            continue
                    width = 4 if code == 0x58 else 1
                    if pos + width > size:
                        raise self.fail(f"truncated: needs {width} bytes at offset {pos}, {size} in total")
                    length = u32_at(data, pos)[0] if width == 4 else data[pos]
                    pos += width
                    used += SLOT + OBJECT + length
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
                        used += max(0, sys.getsizeof(text) - OBJECT - length)
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
                    used += SLOT + OBJECT + SLOT * len(items)
                    push(items)
                elif code == 0x71:  # BINPUT
                    if pos >= size:
                        raise self.fail(f"truncated: needs 1 bytes at offset {pos}, {size} in total")
                    index = data[pos]
                    pos += 1
                    if index == nmemo:
                        memo.append(stack[-1])
                        nmemo += 1
                        used += MEMO_SLOT
                    else:
                        used += self.put_at(index, stack[-1])
                elif code == 0x6A:  # LONG_BINGET
                    if pos + 4 > size:
                        raise self.fail(f"truncated: needs 4 bytes at offset {pos}, {size} in total")
                    index = u32_at(data, pos)[0]
                    pos += 4
                    push(memo[index] if index < nmemo else self.get_at(index, pos))
                    used += SLOT
                elif code == 0x89 or code == 0x88 or code == 0x4E or code == 0x29:  # NEWFALSE/TRUE, NONE, ()
                    push(CONSTANTS[code])
                    used += SLOT
                elif code == 0x52 and len(stack) >= 2 and type(stack[-2]) is Global and type(stack[-1]) is tuple \
                        and len(stack[-1]) != 1 and stack[-2].qualname in RECORD_REDUCERS:
                    # REDUCE building a tensor record or an empty dict; other calls (which may copy
                    # an argument) are charged by ``reduce``
                    used += RECORD + SLOT + OBJECT
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
                    used += RECORD
                    if used > limit:
                        break
                    stack[-1] = StorageRef(key, storage_type.dtype, location, numel)
                else:
                    self.pos, self.used = pos, used
                    handler = ops.get(code)
                    if handler is None:
                        raise self.fail(f"opcode {bytes([code])!r} at offset {pos - 1} is not supported")
                    if handler() is STOP:
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


def walk_pickle(data: bytes, where: str = "data.pkl") -> Any:
    """Interpret a pickle made of plain containers, scalars and tensors, without executing it.

    Returns the object tree with tensors as :class:`TensorView` and OrderedDicts as
    dicts.  Any global, call or opcode outside the allowlist raises
    :class:`CheckpointError` whose message starts with ``where``::

        walk_pickle(zip_entry_bytes, where="model.ckpt: data.pkl")
    """
    return _walk(data, where, fast=True)


def _walk(data: bytes, where: str, fast: bool) -> Any:
    """``walk_pickle``; ``fast=False`` walks every opcode one by one (the tests compare both paths)."""
    walker = _Walker(bytes(data), where, fast)
    with gc_paused():  # the walk makes ~30 objects per tensor and no garbage: the collector only costs time
        try:
            return walker.run()
        except CheckpointError:
            raise
        except IndexError:
            raise walker.fail(f"stack underflow at offset {walker.pos - 1}") from None
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError, RecursionError, struct.error) as e:
            raise walker.fail(f"malformed pickle at offset {walker.pos - 1}: {type(e).__name__}: {e}") from None
