"""Valid seed checkpoints for the fuzzer, and the torch-like STORED zip writer.

The writer lays a zip out as ``torch.save`` does (64-byte aligned payloads behind a
"FB" extra field), optionally with ZIP64 records everywhere; the fuzzer rebuilds
mutated archives with it and the tests craft their bad files with it (tests/torch_like.py).
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from typing import Any

__all__ = ["safetensors_seed", "torchzip_seed", "local_header", "torch_like_zip", "zip_members"]


def _seed_tensors(rng: random.Random) -> dict:
    import torch
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    base = torch.randn(6, 4, generator=g)
    tensors = {
        "w": base,
        "b16": base[0].to(torch.bfloat16),
        "h": torch.randn(3, generator=g).to(torch.float16),
        "i": torch.arange(5, dtype=torch.int64),
        "m": torch.tensor([True, False, True]),
        "e": torch.empty(0, 3),
        "s": torch.tensor(2.5),
        "q": torch.arange(4, dtype=torch.uint8).view(torch.float8_e4m3fn),
    }
    keep = rng.sample(sorted(tensors), rng.randint(1, len(tensors)))
    return {k: tensors[k] for k in keep}


def safetensors_seed(rng: random.Random) -> bytes:
    """A valid safetensors file of a random subset of the seed tensors (``rng`` decides everything)."""
    from safetensors.torch import save
    tensors = {k: v.contiguous() for k, v in _seed_tensors(rng).items()}
    if rng.random() < 0.2:
        import torch
        tensors["e8"] = torch.arange(4, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    return save(tensors, metadata={"format": "pt"} if rng.random() < 0.5 else None)


def torchzip_seed(rng: random.Random) -> bytes:
    """A ``torch.save`` zip of a random subset of the seed tensors, sometimes with views and nesting."""
    import torch
    tensors: dict[str, Any] = dict(_seed_tensors(rng))
    if "w" in tensors and rng.random() < 0.5:   # views sharing a storage: strided, offset, transposed
        w = tensors["w"]
        tensors["w_t"] = w.t()
        tensors["w_row"] = w[2]
        tensors["w_col"] = w[:, 1]
    buffer = io.BytesIO()
    obj: Any = tensors if rng.random() < 0.8 else {"model_state_dict": tensors, "epoch": 3}
    torch.save(obj, buffer)
    return buffer.getvalue()


# ---------------------------------------------------------------- zip writer

_LOCAL = struct.Struct("<4sHHHHHIIIHH")
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")


def zip_members(data: bytes) -> list[tuple[str, bytes]]:
    """(name, bytes) of every member of the zip ``data``, in central directory order (read by the stdlib)."""
    import zipfile
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(info.filename, z.read(info.filename)) for info in z.infolist()]


def local_header(name: str, data: bytes, extra: bytes = b"") -> bytes:
    """A STORED local file header for ``data`` (CRC and sizes filled in), followed by its name and ``extra``."""
    raw = name.encode()
    return _LOCAL.pack(b"PK\x03\x04", 20, 0, 0, 0, 0, zlib.crc32(data), len(data), len(data), len(raw),
                       len(extra)) + raw + extra


def torch_like_zip(members: list[tuple[str, bytes]], zip64: bool = False, align: int = 64,
                   phantoms: tuple[tuple[str, bytes, int], ...] = ()) -> bytes:
    """A STORED zip laid out like torch's: payloads padded to ``align``, optionally ZIP64 everywhere.

    ``phantoms`` are (name, data, local header offset) entries that exist only in the
    central directory, pointing at a local header hidden inside another payload.

    >>> zip_members(torch_like_zip([("archive/version", b"3\\n")]))
    [('archive/version', b'3\\n')]
    """
    out, central, entries = bytearray(), bytearray(), []
    for name, data in members:
        offset = len(out)
        pad = -(offset + 30 + len(name.encode()) + 4) % align
        out += local_header(name, data, struct.pack("<HH", 0x4246, pad) + b"Z" * pad) + data  # torch's "FB" pad
        entries.append((name, data, offset))
    for name, data, offset in entries + list(phantoms):
        raw = name.encode()
        if zip64:  # every 32-bit field saturated, real values in the ZIP64 extra field
            cextra = struct.pack("<HHQQQ", 1, 24, len(data), len(data), offset)
            csize = size = lho = 0xFFFFFFFF
        else:
            cextra, csize, size, lho = b"", len(data), len(data), offset
        central += _CENTRAL.pack(b"PK\x01\x02", 45, 45, 0, 0, 0, 0, zlib.crc32(data), csize, size, len(raw),
                                 len(cextra), 0, 0, 0, 0, lho) + raw + cextra
    cd_offset, count = len(out), len(entries) + len(phantoms)
    out += central
    if zip64:
        z64 = len(out)
        out += struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, len(central), cd_offset)
        out += struct.pack("<4sIQI", b"PK\x06\x07", 0, z64, 1)
        out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    else:
        out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, count, count, len(central), cd_offset, 0)
    return bytes(out)
