"""The planner on its own: records + destination tensors -> jobs, with no file and no executor."""

from __future__ import annotations

import math

import pytest
import torch

import gemma_stream as gs
from gemma_stream.dtypes import by_name
from gemma_stream.formats.records import Checkpoint, TensorRecord
from gemma_stream.plan import QuantTarget, make_plan, zero_copy_jobs


def checkpoint(*specs: tuple[str, str, tuple[int, ...]]) -> Checkpoint:
    """Records laid end to end in one imaginary file (the planner never opens it)."""
    records, offset = [], 1000
    for name, dtype, shape in specs:
        record = TensorRecord(name, by_name(dtype), shape, "f.safetensors", offset)
        records.append(record)
        offset += record.nbytes
    return Checkpoint("safetensors", ["f.safetensors"], records)


def test_plain_jobs_offsets_and_conversion():
    ckpt = checkpoint(("a", "f32", (4, 3)), ("b", "bf16", (5,)))
    a, b = torch.empty(4, 3, dtype=torch.bfloat16), torch.empty(5, dtype=torch.bfloat16)
    plan = make_plan(ckpt, {"a": a, "b": b})
    assert [(j.name, j.src_offset, j.src_dtype.name, j.dst_dtype.name) for j in plan.jobs] == \
        [("a", 1000, "f32", "bf16"), ("b", 1048, "bf16", "bf16")]
    assert plan.jobs[0].dst is a and plan.nbytes == 48 + 10 and plan.loaded == ["a", "b"]


def test_routes_fill_row_ranges_and_split_sources():
    ckpt = checkpoint(("q", "f32", (4, 2)), ("kv", "f32", (4, 2)))
    qkv, k, v = torch.empty(8, 2), torch.empty(2, 2), torch.empty(2, 2)
    plan = make_plan(ckpt, {"qkv": qkv, "k": k, "v": v}, strict=False,
                     rename={"q": gs.Route("qkv", dst_rows=(0, 4)),
                             "kv": [gs.Route("k", src_rows=(0, 2)), gs.Route("v", src_rows=(2, 4))]})
    by_target = {(j.target, j.src_offset) for j in plan.jobs}
    assert by_target == {("qkv", 1000), ("k", 1032), ("v", 1032 + 16)}
    assert plan.missing_keys == ["qkv"]   # rows [4, 8) of the fused tensor were never written


def test_strict_mismatch_lists_every_kind_before_any_job():
    ckpt = checkpoint(("a", "f32", (4,)), ("extra", "f32", (1,)), ("c", "i64", (2,)))
    with pytest.raises(gs.MismatchError) as info:
        make_plan(ckpt, {"a": torch.empty(5), "b": torch.empty(1), "c": torch.empty(2)})
    text = str(info.value)
    assert "missing in checkpoint (3): a, b, c" in text and "unexpected in checkpoint (1): extra" in text
    assert "a: checkpoint shape [4] vs model 'a' shape [5]" in text and "cannot be loaded into 'c'" in text


def test_tied_targets_are_planned_once():
    ckpt = checkpoint(("embed", "f32", (3, 2)), ("head", "f32", (3, 2)))
    shared = torch.empty(3, 2)
    plan = make_plan(ckpt, {"embed": shared, "head": shared})
    assert len(plan.jobs) == 1 and plan.skipped_keys == ["head"]


def test_overlapping_routes_are_refused():
    ckpt = checkpoint(("a", "f32", (4, 2)), ("b", "f32", (4, 2)))
    with pytest.raises(gs.MismatchError, match="overlap"):
        make_plan(ckpt, {"t": torch.empty(6, 2)},
                  rename={"a": gs.Route("t", dst_rows=(0, 4)), "b": gs.Route("t", dst_rows=(2, 6))})


def test_quant_target_takes_float_sources_and_claims_its_scales():
    ckpt = checkpoint(("w", "bf16", (4, 8)),)
    q, s = torch.empty(4, 8, dtype=torch.int8), torch.empty(4)
    target = QuantTarget("int8", (4, 8), q, s, None, 0, ("w_scaler",))
    plan = make_plan(ckpt, {"w": q, "w_scaler": s}, quant={"w": target})
    (job,) = plan.jobs
    assert job.op == "int8" and job.scale is not None and set(plan.loaded) == {"w", "w_scaler"}


