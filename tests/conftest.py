"""Shared fixtures: every behaviour test runs on both executors.

The pure-Python executor runs twice: as it runs here, and as it runs on
Windows and macOS ("python-portable"), with the ``os`` functions those systems
lack removed for the test.
"""

from __future__ import annotations

import os

import pytest

import gemma_stream as gs

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
