"""The checks behind ``gemma-stream verify``: byte ranges, SHA-256 per file, and a
tensor-by-tensor comparison of two checkpoints in bounded memory.

Nothing here prints; :mod:`gemma_stream.cli` renders the results.

>>> from gemma_stream.verify import compare_checkpoints
>>> result = compare_checkpoints("model.ckpt", "model.safetensors")
>>> result.ok, [t.status for t in result.tensors][:2]
(True, ['equal', 'equal'])

Modules, one concern each: ``files`` (byte ranges and SHA-256 per file),
``operands`` (tensor pairs, quantized layouts), ``judge`` (one pair's verdict and
error figures, in row chunks) and ``compare`` (two checkpoints in bounded batches).
"""

# the constants and OnBytes stay importable from here, as before the split
from .compare import DEFAULT_BATCH_BYTES, Comparison, compare_checkpoints  # noqa: F401
from .files import HASH_CHUNK_BYTES, OnBytes, check_ranges, checkpoint_files, record_extent, sha256_file  # noqa: F401
from .judge import CHUNK_ELEMENTS, TensorComparison  # noqa: F401
from .operands import Operand, dequantize_rows, pair_operands

__all__ = ["check_ranges", "checkpoint_files", "sha256_file", "Operand", "pair_operands",
           "TensorComparison", "Comparison", "compare_checkpoints", "dequantize_rows"]
