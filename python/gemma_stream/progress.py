"""Progress reporting: the ``progress=`` argument of every loading entry point, as an executor callback."""

from __future__ import annotations

import sys
from typing import Callable, Union

from .errors import UsageError

__all__ = ["Progress", "progress_callback"]

#: None (a bar on a terminal for loads over 1 GiB), a bool, or ``callback(bytes_done, bytes_total)``
#: whose ``False`` cancels the load
Progress = Union[None, bool, Callable[[int, int], Union[bool, None]]]
_AUTO_PROGRESS_BYTES = 1 << 30


def progress_callback(progress: Progress, total: int, desc: str) -> tuple[Callable[[int], bool] | None,
                                                                          Callable[[], None]]:
    """Return (callback(bytes_done) -> keep going, close()) for the executor.

    >>> update, close = progress_callback(True, 1 << 20, "gemma_stream load")
    """
    if progress is None:
        progress = sys.stderr.isatty() and total > _AUTO_PROGRESS_BYTES
    if progress is False:
        return None, lambda: None
    if progress is True:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False)

        def update(done: int) -> bool:
            bar.update(done - bar.n)
            return True
        return update, bar.close
    if not callable(progress):
        raise UsageError("progress must be None, a bool or a callable(bytes_done, bytes_total)")
    return (lambda done: progress(done, total) is not False), lambda: None
