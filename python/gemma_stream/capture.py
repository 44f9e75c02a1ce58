"""Captured copies: an engine's ``load_weights`` copies of streamed tensors, done by gemma_stream's engine.

An inference engine's ``load_weights(iterable)`` copies each tensor it is
given into its parameter (``param.data.copy_(loaded_weight)``, often into the
rows of a fused parameter, or a tensor-parallel rank's rows or columns of the
tensor).  Its copy is a second pass over the bytes after the read, on the
caller's thread, faulting in every page of its fresh parameters one at a
time.  :class:`CopyCapture` is a ``TorchDispatchMode`` under which such a
copy is *recorded* instead of run, when it can be done from the file:

* its source is a tensor the stream yielded (registered with :meth:`watch`),
  whole or a block of its rows (dim 0) or columns (dim 1), in its stored dtype,
  and nothing has written to that tensor;
* its destination is a CPU tensor of the source's shape, of the same dtype or
  another floating-point dtype (f32 / f16 / bf16, converted as the engine
  converts, bit for bit as torch does), with no overlapping elements.

Every other op runs as it would, with one rule that keeps the result exactly
what the engine's own copies give: an op that touches (reads or writes) bytes
of a destination with a recorded copy pending first runs every pending copy
(:meth:`flush`), and a copy recorded into bytes a pending copy also fills
flushes first too.  ``load_weights`` may also transform a source before
copying it (a write to the tensor marks it "written", and copies from it run
as torch's).  At the end the recorded copies are one plan: the engine reads
the file straight into the destinations on its threads, prefaulting them,
exactly as the direct path does, for architectures nobody taught it.

The stream's tensors are then never read by the caller, so their pages need
not be faulted in ahead: ``stream_checkpoint(..., prefault=capture.reads_ahead)``
does so only while torch has done more of the copying than the engine.
"""

from __future__ import annotations

import math
import weakref
from typing import Callable, Iterable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .dtypes import FLOAT_DTYPES
from .errors import CheckpointError
from .formats import Checkpoint
from .plan import Plan, make_plan
from .routes import PartialRoutes, Route

__all__ = ["CopyCapture"]

_COPY = torch.ops.aten.copy_.default
#: flushes before the capture judges whether it pays (at least 4 copies per plan on average)
_FEW_FLUSHES = 16


