"""The fuzzer's mutations (safetensors header, zip structure, data.pkl opcodes) and :func:`make_case`."""

from __future__ import annotations

import json
import random
import re
import struct
from typing import Any

from .builders import safetensors_seed, torchzip_seed, torch_like_zip, zip_members

__all__ = ["FORMATS", "make_case"]

FORMATS = ("safetensors", "torchzip", "pickle")

_INTERESTING = [0, 1, 2, 7, 8, 63, 64, 255, 256, 4095, 4096, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
                2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30, -1, -2**63]
_DTYPE_CODES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL",
                "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F8_E4M3FNUZ", "C64", "F6_E2M3", "E8M0", "", "f32", None, 3,
                ["F32"], {"F32": 1}]


def _weird_value(rng: random.Random) -> Any:
    choice = rng.randrange(9)
    if choice == 0:
        return rng.choice(_INTERESTING)
    if choice == 1:
        return rng.choice(["", "x", "\u00e9\u4e2d", "a" * 300, "\x00", "../x", "\ud800"])
    if choice == 2:
        return [rng.choice(_INTERESTING) for _ in range(rng.randrange(4))]
    if choice == 3:
        return None
    if choice == 4:
        return rng.random() * 1e6
    if choice == 5:
        return {"a": rng.choice(_INTERESTING)}
    if choice == 6:
        return True
    if choice == 7:   # an integer literal; past 4,300 digits json.dumps cannot write it: see _json_dumps
        return rng.choice([10**20, 10**400, _HUGE])
    return [[[]]] * rng.randrange(3)


_HUGE = "\x01huge-integer\x01"


def _json_dumps(value: Any) -> bytes:
    text = json.dumps(value, ensure_ascii=True, allow_nan=True, default=str)
    return text.replace(json.dumps(_HUGE), "9" * 5000).encode()


def _mutate_safetensors(data: bytes, rng: random.Random) -> bytes:
    (n,) = struct.unpack_from("<Q", data)
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    op = rng.randrange(12)
    names = [k for k in header if k != "__metadata__"]
    entries = [k for k in names if isinstance(header[k], dict)]
    if op <= 4 and entries:   # one field of one entry
        entry = header[rng.choice(entries)]
        field = rng.choice(["dtype", "shape", "data_offsets"])
        if field == "dtype":
            entry["dtype"] = rng.choice(_DTYPE_CODES)
        elif field == "shape" and rng.random() < 0.7 and isinstance(entry.get("shape"), list):
            shape = entry["shape"]
            kind = rng.randrange(5)
            if kind == 0 and shape:
                shape[rng.randrange(len(shape))] = rng.choice(_INTERESTING)
            elif kind == 1:
                shape.insert(rng.randrange(len(shape) + 1), rng.choice([0, 1, 2, 2**62, 2**63]))
            elif kind == 2 and shape:
                shape.pop(rng.randrange(len(shape)))
            elif kind == 3:
                shape[:] = [0] + [rng.choice([2**40, 2**62, 2**63 - 1]) for _ in range(rng.randrange(1, 3))]
            else:
                entry["shape"] = shape[::-1]
        elif field == "data_offsets" and isinstance(entry.get("data_offsets"), list) and \
                all(type(o) is int for o in entry["data_offsets"]):
            offsets = entry["data_offsets"]
            i = rng.randrange(len(offsets)) if offsets else 0
            if offsets:
                offsets[i] = rng.choice([offsets[i] + rng.choice([-8, -4, -1, 1, 2, 4, 8]), rng.choice(_INTERESTING)])
        else:
            entry[field] = _weird_value(rng)
    elif op == 5 and names:       # rename, drop or duplicate an entry
        name = rng.choice(names)
        kind = rng.randrange(3)
        entry = header.pop(name)
        if kind == 0:
            header[rng.choice(["", "\u00e9", "a\x00b", "\ud800", name + "." * 3, "x" * 1000])] = entry
        elif kind == 1:
            header[name] = entry
            header[name + "_copy"] = dict(entry)
    elif op == 6:                 # metadata
        header["__metadata__"] = rng.choice([{"a": "b"}, {"a": 1}, [], "x", {"\ud800": "x"}, None, {"k": _weird_value(rng)}])
    elif op == 7 and names:       # an extra key or a whole entry replaced
        header[rng.choice(names)] = _weird_value(rng) if rng.random() < 0.5 else {
            "dtype": "F32", "shape": [rng.choice(_INTERESTING)], "data_offsets": [0, rng.choice(_INTERESTING)]}
    elif op == 8:                 # deep nesting
        header[rng.choice(names or ["x"])] = json.loads("[" * 50 + "]" * 50)
        if rng.random() < 0.3:
            raw = b'{"x":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
            return struct.pack("<Q", len(raw)) + raw + body
    raw = _json_dumps(header)
    if op == 9:                   # raw bytes of the header
        raw = _flip(raw, rng, rng.randint(1, 3))
    length = len(raw)
    if op == 10:
        length = rng.choice([length + rng.choice([-8, -1, 1, 8]), rng.choice(_INTERESTING) % (1 << 64)])
    out = struct.pack("<Q", length) + raw + body
    if op == 11:
        out = _flip(out, rng, rng.randint(1, 4)) if rng.random() < 0.5 else _truncate(out, rng)
    return out


