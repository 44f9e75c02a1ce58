"""A pickle opcode walker that never executes anything.

``torch.save`` writes its object tree as a pickle whose only "code" is a handful
of well-known globals (``_rebuild_tensor_v2``, storage types, ``OrderedDict``).
This module interprets the opcodes itself: every GLOBAL must be on an allowlist
and becomes an inert :class:`Global` marker, and REDUCE is answered by our own
small handlers that build inert values (:class:`TensorView`, dicts, tuples).
Nothing from the pickle is imported, called or instantiated, so a malicious
``data.pkl`` can at worst produce a :class:`~gemma_stream.errors.CheckpointError`.

Example::

    tree = walk_pickle(data_pkl_bytes, where="model.ckpt: data.pkl")
    tree["model_state_dict"]["embedder.weight"]  # -> TensorView(...)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Callable

from ..dtypes import DTYPES, DType
from ..errors import CheckpointError

__all__ = ["Global", "StorageRef", "TensorView", "walk_pickle", "describe", "MAX_CONTAINERS"]

#: containers a pickle may create; a 2B model needs ~2k, 100k tensors ~600k.  Bounds
#: the memory an adversarial pickle can make us allocate (1 opcode byte -> ~60 bytes).
MAX_CONTAINERS = 1 << 22


@dataclass(frozen=True, eq=False)
class Global:
    """An allowlisted global, by qualified name; ``dtype`` for storage types and dtypes."""

    qualname: str
    dtype: DType | None = None
    is_storage_type: bool = False


@dataclass(frozen=True, eq=False)
class StorageRef:
    """A persistent id ``('storage', type, key, location, numel)``: bytes in ``data/<key>``.

    ``numel`` counts elements of ``dtype`` (``u8`` bytes for ``UntypedStorage``).
    """

    key: str
    dtype: DType
    location: str
    numel: int


@dataclass(frozen=True, eq=False)
class TensorView:
    """What ``_rebuild_tensor_v2/v3`` would build: a strided view of one storage.

    ``storage_offset``, ``size`` and ``stride`` are in elements of ``dtype``.
    Only the types are checked here; ranges are validated by the zip reader,
    which knows the tensor's name and the storage's real size.
    """

    storage: StorageRef
    dtype: DType
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


# --- the allowlist ----------------------------------------------------------------
# Legacy typed storage classes (torch.storage._dtype_to_storage_type_map); dtypes added
# since then are saved as UntypedStorage plus a torch dtype passed to _rebuild_tensor_v3.
_STORAGE_TYPES = {
    "DoubleStorage": "f64", "FloatStorage": "f32", "HalfStorage": "f16", "LongStorage": "i64",
    "IntStorage": "i32", "ShortStorage": "i16", "CharStorage": "i8", "ByteStorage": "u8",
    "BoolStorage": "bool", "BFloat16Storage": "bf16", "ComplexDoubleStorage": "c128",
    "ComplexFloatStorage": "c64",
}
_ALLOWED: dict[str, Global] = {}
for _cls, _name in _STORAGE_TYPES.items():
    for _module in ("torch", "torch.cuda"):
        _ALLOWED[f"{_module}.{_cls}"] = Global(f"{_module}.{_cls}", DTYPES[_name], True)
_ALLOWED["torch.storage.UntypedStorage"] = Global("torch.storage.UntypedStorage", DTYPES["u8"], True)
for _dtype in DTYPES.values():
    if _dtype.torch is not None:  # str(torch.bfloat16) == "torch.bfloat16", as pickled
        _ALLOWED[str(_dtype.torch)] = Global(str(_dtype.torch), _dtype)
for _name in ("collections.OrderedDict", "collections.Counter", "torch._utils._rebuild_tensor",
              "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3",
              "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state",
              "torch._tensor._rebuild_from_type_v2", "torch.Tensor", "torch.nn.parameter.Parameter",
              "torch.Size", "torch.device", "_codecs.encode", "builtins.set", "builtins.frozenset",
              "builtins.complex", "builtins.bytearray"):
    _ALLOWED[_name] = Global(_name)
_TENSOR_CLASSES = ("torch.Tensor", "torch.nn.parameter.Parameter")
_SCALARS = (str, int, float, bool, bytes, type(None))


def describe(obj: Any, limit: int = 80) -> str:
    """A short, bounded, cycle-safe repr of a walked value (for ``Checkpoint.extras``)."""
    parts: list[str] = []
    budget = [limit]

    def emit(text: str) -> bool:
        parts.append(text)
        budget[0] -= len(text)
        return budget[0] > 0

    def walk(value: Any, depth: int) -> bool:
        if isinstance(value, TensorView):
            return emit(f"tensor({value.dtype.name}{list(value.size)})")
        if isinstance(value, Global):
            return emit(value.qualname)
        if isinstance(value, int) and value.bit_length() > 64:  # str() of huge ints is slow or refused
            return emit(f"<{value.bit_length()}-bit int>")
        if isinstance(value, _SCALARS):
            return emit(repr(value[:limit] if isinstance(value, (str, bytes)) else value))
        if depth >= 4:
            return emit("...")
        if isinstance(value, dict):
            pairs: Any = value.items()
            opener, closer = "{", "}"
        elif isinstance(value, (list, tuple, set, frozenset)):
            pairs = ((None, item) for item in value)
            opener, closer = ("[", "]") if isinstance(value, list) else ("(", ")")
        else:
            return emit(type(value).__name__)
        if not emit(opener):
            return False
        for i, (key, item) in enumerate(pairs):
            if (i and not emit(", ")) or (key is not None and not (walk(key, depth + 1) and emit(": "))):
                return False
            if not walk(item, depth + 1):
                return False
        return emit(closer)

    if not walk(obj, 0):
        return "".join(parts)[:limit] + "..."
    return "".join(parts)


class _Walker:
    """Stack machine for the binary pickle opcodes (protocols 2 to 5)."""

    def __init__(self, data: bytes, where: str) -> None:
        self.data = data
        self.where = where
        self.pos = 0
        self.stack: list[Any] = []
        self.marks: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.containers = 0

    # -- helpers -------------------------------------------------------------------
    def fail(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.where}: {message}")

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.data):  # checked before slicing: a length field cannot allocate
            raise self.fail(f"truncated: needs {n} bytes at offset {self.pos}, {len(self.data)} in total")
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def unpack(self, fmt: str) -> int:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def new_container(self, value: Any) -> Any:
        self.containers += 1
        if self.containers > MAX_CONTAINERS:
            raise self.fail(f"more than {MAX_CONTAINERS} containers; refusing to allocate more")
        return value

    def pop_mark(self) -> list[Any]:
        if not self.marks:
            raise self.fail(f"opcode at offset {self.pos - 1} needs a MARK and there is none")
        items = self.stack
        self.stack = self.marks.pop()
        return items

    def hashable(self, key: Any) -> Any:
        # Only scalars (and flat tuples of them) may be dict keys or set items: hashing a
        # deeply nested tuple from an adversarial pickle could overflow the C stack.
        if isinstance(key, _SCALARS) or (isinstance(key, tuple) and all(isinstance(k, _SCALARS) for k in key)):
            return key
        raise self.fail(f"a {type(key).__name__} used as a dict key or set item is not supported")

    def text(self, raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"string at offset {self.pos - len(raw)} is not valid UTF-8") from None

    def lookup_global(self, module: str, name: str) -> Global:
        module = {"__builtin__": "builtins"}.get(module, module)  # protocol-2 spelling
        qualname = f"{module}.{name}"
        found = _ALLOWED.get(qualname)
        if found is None:
            raise self.fail(f"global {qualname!r} is not allowed; gemma_stream never executes pickle code "
                            f"(only plain tensors, dicts and scalars are supported)")
        return found

    # -- the main loop -------------------------------------------------------------
    def run(self) -> Any:
        ops = _OPS
        data = self.data
        while self.pos < len(data):
            code = data[self.pos]
            self.pos += 1
            handler = ops.get(code)
            if handler is None:
                raise self.fail(f"opcode {bytes([code])!r} at offset {self.pos - 1} is not supported")
            if handler(self) is _STOP:
                if len(self.stack) != 1 or self.marks:
                    raise self.fail(f"STOP with {len(self.stack)} values on the stack")
                return self.stack[0]
        raise self.fail("pickle ends without a STOP opcode (truncated)")


_STOP = object()


def _op(*codes: bytes) -> Callable[[Callable[[_Walker], Any]], Callable[[_Walker], Any]]:
    def register(fn: Callable[[_Walker], Any]) -> Callable[[_Walker], Any]:
        for code in codes:
            _OPS[code[0]] = fn
        return fn
    return register


_OPS: dict[int, Callable[[_Walker], Any]] = {}


@_op(b"\x80")
def _proto(w: _Walker) -> None:
    version = w.take(1)[0]
    if version > 5:
        raise w.fail(f"pickle protocol {version} is newer than 5")


@_op(b"\x95")  # FRAME: a length hint only; the data is read as one buffer anyway
def _frame(w: _Walker) -> None:
    if w.unpack("<Q") > len(w.data) - w.pos:
        raise w.fail("FRAME runs past the end of the pickle (truncated)")


@_op(b".")
def _stop(w: _Walker) -> object:
    return _STOP


@_op(b"(")
def _mark(w: _Walker) -> None:
    w.marks.append(w.stack)
    w.stack = []


@_op(b"0")
def _pop(w: _Walker) -> None:
    if w.stack:
        w.stack.pop()
    else:
        w.pop_mark()


@_op(b"1")
def _pop_mark(w: _Walker) -> None:
    w.pop_mark()


@_op(b"2")
def _dup(w: _Walker) -> None:
    w.stack.append(w.stack[-1])


_CONSTANTS = {ord("N"): None, 0x88: True, 0x89: False}
for _code, _value in _CONSTANTS.items():
    _OPS[_code] = lambda w, _v=_value: w.stack.append(_v)
_OPS[ord("J")] = lambda w: w.stack.append(w.unpack("<i"))
_OPS[ord("K")] = lambda w: w.stack.append(w.take(1)[0])
_OPS[ord("M")] = lambda w: w.stack.append(w.unpack("<H"))
_OPS[ord("G")] = lambda w: w.stack.append(struct.unpack(">d", w.take(8))[0])
_OPS[0x8A] = lambda w: w.stack.append(int.from_bytes(w.take(w.take(1)[0]), "little", signed=True))
_OPS[0x8B] = lambda w: w.stack.append(int.from_bytes(w.take(w.unpack("<i")), "little", signed=True))
# strings and bytes: (opcode, length format, decode as text)
for _code, _fmt, _is_text in ((b"X", "<I", True), (b"\x8c", "<B", True), (b"\x8d", "<Q", True),
                              (b"B", "<I", False), (b"C", "<B", False), (b"\x8e", "<Q", False),
                              (b"\x96", "<Q", False), (b"T", "<i", None), (b"U", "<B", None)):
    def _read_string(w: _Walker, _fmt: str = _fmt, _is_text: bool | None = _is_text) -> None:
        raw = w.take(w.unpack(_fmt))
        if _is_text is None:  # protocol-2 str of Python 2: text if it decodes, else bytes
            try:
                w.stack.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                w.stack.append(raw)
        else:
            w.stack.append(w.text(raw) if _is_text else raw)
    _OPS[_code[0]] = _read_string


@_op(b")")
def _empty_tuple(w: _Walker) -> None:
    w.stack.append(())


@_op(b"t")
def _tuple(w: _Walker) -> None:
    w.stack.append(w.new_container(tuple(w.pop_mark())))


def _tuple_n(n: int) -> Callable[[_Walker], None]:
    def build(w: _Walker) -> None:
        if len(w.stack) < n:
            raise w.fail(f"TUPLE{n} at offset {w.pos - 1} needs {n} values on the stack")
        items = tuple(w.stack[-n:])
        del w.stack[-n:]
        w.stack.append(w.new_container(items))
    return build


_OPS[0x85], _OPS[0x86], _OPS[0x87] = _tuple_n(1), _tuple_n(2), _tuple_n(3)
_OPS[ord("]")] = lambda w: w.stack.append(w.new_container([]))
_OPS[ord("}")] = lambda w: w.stack.append(w.new_container({}))
_OPS[0x8F] = lambda w: w.stack.append(w.new_container(set()))
_OPS[ord("l")] = lambda w: w.stack.append(w.new_container(w.pop_mark()))


@_op(b"d")
def _dict(w: _Walker) -> None:
    items = w.pop_mark()
    w.stack.append(w.new_container(_pairs_into({}, items, w)))


def _pairs_into(target: Any, items: list[Any], w: _Walker) -> Any:
    if not isinstance(target, dict):
        raise w.fail(f"SETITEM(S) on a {type(target).__name__}")
    if len(items) % 2:
        raise w.fail("SETITEMS with an odd number of values")
    for i in range(0, len(items), 2):
        target[w.hashable(items[i])] = items[i + 1]
    return target


@_op(b"s")
def _setitem(w: _Walker) -> None:
    value, key = w.stack.pop(), w.stack.pop()
    _pairs_into(w.stack[-1], [key, value], w)


@_op(b"u")
def _setitems(w: _Walker) -> None:
    items = w.pop_mark()
    _pairs_into(w.stack[-1], items, w)


@_op(b"a", b"e")
def _append(w: _Walker) -> None:
    items = [w.stack.pop()] if w.data[w.pos - 1] == ord("a") else w.pop_mark()
    target = w.stack[-1]
    if not isinstance(target, list):
        raise w.fail(f"APPEND(S) on a {type(target).__name__}")
    target.extend(items)


@_op(b"\x90")
def _additems(w: _Walker) -> None:
    items = w.pop_mark()
    target = w.stack[-1]
    if not isinstance(target, set):
        raise w.fail(f"ADDITEMS on a {type(target).__name__}")
    target.update(w.hashable(item) for item in items)


@_op(b"\x91")
def _frozenset(w: _Walker) -> None:
    w.stack.append(w.new_container(frozenset(w.hashable(item) for item in w.pop_mark())))


# -- memo: indices are dict keys, so a huge LONG_BINPUT index allocates nothing --------
_OPS[ord("q")] = lambda w: w.memo.__setitem__(w.take(1)[0], w.stack[-1])
_OPS[ord("r")] = lambda w: w.memo.__setitem__(w.unpack("<I"), w.stack[-1])
_OPS[0x94] = lambda w: w.memo.__setitem__(len(w.memo), w.stack[-1])


@_op(b"h", b"j")
def _get(w: _Walker) -> None:
    index = w.take(1)[0] if w.data[w.pos - 1] == ord("h") else w.unpack("<I")
    if index not in w.memo:
        raise w.fail(f"memo entry {index} read at offset {w.pos} was never stored")
    w.stack.append(w.memo[index])


@_op(b"c")
def _global(w: _Walker) -> None:
    end_module = w.data.find(b"\n", w.pos, w.pos + 256)
    end_name = w.data.find(b"\n", end_module + 1, end_module + 257) if end_module >= 0 else -1
    if end_name < 0:
        raise w.fail(f"GLOBAL at offset {w.pos - 1} is not two short newline-terminated lines")
    module, name = w.text(w.data[w.pos:end_module]), w.text(w.data[end_module + 1:end_name])
    w.pos = end_name + 1
    w.stack.append(w.lookup_global(module, name))


@_op(b"\x93")
def _stack_global(w: _Walker) -> None:
    name, module = w.stack.pop(), w.stack.pop()
    if not isinstance(module, str) or not isinstance(name, str):
        raise w.fail("STACK_GLOBAL needs two strings")
    w.stack.append(w.lookup_global(module, name))


@_op(b"Q")
def _binpersid(w: _Walker) -> None:
    pid = w.stack.pop()
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
        raise w.fail(f"persistent id {describe(pid)} is not ('storage', type, key, location, numel)")
    _, storage_type, key, location, numel = pid
    if not (isinstance(storage_type, Global) and storage_type.is_storage_type):
        raise w.fail(f"persistent id names {describe(storage_type)}, not a supported storage type")
    if not isinstance(key, str) or not isinstance(location, str) or type(numel) is not int or numel < 0:
        raise w.fail(f"persistent id {describe(pid)} has a malformed key, location or numel")
    assert storage_type.dtype is not None
    w.stack.append(StorageRef(key, storage_type.dtype, location, numel))


@_op(b"R")
def _reduce(w: _Walker) -> None:
    args, func = w.stack.pop(), w.stack.pop()
    if not isinstance(args, tuple):
        raise w.fail(f"REDUCE arguments are a {type(args).__name__}, not a tuple")
    handler = _REDUCERS.get(func.qualname) if isinstance(func, Global) else None
    if handler is None:
        raise w.fail(f"calling {describe(func)} is not allowed; gemma_stream never executes pickle code")
    w.stack.append(handler(w, args))


@_op(b"b")
def _build(w: _Walker) -> None:
    state, target = w.stack.pop(), w.stack[-1]
    # An OrderedDict from Module.state_dict() carries `_metadata` (module versions) as
    # instance state; python attributes on tensors arrive the same way. Both are ignored.
    if isinstance(target, dict) and isinstance(state, (dict, type(None))):
        return
    if isinstance(target, TensorView) and (state is None or state == () or state == {}):
        return
    raise w.fail(f"BUILD (setting state) on a {type(target).__name__} is not allowed")


# -- REDUCE handlers: our own code computing inert values, one per allowlisted callable --
def _expect(w: _Walker, args: tuple, name: str, lengths: tuple[int, ...]) -> None:
    if len(args) not in lengths:
        raise w.fail(f"{name} called with {len(args)} arguments, expected {' or '.join(map(str, lengths))}")


def _int_tuple(w: _Walker, value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int for v in value):
        raise w.fail(f"tensor {what} {describe(value)} is not a tuple of integers")
    return tuple(value)


def _tensor(w: _Walker, args: tuple, name: str, dtype: Any = None, metadata: Any = None) -> TensorView:
    storage, offset, size, stride = args[:4]
    if not isinstance(storage, StorageRef):
        raise w.fail(f"{name} expects a storage, got {describe(storage)}")
    if type(offset) is not int:
        raise w.fail(f"{name}: storage offset {describe(offset)} is not an integer")
    if dtype is None:
        dtype = storage.dtype
    elif not (isinstance(dtype, Global) and dtype.dtype is not None and not dtype.is_storage_type):
        raise w.fail(f"{name}: dtype {describe(dtype)} is not a supported torch dtype")
    else:
        dtype = dtype.dtype
    if isinstance(metadata, dict) and any(metadata.values()):
        # conj/neg bits make the stored bytes differ from the tensor's values
        raise w.fail(f"tensor with metadata {describe(metadata)} (conj/neg bit) is not supported; "
                     f"save t.resolve_conj().resolve_neg() instead")
    return TensorView(storage, dtype, offset, _int_tuple(w, size, "size"), _int_tuple(w, stride, "stride"))


def _rebuild_tensor(w: _Walker, args: tuple) -> TensorView:
    _expect(w, args, "_rebuild_tensor", (4,))
    return _tensor(w, args, "_rebuild_tensor")


def _rebuild_tensor_v2(w: _Walker, args: tuple) -> TensorView:
    _expect(w, args, "_rebuild_tensor_v2", (6, 7))
    return _tensor(w, args, "_rebuild_tensor_v2", metadata=args[6] if len(args) == 7 else None)


def _rebuild_tensor_v3(w: _Walker, args: tuple) -> TensorView:
    _expect(w, args, "_rebuild_tensor_v3", (7, 8))
    return _tensor(w, args, "_rebuild_tensor_v3", dtype=args[6], metadata=args[7] if len(args) == 8 else None)


def _rebuild_parameter(w: _Walker, args: tuple) -> TensorView:
    _expect(w, args, "_rebuild_parameter", (3, 4))  # _with_state adds python attributes: ignored
    if not isinstance(args[0], TensorView):
        raise w.fail(f"_rebuild_parameter expects a tensor, got {describe(args[0])}")
    return args[0]


def _rebuild_from_type_v2(w: _Walker, args: tuple) -> Any:
    # (func, new_type, args, state): a Tensor/Parameter with python attributes
    _expect(w, args, "_rebuild_from_type_v2", (4,))
    func, new_type, inner = args[:3]
    if not (isinstance(new_type, Global) and new_type.qualname in _TENSOR_CLASSES):
        raise w.fail(f"tensor subclass {describe(new_type)} is not supported")
    if not isinstance(func, Global) or func.qualname not in _REDUCERS or not isinstance(inner, tuple):
        raise w.fail(f"_rebuild_from_type_v2 with {describe(func)} is not supported")
    result = _REDUCERS[func.qualname](w, inner)
    if not isinstance(result, TensorView):
        raise w.fail("_rebuild_from_type_v2 did not rebuild a tensor")
    return result


def _ordered_dict(w: _Walker, args: tuple) -> dict:
    # OrderedDict() / Counter({...}): a plain dict keeps insertion order
    if args and not (len(args) == 1 and isinstance(args[0], dict)):
        raise w.fail(f"OrderedDict/Counter called with {describe(args)}")
    return w.new_container(dict(args[0]) if args else {})


def _codecs_encode(w: _Walker, args: tuple) -> bytes:
    # protocol 2 pickles bytes as _codecs.encode(text, "latin1")
    if len(args) != 2 or not isinstance(args[0], str) or args[1] not in ("latin1", "latin-1"):
        raise w.fail(f"_codecs.encode called with {describe(args)}")
    return args[0].encode("latin1")


def _sequence(kind: type) -> Callable[[_Walker, tuple], Any]:
    def build(w: _Walker, args: tuple) -> Any:
        if args and not (len(args) == 1 and isinstance(args[0], (list, tuple, bytes))):
            raise w.fail(f"{kind.__name__} called with {describe(args)}")
        items = args[0] if args else ()
        if kind in (set, frozenset):
            items = [w.hashable(item) for item in items]
        return w.new_container(kind(items))
    return build


def _complex(w: _Walker, args: tuple) -> complex:
    if not (1 <= len(args) <= 2 and all(type(a) in (int, float) for a in args)):
        raise w.fail(f"complex called with {describe(args)}")
    return complex(*args)


def _device(w: _Walker, args: tuple) -> str:
    if not args or not all(isinstance(a, (str, int)) for a in args):
        raise w.fail(f"torch.device called with {describe(args)}")
    return ":".join(map(str, args))


_REDUCERS: dict[str, Callable[[_Walker, tuple], Any]] = {
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "collections.OrderedDict": _ordered_dict,
    "collections.Counter": _ordered_dict,
    "_codecs.encode": _codecs_encode,
    "torch.Size": _sequence(tuple),
    "builtins.set": _sequence(set),
    "builtins.frozenset": _sequence(frozenset),
    "builtins.bytearray": _sequence(bytearray),
    "builtins.complex": _complex,
    "torch.device": _device,
}


def walk_pickle(data: bytes, where: str = "data.pkl") -> Any:
    """Interpret a pickle made of plain containers, scalars and tensors, without executing it.

    Returns the object tree with tensors as :class:`TensorView` and OrderedDicts as
    dicts.  Any global, call or opcode outside the allowlist raises
    :class:`CheckpointError` whose message starts with ``where``::

        walk_pickle(zip_entry_bytes, where="model.ckpt: data.pkl")
    """
    walker = _Walker(bytes(data), where)
    try:
        return walker.run()
    except CheckpointError:
        raise
    except IndexError:
        raise walker.fail(f"stack underflow at offset {walker.pos - 1}") from None
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError, RecursionError, struct.error) as e:
        raise walker.fail(f"malformed pickle at offset {walker.pos - 1}: {type(e).__name__}: {e}") from None
