"""Streaming conversion: a torch zip or safetensors checkpoint to safetensors.

Metadata first, bytes second: the output layout (names, dtypes, shapes, shards,
offsets) is computed from the records alone and each header is written first.
The data is then filled in blocks of at most ``block_writer.BLOCK_BYTES`` (64 MiB):
every block is produced by the ordinary plan -> executor path (copy, dtype
conversion or quantization jobs, on either executor) into one reusable bounce
buffer and written with ``pwrite`` at its final offset.  Memory stays near one
block whatever the largest tensor; a 2 GB embedding never needs a 2 GB buffer.

Which tensors ``quantize=`` touches: 2-D tensors of float16, bfloat16 or float32
named ``weight`` or ``*.weight`` (Linear and Embedding weights; norms are 1-D and
stay as they are) whose K (dim 1) fits the scheme (int4: a multiple of
``group_size``).  They are stored in the contract layout of FORMATS.md: int8
``X.weight`` int8 [N, K] + ``X.weight_scaler`` float32 [N]; int4 ``X.weight``
uint8 [N, K/2] + ``X.weight_scale``, ``X.weight_zero`` bfloat16 [N, K/G].

Tied tensors of a torch zip (the same view of one storage under two names) are
written once, under the alphabetically first of those names (safetensors cannot
alias); the others are in ``ConvertReport.aliases``.  Different views of one
storage (a slice, a transpose) are each written as their own contiguous copy.

>>> report = gs.convert("gemma-2b.ckpt", "gemma-2b.safetensors", dtype=torch.bfloat16)
>>> report.files, report.bytes_written
"""

from __future__ import annotations

import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field

import torch

from .progress import Progress, progress_callback
from .block_writer import BlockWriter, OutputTensor, SourceUnit
from .dtypes import CONVERTIBLE, DType, from_torch
from .deprecation import renamed_argument
from .errors import GemmaStreamError
from .formats import Checkpoint, TensorRecord, open_checkpoint
from .formats.safetensors_writer import INDEX_FILE, SINGLE_FILE, AtomicFiles, header_bytes, index_bytes, shard_names
from .quant.reference import GROUP_SIZES

__all__ = ["convert", "ConvertReport", "parse_size"]

_SCALE_DTYPES = {"int8": torch.float32, "int4": torch.bfloat16}  # FORMATS.md defaults
_SHORT_DTYPES = {"bf16": "bfloat16", "f16": "float16", "fp16": "float16", "f32": "float32", "fp32": "float32"}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass
class ConvertReport:
    """What ``convert`` wrote."""

    files: list[str] = field(default_factory=list)          # safetensors files, in shard order
    index: str | None = None                                 # model.safetensors.index.json when sharded
    tensors: int = 0                                         # tensors written
    bytes_written: int = 0                                   # all files, headers and index included
    bytes_read: int = 0
    seconds: float = 0.0
    backend: str = ""
    quantized: list[str] = field(default_factory=list)       # source names stored quantized
    unquantized: list[str] = field(default_factory=list)     # "name: why" for 2-D float weights left as they are
    aliases: dict[str, str] = field(default_factory=dict)    # tied name not written -> name written
    skipped: list[str] = field(default_factory=list)         # "name: why" for tensors not written


# ---------------------------------------------------------------- options

