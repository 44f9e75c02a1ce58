"""Type stub of gemma_stream._native, the C++ copy engine (csrc/bindings.cc)."""

from typing import Callable

class JobError(ValueError):
    """A job that cannot be valid whatever the file holds (null destination, bad file index, dtype
    pair): a bug of the planner, never the file's fault (gemma_stream.InternalError)."""

class IoError(OSError):
    """An I/O failure; names the path, offset and the OS error."""

class DataError(ValueError):
    """The file's bytes are at fault (range past the end, a row with NaN to quantize);
    ``args`` is (message, path, tensor, row or None) (gemma_stream.CheckpointError)."""

# (op, file, src_offset, src_dtype, shape, src_strides, dst_ptr, dst_dtype,
#  scale_ptr, zero_ptr, scale_dtype, group_size, name, first_row)
_JobTuple = tuple[int, int, int, int, list[int], list[int], int, int, int, int, int, int, str, int]

# (st_dev, st_ino, st_size, st_mtime_ns) of each validated file
_IdentityTuple = tuple[int, int, int, int]

def run(files: list[str], jobs: list[_JobTuple], threads: int, chunk_bytes: int, drop_cache: bool,
        progress: Callable[[int], bool | None] | None,
        identities: list[_IdentityTuple] = ...) -> tuple[int, bool]:
    """Run copy jobs; returns (bytes_read, completed)."""

def int4_to_cpu_kernel_layout(data: int, rows: int, K: int, block: int, halves: bool) -> bool: ...
def int4_from_cpu_kernel_layout(data: int, rows: int, K: int, block: int, halves: bool) -> bool: ...
def quant_kernels() -> str:
    """Which quantizer loops run here: "avx2" or "portable"."""

def cache_drop() -> str:
    """How this OS drops pages from the page cache: "fadvise_dontneed", "f_nocache" or "none"."""

def hardware_threads() -> int: ...
