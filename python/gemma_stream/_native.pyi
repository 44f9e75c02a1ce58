"""Type stub of gemma_stream._native, the C++ copy engine (csrc/bindings.cc)."""

from typing import Callable

class JobError(ValueError):
    """A job the engine refuses (bad range, dtype pair, shape); names the tensor."""

class IoError(OSError):
    """An I/O failure; names the path, offset and the OS error."""

# (op, file, src_offset, src_dtype, shape, src_strides, dst_ptr, dst_dtype,
#  scale_ptr, zero_ptr, scale_dtype, group_size, name, first_row)
_JobTuple = tuple[int, int, int, int, list[int], list[int], int, int, int, int, int, int, str, int]

def run(files: list[str], jobs: list[_JobTuple], threads: int, chunk_bytes: int, drop_cache: bool,
        progress: Callable[[int], bool | None] | None) -> tuple[int, bool]:
    """Run copy jobs; returns (bytes_read, completed)."""

def int4_to_cpu_kernel_layout(data: int, rows: int, K: int, block: int, halves: bool) -> bool: ...
def int4_from_cpu_kernel_layout(data: int, rows: int, K: int, block: int, halves: bool) -> bool: ...
def quant_kernels() -> str:
    """Which quantizer loops run here: "avx2" or "portable"."""

def cache_drop() -> str:
    """How this OS drops pages from the page cache: "fadvise_dontneed", "f_nocache" or "none"."""

def hardware_threads() -> int: ...