def _flip(data: bytes, rng: random.Random, count: int) -> bytes:
    if not data:
        return data
    out = bytearray(data)
    for _ in range(count):
        i = rng.randrange(len(out))
        out[i] = rng.choice([rng.randrange(256), out[i] ^ (1 << rng.randrange(8)), 0, 0xFF])
    return bytes(out)


def _truncate(data: bytes, rng: random.Random) -> bytes:
    cut = rng.randrange(len(data)) if data else 0
    return data[:cut] if rng.random() < 0.7 else data + bytes(rng.randrange(1, 64))


_FIELD_OFFSETS = {   # signature -> byte offsets of its integer fields and their widths
    b"PK\x03\x04": [(4, 2), (6, 2), (8, 2), (14, 4), (18, 4), (22, 4), (26, 2), (28, 2)],
    b"PK\x01\x02": [(8, 2), (10, 2), (20, 4), (24, 4), (28, 2), (30, 2), (32, 2), (34, 2), (42, 4)],
    b"PK\x05\x06": [(4, 2), (6, 2), (8, 2), (10, 2), (12, 4), (16, 4), (20, 2)],
    b"PK\x06\x06": [(4, 8), (16, 4), (20, 4), (24, 8), (32, 8), (40, 8), (48, 8)],
    b"PK\x06\x07": [(4, 4), (8, 8), (16, 4)],
}


