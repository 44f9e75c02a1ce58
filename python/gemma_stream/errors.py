"""The closed set of errors gemma_stream raises.

``GemmaStreamError`` derives from ``ValueError`` so callers that already catch
``ValueError`` around checkpoint loading keep working.
"""

from __future__ import annotations

__all__ = ["GemmaStreamError", "CheckpointError", "MismatchError", "UninitializedWarning"]


class GemmaStreamError(ValueError):
    """Base class of every error gemma_stream raises on purpose."""


class CheckpointError(GemmaStreamError):
    """The checkpoint file is malformed, truncated or unsafe.

    The message names the file and, where one is involved, the tensor.
    """


class MismatchError(GemmaStreamError):
    """The model and the checkpoint disagree: names, shapes or dtypes."""


class UninitializedWarning(UserWarning):
    """``strict=False`` loaded a model with ``meta`` tensors the checkpoint did not fill."""
