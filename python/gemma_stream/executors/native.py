"""The C++ executor: turns jobs into plain tuples of ints for gemma_stream._native."""

from __future__ import annotations

from typing import Callable

from .. import _native
from ..dtypes import from_torch
from ..errors import CheckpointError, InternalError, nan_row
from ..formats.records import CheckpointFile
from ..plan import CopyJob

_OPS = {"copy": 0, "int8": 1, "int4": 2}


def _as_tuple(job: CopyJob) -> tuple:
    scale_code = from_torch(job.scale.dtype).code if job.scale is not None else 11
    return (_OPS[job.op], job.file_index, job.src_offset, job.src_dtype.code, list(job.shape),
            list(job.src_strides) if job.src_strides is not None else [], job.dst.data_ptr(),
            from_torch(job.dst.dtype).code, job.scale.data_ptr() if job.scale is not None else 0,
            job.zero.data_ptr() if job.zero is not None else 0, scale_code, job.group_size, job.name,
            job.first_row)


class NativeExecutor:
    name = "native"

    def run(self, files: list[str], jobs: list[CopyJob], *, threads: int, chunk_bytes: int,
            drop_cache: bool, progress: Callable[[int], bool] | None) -> tuple[int, bool]:
        for job in jobs:  # the C++ side writes through raw pointers: insist on plain CPU memory
            for t in (job.dst, job.scale, job.zero):
                if t is not None and (t.device.type != "cpu" or not t.is_contiguous()):
                    raise InternalError(f"tensor {job.name!r}: native executor needs contiguous CPU destinations")
        # every byte must come from the file whose header was validated: the engine checks each open
        identities = [f.identity for f in files] if all(isinstance(f, CheckpointFile) for f in files) else []
        try:
            read, completed = _native.run(files, [_as_tuple(j) for j in jobs], threads, chunk_bytes,
                                          drop_cache, progress, identities)
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
