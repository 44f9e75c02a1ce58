"""Routes: where a checkpoint tensor, or a block of it, goes, and the ``rename=`` forms that name them.

``rename`` may be a dict, a callable, a map object (:mod:`gemma_stream.maps`) or
:class:`PartialRoutes`; :func:`normalize_rename` turns any of them into one
``name -> routes | None`` function for the planner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Union

from .errors import UsageError

__all__ = ["Route", "PartialRoutes", "Rename", "RenameResult", "normalize_rename"]


@dataclass(frozen=True)
class Route:
    """Where a checkpoint tensor, or a block of its rows (dim 0) and columns (dim 1), goes.

    ``src_rows`` selects rows of the checkpoint tensor, ``dst_rows`` the rows of
    the target they fill; ``None`` means all rows.  A fused projection (q, k, v
    into one ``qkv_proj``) is three routes into consecutive ``dst_rows``.
    ``src_cols``/``dst_cols`` do the same along dim 1 (tensors of 2 or more
    dims): a tensor-parallel rank's slice of a row-parallel weight is
    ``Route(name, src_cols=(a, b))`` into its local ``[N, b - a]`` tensor.

    >>> gs.Route("layers.0.mlp.down_proj.weight", src_cols=(0, 4096))
    """

    target: str
    src_rows: tuple[int, int] | None = None
    dst_rows: tuple[int, int] | None = None
    src_cols: tuple[int, int] | None = None
    dst_cols: tuple[int, int] | None = None


RenameResult = Union[None, str, Route, Iterable[Route]]
Rename = Union[None, Mapping[str, RenameResult], Callable[[str], RenameResult]]


class PartialRoutes:
    """A rename whose routes may read only part of a checkpoint tensor: one rank's shard.

    Without it, routes that leave rows or columns of a checkpoint tensor unread
    are a mismatch (the rest would be silently dropped).

    >>> rank_cols = (rank * 1024, (rank + 1) * 1024)
    >>> gs.load_into(model, "model.safetensors",
    ...              rename=gs.PartialRoutes(lambda n: gs.Route(n, src_cols=rank_cols)))
    """

    def __init__(self, rename: Rename):
        self.rename = rename
        self.computed = tuple(getattr(rename, "computed", ()) or ())

    def __call__(self, name: str) -> RenameResult:
        if self.rename is None:
            return name
        if isinstance(self.rename, Mapping):
            return self.rename.get(name, name)
        return self.rename(name)


def normalize_rename(rename: Rename) -> Callable[[str], list[Route] | None]:
    """Turn a dict, callable or map object into ``name -> routes | None``."""
    if rename is None:
        lookup: Callable[[str], RenameResult] = lambda name: name
    elif isinstance(rename, Mapping):
        lookup = lambda name: rename.get(name, name)
    elif callable(rename):
        lookup = rename
    else:
        raise UsageError(f"rename must be a dict or a callable, not {type(rename).__name__}")

    def routes(name: str) -> list[Route] | None:
        result = lookup(name)
        if result is None:
            return None
        if isinstance(result, str):
            return [Route(result)]
        if isinstance(result, Route):
            return [result]
        out = [Route(r) if isinstance(r, str) else r for r in result]
        if not all(isinstance(r, Route) for r in out):
            raise UsageError(f"rename({name!r}) returned {result!r}; expected a name, Route, list of Routes or None")
        return out

    return routes
