"""Shared fixtures: every behaviour test runs on both executors."""

from __future__ import annotations

import pytest

import gemma_stream as gs

BACKENDS = ["native", "python"]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """The executor under test; the native one must be importable (CI proves it ran)."""
    if request.param == "native" and not gs.native_available():
        pytest.fail("gemma_stream._native is not importable: the native backend cannot be tested")
    return request.param
