"""The closed set of errors gemma_stream raises.

``GemmaStreamError`` derives from ``ValueError`` so callers that already catch
``ValueError`` around checkpoint loading keep working.  Its subclasses say whose
fault it is:

- :class:`CheckpointError`: the file (malformed, truncated, unsafe, changed or
  unreadable during the load); carries ``path``, ``tensor`` and ``row`` where known.
- :class:`MismatchError`: the model and the checkpoint disagree.
- :class:`UsageError`: an argument or a ``GEMMA_STREAM_*`` setting is invalid
  (also a ``TypeError``, since some of these checks used to raise one).

:class:`InternalError` is *not* a ``GemmaStreamError``: it means a bug of ours
(a planner handing the engine an impossible job), never a bad file, so code that
catches ``GemmaStreamError`` to reject a user's file does not swallow it.  The
command line exits 2 for the first family and 3 for an ``InternalError``.

>>> try:
...     gs.load_state_dict("model.safetensors")
... except gs.CheckpointError as e:
...     print(e.path, e.tensor, e.row)
"""

from __future__ import annotations

__all__ = ["GemmaStreamError", "CheckpointError", "MismatchError", "UsageError", "InternalError", "UninitializedWarning",
           "nan_row"]


class GemmaStreamError(ValueError):
    """Base class of every error gemma_stream raises on purpose about its input."""


class CheckpointError(GemmaStreamError):
    """The checkpoint file is malformed, truncated, unsafe, or changed during the load.

    The message names the file and, where one is involved, the tensor; the same
    facts are attributes: ``path`` (the file), ``tensor`` (its name) and ``row``
    (a row index inside that tensor, for quantization failures), each None when
    unknown.
    """

    def __init__(self, message: str, *, path: str | None = None, tensor: str | None = None,
                 row: int | None = None) -> None:
        super().__init__(message)
        self.path, self.tensor, self.row = path, tensor, row


class MismatchError(GemmaStreamError):
    """The model and the checkpoint disagree: names, shapes or dtypes."""


class UsageError(GemmaStreamError, TypeError):
    """An argument, a mode or a ``GEMMA_STREAM_*`` environment setting is invalid."""


class InternalError(RuntimeError):
    """A bug in gemma_stream (an impossible job reached the engine); the file is not to blame."""


def nan_row(path: str, tensor: str, row: int) -> CheckpointError:
    """The one wording for a row that cannot be quantized (both executors and the converter use it)."""
    return CheckpointError(f"{path}: tensor '{tensor}': row {row} holds NaN or infinity; it cannot be quantized",
                           path=path, tensor=tensor, row=row)


class UninitializedWarning(UserWarning):
    """``strict=False`` loaded a model with ``meta`` tensors the checkpoint did not fill."""
