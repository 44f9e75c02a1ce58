"""The C++ executor: encodes the jobs as one ``_native.JobBatch`` (a column per field) and runs them."""

from __future__ import annotations

from typing import Callable

from .. import _native
from ..config import config
from ..dtypes import DTYPES, from_torch
from ..errors import CheckpointError, InternalError, nan_row
from ..formats.records import CheckpointFile
from ..jobs import is_plain_cpu
from ..plan import CopyJob

_native_run = _native.run   # one name, so the job-overhead benchmark can time the engine call
#: the engine's op codes by CopyJob.op ("copy", "int8", "int4")
_OPS: dict[str, int] = dict(_native.OPS)
#: torch dtype -> engine dtype code: dtypes.py's table, which the tests compare with _native.dtype_table()
_CODES = {d.torch: d.code for d in DTYPES.values() if d.torch is not None}
_NO_SCALE = DTYPES["f32"].code   # scale_dtype of a job without scales (never read)


def _code(dtype) -> int:
    code = _CODES.get(dtype)
    return code if code is not None else from_torch(dtype).code   # from_torch names the unknown dtype


def encode(jobs: list[CopyJob]) -> _native.JobBatch:
    """The jobs as the engine's typed batch, one column per field, filled in one pass.

    Raises ``InternalError`` for a destination the engine cannot write through a raw pointer
    (not contiguous, not on the CPU): the planner stages those.
    """
    op, file, src_offset, src_dtype, shape, src_strides = [], [], [], [], [], []
    dst, dst_dtype, scale, zero, scale_dtype, group_size, name, first_row, block_rows = [], [], [], [], [], [], [], [], []
    for job in jobs:
        d, s, z = job.dst, job.scale, job.zero
        if not is_plain_cpu(d) or (s is not None and not is_plain_cpu(s)) or (z is not None and not is_plain_cpu(z)):
            raise InternalError(f"tensor {job.name!r}: native executor needs contiguous CPU destinations")
        op.append(_OPS[job.op])
        file.append(job.file_index)
        src_offset.append(job.src_offset)
        src_dtype.append(job.src_dtype.code)
        shape.append(job.shape)
        src_strides.append(job.src_strides or ())
        dst.append(d.data_ptr())
        dst_dtype.append(_code(d.dtype))
        scale.append(s.data_ptr() if s is not None else 0)
        zero.append(z.data_ptr() if z is not None else 0)
        scale_dtype.append(_code(s.dtype) if s is not None else _NO_SCALE)
        group_size.append(job.group_size)
        name.append(job.name)
        first_row.append(job.first_row)
        block_rows.append(job.block_rows)
    return _native.JobBatch(op=op, file=file, src_offset=src_offset, src_dtype=src_dtype, shape=shape,
                            src_strides=src_strides, dst=dst, dst_dtype=dst_dtype, scale=scale, zero=zero,
                            scale_dtype=scale_dtype, group_size=group_size, name=name, first_row=first_row,
                            block_rows=block_rows)


def quant_kernels() -> str:
    """Which quantizer loops the engine runs here: ``"avx2"`` or ``"portable"`` (``GEMMA_STREAM_NO_AVX2=1``)."""
    return _native.quant_kernels(config().avx2)


class NativeExecutor:
    name = "native"

    def run(self, files: list[str], jobs: list[CopyJob], *, threads: int, chunk_bytes: int,
            drop_cache: bool, progress: Callable[[int], bool] | None) -> tuple[int, bool]:
        batch = encode(jobs)   # the C++ side writes through raw pointers: encode insists on plain CPU memory
        # every byte must come from the file whose header was validated: the engine checks each open
        identities = [f.identity for f in files] if all(isinstance(f, CheckpointFile) for f in files) else []
        try:
            read, completed = _native_run(files, batch, threads, chunk_bytes, drop_cache, progress, identities,
                                          config().avx2)
        except _native.DataError as e:
            message, path, tensor, row = e.args
            if row is not None:
                raise nan_row(path, tensor, row) from None
            raise CheckpointError(message, path=path, tensor=tensor) from None
        except _native.IoError as e:  # open, stat, read failures and a file changed under the load
            message = str(e)
            raise CheckpointError(message, path=next((f for f in files if message.startswith(f"{f}:")), None)) \
                from None
        except _native.JobError as e:
            raise InternalError(f"gemma_stream bug: the engine refused a job: {e}") from None
        return read, completed
