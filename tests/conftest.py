"""Shared fixtures: every behaviour test runs on both executors; small checkpoints and the command
line for the CLI and verify tests (``from conftest import run_cli, call_cli``); page-cache probes
and a 24 MiB file for the engine's cache and mmap tests (``from conftest import cached_bytes``).

The pure-Python executor runs twice: as it runs here, and as it runs on
Windows and macOS ("python-portable"), with the ``os`` functions those systems
lack removed for the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import gemma_stream as gs
from gemma_stream import cli
from gemma_stream.quant import quantize_int4, quantize_int8

PACKAGE_ROOT = str(Path(gs.__file__).resolve().parent.parent)

BACKENDS = ["native", "python", "python-portable"]

#: ``os`` names Linux has and Windows lacks (macOS lacks the fadvise ones and
#: sched_getaffinity; O_DIRECT is Linux only). ``statvfs`` stays: shutil.disk_usage,
#: which convert uses on every OS, is built on it on POSIX (on nt._getdiskusage on Windows).
POSIX_ONLY_OS_NAMES = ["preadv", "pread", "pwrite", "posix_fadvise", "POSIX_FADV_DONTNEED",
                       "POSIX_FADV_SEQUENTIAL", "POSIX_FADV_WILLNEED", "POSIX_FADV_NORMAL", "O_CLOEXEC",
                       "O_DIRECT", "sched_getaffinity", "major", "minor"]


def remove_posix_only_os(monkeypatch: pytest.MonkeyPatch) -> None:
    """Take away the ``os`` functions and constants Windows does not have, for one test."""
    for name in POSIX_ONLY_OS_NAMES:
        monkeypatch.delattr(os, name, raising=False)


@pytest.fixture
def portable_os(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a test with :data:`POSIX_ONLY_OS_NAMES` removed from ``os``."""
    remove_posix_only_os(monkeypatch)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch: pytest.MonkeyPatch) -> str:
    """The executor under test; the native one must be importable (CI proves it ran)."""
    if request.param == "native" and not gs.native_available():
        pytest.fail("gemma_stream._native is not importable: the native backend cannot be tested")
    if request.param == "python-portable":
        if request.node.get_closest_marker("page_cache"):
            pytest.skip("needs posix_fadvise, which the portable run removes")
        remove_posix_only_os(monkeypatch)
        return "python"
    return request.param


# ---------------------------------------------------------------- the command line and its checkpoints

