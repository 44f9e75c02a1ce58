"""The ZIP container of a torch.save checkpoint: end of central directory (ZIP64 too), the
central directory, and the local header that places each member's bytes.

Read with ``struct`` and ``fileio.pread`` only: the central directory once, then one
local header per member used, because the payload offset depends on the *local*
extra field (torch pads it so each ``data/<key>`` starts on a 64-byte boundary).
Only STORED, unencrypted, single-volume archives are accepted; every size and
offset is checked against the file before it is used.

Example::

    entries, directory_offset = read_zip_directory(fd, path, os.fstat(fd).st_size)
    payload_offset(fd, path, entries["archive/data.pkl"], directory_offset)
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from .. import fileio
from ..config import config
from ..errors import CheckpointError
from .safetensors import not_a_checkpoint

__all__ = ["ZipEntry", "read_zip_directory", "payload_offset", "payload_offsets", "LocalHeaderReads", "read_exact",
           "not_zip", "EOCD_BYTES", "MAX_DIRECTORY_BYTES"]

MAX_DIRECTORY_BYTES = 1 << 28     # bounds what a forged EOCD can make us read

_EOCD = struct.Struct("<4sHHHHIIH")            # end of central directory, 22 bytes
_ZIP64_LOCATOR = struct.Struct("<4sIQI")        # 20 bytes, just before the EOCD
_ZIP64_EOCD = struct.Struct("<4sQHHIIQQQQ")     # 56 bytes
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")  # central directory file header, 46 bytes
_LOCAL = struct.Struct("<4sHHHHHIIIHH")         # local file header, 30 bytes
_LOCAL_CHECKED = struct.Struct("<4s4xH16xHH")  # its signature, method, name and extra field lengths
_U32_MAX, _U16_MAX = 0xFFFFFFFF, 0xFFFF

_LEGACY_HINT = (
    "this looks like a legacy torch.save file (PyTorch < 1.6, or _use_new_zipfile_serialization=False), "
    "which cannot be read without executing pickle code. Re-save it with a recent torch: "
    "torch.save(torch.load(path, weights_only=True), new_path)")


class ZipEntry(NamedTuple):
    """One central directory entry of a STORED (uncompressed) archive member (immutable; a tuple
    because a checkpoint has one per tensor and a frozen dataclass took 3x as long to build)."""

    name: str
    raw_name: bytes
    size: int
    local_header_offset: int


def read_exact(fd: int, path: str, n: int, offset: int, what: str) -> bytes:
    if offset < 0 or n < 0 or offset + n >= 1 << 63:  # a forged ZIP64 offset: pread would raise OverflowError
        raise CheckpointError(f"{path}: {what} at offset {offset} lies outside any file", path=path)
    data = fileio.pread(fd, n, offset)
    if len(data) != n:
        raise CheckpointError(f"{path}: truncated: {what} needs {n} bytes at offset {offset}, got {len(data)}")
    return data


def _find_eocd(fd: int, path: str, file_size: int) -> tuple[int, tuple]:
    """Offset and fields of the End of Central Directory record (it may be followed by a comment)."""
    tail_size = min(file_size, _EOCD.size + _U16_MAX)
    tail = read_exact(fd, path, tail_size, file_size - tail_size, "the zip trailer")
    pos = tail.rfind(b"PK\x05\x06")
    while pos >= 0:
        if pos + _EOCD.size <= tail_size:
            fields = _EOCD.unpack_from(tail, pos)
            if pos + _EOCD.size + fields[7] == tail_size:  # the comment must end the file
                return file_size - tail_size + pos, fields
        pos = tail.rfind(b"PK\x05\x06", 0, pos)
    head = fileio.pread(fd, 16, 0)
    if head[:4] == b"PK\x03\x04":
        raise CheckpointError(f"{path}: truncated or damaged zip archive: no end of central directory record")
    raise not_zip(path, head)


def not_zip(path: str, head: bytes) -> CheckpointError:
    if head[:1] == b"\x80":  # a pickle protocol opcode: torch.save's legacy (non-zip) format
        return CheckpointError(f"{path}: not a zip archive (starts with {head[:4]!r}); {_LEGACY_HINT}")
    return not_a_checkpoint(path, head)


def _directory_bounds(fd: int, path: str, file_size: int) -> tuple[int, int, int, int]:
    """(entry count, central directory offset, size, end of the region it may occupy)."""
    eocd_offset, (_, disk, cd_disk, _, count, cd_size, cd_offset, _) = _find_eocd(fd, path, file_size)
    limit = eocd_offset
    if eocd_offset >= _ZIP64_LOCATOR.size:
        sig, _, z64_offset, _ = _ZIP64_LOCATOR.unpack(
            read_exact(fd, path, _ZIP64_LOCATOR.size, eocd_offset - _ZIP64_LOCATOR.size, "the ZIP64 locator"))
        if sig == b"PK\x06\x07":  # torch (miniz) always writes ZIP64 records
            if z64_offset + _ZIP64_EOCD.size > eocd_offset - _ZIP64_LOCATOR.size:
                raise CheckpointError(f"{path}: ZIP64 end of central directory offset {z64_offset} is out of range")
            (sig, _, _, _, disk, cd_disk, _, count, cd_size, cd_offset) = _ZIP64_EOCD.unpack(
                read_exact(fd, path, _ZIP64_EOCD.size, z64_offset, "the ZIP64 end of central directory"))
            if sig != b"PK\x06\x06":
                raise CheckpointError(f"{path}: no ZIP64 end of central directory record at offset {z64_offset}")
            limit = z64_offset
        elif _U32_MAX in (cd_size, cd_offset) or count == _U16_MAX:
            raise CheckpointError(f"{path}: zip directory needs ZIP64 records but has no ZIP64 locator")
    if disk or cd_disk:
        raise CheckpointError(f"{path}: multi-volume zip archives are not supported")
    if cd_size > MAX_DIRECTORY_BYTES or cd_offset + cd_size > limit:
        raise CheckpointError(
            f"{path}: central directory [{cd_offset}, {cd_offset + cd_size}) does not fit before offset {limit}")
    return count, cd_offset, cd_size, limit


def _zip64_extra(path: str, name: str, extra: bytes, wanted: list[bool]) -> list[int]:
    """Values of the ZIP64 extra field (id 1) for the 32-bit fields that were 0xFFFFFFFF."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        if tag == 1:
            count = sum(wanted)
            if length < 8 * count or pos + 4 + 8 * count > len(extra):
                break
            return list(struct.unpack_from(f"<{count}Q", extra, pos + 4))
        pos += 4 + length
    raise CheckpointError(f"{path}: entry {name!r}: sizes need a ZIP64 extra field and it is missing or short")


