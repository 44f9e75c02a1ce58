"""A seeded, differential mutation fuzzer for the checkpoint readers (issue 14).

Each case is a small valid checkpoint (safetensors, or a torch zip) mutated by
one to three operations chosen from a seeded RNG: safetensors header JSON and
length, zip structure (local headers, central directory, EOCD, ZIP64 records),
or the ``data.pkl`` opcodes (the zip is then rebuilt around the new pickle).
The same file is read by the reference (``safetensors.torch.load_file``, or
``torch.load(weights_only=True)``) and by ``load_state_dict`` on each backend,
and the outcomes are compared:

- both reject; both accept with equal tensors (dtype, shape, bytes; bools by value);
- accepted or rejected only by us (grouped by the reference's or our message);
- wrong data (both accept, tensors differ), leaked exception types (anything but a
  ``GemmaStreamError``), crashes and hangs.

Cases run in child processes under ``RLIMIT_AS`` with a per-case alarm, many per
child; a child that dies or stops answering is blamed on the case it was running,
which is reported as a crash or hang, and a fresh child carries on after it.
Any case can be replayed: its bytes depend only on (seed, format, index).

    python -m gemma_stream.fuzz --cases 2000            # every format, both backends
    python benchmarks/fuzz.py --cases 100000 --formats pickle --json out.json
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import random
import re
import resource
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from typing import Any, Callable, Iterator

__all__ = ["FORMATS", "make_case", "run_case", "fuzz", "main"]

FORMATS = ("safetensors", "torchzip", "pickle")
CATEGORIES = ("both_reject", "both_accept_equal", "ours_only_accept", "ours_only_reject", "wrong_data", "leaked",
              "crash", "hang", "backends_disagree", "generator_error")


# ---------------------------------------------------------------- seeds

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


def _safetensors_seed(rng: random.Random) -> bytes:
    from safetensors.torch import save
    tensors = {k: v.contiguous() for k, v in _seed_tensors(rng).items()}
    if rng.random() < 0.2:
        import torch
        tensors["e8"] = torch.arange(4, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    return save(tensors, metadata={"format": "pt"} if rng.random() < 0.5 else None)


def _torchzip_seed(rng: random.Random) -> bytes:
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


# ---------------------------------------------------------------- zip helpers

_LOCAL = struct.Struct("<4sHHHHHIIIHH")
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")


def _members(data: bytes) -> list[tuple[str, bytes]]:
    import zipfile
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(info.filename, z.read(info.filename)) for info in z.infolist()]


def _write_zip(members: list[tuple[str, bytes]], zip64: bool) -> bytes:
    """A STORED zip laid out like torch's: 64-byte aligned payloads, optionally ZIP64 records."""
    out, central, entries = bytearray(), bytearray(), []
    for name, data in members:
        raw = name.encode()
        offset = len(out)
        pad = -(offset + 30 + len(raw) + 4) % 64
        extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
        out += _LOCAL.pack(b"PK\x03\x04", 20, 0, 0, 0, 0, zlib.crc32(data), len(data), len(data), len(raw),
                           len(extra)) + raw + extra + data
        entries.append((raw, data, offset))
    for raw, data, offset in entries:
        if zip64:
            cextra = struct.pack("<HHQQQ", 1, 24, len(data), len(data), offset)
            csize = size = lho = 0xFFFFFFFF
        else:
            cextra, csize, size, lho = b"", len(data), len(data), offset
        central += _CENTRAL.pack(b"PK\x01\x02", 45, 45, 0, 0, 0, 0, zlib.crc32(data), csize, size, len(raw),
                                 len(cextra), 0, 0, 0, 0, lho) + raw + cextra
    cd_offset, count = len(out), len(entries)
    out += central
    if zip64:
        z64 = len(out)
        out += struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, len(central), cd_offset)
        out += struct.pack("<4sIQI", b"PK\x06\x07", 0, z64, 1)
        out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    else:
        out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, count, count, len(central), cd_offset, 0)
    return bytes(out)


