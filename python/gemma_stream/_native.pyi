"""Type stub of gemma_stream._native, the C++ copy engine (csrc/bindings.cc)."""

from collections.abc import Sequence
from typing import Callable

class JobError(ValueError):
    """A job that cannot be valid whatever the file holds (null destination, bad file index, dtype
    pair): a bug of the planner, never the file's fault (gemma_stream.InternalError)."""

class IoError(OSError):
    """An I/O failure; names the path, offset and the OS error."""

class DataError(ValueError):
    """The file's bytes are at fault (range past the end, a row with NaN to quantize);
    ``args`` is (message, path, tensor, row or None) (gemma_stream.CheckpointError)."""

#: op code by CopyJob.op: {"copy": 0, "int8": 1, "int4": 2}
OPS: dict[str, int]
#: csrc/file.h's kPageBytes and kFolioBytes (fileio.PAGE_BYTES / FOLIO_BYTES on the Python side)
PAGE_BYTES: int
FOLIO_BYTES: int

class JobBatch:
    """Copy jobs, one column per field of the engine's CopyJob (csrc/executor.h); job i is the
    i-th element of every column (built by gemma_stream.executors.native.encode). Dtype and op
    codes are checked when the batch runs (JobError)."""

    def __init__(self, *, op: Sequence[int], file: Sequence[int], src_offset: Sequence[int],
                 src_dtype: Sequence[int], shape: Sequence[Sequence[int]], src_strides: Sequence[Sequence[int]],
                 dst: Sequence[int], dst_dtype: Sequence[int], scale: Sequence[int], zero: Sequence[int],
                 scale_dtype: Sequence[int], group_size: Sequence[int], name: Sequence[str],
                 first_row: Sequence[int], block_rows: Sequence[int]) -> None: ...
    def __len__(self) -> int: ...
    op: list[int]              # OPS
    file: list[int]            # index into run()'s files
    src_offset: list[int]      # file offset of element [0, ..., 0]
    src_dtype: list[int]       # dtype codes (dtypes.py, dtype_table())
    shape: list[list[int]]
    src_strides: list[list[int]]   # element strides; [] = C-contiguous
    dst: list[int]             # destination addresses (quantized weights for int8/int4)
    dst_dtype: list[int]
    scale: list[int]           # int8/int4 scale addresses; 0 = none
    zero: list[int]            # int4 zero-point addresses; 0 = none
    scale_dtype: list[int]
    group_size: list[int]      # int4 only
    name: list[str]            # tensor names, for error messages
    first_row: list[int]       # the source view's first row in its tensor (error messages)
    block_rows: list[int]      # strided: outermost indices per read (0 = a chunk's worth, 1 = each row alone)

# (st_dev, st_ino, st_size, st_mtime_ns) of each validated file
_IdentityTuple = tuple[int, int, int, int]

def run(files: list[str], jobs: JobBatch, threads: int, chunk_bytes: int, drop_cache: bool,
        progress: Callable[[int], bool | None] | None,
        identities: list[_IdentityTuple] = ..., allow_avx2: bool = True) -> tuple[int, bool]:
    """Run copy jobs; returns (bytes_read, completed). allow_avx2=False: the quantizers' portable loops."""

def read_ranges(path: str, offsets: list[int], lengths: list[int], threads: int,
                identity: _IdentityTuple | None = None) -> tuple[bytes, list[int]]:
    """Read many byte ranges of one file back to back, without the GIL, on up to ``threads`` threads;
    a range is cut at the end of the file (its unread tail zeroed). Returns (bytes, bytes read per range)."""

class BackgroundAdvice:
    """Asks for many byte ranges of one file (posix_fadvise WILLNEED) on a native thread of its own."""

    def __init__(self, path: str, offsets: list[int], lengths: list[int]) -> None: ...
    def wait(self) -> None: ...


def dtype_table() -> list[tuple[str, int, int, bool]]:
    """(name, code, itemsize, convertible among f16/bf16/f32) of every dtype code the engine knows."""

def int4_to_cpu_kernel_layout(data: int, rows: int, K: int, block: int, halves: bool) -> bool: ...
def int4_from_cpu_kernel_layout(data: int, rows: int, K: int, block: int, halves: bool) -> bool: ...
def quant_kernels(allow_avx2: bool) -> str:
    """Which quantizer loops run here with this allow_avx2: "avx2" or "portable"."""

def cache_drop() -> str:
    """How this OS drops pages from the page cache: "fadvise_dontneed", "f_nocache" or "none"."""

def hardware_threads() -> int: ...