def read_zip_directory(fd: int, path: str, file_size: int) -> tuple[dict[str, ZipEntry], int]:
    """Parse the central directory: (entries by name, offset where the directory starts).

    Every entry must be STORED and unencrypted, and names must be unique.
    """
    count, cd_offset, cd_size, _ = _directory_bounds(fd, path, file_size)
    directory = read_exact(fd, path, cd_size, cd_offset, "the central directory")
    entries: dict[str, ZipEntry] = {}
    pos = 0
    for index in range(count):
        if pos + _CENTRAL.size > cd_size:
            raise CheckpointError(f"{path}: central directory ends after {index} of {count} entries")
        (sig, _, _, flags, method, _, _, _, csize, size, name_len, extra_len, comment_len, disk, _, attributes,
         lho) = _CENTRAL.unpack_from(directory, pos)
        if sig != b"PK\x01\x02":
            raise CheckpointError(f"{path}: central directory entry {index} has a bad signature")
        name_at = pos + 46
        raw_name = directory[name_at:name_at + name_len]
        pos = name_at + name_len + extra_len + comment_len
        if pos > cd_size:
            raise CheckpointError(f"{path}: central directory entry {index} runs past the directory")
        name = raw_name.decode("utf-8" if flags & 0x800 else "cp437", errors="replace")
        if size == _U32_MAX or csize == _U32_MAX or lho == _U32_MAX:
            wanted = [size == _U32_MAX, csize == _U32_MAX, lho == _U32_MAX]
            extra = directory[name_at + name_len:name_at + name_len + extra_len]
            values = iter(_zip64_extra(path, name, extra, wanted))
            size, csize, lho = (next(values) if w else v for w, v in zip(wanted, (size, csize, lho)))
        if flags & 1:
            raise CheckpointError(f"{path}: entry {name!r} is encrypted")
        if attributes & 0x10 or name.endswith("/"):
            # torch's reader (miniz) extracts a directory entry as nothing: its tensors would load as zeros
            raise CheckpointError(f"{path}: entry {name!r} is marked as a directory (external attributes "
                                  f"{attributes:#x}); torch.save never writes one")
        if disk:
            raise CheckpointError(f"{path}: entry {name!r} starts on disk {disk}; multi-volume zip archives are "
                                  f"not supported")
        if method != 0:
            raise CheckpointError(
                f"{path}: entry {name!r} is compressed (method {method}); torch.save stores every entry "
                f"uncompressed, so this file was re-zipped: re-save it with torch.save")
        if csize != size:
            raise CheckpointError(f"{path}: entry {name!r} is stored but its sizes differ ({csize} != {size})")
        if name in entries:
            raise CheckpointError(f"{path}: entry {name!r} appears twice in the zip directory")
        entries[name] = ZipEntry(name, raw_name, size, lho)
    return entries, cd_offset


