"""``compare_checkpoints``: two checkpoints compared tensor by tensor, a bounded batch at a time."""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

from ..api import load_state_dict
from ..deprecation import renamed_argument
from ..formats import Checkpoint, open_checkpoint
from .files import OnBytes
from .judge import TensorComparison, judge, structural_verdict, tied_verdict
from .operands import pair_operands

__all__ = ["DEFAULT_BATCH_BYTES", "Comparison", "compare_checkpoints"]

log = logging.getLogger("gemma_stream.verify")

#: bytes of tensors (both sides together) loaded per batch by ``compare_checkpoints``
DEFAULT_BATCH_BYTES = 256 << 20


@dataclass
class Comparison:
    path_a: str
    path_b: str
    tensors: list[TensorComparison] = field(default_factory=list)
    min_sqnr_db: float | None = None

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.tensors)

    def counts(self) -> Counter:
        return Counter(t.status for t in self.tensors)


def _batches(pairs: list, batch_bytes: int) -> Iterator[list]:
    batch, size = [], 0
    for pair in pairs:
        cost = pair[1].nbytes + pair[2].nbytes
        if batch and size + cost > batch_bytes:
            yield batch
            batch, size = [], 0
        batch.append(pair)
        size += cost
    if batch:
        yield batch


def compare_checkpoints(path_a: str | os.PathLike, path_b: str | os.PathLike, *,
                        state_dict_key: str | None = None,
                        min_sqnr_db: float | None = None, batch_bytes: int = DEFAULT_BATCH_BYTES,
                        backend: str = "auto", on_bytes: OnBytes | None = None,
                        checkpoints: tuple[Checkpoint, Checkpoint] | None = None,
                        ignore: re.Pattern | None = None, key: str | None = None) -> Comparison:
    """Stream two checkpoints tensor by tensor, a batch of about ``batch_bytes`` at a time.

    Peak memory is one batch of both sides (or the largest tensor pair, whichever
    is larger) plus float temporaries of ``CHUNK_ELEMENTS``; never two whole models.
    ``on_bytes(n)`` is called as tensor bytes are read (for a progress bar);
    names matching ``ignore`` (``re.search``) are left out on both sides;
    ``state_dict_key`` picks the state dict inside torch zips (``key=`` is its
    deprecated name).
    """
    key = renamed_argument(state_dict_key, key, old="key", new="state_dict_key", where="compare_checkpoints")
    ckpt_a, ckpt_b = checkpoints or (open_checkpoint(path_a, key=key), open_checkpoint(path_b, key=key))
    result = Comparison(os.fspath(path_a), os.fspath(path_b), min_sqnr_db=min_sqnr_db)
    pairs = [pair for pair in pair_operands(ckpt_a, ckpt_b) if ignore is None or not ignore.search(pair[0])]
    position = {name: i for i, (name, _, _) in enumerate(pairs)}
    judged: list[TensorComparison] = []
    comparable = []
    for name, oa, ob in pairs:
        verdict = structural_verdict(name, oa, ob)
        if verdict is not None and verdict.status in ("only in A", "only in B"):
            verdict = tied_verdict(verdict, *((ckpt_a, ckpt_b) if ob is None else (ckpt_b, ckpt_a)))
        if verdict is not None:
            judged.append(verdict)
        else:
            comparable.append((name, oa, ob))
    for batch in _batches(comparable, batch_bytes):
        log.debug("comparing %d tensors starting at %r", len(batch), batch[0][0])
        # the checkpoints opened above are read from, never parsed again per batch
        loaded = [load_state_dict(ckpt, keys=sorted({r.name for pair in batch for r in pair[side].records}),
                                  backend=backend, progress=_progress(on_bytes))
                  for side, ckpt in ((1, ckpt_a), (2, ckpt_b))]
        judged.extend(judge(name, oa, ob, loaded[0], loaded[1], min_sqnr_db) for name, oa, ob in batch)
        del loaded
    result.tensors = sorted(judged, key=lambda t: position[t.name])
    return result


def _progress(on_bytes: OnBytes | None):
    if on_bytes is None:
        return False
    last = 0

    def update(done: int, total: int) -> bool:
        nonlocal last
        on_bytes(done - last)
        last = done
        return True
    return update
