"""Bounds: the checkpoint's bytes read into fresh memory with no parsing at all.

What a loader is compared with: pread in 64 MiB calls by 1 or 2 threads (contiguous halves), with
O_DIRECT, into huge pages, and mmap + memcpy (1 thread) or + torch ``copy_`` (torch's threads).
Each ``prepare(ctx)`` returns the timed function, as the loaders in ``child`` do.
"""

from __future__ import annotations

import mmap
import os
import threading
from dataclasses import dataclass

import torch

__all__ = ["Buffer", "pread_bound", "memcpy_bound", "mmap_copy_bound"]

_IO_BYTES = 64 << 20
_DIRECT_ALIGN = 4096


@dataclass
class Buffer:
    data: object   # keeps the destination alive until the child has measured it
    nbytes: int


def _pieces(paths: list[str], align: int) -> tuple[list[tuple[int, int, int, int]], int]:
    """(file index, file offset, length, buffer offset) in 64 MiB calls; each file's region aligned."""
    pieces, buf_offset = [], 0
    for i, path in enumerate(paths):
        size = os.path.getsize(path)
        for offset in range(0, size, _IO_BYTES):
            length = min(_IO_BYTES, size - offset)
            pieces.append((i, offset, -(-length // align) * align, buf_offset + offset))
        buf_offset += -(-size // align) * align
    return pieces, buf_offset


def _split(pieces: list, parts: int) -> list[list]:
    """Contiguous groups of about equal bytes: thread i reads the i-th part of the file(s)."""
    total = sum(p[2] for p in pieces)
    groups: list[list] = [[] for _ in range(parts)]
    done = 0
    for piece in pieces:
        groups[min(parts - 1, done * parts // max(total, 1))].append(piece)
        done += piece[2]
    return groups


def _read_into(fds: list[int], view: memoryview, group: list) -> None:
    for index, offset, length, buf_offset in group:
        got = 0
        while got < length:
            n = os.preadv(fds[index], [view[buf_offset + got:buf_offset + length]], offset + got)
            if n == 0:   # end of file (O_DIRECT reads round the last call up to the block size)
                break
            got += n


def pread_bound(threads: int, direct: bool = False, huge_pages: bool | None = None):
    """``huge_pages``: True advises transparent huge pages, False forbids them (plain 4 KiB pages, as a
    parameter allocated by torch gets where THP is "madvise"), None leaves the kernel's default."""
    def prepare(ctx):
        paths = ctx.files["data"]
        pieces, alloc = _pieces(paths, _DIRECT_ALIGN if direct else 1)

        def run():
            flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
            fds = [os.open(p, flags) for p in paths]
            # fresh, untouched private anonymous memory, like a just-allocated parameter
            buf = mmap.mmap(-1, max(alloc, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            if huge_pages:   # transparent huge pages: one fault per 2 MiB instead of per 4 KiB
                buf.madvise(mmap.MADV_HUGEPAGE)
            elif huge_pages is False and hasattr(mmap, "MADV_NOHUGEPAGE"):
                buf.madvise(mmap.MADV_NOHUGEPAGE)
            view = memoryview(buf)
            errors: list[BaseException] = []

            def work(group):
                try:
                    _read_into(fds, view, group)
                except BaseException as exc:   # re-raised on the calling thread below
                    errors.append(exc)
            workers = [threading.Thread(target=work, args=(g,)) for g in _split(pieces, threads)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            view.release()
            for fd in fds:
                os.close(fd)
            if errors:
                raise errors[0]
            return Buffer(buf, sum(os.path.getsize(p) for p in paths))
        return run
    return prepare


def memcpy_bound(ctx):
    paths = ctx.files["data"]
    pieces, alloc = _pieces(paths, 1)

    def run():
        maps = []
        for p in paths:
            with open(p, "rb") as f:
                maps.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        buf = mmap.mmap(-1, max(alloc, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        dst, srcs = memoryview(buf), [memoryview(m) for m in maps]
        for index, offset, length, buf_offset in pieces:
            dst[buf_offset:buf_offset + length] = srcs[index][offset:offset + length]
        for view in [dst, *srcs]:
            view.release()
        for m in maps:
            m.close()
        return Buffer(buf, alloc)
    return run


def mmap_copy_bound(ctx):
    """mmap the file and copy it with torch's (multi-threaded) copy_: what safetensors' load_model does."""
    paths = ctx.files["data"]

    def run():
        total = sum(os.path.getsize(p) for p in paths)
        dst = torch.empty(total, dtype=torch.uint8)
        at = 0
        for p in paths:
            with open(p, "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)   # private: never written
            src = torch.frombuffer(mapped, dtype=torch.uint8)
            for offset in range(0, src.numel(), _IO_BYTES):
                piece = src[offset:offset + _IO_BYTES]
                dst[at + offset:at + offset + piece.numel()].copy_(piece)
            at += src.numel()
            del src, piece
            mapped.close()
        return Buffer(dst, total)
    return run
