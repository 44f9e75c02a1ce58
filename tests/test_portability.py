"""fileio: positional reads and writes on every OS, page-cache advice where there is some,
and the import-time reason for a missing extension."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import gemma_stream as gs
from gemma_stream import fileio
from gemma_stream.errors import InternalError

from conftest import package_without_native

# (os functions removed) -> the read path fileio takes: preadv, pread, per-thread seek + readinto
READ_PATHS = {"preadv": [], "pread": ["preadv"], "thread-handles": ["preadv", "pread"]}


@pytest.fixture
def data_file(tmp_path) -> tuple[Path, bytes]:
    data = random.Random(7).randbytes(300_001)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize("path_taken", list(READ_PATHS))
def test_concurrent_positional_reads_return_the_file_bytes(data_file, monkeypatch, path_taken):
    path, data = data_file
    for name in READ_PATHS[path_taken]:
        monkeypatch.delattr(os, name, raising=False)
    fd = fileio.open_read(path)
    errors = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(200):
                offset = rng.randrange(len(data))
                n = rng.randrange(1, 5000)
                buf = bytearray(n)
                got = fileio.read_into(fd, memoryview(buf), offset)
                want = data[offset:offset + n]
                if got != len(want) or bytes(buf[:got]) != want:
                    errors.append((offset, n, got))
                if fileio.pread(fd, n, offset) != want:
                    errors.append(("pread", offset, n))
        except Exception as e:  # noqa: BLE001 - reported below, on the test thread
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    entry = fileio._open[fd]
    handles = list(entry.handles)
    fileio.close(fd)
    assert errors == []
    assert fd not in fileio._open
    if path_taken == "thread-handles":
        assert len(handles) == 4 and all(h.closed for h in handles)   # one per thread, closed with the fd
    else:
        assert handles == []
    with pytest.raises(OSError):
        os.fstat(fd)


@pytest.mark.parametrize("path_taken", list(READ_PATHS))
@pytest.mark.parametrize("threads", [1, 3])
def test_pread_many_returns_every_range_in_order(data_file, monkeypatch, path_taken, threads):
    """Thousands of scattered reads (a torch zip's local headers), split over threads by runs:
    each answer lands at its own index, short at the end of the file and empty past it."""
    path, data = data_file
    for name in READ_PATHS[path_taken]:
        monkeypatch.delattr(os, name, raising=False)
    rng = random.Random(threads)
    ranges = [(rng.randrange(1, 300), rng.randrange(len(data) + 50)) for _ in range(fileio.PARALLEL_READS * 4 + 7)]
    ranges += [(10, len(data) - 4), (10, len(data) + 1)]
    fd = fileio.open_read(path)
    try:
        got = fileio.pread_many(fd, ranges, threads)
    finally:
        fileio.close(fd)
    assert got == [data[offset:offset + n] for n, offset in ranges]
    assert got[-2:] == [data[-4:], b""]


def test_read_past_the_end_returns_what_is_there(data_file, portable_os):
    path, data = data_file
    fd = fileio.open_read(path)
    try:
        assert fileio.pread(fd, 100, len(data) - 10) == data[-10:]
        assert fileio.read_into(fd, memoryview(bytearray(10)), len(data)) == 0
    finally:
        fileio.close(fd)


def test_reads_need_a_descriptor_from_open_read_without_pread(data_file, portable_os):
    fd = os.open(data_file[0], os.O_RDONLY)
    try:
        with pytest.raises(InternalError, match="open_read"):   # a bug of ours, not the file's
            fileio.read_into(fd, memoryview(bytearray(4)), 0)
    finally:
        os.close(fd)


@pytest.mark.parametrize("have_pwrite", [True, False])
def test_write_at_writes_at_the_offset(tmp_path, monkeypatch, have_pwrite):
    if not have_pwrite:
        monkeypatch.delattr(os, "pwrite", raising=False)
    path = tmp_path / "out.bin"
    fd = os.open(path, fileio.open_flags(os.O_RDWR | os.O_CREAT), 0o666)
    try:
        os.ftruncate(fd, 16)
        assert fileio.write_at(fd, b"abcd", 10) == 4
        assert fileio.write_at(fd, memoryview(b"xy"), 0) == 2
    finally:
        os.close(fd)
    assert path.read_bytes() == b"xy" + bytes(8) + b"abcd" + bytes(2)


def test_open_flags_add_binary_mode_and_no_inheritance(monkeypatch):
    monkeypatch.setattr(os, "O_BINARY", 0x8000, raising=False)     # Windows: text mode otherwise
    monkeypatch.setattr(os, "O_NOINHERIT", 0x0080, raising=False)
    monkeypatch.delattr(os, "O_CLOEXEC", raising=False)
    assert fileio.open_flags(os.O_RDONLY) == os.O_RDONLY | 0x8000 | 0x0080


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux has posix_fadvise")
def test_linux_drops_pages_after_reading():
    assert fileio.cache_drop_support() == "fadvise_dontneed"


def test_cache_drop_support_follows_the_os_functions(monkeypatch, portable_os):
    monkeypatch.setattr(sys, "platform", "win32")
    assert fileio.cache_drop_support() == "none"
    assert fileio.drop_cache(0, 0, 4096) is False and fileio.advise_willneed(0, 0, 4096) is False
    monkeypatch.setattr(sys, "platform", "darwin")
    assert fileio.cache_drop_support() == "f_nocache"


@pytest.mark.skipif(not gs.native_available(), reason="needs the native extension")
def test_native_and_python_name_the_same_cache_drop():
    from gemma_stream import _native
    assert _native.cache_drop() == fileio.cache_drop_support()


def test_cache_drop_without_os_support_keeps_the_pages_says_so_and_warns_once(tmp_path, backend, monkeypatch,
                                                                               portable_os):
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(fileio, "_warned_no_drop", False)
    torch.manual_seed(0)
    src = nn.Linear(8, 4)
    path = tmp_path / "model.safetensors"
    save_file({k: v.detach() for k, v in src.state_dict().items()}, path)
    model = nn.Linear(8, 4)
    with pytest.warns(RuntimeWarning, match="cache='drop' is not supported on this platform"):
        report = gs.load_into(model, path, backend=backend, cache="drop")
    assert report.cache == "keep"
    assert torch.equal(model.weight, src.weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gs.load_into(model, path, backend=backend, cache="drop").cache == "keep"   # once per process
        assert gs.load_into(model, path, backend=backend, cache="auto").cache == "keep"


def test_missing_extension_warning_names_the_real_cause(tmp_path):
    package_without_native(tmp_path)
    code = ("import warnings; warnings.simplefilter('always')\n"
            "import gemma_stream as gs\n"
            "from gemma_stream.executors import get_executor\n"
            "print(gs.BACKEND); get_executor('auto')\n")
    env = {k: v for k, v in os.environ.items() if k != "GEMMA_STREAM_BACKEND"}
    env["PYTHONPATH"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "python"
    assert "built without a working C++ compiler, or with GEMMA_STREAM_NATIVE=off" in out.stderr
    assert "circular import" not in out.stderr


@pytest.fixture
def no_proc(monkeypatch):
    """Run gemma_stream as on macOS and Windows: its opens of anything under /proc fail
    (psutil's own reads of /proc, on Linux, still work)."""
    import builtins
    real_open = builtins.open

    def open_without_proc(file, *args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if str(file).startswith("/proc/") and caller.startswith("gemma_stream"):
            raise FileNotFoundError(2, "No such file or directory", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_without_proc)


def test_meminfo_without_proc_comes_from_psutil(no_proc):
    psutil = pytest.importorskip("psutil")
    from gemma_stream.config import mem_available, meminfo
    assert meminfo("MemTotal") == psutil.virtual_memory().total
    assert 0 < mem_available() <= psutil.virtual_memory().total
    assert meminfo("NoSuchField") is None


def test_benchmark_probes_without_proc(no_proc):
    pytest.importorskip("psutil")
    from gemma_stream.benchmark import child, report, runner
    assert 0.0 <= runner.cpu_busy(0.05) <= 1.0
    busy, total = runner.cpu_times()
    assert 0 < busy < total
    status = child.proc_status()
    assert status["VmHWM"] >= status["VmRSS"] > 0 and status["RssFile"] == 0
    assert child.reset_peak() is False
    assert report.machine_info()["mem_total_gib"] > 0