@pytest.fixture(scope="session")
def files(tmp_path_factory) -> dict[str, Path]:
    """Small checkpoints in every format, good and broken, for the CLI and verify tests."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    out = {}
    single = {"model.embed_tokens.weight": torch.randn(64, 32).bfloat16(),
              "model.layers.0.mlp.up_proj.weight": torch.randn(48, 32).bfloat16(),
              "model.norm.weight": torch.ones(32), "rope.inv_freq": torch.rand(8, dtype=torch.float64)}
    out["single"] = root / "single.safetensors"
    save_file(single, out["single"], metadata={"format": "pt", "origin": "test"})

    shards = root / "sharded"
    shards.mkdir()
    parts = {"model-00001-of-00002.safetensors": {"a.weight": torch.randn(10, 12), "step": torch.arange(3)},
             "model-00002-of-00002.safetensors": {"b.weight": torch.randn(5, 4).half()}}
    for name, tensors in parts.items():
        save_file(tensors, shards / name)
    weight_map = {t: name for name, tensors in parts.items() for t in tensors}
    (shards / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0},
                                                                     "weight_map": weight_map}))
    out["sharded"] = shards

    w = torch.randn(16, 8)
    state = {"embedder.weight": w, "lm_head.weight": w, "proj.weight": torch.randn(6, 8).t(),
             "rows": w[4:8], "freqs_cis": torch.polar(torch.ones(4, 2), torch.zeros(4, 2))}
    out["ckpt"] = root / "model.ckpt"
    torch.save({"model_state_dict": state, "epoch": 3}, out["ckpt"])
    # the same views without the complex buffer (our safetensors reader has no C64), converted
    del state["freqs_cis"]
    out["ckpt_real"] = root / "real.ckpt"
    torch.save({"model_state_dict": state}, out["ckpt_real"])
    out["ckpt_as_safetensors"] = root / "from_ckpt.safetensors"
    save_file({k: v.contiguous().clone() for k, v in state.items()}, out["ckpt_as_safetensors"])

    weight, table = torch.randn(64, 128), torch.randn(40, 64)
    out["ref"] = root / "ref.safetensors"
    save_file({"l.weight": weight, "emb.weight": table, "n.weight": torch.ones(64)}, out["ref"])
    out["ref_bf16"] = root / "ref_bf16.safetensors"
    save_file({"l.weight": weight.bfloat16(), "emb.weight": table.bfloat16(),
               "n.weight": torch.ones(64).bfloat16()}, out["ref_bf16"])
    q8, s8 = quantize_int8(weight)
    q4, s4, z4 = quantize_int4(table, group_size=32)
    out["quant"] = root / "quant.safetensors"
    save_file({"l.weight": q8, "l.weight_scaler": s8, "emb.weight": q4, "emb.weight_scale": s4,
               "emb.weight_zero": z4, "n.weight": torch.ones(64)}, out["quant"])
    changed = weight.clone()
    changed[3, 5] += 0.5
    out["changed"] = root / "changed.safetensors"
    save_file({"l.weight": changed, "emb.weight": table[:20].clone(), "extra": torch.ones(2)}, out["changed"])

    raw = out["single"].read_bytes()
    out["truncated"] = root / "truncated.safetensors"
    out["truncated"].write_bytes(raw[:len(raw) - 100])
    out["bad_header"] = root / "bad_header.safetensors"
    out["bad_header"].write_bytes((20).to_bytes(8, "little") + b'{"a": [1, 2, 3]} ...')
    out["truncated_ckpt"] = root / "truncated.ckpt"
    out["truncated_ckpt"].write_bytes(out["ckpt"].read_bytes()[:600])
    return out


def run_cli(*args, check_rc: int | None = 0, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "gemma_stream", *map(str, args)], env=env, text=True,
                          capture_output=True, timeout=120, **kwargs)
    if check_rc is not None:
        assert proc.returncode == check_rc, (proc.stdout, proc.stderr)
    return proc


def call_cli(capsys, *args) -> subprocess.CompletedProcess:
    """``cli.main`` in this process (quicker than a subprocess) with the same result shape."""
    rc = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out, err)


def package_without_native(tmp_path: Path) -> Path:
    """A copy of the package without its compiled engine, at ``tmp_path / "gemma_stream"``, for a
    child run with ``PYTHONPATH=tmp_path``.  Skips the test where the engine is found other than
    beside the package: an editable install's import hook maps ``gemma_stream._native`` to its
    build whatever folder the package is imported from, so no copy can lack it there."""
    import importlib.util
    import shutil

    package = Path(gs.__file__).resolve().parent
    spec = importlib.util.find_spec("gemma_stream._native")
    if spec is not None and spec.origin and Path(spec.origin).resolve().parent != package:
        pytest.skip(f"gemma_stream._native is imported from {spec.origin}, not beside the package "
                    f"(an editable install): a copy of the package would still find it")
    copy = tmp_path / "gemma_stream"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("_native*", "__pycache__"))
    return copy


def bytes_at(path: str, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


# ---------------------------------------------------------------- the page cache (test_engine_cache, _mmap)

MiB = 1 << 20


def cached_bytes(path) -> int:
    """Bytes of the file in the page cache (mincore, through the package's one door to it)."""
    from gemma_stream import pagecache

    resident = pagecache.resident_bytes(path)
    assert resident is not None, "no mincore on this platform"
    return resident


def set_cached(path, cached: bool) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if cached:
            # small reads leave large folios that straddle the engine's chunk edges
            while os.read(fd, 64 << 10):
                pass
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    """24 MiB over tensors of mixed sizes and dtypes; skips where the page cache cannot be observed."""
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("cache") / "w.safetensors"
    sd = {"embed": torch.randn(2048, 2048), "small": torch.randn(7, 3),
          "mid": torch.randn(1000, 1024).bfloat16(), "tail": torch.randn(4_000_000).half()}
    save_file(sd, str(path))
    set_cached(path, False)
    if cached_bytes(path) > 2 * MiB:
        pytest.skip("this file system keeps pages after POSIX_FADV_DONTNEED (tmpfs?)")
    return path, sd


def mapped_from(path, tensor: torch.Tensor) -> bool:
    """True when the tensor's memory lies in a private (copy-on-write) mapping of ``path``."""
    real = os.path.realpath(path)
    with open("/proc/self/maps") as maps:
        lines = maps.read().splitlines()
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[5] == real:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= tensor.data_ptr() < hi:
                return fields[1][3] == "p"
    return False
