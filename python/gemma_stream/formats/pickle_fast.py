"""The pickle walker's fast path: one regular ``torch.save`` tensor entry at a time.

``torch.save`` writes a state dict as protocol-2 opcodes, and every tensor after the first of
its dtype is the same ~30-opcode run (name, ``_rebuild_tensor_v2`` and the storage type fetched
from the memo, the persistent id, offset, size, stride, an empty ``OrderedDict``)::

    X <name> q  h<rebuild> ( ( h<'storage'> h<storage type> X <key> q X <location> q <numel> t q Q
    <offset>  <size...> TUPLEn q  <stride...> TUPLEn q  \\x89 h<OrderedDict> ) R q  t q  R q

:func:`take_entries` recognises such runs with one compiled bytes pattern (the location is
a fresh string or, as torch.save writes real tensors, read back from the memo) and does to the
stack, the memo, the budget and the opcode count exactly what the general walker would.  It
raises nothing: anything irregular (a GLOBAL instead of a memo read, a memo index out of
sequence, a negative numel, a memo entry of an unexpected type, four or more dimensions, a
budget or opcode limit that the run would cross) stops it, and the general walker walks that
run opcode by opcode, with every check and every error message it has.  The fast path therefore changes only the speed:
tests/test_pickle_walker.py runs both paths on mutated pickles and compares results and errors.
"""

from __future__ import annotations

import re
import struct
import sys
from typing import Any

from .pickle_ops import MEMO_SLOT, OBJECT, RECORD, SLOT
from .torch_globals import Global, StorageRef, TensorView

__all__ = ["take_entries", "ENTRY_AFTER_NAME"]

_PUT = rb"(q.|r.{4})"            # BINPUT / LONG_BINPUT
_GET = rb"(h.|j.{4})"            # BINGET / LONG_BINGET
_INT = rb"(K.|M..|J.{4})"        # BININT1 / BININT2 / BININT
# a size or stride: () is EMPTY_TUPLE (never memoized); else 1-3 ints, TUPLE1/2/3 and its PUT
_DIMS = rb"(?:\)|((?:K.|M..|J.{4}){1,3})([\x85-\x87])(q.|r.{4}))"
#: the tensor entry after its name, for the walker to try when a BINUNICODE is followed by a PUT
ENTRY_AFTER_NAME = re.compile(
    _PUT + _GET + rb"\(\(" + _GET + _GET
    + rb"X(.)\x00\x00\x00([0-9]{1,20})" + _PUT          # storage key: decimal, as torch.save writes it
    # location ("cpu", "cuda:0"): torch.save memoizes the one string of real tensors (a GET); fake tensors' are new
    + rb"(?:X(.)\x00\x00\x00([a-z0-9:]{1,32})" + _PUT + b"|" + _GET + rb")"
    + _INT + rb"t" + _PUT + rb"Q" + _INT + _DIMS + _DIMS
    + rb"([\x88\x89])" + _GET + rb"\)R" + _PUT + rb"t" + _PUT + rb"R" + _PUT,
    re.DOTALL)
_INT_TOKEN = re.compile(rb"K.|M..|J.{4}", re.DOTALL)   # the first byte fixes each token's length
_U16, _U32, _I32 = (struct.Struct(f).unpack_from for f in ("<H", "<I", "<i"))
_TUPLE_OPS = {0x85: 1, 0x86: 2, 0x87: 3}
_REBUILD, _ORDERED_DICT = "torch._utils._rebuild_tensor_v2", "collections.OrderedDict"
# What the general walker charges the budget for the run's fixed opcodes (pickle_walker.run and
# pickle_ops): 6 PUTs (name, key, pid, {}, args, view), 4 GETs, 2 MARKs, the key string's header,
# the 5-tuple, BINPERSID, NEWFALSE, the empty tuple, two REDUCEs, the 6-tuple.  The name, the
# location, the ints and the dims (with their PUTs) are added per entry.
_FIXED_CHARGE = (6 * MEMO_SLOT + 4 * SLOT + 2 * OBJECT + (SLOT + OBJECT) + (SLOT + OBJECT + 5 * SLOT)
                 + RECORD + SLOT + SLOT + 2 * (RECORD + SLOT + OBJECT) + (SLOT + OBJECT + 6 * SLOT))
#: the run's opcodes besides the name, the location, the two ints and the dims: 6 PUTs, 4 GETs,
#: 2 MARKs, the key, 2 TUPLEs, BINPERSID, NEWFALSE, EMPTY_TUPLE, 2 REDUCEs
_FIXED_OPCODES = 20


#: most of a checkpoint's ints, sizes and strides repeat: each distinct token run is decoded once
#: (bounded, so a hostile pickle of distinct values cannot grow them past a few MB)
_CACHE_LIMIT = 1 << 14
_int_cache: dict[bytes, tuple[int, int]] = {}
_dims_cache: dict[bytes, tuple[tuple[int, ...], int, int]] = {}