def payload_offset(fd: int, path: str, entry: ZipEntry, end_limit: int) -> int:
    """Absolute offset of an entry's bytes, from its local header; checked to end by ``end_limit``."""
    n = _LOCAL.size + len(entry.raw_name)
    offset = entry.local_header_offset
    header = fileio.pread(fd, n, offset) if 0 <= offset < 1 << 62 else b""   # one per storage: no message built
    if len(header) != n:   # short, or at an offset no file has: _pread says which
        header = read_exact(fd, path, n, offset, f"local header of {entry.name!r}")
    sig, _, _, method, _, _, _, _, _, name_len, extra_len = _LOCAL.unpack_from(header)
    if sig != b"PK\x03\x04" or method != 0 or header[_LOCAL.size:] != entry.raw_name:
        raise CheckpointError(
            f"{path}: local header of {entry.name!r} at offset {entry.local_header_offset} "
            f"does not match the central directory")
    start = entry.local_header_offset + _LOCAL.size + name_len + extra_len
    if start + entry.size > end_limit:
        raise CheckpointError(
            f"{path}: entry {entry.name!r} bytes [{start}, {start + entry.size}) run past offset {end_limit} "
            f"(file truncated or damaged)")
    return start


def _header_ranges(entries: list[ZipEntry]) -> list[tuple[int, int]]:
    """``(bytes, offset)`` of each entry's local header and name (an offset no file has reads at 0:
    the checks then refuse the entry)."""
    local_size, limit = _LOCAL.size, 1 << 62
    return [(local_size + len(e.raw_name), e.local_header_offset if 0 <= e.local_header_offset < limit else 0)
            for e in entries]