def _mutate_zip_structure(data: bytes, rng: random.Random) -> bytes:
    if rng.random() < 0.5:   # optionally start from the ZIP64 layout of the same members
        try:
            data = torch_like_zip(zip_members(data), zip64=True)
        except Exception:
            pass
    spots = [(m.start(), sig) for sig in _FIELD_OFFSETS for m in re.finditer(re.escape(sig), data)]
    out = bytearray(data)
    for _ in range(rng.randint(1, 2)):
        kind = rng.randrange(10)
        if kind < 7 and spots:
            start, sig = rng.choice(spots)
            offset, width = rng.choice(_FIELD_OFFSETS[sig])
            if start + offset + width > len(out):
                continue
            old = int.from_bytes(out[start + offset:start + offset + width], "little")
            value = rng.choice([old + rng.choice([-64, -1, 1, 64, 30]), rng.choice(_INTERESTING), len(out),
                                len(out) - start, 0xFFFFFFFF])
            out[start + offset:start + offset + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
        elif kind == 7 and spots:  # a signature broken
            start, _ = rng.choice(spots)
            out[start + rng.randrange(4)] ^= 0xFF
        elif kind == 8:
            out = bytearray(_truncate(bytes(out), rng))
        else:
            out = bytearray(_flip(bytes(out), rng, rng.randint(1, 4)))
    return bytes(out)


_PICKLE_OPS = b"()]}N\x88\x89KJMG\x8a\x8b\x8c\x8dXBCtu\x85\x86\x87se\x90\x91qrhj\x94\x93QRb01\x80\x95.2ca\x8f\x96\x8e"


def _mutate_pickle(pkl: bytes, rng: random.Random) -> bytes:
    out = bytearray(pkl)
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(8)
        i = rng.randrange(len(out)) if out else 0
        if kind == 0 and out:           # one byte becomes another opcode
            out[i] = rng.choice(_PICKLE_OPS)
        elif kind == 1:                 # an opcode (with argument bytes) inserted
            op = bytes([rng.choice(_PICKLE_OPS)]) + bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 2, 4, 8])))
            out[i:i] = op
        elif kind == 2 and out:         # a run deleted
            del out[i:i + rng.randint(1, 8)]
        elif kind == 3 and out:         # a run duplicated
            j = min(len(out), i + rng.randint(1, 64))
            out[j:j] = out[i:j] * rng.randint(1, 3)
        elif kind == 4 and out:         # an integer argument changed (BININT, BININT1, LONG1 ...)
            value = rng.choice(_INTERESTING)
            width = rng.choice([1, 2, 4, 8])
            out[i:i + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
        elif kind == 5:                 # a forbidden global
            out[i:i] = rng.choice([b"cos\nsystem\n", b"cbuiltins\neval\n", b"ctorch\nFloatStorage\n",
                                   b"ctorch._utils\n_rebuild_tensor_v2\n", b"c__builtin__\nset\n"])
        elif kind == 6:                 # a bomb fragment
            out[i:i] = rng.choice([b"(" * 5000, b"]" * 5000, b"N" + b"\x94" * 3000, b"\x8a\x40" + b"\x7f" * 64,
                                   b"X\xff\xff\xff\x00"])
        elif out:
            out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def make_case(fmt: str, seed: int, index: int) -> tuple[bytes, str]:
    """The bytes of case ``index`` of ``fmt`` and a one-line description of its mutations."""
    rng = random.Random(f"{seed}:{fmt}:{index}")
    if fmt == "safetensors":
        data = safetensors_seed(rng)
        if rng.random() < 0.25:   # valid structure, changed tensor bytes: the data paths are compared
            (n,) = struct.unpack_from("<Q", data)
            return data[:8 + n] + _flip(data[8 + n:], rng, rng.randint(1, 8)), "safetensors data"
        for _ in range(rng.randint(1, 3)):
            data = _mutate_safetensors(data, rng) if len(data) >= 8 and _header_ok(data) else _flip(data, rng, 2)
        return data, "safetensors"
    seed_file = torchzip_seed(rng)
    members = zip_members(seed_file)
    if rng.random() < 0.2:        # valid structure, changed storage bytes
        members = [(name, _flip(blob, rng, 4) if "/data/" in name else blob) for name, blob in members]
        return torch_like_zip(members, zip64=rng.random() < 0.5), "torchzip data"
    if fmt == "pickle":
        members = [(name, _mutate_pickle(blob, rng) if name.endswith("/data.pkl") else blob)
                   for name, blob in members]
        return torch_like_zip(members, zip64=rng.random() < 0.3), "pickle"
    return _mutate_zip_structure(torch_like_zip(members, zip64=False) if rng.random() < 0.5 else seed_file, rng), "zip"


def _header_ok(data: bytes) -> bool:
    (n,) = struct.unpack_from("<Q", data)
    if n > len(data) - 8:
        return False
    try:
        return isinstance(json.loads(data[8:8 + n]), dict)
    except (ValueError, RecursionError):
        return False