def parse_size(size: int | str) -> int:
    """Bytes in ``2GB`` (10^9), ``500MiB`` (2^20), ``1e9`` or an int, as transformers reads them."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?(?:e[0-9]+)?)\s*([a-z]*)\s*", str(size).lower())
        if not match or match.group(2) not in _UNITS:
            raise GemmaStreamError(f"max_shard_size {size!r} is not a size such as 2GB, 500MB or 1073741824")
        value = int(float(match.group(1)) * _UNITS[match.group(2)])
    if value <= 0:
        raise GemmaStreamError(f"max_shard_size must be positive, not {size!r}")
    return value


def _out_dtype(dtype: torch.dtype | str | None) -> DType | None:
    if dtype is None:
        return None
    torch_dtype = getattr(torch, _SHORT_DTYPES.get(dtype.lower(), dtype.lower()), None) if isinstance(dtype, str) \
        else dtype
    if torch_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise GemmaStreamError(f"dtype must be float16, bfloat16 or float32, not {dtype!r}")
    return from_torch(torch_dtype)


# ---------------------------------------------------------------- layout (no I/O)

def _why_not_quantized(record: TensorRecord, scheme: str, group_size: int) -> str | None:
    n, k = record.shape
    if n == 0 or k == 0:
        return "empty weight"
    if scheme == "int4" and k % group_size:
        return f"K={k} is not a multiple of group_size={group_size}"
    return None


def _quant_outputs(record: TensorRecord, scheme: str, group_size: int) -> list[OutputTensor]:
    n, k = record.shape
    base = record.name[:-len("weight")]
    scale = from_torch(_SCALE_DTYPES[scheme])
    if scheme == "int8":
        return [OutputTensor(record.name, from_torch(torch.int8), (n, k)),
                OutputTensor(f"{base}weight_scaler", scale, (n,))]
    groups = (n, k // group_size)
    return [OutputTensor(record.name, from_torch(torch.uint8), (n, k // 2)),
            OutputTensor(f"{base}weight_scale", scale, groups), OutputTensor(f"{base}weight_zero", scale, groups)]


def _units(ckpt: Checkpoint, dtype: DType | None, scheme: str | None, group_size: int,
           report: ConvertReport) -> list[SourceUnit]:
    units: list[SourceUnit] = []
    views: dict[tuple, str] = {}
    for record in ckpt.records:
        if record.dtype.safetensors is None:
            report.skipped.append(f"{record.name}: safetensors cannot store {record.dtype.torch}")
            continue
        if record.storage is not None:  # torch zip: the same view of one storage is one tensor
            view = (record.file, record.storage, record.byte_offset, record.shape, record.strides, record.dtype)
            if view in views:
                report.aliases[record.name] = views[view]
                continue
            views[view] = record.name
        is_weight = (record.name == "weight" or record.name.endswith(".weight")) and len(record.shape) == 2
        if scheme and is_weight and record.dtype.name in CONVERTIBLE:
            why = _why_not_quantized(record, scheme, group_size)
            if why is None:
                units.append(SourceUnit(record, scheme, _quant_outputs(record, scheme, group_size)))
                report.quantized.append(record.name)
                continue
            report.unquantized.append(f"{record.name}: {why}")
        out = dtype if dtype is not None and record.dtype.name in CONVERTIBLE else record.dtype
        units.append(SourceUnit(record, "copy", [OutputTensor(record.name, out, record.shape)]))
    seen: dict[str, str] = {}
    for unit in units:
        for out in unit.outputs:
            if out.name in seen:
                raise GemmaStreamError(f"{ckpt.files[0]}: output tensor {out.name!r} would be written for both "
                                       f"{seen[out.name]!r} and {unit.record.name!r}")
            seen[out.name] = unit.record.name
    return units


def _assign_shards(units: list[SourceUnit], max_shard_bytes: int | None) -> int:
    """Greedy in source order, a unit's outputs kept together (as transformers shards)."""
    shard, used = 0, 0
    for unit in units:
        size = sum(out.nbytes for out in unit.outputs)
        if max_shard_bytes is not None and used and used + size > max_shard_bytes:
            shard, used = shard + 1, 0
        for out in unit.outputs:
            out.shard = shard
        used += size
    return shard + 1


def _shard_head(outputs: list[OutputTensor], metadata: dict[str, str]) -> bytes:
    """A shard's header; sets each output's offset in the shard's data buffer."""
    head, offsets = header_bytes([(o.name, o.dtype, o.shape) for o in outputs], metadata)
    for out, offset in zip(outputs, offsets):
        out.offset = offset
    return head


# ---------------------------------------------------------------- output files and their layout

def _destinations(dst: str, shards: int, sharded: bool) -> tuple[list[str], str | None]:
    if not sharded:
        return [os.path.abspath(os.path.join(dst, SINGLE_FILE) if os.path.isdir(dst) else dst)], None
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise GemmaStreamError(f"{dst}: max_shard_size writes a directory of shards, but this is a file")
    root = os.path.abspath(dst)
    return [os.path.join(root, name) for name in shard_names(shards)], os.path.join(root, INDEX_FILE)


def _make_dirs(directory: str) -> list[str]:
    """Create ``directory`` and missing parents; returns those created, outermost first."""
    missing = []
    while not os.path.isdir(directory):
        missing.append(directory)
        directory = os.path.dirname(directory)
    for path in reversed(missing):
        os.mkdir(path)
    return missing[::-1]


def _check_space(directory: str, need: int) -> None:
    while not os.path.isdir(directory):
        directory = os.path.dirname(directory)
    free = shutil.disk_usage(directory).free  # statvfs's f_bavail * f_frsize; Windows has no statvfs
    if need > free:
        raise GemmaStreamError(f"{directory}: the output needs {need} bytes and only {free} are free")


def _metadata(ckpt: Checkpoint, quantize: str | None, group_size: int) -> dict[str, str]:
    # a safetensors source keeps its own metadata; a torch zip's only says how it was read
    metadata = {k: v for k, v in ckpt.metadata.items() if k != "total_size"} if ckpt.format == "safetensors" else {}
    metadata.setdefault("format", "pt")  # transformers refuses safetensors files without it
    if quantize:
        metadata.update({"gemma_stream.quantize": quantize, "gemma_stream.group_size": str(group_size),
                         "gemma_stream.scale_dtype": str(_SCALE_DTYPES[quantize]).replace("torch.", "")})
    return metadata