class LocalHeaderReads:
    """The local headers of many entries, asked for before the caller goes on (a torch zip's
    reader walks its pickle meanwhile) and read when it wants them: on a file that is not cached
    every header is asked for at once (``posix_fadvise(WILLNEED)``) on a native thread
    (``_native.BackgroundAdvice``), so the disk reads them while the pickle is walked;
    :meth:`headers` then reads them all in one call into the native engine, without the GIL, on
    the loader's threads, and cuts the bytes into headers.

    No Python thread: one that read them in the background waited for the walk to let go of the
    GIL before it could start, so its read began 12-20 ms late, after the walk, and the caller
    then waited 3-4 ms for it; made to start at once, its reads ran beside the walk on this
    project's 2 cores and slowed it more than they saved.  Asking, rather than reading, is what
    runs beside the walk: on the caller's thread it took 15-23 ms first (NOTES.md 39).

    :meth:`start` returns None where it would not help: no native engine (or
    ``GEMMA_STREAM_BACKEND=python``), fewer than ``fileio.PARALLEL_READS`` entries, or more than
    ``MAX_BYTES`` of headers.  The bytes are only read, not trusted: :func:`payload_offsets` checks
    them as it checks its own reads, and a failed read leaves the reading to it.
    """

    MAX_BYTES = 64 << 20

    def __init__(self, path: str, identity: tuple[int, int, int, int] | None, entries: list[ZipEntry],
                 offsets: list[int], lengths: list[int], threads: int, native, cold: bool):
        self._path, self._identity, self._entries = str(path), identity, entries
        self._offsets, self._lengths, self._threads, self._native = offsets, lengths, threads, native
        # cold: every header asked for at once, on a native thread (no GIL), while the caller goes on
        self._advice = native.BackgroundAdvice(self._path, offsets, lengths) if cold else None

    @classmethod
    def start(cls, path: str, identity: tuple[int, int, int, int] | None, entries: list[ZipEntry],
              threads: int, cold: bool) -> LocalHeaderReads | None:
        from ..executors import native_module   # here: executors import the planner, which imports formats
        native = native_module()
        if native is None or config().backend == "python" or len(entries) < fileio.PARALLEL_READS:
            return None
        ranges = _header_ranges(entries)
        lengths = [n for n, _ in ranges]
        if sum(lengths) > cls.MAX_BYTES:
            return None
        return cls(path, identity, entries, [o for _, o in ranges], lengths, threads, native, cold)

    def headers(self, entries: list[ZipEntry]) -> list[bytes] | None:
        """The headers of ``entries`` (each one of those started with); None when the read failed."""
        if self._advice is not None:
            self._advice.wait()   # without the GIL; the advice is queued well before the walk ends
        try:
            data, got = self._native.read_ranges(self._path, self._offsets, self._lengths, self._threads,
                                                 self._identity)
        except Exception:   # noqa: BLE001  (the reader's own reads then say what is wrong)
            return None
        out, at = [], 0
        for n, length in zip(self._lengths, got):
            out.append(data[at:at + length])
            at += n
        if entries == self._entries:   # the same list, or the same entries in the same order
            return out
        index = {entry.name: i for i, entry in enumerate(self._entries)}
        try:
            return [out[index[entry.name]] for entry in entries]
        except KeyError:
            return None


def payload_offsets(fd: int, path: str, entries: list[ZipEntry], end_limit: int, threads: int = 1,
                    cold: bool = False, reads: LocalHeaderReads | None = None) -> list[int]:
    """:func:`payload_offset` of each entry, in order: the same checks and the same errors.

    One call per checkpoint instead of one per storage (a many-tensor zip has thousands): the
    local headers are read on up to ``threads`` threads (:func:`fileio.pread_many`, all asked for
    at once first when the file is ``cold``), or taken from ``reads`` (one native call),
    then each is checked inline; an entry that fails any check goes through
    :func:`payload_offset`, whose refusal names it, and the first such entry in ``entries`` is the
    one refused."""
    local_size = _LOCAL.size
    limit = 1 << 62
    headers = reads.headers(entries) if reads is not None else None
    if headers is None:
        headers = fileio.pread_many(fd, _header_ranges(entries), threads, advise=cold)
    unpack_checked = _LOCAL_CHECKED.unpack_from
    out = []
    append = out.append
    for entry, header in zip(entries, headers):
        offset = entry.local_header_offset
        raw_name = entry.raw_name
        if len(header) == local_size + len(raw_name) and 0 <= offset < limit and header.endswith(raw_name):
            sig, method, name_len, extra_len = unpack_checked(header)
            start = offset + local_size + name_len + extra_len
            if sig == b"PK\x03\x04" and method == 0 and start + entry.size <= end_limit:
                append(start)
                continue
        append(payload_offset(fd, path, entry, end_limit))   # raises, naming the entry
    return out


#: the smallest zip: an end of central directory record alone
EOCD_BYTES = _EOCD.size
