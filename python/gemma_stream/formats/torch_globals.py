"""What a torch.save pickle may name, and the inert values our REDUCE handlers build.

The allowlist is the set of globals ``torch.load(weights_only=True)`` accepts for
plain state dicts: storage types, torch dtypes, the ``_rebuild_*`` functions,
``OrderedDict``, ``torch.Size``, ``set`` and ``_codecs.encode``.  A GLOBAL on the
list becomes a :class:`Global` marker (nothing is imported); a REDUCE on one of
them runs *our* handler from :data:`REDUCERS`, which checks the arguments and
returns a :class:`TensorView`, a dict, a tuple or bytes.  The opcode machine that
uses them is :mod:`.pickle_walker`.

Example::

    ALLOWED["torch._utils._rebuild_tensor_v2"]   # -> Global(...)
    REDUCERS["collections.OrderedDict"](walker, ())  # -> {}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from ..dtypes import DTYPES, DType
from ..errors import CheckpointError

__all__ = ["Global", "StorageRef", "TensorView", "ALLOWED", "REDUCERS", "SCALARS", "Interpreter", "describe"]


@dataclass(frozen=True, eq=False, slots=True)
class Global:
    """An allowlisted global, by qualified name; ``dtype`` for storage types and dtypes."""

    qualname: str
    dtype: DType | None = None
    is_storage_type: bool = False


# StorageRef and TensorView are built once per tensor of a checkpoint (thousands in a MoE zip), and
# a frozen dataclass's __init__ (object.__setattr__ per field) took 0.9 us against 0.25 us: they are
# plain slotted records, which nothing outside the zip reader holds or changes.
@dataclass(eq=False, slots=True)
class StorageRef:
    """A persistent id ``('storage', type, key, location, numel)``: bytes in ``data/<key>``.

    ``numel`` counts elements of ``dtype`` (``u8`` bytes for ``UntypedStorage``).
    """

    key: str
    dtype: DType
    location: str
    numel: int


@dataclass(eq=False, slots=True)
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
ALLOWED: dict[str, Global] = {}
for _cls, _name in _STORAGE_TYPES.items():
    for _module in ("torch", "torch.cuda"):
        ALLOWED[f"{_module}.{_cls}"] = Global(f"{_module}.{_cls}", DTYPES[_name], True)
ALLOWED["torch.storage.UntypedStorage"] = Global("torch.storage.UntypedStorage", DTYPES["u8"], True)
for _dtype in DTYPES.values():
    if _dtype.torch is not None:  # str(torch.bfloat16) == "torch.bfloat16", as pickled
        ALLOWED[str(_dtype.torch)] = Global(str(_dtype.torch), _dtype)
for _name in ("collections.OrderedDict", "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2",
              "torch._utils._rebuild_tensor_v3", "torch._utils._rebuild_parameter",
              "torch._utils._rebuild_parameter_with_state", "torch._tensor._rebuild_from_type_v2",
              "torch.Tensor", "torch.nn.parameter.Parameter", "torch.Size", "_codecs.encode", "builtins.set"):
    ALLOWED[_name] = Global(_name)
_TENSOR_CLASSES = ("torch.Tensor", "torch.nn.parameter.Parameter")
SCALARS = (str, int, float, bool, bytes, type(None))


def describe(obj: Any, limit: int = 80) -> str:
    """A short, bounded, cycle-safe repr of a walked value (for ``Checkpoint.extras``)."""
    out: list[str] = []
    used = 0

    def emit(text: str) -> None:
        nonlocal used
        out.append(text)
        used += len(text)

    def walk(value: Any, depth: int) -> None:
        if isinstance(value, TensorView):
            emit(f"tensor({value.dtype.name}{list(value.size)})")
        elif isinstance(value, Global):
            emit(value.qualname)
        elif isinstance(value, int) and value.bit_length() > 64:  # str() of huge ints is slow or refused
            emit(f"<{value.bit_length()}-bit int>")
        elif isinstance(value, SCALARS):
            emit(repr(value[:limit] if isinstance(value, (str, bytes)) else value))
        elif not isinstance(value, (dict, list, tuple, set, frozenset)):
            emit(type(value).__name__)
        elif depth >= 4:  # also what ends a cycle
            emit("...")
        else:
            pairs = value.items() if isinstance(value, dict) else ((None, item) for item in value)
            brackets = "{}" if isinstance(value, dict) else "[]" if isinstance(value, list) else "()"
            emit(brackets[0])
            for i, (key, item) in enumerate(pairs):
                if used > limit:  # stop early: a value may hold millions of items
                    return
                emit(", " if i else "")
                if key is not None:
                    walk(key, depth + 1)
                    emit(": ")
                walk(item, depth + 1)
            emit(brackets[1])

    walk(obj, 0)
    text = "".join(out)
    return text if len(text) <= limit else text[:limit] + "..."


class Interpreter(Protocol):
    """What a REDUCE handler needs from the walker calling it."""

    def fail(self, message: str) -> CheckpointError: ...

    def hashable(self, key: Any) -> Any: ...

    def charge(self, nbytes: int) -> None: ...


# -- REDUCE handlers: our own code computing inert values, one per allowlisted callable --
def _int_tuple(w: Interpreter, value: Any, what: str) -> tuple[int, ...]:
    # map/count run in C: a generator over the items cost as much as the rest of the rebuild
    if not isinstance(value, (tuple, list)) or tuple(map(type, value)).count(int) != len(value):
        raise w.fail(f"tensor {what} {describe(value)} is not a tuple of integers")
    if type(value) is tuple:
        return value
    w.charge(64 + 8 * len(value))   # the copy of a list
    return tuple(value)


def _tensor_rebuilder(name: str, counts: tuple[int, ...], dtype_at: int | None) -> Callable[[Interpreter, tuple], Any]:
    """``_rebuild_tensor(storage, offset, size, stride)``; ``_v2`` adds requires_grad, hooks
    and optional metadata; ``_v3`` adds the dtype (for storages saved as UntypedStorage)."""
    def rebuild(w: Interpreter, args: tuple) -> TensorView:
        if len(args) not in counts:
            raise w.fail(f"{name} called with {len(args)} arguments, expected {' or '.join(map(str, counts))}")
        storage, offset = args[0], args[1]
        if not isinstance(storage, StorageRef) or type(offset) is not int:
            raise w.fail(f"{name} expects a storage and an integer offset, got {describe(args[:2])}")
        dtype = storage.dtype
        if dtype_at is not None:
            marker = args[dtype_at]
            if not (isinstance(marker, Global) and marker.dtype and not marker.is_storage_type):
                raise w.fail(f"{name}: dtype {describe(marker)} is not a supported torch dtype")
            dtype = marker.dtype
        metadata = args[counts[-1] - 1] if len(args) == counts[-1] > 4 else None
        if isinstance(metadata, dict) and any(metadata.values()):
            # conj/neg bits make the stored bytes differ from the tensor's values
            raise w.fail(f"tensor with metadata {describe(metadata)} (conj/neg bit) is not supported; "
                         f"save t.resolve_conj().resolve_neg() instead")
        return TensorView(storage, dtype, offset, _int_tuple(w, args[2], "size"), _int_tuple(w, args[3], "stride"))
    return rebuild


def _rebuild_parameter(w: Interpreter, args: tuple) -> TensorView:
    # (data, requires_grad, hooks[, state]): the state is python attributes, ignored
    if len(args) not in (3, 4) or not isinstance(args[0], TensorView):
        raise w.fail(f"_rebuild_parameter called with {describe(args)}")
    return args[0]


def _rebuild_from_type_v2(w: Interpreter, args: tuple) -> Any:
    # (func, new_type, args, state): how a Tensor/Parameter with python attributes is saved
    if len(args) != 4:
        raise w.fail(f"_rebuild_from_type_v2 called with {describe(args)}")
    func, new_type, inner = args[:3]
    if not (isinstance(new_type, Global) and new_type.qualname in _TENSOR_CLASSES):
        raise w.fail(f"tensor subclass {describe(new_type)} is not supported")
    handler = REDUCERS.get(func.qualname) if isinstance(func, Global) else None
    if handler is None or not isinstance(inner, tuple) or func.qualname == "torch._tensor._rebuild_from_type_v2":
        raise w.fail(f"_rebuild_from_type_v2 with {describe(func)} is not supported")
    result = handler(w, inner)
    if not isinstance(result, TensorView):
        raise w.fail("_rebuild_from_type_v2 did not rebuild a tensor")
    return result


def _ordered_dict(w: Interpreter, args: tuple) -> dict:
    # OrderedDict() (items follow as SETITEMS): a plain dict keeps insertion order
    if args and not (len(args) == 1 and isinstance(args[0], dict)):
        raise w.fail(f"OrderedDict called with {describe(args)}")
    return dict(args[0]) if args else {}


def _codecs_encode(w: Interpreter, args: tuple) -> bytes:
    # protocol 2 pickles bytes as _codecs.encode(text, "latin1")
    if len(args) != 2 or not isinstance(args[0], str) or args[1] not in ("latin1", "latin-1"):
        raise w.fail(f"_codecs.encode called with {describe(args)}")
    w.charge(48 + len(args[0]))   # the bytes copy of the text
    return args[0].encode("latin1")


def _sequence(kind: type) -> Callable[[Interpreter, tuple], Any]:
    """``set(list)``, ``torch.Size(tuple)``: built as a set or a tuple."""
    def build(w: Interpreter, args: tuple) -> Any:
        if args and not (len(args) == 1 and isinstance(args[0], (list, tuple))):
            raise w.fail(f"{kind.__name__} called with {describe(args)}")
        items = args[0] if args else ()
        return kind(w.hashable(item) for item in items) if kind is set else kind(items)
    return build


REDUCERS: dict[str, Callable[[Interpreter, tuple], Any]] = {
    "torch._utils._rebuild_tensor": _tensor_rebuilder("_rebuild_tensor", (4,), None),
    "torch._utils._rebuild_tensor_v2": _tensor_rebuilder("_rebuild_tensor_v2", (6, 7), None),
    "torch._utils._rebuild_tensor_v3": _tensor_rebuilder("_rebuild_tensor_v3", (7, 8), 6),
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "collections.OrderedDict": _ordered_dict,
    "_codecs.encode": _codecs_encode,
    "torch.Size": _sequence(tuple),
    "builtins.set": _sequence(set),
}
