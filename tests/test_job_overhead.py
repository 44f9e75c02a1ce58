"""benchmarks/job_overhead.py's harness runs and splits the per-job CPU cost into its parts."""

from __future__ import annotations

import math

import pytest

import gemma_stream as gs
from gemma_stream.benchmark.job_overhead import measure, small_shapes


def test_small_shapes_span_the_sizes_asked_for():
    shapes = small_shapes(500, 64)
    sizes = [math.prod(s) * 2 for s in shapes]
    assert len(shapes) == 500 and min(sizes) >= 2048 and max(sizes) <= 64 << 10
    assert min(sizes) < 8 << 10 and max(sizes) > 32 << 10   # log-uniform: both ends are reached


@pytest.mark.skipif(not gs.native_available(), reason="native extension not built")
def test_measure_reports_every_part(tmp_path):
    out = measure(str(tmp_path), tensors=64, max_kib=16, rounds=1)
    for label in ("many_small", "few_large"):
        parts = out[label]
        assert parts["total"] > 0 and parts["engine"] > 0
        assert parts["executor"] >= parts["engine"]
    assert out["many_small"]["plan"] > out["few_large"]["plan"]
    assert set(out["per_job_us"]) == {"total", "plan", "executor_python", "engine"}
    assert list(tmp_path.iterdir()) == []   # the checkpoints are removed