# ---------------------------------------------------------------- mutations

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
            data = _write_zip(_members(data), zip64=True)
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
        data = _safetensors_seed(rng)
        if rng.random() < 0.25:   # valid structure, changed tensor bytes: the data paths are compared
            (n,) = struct.unpack_from("<Q", data)
            return data[:8 + n] + _flip(data[8 + n:], rng, rng.randint(1, 8)), "safetensors data"
        for _ in range(rng.randint(1, 3)):
            data = _mutate_safetensors(data, rng) if len(data) >= 8 and _header_ok(data) else _flip(data, rng, 2)
        return data, "safetensors"
    seed_file = _torchzip_seed(rng)
    members = _members(seed_file)
    if rng.random() < 0.2:        # valid structure, changed storage bytes
        members = [(name, _flip(blob, rng, 4) if "/data/" in name else blob) for name, blob in members]
        return _write_zip(members, zip64=rng.random() < 0.5), "torchzip data"
    if fmt == "pickle":
        members = [(name, _mutate_pickle(blob, rng) if name.endswith("/data.pkl") else blob)
                   for name, blob in members]
        return _write_zip(members, zip64=rng.random() < 0.3), "pickle"
    return _mutate_zip_structure(_write_zip(members, zip64=False) if rng.random() < 0.5 else seed_file, rng), "zip"


def _header_ok(data: bytes) -> bool:
    (n,) = struct.unpack_from("<Q", data)
    if n > len(data) - 8:
        return False
    try:
        return isinstance(json.loads(data[8:8 + n]), dict)
    except (ValueError, RecursionError):
        return False


# ---------------------------------------------------------------- one case

def _flat(obj: Any, prefix: str = "", depth: int = 0) -> dict:
    import torch
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, torch.Tensor):
                out[f"{prefix}{k}"] = v
            elif isinstance(v, dict) and depth < 8:
                out.update(_flat(v, f"{prefix}{k}.", depth + 1))
    return out


def _reference(fmt: str, path: str) -> dict:
    if fmt == "safetensors":
        from safetensors.torch import load_file
        return load_file(path)
    import torch
    obj = torch.load(path, weights_only=True, map_location="cpu")
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("model_state_dict", "state_dict", "model"):
            if isinstance(obj.get(key), dict):
                return _flat(obj[key])
    return _flat(obj)


def _same(a: Any, b: Any) -> str | None:
    """None when two tensor dicts are equal (dtype, shape, bytes; bools by value), else why not."""
    import torch
    if set(a) != set(b):
        return f"names differ: {sorted(set(a) ^ set(b))[:3]}"
    for name in a:
        x, y = a[name], b[name]
        if x.dtype != y.dtype or tuple(x.shape) != tuple(y.shape):
            return f"{name}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}"
        if x.numel() == 0:
            continue
        if x.dtype == torch.bool:
            x, y = x.contiguous().view(torch.uint8) != 0, y.contiguous().view(torch.uint8) != 0
        elif x.element_size() > 0:
            x = x.contiguous().reshape(-1).view(torch.uint8)
            y = y.contiguous().reshape(-1).view(torch.uint8)
        if not torch.equal(x, y):
            return f"{name}: bytes differ"
    return None


def _reason(e: BaseException) -> str:
    text = str(e).split("\n")[0]
    text = re.sub(r"^.*?(\.safetensors|\.pt)(: data\.pkl)?: ", "", text)
    text = re.sub(r"'[^']*'", "'…'", text)
    text = re.sub(r"\d+", "N", text)
    return f"{type(e).__name__}: {text[:90]}"