@dataclass
class _Layout:
    """Everything known before a byte is copied: the files, what each starts with, their sizes."""

    paths: list[str]             # shard files, then the index if sharded (final names)
    heads: list[bytes]           # a shard's header; the whole index
    sizes: list[int]
    shards: int


def _layout(units: list[SourceUnit], dst: str, max_bytes: int | None, metadata: dict[str, str]) -> _Layout:
    shards = _assign_shards(units, max_bytes)
    outputs = [out for unit in units for out in unit.outputs]
    heads = [_shard_head([o for o in outputs if o.shard == i], metadata) for i in range(shards)]
    sizes = [len(h) + sum(o.nbytes for o in outputs if o.shard == i) for i, h in enumerate(heads)]
    paths, index = _destinations(dst, shards, max_bytes is not None)
    if index is not None:
        weight_map = {o.name: os.path.basename(paths[o.shard]) for o in outputs}
        heads.append(index_bytes(weight_map, sum(o.nbytes for o in outputs), metadata))
        sizes.append(len(heads[-1]))
        paths.append(index)
    _check_space(os.path.dirname(paths[0]), sum(sizes))
    return _Layout(paths, heads, sizes, shards)


# ---------------------------------------------------------------- public API

def convert(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
            quantize: str | None = None, group_size: int = 128, max_shard_size: int | str | None = None,
            state_dict_key: str | None = None, threads: int | None = None, backend: str = "auto",
            progress: Progress = None, key: str | None = None) -> ConvertReport:
    """Stream a checkpoint (torch zip or safetensors, single or sharded) into safetensors.

    ``dtype`` converts float16/bfloat16/float32 tensors; ``quantize="int8"|"int4"``
    stores 2-D float ``*.weight`` tensors in gemma_stream's quantized layout (see
    the module docstring) and records the scheme in ``__metadata__``.  With
    ``max_shard_size`` (bytes, or "2GB", "500MiB") ``dst`` is a directory that
    receives ``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``;
    otherwise ``dst`` is the file (or a directory that receives ``model.safetensors``).
    ``state_dict_key`` picks the state dict inside a torch zip (found automatically
    by default; ``key=`` is its deprecated name).
    Files appear under their final names only once complete; on error nothing is left.

    >>> gs.convert("gemma-7b.ckpt", "out/", dtype=torch.bfloat16, max_shard_size="5GB")
    >>> gs.convert("model.safetensors", "model-int4.safetensors", quantize="int4", group_size=128)
    """
    start = time.perf_counter()
    state_dict_key = renamed_argument(state_dict_key, key, old="key", new="state_dict_key", where="gs.convert")
    out_dtype = _out_dtype(dtype)
    if quantize not in (None, "int8", "int4"):
        raise GemmaStreamError(f"quantize must be None, 'int8' or 'int4', not {quantize!r}")
    if quantize == "int4" and group_size not in GROUP_SIZES:
        raise GemmaStreamError(f"int4 group_size must be one of {GROUP_SIZES}, not {group_size}")
    max_bytes = parse_size(max_shard_size) if max_shard_size is not None else None
    ckpt = open_checkpoint(src, key=state_dict_key)
    report = ConvertReport()
    units = _units(ckpt, out_dtype, quantize, group_size, report)
    if report.skipped:
        warnings.warn(f"gemma_stream.convert: not written: {'; '.join(report.skipped)}", UserWarning, stacklevel=2)
    layout = _layout(units, os.fspath(dst), max_bytes, _metadata(ckpt, quantize, group_size))
    callback, close = progress_callback(progress, sum(u.record.nbytes for u in units), "gemma_stream convert")
    writer = BlockWriter(ckpt, [len(h) for h in layout.heads[:layout.shards]], backend, threads, callback)
    created = _make_dirs(os.path.dirname(layout.paths[0]))
    try:
        with AtomicFiles(layout.paths) as files:  # renamed in order: the index last
            fds = [files.create(i, head, size) for i, (head, size) in enumerate(zip(layout.heads, layout.sizes))]
            writer.run(units, fds[:layout.shards])
    except BaseException as e:
        for directory in reversed(created):  # empty now: the files were removed
            os.rmdir(directory)
        if isinstance(e, GemmaStreamError) and writer.cancelled:
            raise GemmaStreamError("convert cancelled by the progress callback; nothing was written") from None
        raise
    finally:
        close()
    report.files = layout.paths[:layout.shards]
    report.index = layout.paths[-1] if len(layout.paths) > layout.shards else None
    report.tensors = sum(len(unit.outputs) for unit in units)
    report.bytes_written, report.bytes_read = sum(layout.sizes), writer.bytes_read
    report.backend, report.seconds = writer.executor.name, time.perf_counter() - start
    return report