def test_rebind_points_jobs_at_the_tensors_that_replaced_meta_ones():
    ckpt = checkpoint(("q", "f32", (2, 3)), ("k", "f32", (2, 3)))
    fused = torch.empty(4, 3, device="meta")
    plan = make_plan(ckpt, {"qkv": fused}, rename={"q": gs.Route("qkv", dst_rows=(0, 2)),
                                                   "k": gs.Route("qkv", dst_rows=(2, 4))})
    assert all(j.staged for j in plan.jobs)        # meta is no CPU memory
    real = torch.zeros(4, 3)
    plan.rebind({id(fused): real})
    for job, first_row in zip(plan.jobs, (0, 2)):
        assert not job.staged and job.dst.data_ptr() == real[first_row].data_ptr() and job.dst.shape == (2, 3)
    with pytest.raises(RuntimeError, match="bug"):
        other = make_plan(ckpt, {"qkv": torch.empty(4, 3, device="meta")},
                          rename={"q": gs.Route("qkv", dst_rows=(0, 2)), "k": gs.Route("qkv", dst_rows=(2, 4))})
        other.rebind({})


def test_computed_names_excuse_missing_keys_but_are_not_filled():
    ckpt = checkpoint(("a", "f32", (2,)),)
    targets = {"a": torch.empty(2), "freqs_cis": torch.empty(3)}

    class Map(dict):
        computed = ("freqs_cis",)
    plan = make_plan(ckpt, targets, rename=Map())
    assert plan.missing_keys == [] and plan.computed_keys == ["freqs_cis"]
    assert plan.filled(targets) == {id(targets["a"])}


def test_zero_copy_takes_whole_same_dtype_cpu_targets_only():
    ckpt = checkpoint(("same", "bf16", (4,)), ("conv", "f32", (4,)), ("rows", "bf16", (2, 2)))
    targets = {"same": torch.empty(4, dtype=torch.bfloat16), "conv": torch.empty(4, dtype=torch.bfloat16),
               "fused": torch.empty(4, 2, dtype=torch.bfloat16)}
    plan = make_plan(ckpt, targets, strict=False, rename={"rows": gs.Route("fused", dst_rows=(0, 2))})
    assert [j.target for j in zero_copy_jobs(plan, targets, torch.device("cpu"))] == ["same"]


@pytest.mark.parametrize("policy, mapped_bytes, available, supported, expected", [
    ("auto", 800, 1000, True, True),      # fits with a fifth to spare
    ("auto", 801, 1000, True, False),     # would push out its own first pages
    ("auto", 800, None, True, False),     # MemAvailable unknown: do not guess
    ("auto", 0, 1000, True, False),       # nothing mapped
    ("auto", 800, 1000, False, False),    # no posix_fadvise (macOS, Windows)
    ("on", 1 << 40, 1000, True, True),
    ("on", 1 << 40, None, False, False),
    ("on", 0, None, True, False),
    ("off", 1, 1 << 40, True, False),
])
def test_readahead_decision_takes_the_facts_it_is_given(policy, mapped_bytes, available, supported, expected):
    from gemma_stream.plan import choose_readahead

    assert choose_readahead(policy, mapped_bytes, available, supported=supported) is expected


def test_readahead_decision_refuses_an_unknown_policy():
    from gemma_stream.plan import choose_readahead

    with pytest.raises(gs.UsageError, match="'sometimes'"):
        choose_readahead("sometimes", 1, 1)


@pytest.mark.parametrize("shape, strides", [
    ((4, 3), None), ((4, 3), (3, 1)), ((3, 4), (1, 3)), ((2, 3, 5), (40, 1, 6)), ((4, 2), (8, 1)),
    ((), ()), ((0, 7), (7, 1)), ((5, 0), None), ((1,), (99,)),
])
def test_span_of_a_strided_view_is_where_torch_reads_up_to(shape, strides):
    """``span_elements`` (and ``CopyJob.src_span_bytes``) agree with the last element torch's
    ``as_strided`` reads from a storage of just that many elements."""
    from gemma_stream.layout import span_elements
    from gemma_stream.plan import CopyJob

    span = span_elements(shape, strides)
    numel = math.prod(shape)
    view_strides = strides if strides is not None else torch.empty(shape).stride()
    base = torch.arange(max(span, 1), dtype=torch.float64)
    view = base.as_strided(shape, view_strides)                  # raises if the span were too short
    assert span == (int(view.max()) + 1 if numel else 0)
    job = CopyJob(name="w", target="w", file_index=0, src_offset=100, src_dtype=by_name("bf16"), shape=shape,
                  src_strides=strides, dst=torch.empty(shape, dtype=torch.bfloat16))
    assert job.src_span_bytes == 2 * span
    assert strides is not None or job.src_span_bytes == job.nbytes


def test_plan_names_stay_importable_from_plan():
    """The split modules (routes, jobs, plan_checks) are one set of objects, reachable from ``plan``."""
    from gemma_stream import jobs, plan, routes

    assert plan.Route is routes.Route is gs.Route and plan.PartialRoutes is gs.PartialRoutes
    assert plan.normalize_rename is routes.normalize_rename
    assert plan.CopyJob is jobs.CopyJob and plan.Plan is jobs.Plan and plan.QuantTarget is jobs.QuantTarget
    assert all(hasattr(plan, name) for name in plan.__all__)