def run_case(fmt: str, data: bytes, path: str, backends: tuple[str, ...]) -> dict:
    """Write ``data`` to ``path``, read it with the reference and with each backend; the verdict per backend."""
    import gemma_stream as gs
    with open(path, "wb") as f:
        f.write(data)
    ref_error = None
    try:
        reference = _reference(fmt, path)
    except Exception as e:  # noqa: BLE001 - any refusal of the reference is a refusal
        reference, ref_error = None, _reason(e)
    verdicts, loaded = {}, {}
    for backend in backends:
        try:
            ours = gs.load_state_dict(path, backend=backend)
        except gs.GemmaStreamError as e:
            verdicts[backend] = ("both_reject", "") if ref_error else ("ours_only_reject", _reason(e))
            continue
        except Exception as e:  # noqa: BLE001 - exactly what the fuzzer looks for
            verdicts[backend] = ("leaked", _reason(e))
            continue
        loaded[backend] = ours
        if ref_error:
            verdicts[backend] = ("ours_only_accept", ref_error)
            continue
        why = _same(reference, ours)
        verdicts[backend] = ("both_accept_equal", "") if why is None else ("wrong_data", why)
    if len(loaded) == 2:
        first, second = loaded.values()
        why = _same(first, second)
        if why is not None:
            verdicts["agreement"] = ("backends_disagree", why)
    return verdicts


# ---------------------------------------------------------------- children

def _child(fmt: str, seed: int, first: int, last: int, backends: tuple[str, ...], case_seconds: int) -> None:
    """Run cases [first, last) and print one JSON line per case (a child of :func:`fuzz`)."""
    import warnings
    warnings.simplefilter("ignore")
    import torch  # noqa: F401 - imported before the first alarm
    import gemma_stream
    if "native" in backends and not gemma_stream.native_available():
        # e.g. the extension being rebuilt while the child started: no case is to blame, retry
        sys.exit(_NO_BACKEND)

    def alarm(signum, frame):
        raise TimeoutError(f"case ran over {case_seconds} s")
    signal.signal(signal.SIGALRM, alarm)
    suffix = ".safetensors" if fmt == "safetensors" else ".pt"
    crash_at = int(os.environ.get("GEMMA_STREAM_FUZZ_SELFTEST_CRASH", "-1"))   # tests/test_fuzz.py only
    with tempfile.TemporaryDirectory(prefix="gs_fuzz_") as tmp:
        path = os.path.join(tmp, f"case{suffix}")
        for index in range(first, last):
            try:
                data, _ = make_case(fmt, seed, index)
            except Exception as e:  # noqa: BLE001 - a bug of the mutator, not of the code under test
                print(json.dumps({"i": index, "v": {"all": ("generator_error", _reason(e))}}), flush=True)
                continue
            if index == crash_at:
                os.abort()
            signal.alarm(case_seconds)
            try:
                verdicts = run_case(fmt, data, path, backends)
            except TimeoutError as e:
                verdicts = {"all": ("hang", str(e))}
            finally:
                signal.alarm(0)
            print(json.dumps({"i": index, "v": verdicts}), flush=True)


_NO_BACKEND = 75   # a child's exit status: a requested backend did not import


def _limit_memory(nbytes: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (nbytes, nbytes))
    return apply


def _run_children(fmt: str, seed: int, first: int, cases: int, backends: tuple[str, ...], batch: int,
                  case_seconds: int, memory_bytes: int) -> Iterator[tuple[int, dict]]:
    """Yield (index, verdicts) for every case; a child that dies or hangs is blamed on its current case."""
    env = dict(os.environ, OMP_NUM_THREADS="1", GEMMA_STREAM_PREFETCH="off")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         env.get("PYTHONPATH", "")])
    index, retries = first, 0
    while index < cases:
        last = min(cases, index + batch)
        cmd = [sys.executable, "-m", "gemma_stream.fuzz", "--child", fmt, str(seed), str(index), str(last),
               ",".join(backends), str(case_seconds)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                preexec_fn=_limit_memory(memory_bytes))
        buffer = b""
        deadline = time.monotonic() + 120 + 4 * case_seconds   # start-up, then per case
        while True:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    break
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    record = json.loads(line)
                    index = record["i"] + 1
                    deadline = time.monotonic() + 4 * case_seconds
                    yield record["i"], record["v"]
            elif time.monotonic() > deadline:
                proc.kill()
                break
        proc.wait()
        stderr = proc.stderr.read().decode(errors="replace")[-300:]
        proc.stdout.close()
        proc.stderr.close()
        if proc.returncode == _NO_BACKEND and retries < 5:
            retries += 1
            time.sleep(10)
            continue
        if proc.returncode == _NO_BACKEND:
            raise RuntimeError(f"fuzz: a requested backend does not import: {stderr}")
        if index < last:   # the child stopped inside case `index`
            kind = "hang" if proc.returncode == -signal.SIGKILL else "crash"
            yield index, {"all": (kind, f"exit {proc.returncode}: {stderr.strip()[-160:]}")}
            index += 1