def _int(token: bytes) -> tuple[int, int]:
    """(value, budget charge) of one int opcode, as the walker charges it (small ints are shared)."""
    found = _int_cache.get(token)
    if found is None:
        code = token[0]
        if code == 0x4B:           # BININT1 is inline in the walker: a slot, whatever the value
            found = token[1], SLOT
        else:
            value = _U16(token, 1)[0] if code == 0x4D else _I32(token, 1)[0]
            found = value, SLOT if -5 <= value <= 256 else SLOT + OBJECT
        if len(_int_cache) < _CACHE_LIMIT:
            _int_cache[token] = found
    return found


def _dims(ints: bytes, op: bytes) -> tuple[tuple[int, ...], int, int]:
    """(dims, budget charge, opcodes) of a size or stride (its PUT is counted by the caller), or
    :data:`_BAD_DIMS` when the tuple opcode disagrees with the count of ints.

    The tuple may be shared by several entries: it is immutable and equal to what the general
    walker builds."""
    if not ints:   # EMPTY_TUPLE
        return _EMPTY_DIMS
    run = ints + op
    found = _dims_cache.get(run)
    if found is not None:
        return found
    tokens = _INT_TOKEN.findall(ints)
    if len(tokens) != _TUPLE_OPS[op[0]]:
        found = _BAD_DIMS
    else:
        dims, charge = [], SLOT + OBJECT + SLOT * len(tokens)
        for token in tokens:
            value, cost = _int(token)
            dims.append(value)
            charge += cost
        found = tuple(dims), charge, len(tokens) + 1
    if len(_dims_cache) < _CACHE_LIMIT:
        _dims_cache[run] = found
    return found


_EMPTY_DIMS = ((), SLOT, 1)
_BAD_DIMS = ((), 0, 0)   # by identity: a run of ints the general walker would not make a size of


#: entries taken per call at most; the walker calls again for the next ones.  Measured on CPython
#: 3.11: this function's first call in a process ran about 15% slower than its later calls on the
#: same bytes (a fresh copy of its code object did the same), so one call that took all 4,172
#: entries of a many-tensor zip walked them in 34 ms against 29; at 64 a call, a process's first
#: walk took 30 ms and later walks 0.4 ms more than before (benchmarks/NOTES.md 44)
ENTRIES_PER_CALL = 64