def _extent(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(storage address, first byte, end byte) of the elements ``t`` can reach; None for no storage."""
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):      # a tensor subclass without storage
        return None
    if t.numel() == 0:
        return storage.data_ptr(), 0, 0
    span = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
    first = t.storage_offset() * t.element_size()
    return storage.data_ptr(), first, first + span * t.element_size()


def _tensors(values) -> Iterator[torch.Tensor]:
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from _tensors(value)


def _block(src: torch.Tensor, whole: torch.Tensor) -> Route | None:
    """The route of ``src`` as ``whole`` (a contiguous yielded tensor) or a block of its rows or
    columns; None when it is any other view."""
    if src.dtype != whole.dtype or src.dim() != whole.dim() or src.stride() != whole.stride():
        return None
    offset = src.storage_offset() - whole.storage_offset()
    shape, full = tuple(src.shape), tuple(whole.shape)
    if shape == full:
        return Route("") if offset == 0 else None
    if src.dim() >= 1 and shape[1:] == full[1:]:
        row = math.prod(full[1:])
        if row and offset % row == 0 and offset // row + shape[0] <= full[0]:
            return Route("", src_rows=(offset // row, offset // row + shape[0]))
    if src.dim() >= 2 and shape[0] == full[0] and shape[2:] == full[2:]:
        inner = math.prod(full[2:])
        if inner and offset % inner == 0 and offset // inner < full[1] and offset // inner + shape[1] <= full[1]:
            return Route("", src_cols=(offset // inner, offset // inner + shape[1]))
    return None


class CopyCapture(TorchDispatchMode):
    """Record ``copy_`` from watched stream tensors; run them with the engine at :meth:`flush`.

    >>> capture = CopyCapture(ckpt, run=lambda plan: run_the_jobs(plan))
    >>> with capture:
    ...     model.load_weights(capture.watch(stream))
    >>> capture.flush()      # the recorded copies, read from the file into the parameters
    """

    def __init__(self, ckpt: Checkpoint, run: Callable[[Plan], object]):
        """``ckpt``: the checkpoint streamed; ``run``: executes a plan (the recorded copies)."""
        super().__init__()
        self.ckpt, self._run = ckpt, run
        self._records = {record.name: record for record in ckpt.records}
        #: storage address -> (the yielded tensor, its record name); a dead reference is no source
        self._sources: dict[int, tuple[weakref.ref, str]] = {}
        self._written: list[tuple[int, int]] = []    # address ranges ops wrote to in yielded tensors
        self._pending: list[tuple[torch.Tensor, str, Route]] = []
        self._ranges: dict[int, list[tuple[int, int]]] = {}   # storage -> byte ranges pending copies fill
        #: what happened: copies recorded and their bytes, copies torch ran, flushes (the final one included)
        self.stats = {"captured": 0, "captured_bytes": 0, "ran": 0, "ran_bytes": 0, "flushes": 0}
        #: False once flushes come every few copies (copies then run as torch's)
        self.capturing = True

    def watch(self, stream: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """``stream`` passed through, each tensor registered as a source by its record name.

        The names must be the checkpoint's own (a stream of ``ckpt`` without ``rename``); a tensor
        whose dtype or shape is not its record's (a stream converting dtypes) is no source."""
        for name, tensor in stream:
            record = self._records.get(name)
            if record is not None and tensor.dtype == record.dtype.torch and tuple(tensor.shape) == record.shape \
                    and tensor.is_contiguous() and tensor.device.type == "cpu":
                self._sources[tensor.untyped_storage().data_ptr()] = (weakref.ref(tensor), name)
            yield name, tensor

    def reads_ahead(self) -> bool:
        """Whether the stream should fault its next window in: torch, not the engine, has done most
        of the copying so far (the caller reads the tensors itself)."""
        return self.stats["ran_bytes"] > self.stats["captured_bytes"]

    def _source(self, src: torch.Tensor) -> tuple[str, Route] | None:
        address = src.untyped_storage().data_ptr()
        entry = self._sources.get(address)
        if entry is None:
            return None
        whole = entry[0]()
        if whole is None or whole.untyped_storage().data_ptr() != address:
            del self._sources[address]
            return None
        # a write to any tensor over these bytes (a torch zip's views may share them) since they were mapped
        end = address + whole.numel() * whole.element_size()
        if any(lo < end and address < hi for lo, hi in self._written):
            return None
        route = _block(src, whole)
        return None if route is None else (entry[1], route)

    def _touches_pending(self, tensor: torch.Tensor) -> bool:
        return self._overlaps_pending(_extent(tensor))

    def _overlaps_pending(self, extent: tuple[int, int, int] | None) -> bool:
        if extent is None:
            return bool(self._pending)      # cannot tell what it reaches: assume it reaches them
        ranges = self._ranges.get(extent[0])
        return bool(ranges) and any(lo < extent[2] and extent[1] < hi for lo, hi in ranges)

    def _capture(self, dst: torch.Tensor, src: torch.Tensor) -> bool:
        """Record ``dst.copy_(src)`` if the engine can do it from the file; False to let torch run it."""
        if dst.device.type != "cpu" or src.device.type != "cpu" or dst.shape != src.shape or dst.numel() == 0:
            return False
        if dst.dtype != src.dtype and not (dst.dtype in FLOAT_DTYPES and src.dtype in FLOAT_DTYPES):
            return False
        if not _distinct(dst):            # an expanded (stride 0) or self-overlapping destination
            return False
        found = self._source(src)
        extent = _extent(dst)
        if found is None or extent is None or extent[0] in self._sources:
            return False
        if self._overlaps_pending(extent):
            self.flush()
        name, route = found
        self._pending.append((dst, name, route))
        self._ranges.setdefault(extent[0], []).append((extent[1], extent[2]))
        self.stats["captured"] += 1
        self.stats["captured_bytes"] += dst.numel() * src.element_size()
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _COPY and len(args) >= 2 and isinstance(args[0], torch.Tensor) and \
                isinstance(args[1], torch.Tensor):
            if self.capturing and self._capture(args[0], args[1]):
                return args[0]
            self.stats["ran"] += 1
            self.stats["ran_bytes"] += args[0].numel() * args[0].element_size()
        if not func.is_view:
            if self._pending and any(self._touches_pending(t) for t in (*_tensors(args), *_tensors(kwargs.values()))):
                self.flush()
            self._mark_written(func, args, kwargs)
        return func(*args, **kwargs)

    def _mark_written(self, func, args, kwargs) -> None:
        """Bytes of a yielded tensor an op writes to are a source no more (the file no longer holds their
        values)."""
        if not self._sources:
            return
        for i, argument in enumerate(func._schema.arguments):
            if argument.alias_info is None or not argument.alias_info.is_write:
                continue
            value = args[i] if i < len(args) else kwargs.get(argument.name)
            for tensor in _tensors([value]):
                extent = _extent(tensor)
                if extent is not None and extent[0] in self._sources:
                    self._written.append((extent[0] + extent[1], extent[0] + extent[2]))

    def flush(self) -> None:
        """Run every recorded copy: one plan, the engine reading the file into the destinations."""
        if not self._pending:
            return
        pending, self._pending, self._ranges = self._pending, [], {}
        targets: dict[str, torch.Tensor] = {}
        routes: dict[str, list[Route]] = {}
        for i, (dst, name, route) in enumerate(pending):
            key = f"{i}:{name}"
            targets[key] = dst
            routes.setdefault(name, []).append(Route(key, route.src_rows, None, route.src_cols, None))
        part = Checkpoint(self.ckpt.format, self.ckpt.files, [self._records[name] for name in routes])
        try:
            self._run(make_plan(part, targets, rename=PartialRoutes(routes.get), strict=True))
        except CheckpointError as error:
            if error.tensor is not None:
                raise
            # a file error that names no tensor (the file changed since its header was read): name them
            first = pending[0][1]
            more = f" and {len(routes) - 1} more" if len(routes) > 1 else ""
            raise CheckpointError(f"{error} (while copying tensor {first!r}{more} into the model's parameters)",
                                  path=error.path, tensor=first, row=error.row) from error
        self.stats["flushes"] += 1
        # a caller that reads what it just copied makes a plan of one or two copies each time: a plan
        # costs more than torch's copy of a small tensor, so such a caller copies by itself from here on
        if self.stats["flushes"] >= _FEW_FLUSHES and self.stats["captured"] < 4 * self.stats["flushes"]:
            self.capturing = False


def _distinct(t: torch.Tensor) -> bool:
    """No two elements of ``t`` share memory (dims sorted by stride, each past the ones inside it)."""
    reach = 1
    dims = sorted(((abs(s), n) for n, s in zip(t.shape, t.stride()) if n > 1))
    for stride, n in dims:
        if stride < reach:
            return False
        reach = stride * n
    return True