def fuzz(cases: int, formats: tuple[str, ...] = FORMATS, backends: tuple[str, ...] = ("native", "python"),
         seed: int = 0, batch: int = 500, case_seconds: int = 20, memory_bytes: int = 8 << 30,
         jobs: int = 1, progress: Callable[[dict], None] | None = None) -> dict:
    """Run ``cases`` cases per format; returns {format: {category: count, "reasons": ..., "examples": ...}}.

    Counts are per case and backend (a case refused by both backends counts twice);
    ``progress(partial results)`` is called every 1,000 cases.

    >>> fuzz(200, formats=("safetensors",))["safetensors"]["wrong_data"]
    0
    """
    results: dict = {}
    for fmt in formats:
        counts: collections.Counter = collections.Counter()
        reasons: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        examples: dict[str, list[int]] = collections.defaultdict(list)
        start = time.monotonic()

        def summary(done: int) -> dict:
            return {"cases": done, "backends": list(backends), "seed": seed,
                    "seconds": round(time.monotonic() - start, 1), **{c: counts[c] for c in CATEGORIES},
                    "reasons": {c: dict(r.most_common(12)) for c, r in reasons.items()},
                    "examples": dict(examples)}
        shares = [(cases * k // jobs, cases * (k + 1) // jobs) for k in range(jobs)]
        streams = [_run_children(fmt, seed, lo, hi, backends, batch, case_seconds, memory_bytes) for lo, hi in shares]
        done = 0
        for index, verdicts in _interleave(streams):
            done += 1
            for who, (category, why) in verdicts.items():
                weight = len(backends) if who == "all" else 1
                counts[category] += weight
                if why:
                    reasons[category][why] += weight
                if category not in ("both_reject", "both_accept_equal") and len(examples[category]) < 5:
                    examples[category].append(index)
            if progress is not None and done % 1000 == 0:
                progress({**results, fmt: summary(done)})
        results[fmt] = summary(done)
    return results


def _interleave(streams: list[Iterator]) -> Iterator:
    if len(streams) == 1:
        yield from streams[0]
        return
    import threading
    import queue
    out: queue.Queue = queue.Queue(maxsize=1000)
    done = object()

    def pump(stream):
        for item in stream:
            out.put(item)
        out.put(done)
    for stream in streams:
        threading.Thread(target=pump, args=(stream,), daemon=True).start()
    finished = 0
    while finished < len(streams):
        item = out.get()
        if item is done:
            finished += 1
        else:
            yield item


def format_table(results: dict) -> str:
    """The RELIABILITY.md table: one row per format (counts are case x backend)."""
    head = ["format", "cases", "backends", "both reject", "both accept, equal", "accepted only by us",
            "rejected only by us", "wrong data", "leaked types", "crashes/hangs", "backends disagree", "seconds"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for fmt, r in results.items():
        rows.append("| " + " | ".join(str(v) for v in (
            fmt, r["cases"], "+".join(r["backends"]), r["both_reject"], r["both_accept_equal"], r["ours_only_accept"],
            r["ours_only_reject"], r["wrong_data"], r["leaked"], r["crash"] + r["hang"], r["backends_disagree"],
            r["seconds"])) + " |")
    return "\n".join(rows)


BOMBS = {   # data.pkl bodies that allocate per opcode byte; each is grown to the pickle size limit
    "MARK": b"(",
    "EMPTY_LIST": b"]",
    "MEMOIZE": b"\x94",
    "DUP": b"2",
    "TUPLE1": b"\x85",
    "MARK+POP_MARK": b"(1",
    "SHORT_BINUNICODE": b"\x8c\x05hello",
    "LONG1": b"\x8a\x08" + b"\x7f" * 8,
}


def rss_kib(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` (peak, reset by writing 5 to /proc/self/clear_refs) in KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def bomb_table(size: int | None = None) -> str:
    """Each bomb walked in a fresh child: its size, seconds, MB/s and extra peak RSS (MiB)."""
    from .formats.torchzip import MAX_PICKLE_BYTES
    size = size or MAX_PICKLE_BYTES
    code = ("import sys,time\n"
            "from gemma_stream.errors import CheckpointError\n"
            "from gemma_stream.formats.pickle_walker import walk_pickle\n"
            "from gemma_stream.fuzz import rss_kib\n"
            "unit=bytes.fromhex(sys.argv[1]); n=int(sys.argv[2])\n"
            "data=bytearray(b'\\x80\\x02N'); data+=unit*((n-3)//len(unit)); data=bytes(data)\n"
            "open('/proc/self/clear_refs','w').write('5')\n"   # resets the peak (VmHWM) to the current RSS
            "before=rss_kib('VmRSS'); t=time.perf_counter(); c=time.process_time()\n"
            "try:\n    walk_pickle(data); verdict='parsed'\n"
            "except CheckpointError as e:\n    verdict=str(e).split(': ',1)[1][:60]\n"
            "dt=time.perf_counter()-t; cpu=time.process_time()-c\n"
            "print(len(data), dt, cpu, (rss_kib('VmHWM')-before)/1024, verdict)\n")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rows = ["| bomb | data.pkl bytes | seconds | CPU seconds | MB/s (CPU) | extra peak RSS (MiB) | verdict |",
            "|---|---|---|---|---|---|---|"]
    for name, unit in BOMBS.items():
        out = subprocess.run([sys.executable, "-c", code, unit.hex(), str(size)], env=env, capture_output=True,
                             text=True, timeout=600).stdout.split(" ", 4)
        n, seconds, cpu, extra, verdict = int(out[0]), float(out[1]), float(out[2]), float(out[3]), out[4].strip()
        rows.append(f"| {name} | {n} | {seconds:.2f} | {cpu:.2f} | {n / cpu / 1e6:.0f} | {extra:.1f} | {verdict} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        fmt, seed, first, last, backends, case_seconds = argv[1:7]
        _child(fmt, int(seed), int(first), int(last), tuple(backends.split(",")), int(case_seconds))
        return 0
    parser = argparse.ArgumentParser(prog="python -m gemma_stream.fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=1000, help="cases per format (default 1000)")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated subset of " + ",".join(FORMATS))
    parser.add_argument("--backends", default="native,python")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=500, help="cases per child process")
    parser.add_argument("--jobs", type=int, default=1, help="child processes at once")
    parser.add_argument("--case-seconds", type=int, default=20, help="alarm per case in the child")
    parser.add_argument("--memory-gb", type=float, default=8.0, help="RLIMIT_AS of each child")
    parser.add_argument("--json", help="write the results here (also every 1,000 cases)")
    parser.add_argument("--bombs", action="store_true", help="only measure the pickle bombs (memory, MB/s)")
    parser.add_argument("--bomb-mib", type=int, help="bomb size (default: the 256 MiB pickle limit)")
    args = parser.parse_args(argv)
    if args.bombs:
        print(bomb_table(args.bomb_mib << 20 if args.bomb_mib else None))
        return 0
    def save(results: dict) -> None:
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump(results, f, indent=1)
            os.replace(args.json + ".tmp", args.json)
    results = fuzz(args.cases, tuple(args.formats.split(",")), tuple(args.backends.split(",")), args.seed,
                   args.batch, args.case_seconds, int(args.memory_gb * (1 << 30)), args.jobs, progress=save)
    print(format_table(results))
    for fmt, r in results.items():
        for category, reasons in r["reasons"].items():
            print(f"\n{fmt} / {category}:")
            for why, n in reasons.items():
                print(f"  {n:7d}  {why}")
        if r["examples"]:
            print(f"{fmt} examples (replay with make_case('{fmt}', {args.seed}, i)): {r['examples']}")
    save(results)
    bad = sum(r["wrong_data"] + r["leaked"] + r["crash"] + r["hang"] + r["backends_disagree"]
              for r in results.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