def take_entries(data: bytes, pos: int, stack: list[Any], memo: list[Any], used: int, limit: int,
                 opcodes_left: int | None) -> tuple[int, int, int] | None:
    """Walk the regular tensor entries that start at ``pos`` (a BINUNICODE), as many as follow
    (at most ``ENTRIES_PER_CALL``).

    Each entry taken pushes its name and :class:`TensorView` on ``stack`` and appends its memo
    entries to ``memo``, exactly as the general walker would.  Returns ``(position after the
    last entry taken, budget used, opcodes walked)``, or ``None`` when the bytes at ``pos`` are
    not a regular entry (nothing changed): the general walker then takes the next opcode.
    An entry that would cross ``limit`` or ``opcodes_left`` is left to the general walker too,
    so its refusal names the same offset.
    """
    size = len(data)
    match, u32, getsizeof = ENTRY_AFTER_NAME.match, _U32, sys.getsizeof
    int_cache, dims_cache = _int_cache, _dims_cache
    start_pos, walked_total = pos, 0
    # the four memo reads as checked, by their opcodes: within one call the memo only grows, so
    # an index once read and checked keeps its object (entries repeat the same four reads)
    checked_reads: dict[tuple[bytes, bytes, bytes, bytes], tuple[str, Global]] = {}
    left = ENTRIES_PER_CALL
    while pos + 5 <= size and data[pos] == 0x58 and left:   # BINUNICODE: the entry's name
        left -= 1
        length = u32(data, pos + 1)[0]
        name_end = pos + 5 + length
        m = match(data, name_end)
        if m is None:
            break
        # b"" for the alternatives not taken (every group taken is at least a byte)
        (put_name, get_rebuild, get_tag, get_type, key_len, key, put_key, loc_len, loc, put_loc, get_loc,
         numel_token, put_pid, offset_token, size_ints, size_op, put_size, stride_ints, stride_op, put_stride, grad,
         get_dict, put_dict, put_args, put_view) = m.groups(b"")
        nmemo = len(memo)
        reads = (get_rebuild, get_tag, get_type, get_dict)
        found = checked_reads.get(reads)
        if found is None:
            # the memo reads: indices the walker has stored, holding what a regular entry reads there
            # (an index past them, even the entry's own name, is left to the general path)
            i1 = get_rebuild[1] if len(get_rebuild) == 2 else u32(get_rebuild, 1)[0]
            i2 = get_tag[1] if len(get_tag) == 2 else u32(get_tag, 1)[0]
            i3 = get_type[1] if len(get_type) == 2 else u32(get_type, 1)[0]
            i4 = get_dict[1] if len(get_dict) == 2 else u32(get_dict, 1)[0]
            if i1 >= nmemo or i2 >= nmemo or i3 >= nmemo or i4 >= nmemo:
                break
            rebuild, tag, storage_type, ordered_dict = memo[i1], memo[i2], memo[i3], memo[i4]
            if not (type(rebuild) is Global and rebuild.qualname == _REBUILD and type(tag) is str
                    and tag == "storage" and type(storage_type) is Global and storage_type.is_storage_type
                    and storage_type.dtype and type(ordered_dict) is Global
                    and ordered_dict.qualname == _ORDERED_DICT):
                break
            found = checked_reads[reads] = (tag, storage_type)
        tag, storage_type = found
        if key_len[0] != len(key):
            break
        if not get_loc:
            if loc_len[0] != len(loc):
                break
            loc_charge, loc = SLOT + OBJECT + len(loc), loc.decode("ascii")
        else:   # the string a previous entry stored
            index = get_loc[1] if len(get_loc) == 2 else u32(get_loc, 1)[0]
            if index >= nmemo or type(memo[index]) is not str:
                break
            loc_charge, loc = SLOT, memo[index]
        numel, numel_charge = int_cache.get(numel_token) or _int(numel_token)
        offset, offset_charge = int_cache.get(offset_token) or _int(offset_token)
        size_dims = dims_cache.get(size_ints + size_op) or _dims(size_ints, size_op)
        stride_dims = dims_cache.get(stride_ints + stride_op) or _dims(stride_ints, stride_op)
        if numel < 0 or size_dims is _BAD_DIMS or stride_dims is _BAD_DIMS:
            break
        # the memo stores, in order: name, key, location, pid tuple, size, stride, {}, the args, the
        # view (the location, size and stride only when they have a PUT), at the indices the PUTs
        # name, which must be the next ones (else the general path stores them where they say)
        stored = 6 + (put_loc != b"") + (put_size != b"") + (put_stride != b"")
        puts = b"".join((put_name, put_key, put_loc, put_pid, put_size, put_stride, put_dict, put_args, put_view))
        if len(puts) == 5 * stored:      # LONG_BINPUTs, as torch.save writes from index 256
            in_sequence = _LONG_PUTS[stored](puts) == tuple(range(nmemo, nmemo + stored))
        elif len(puts) == 2 * stored:    # BINPUTs
            in_sequence = nmemo + stored <= 256 and puts[1::2] == bytes(range(nmemo, nmemo + stored))
        else:                            # the two kinds mixed, around index 256
            in_sequence = _puts_in_sequence(puts, nmemo)
        if not in_sequence:
            break
        try:
            name = data[pos + 5:name_end].decode("utf-8")
        except UnicodeDecodeError:
            break
        dims_size, size_charge, size_ops = size_dims
        dims_stride, stride_charge, stride_ops = stride_dims
        charge = (SLOT + OBJECT + length + _FIXED_CHARGE + len(key) + loc_charge + numel_charge + offset_charge
                  + size_charge + stride_charge + (stored - 6) * MEMO_SLOT)
        if not name.isascii():   # as the walker charges a non-ASCII str
            charge += max(0, getsizeof(name) - OBJECT - length)
        walked = 1 + _FIXED_OPCODES + 3 + size_ops + stride_ops + stored - 6   # name, 2 ints, location
        if used + charge > limit or (opcodes_left is not None and walked > opcodes_left):
            break
        key = key.decode("ascii")
        dtype = storage_type.dtype
        storage = StorageRef(key, dtype, loc, numel)
        hooks: dict = {}
        view = TensorView(storage, dtype, offset, dims_size, dims_stride)
        memo += [name, key]
        if put_loc:
            memo.append(loc)
        memo.append((tag, storage_type, key, loc, numel))
        if put_size:
            memo.append(dims_size)
        if put_stride:
            memo.append(dims_stride)
        memo += [hooks, (storage, offset, dims_size, dims_stride, grad == b"\x88", hooks), view]
        stack += [name, view]
        used += charge
        walked_total += walked
        if opcodes_left is not None:
            opcodes_left -= walked
        pos = m.end()
    return (pos, used, walked_total) if pos != start_pos else None


#: the indices of ``n`` LONG_BINPUTs in a row (the opcode bytes skipped: the pattern fixed them)
_LONG_PUTS = {n: struct.Struct("<" + "xI" * n).unpack for n in range(6, 10)}


def _puts_in_sequence(puts: bytes, index: int) -> bool:
    """Whether BINPUTs and LONG_BINPUTs (each taken whole by the pattern) store ``index``, ``index + 1``, ..."""
    pos = 0
    while pos < len(puts):
        if puts[pos] == 0x71:   # BINPUT
            if puts[pos + 1] != index:
                return False
            pos += 2
        else:
            if _U32(puts, pos + 1)[0] != index:
                return False
            pos += 5
        index += 1
    return True
