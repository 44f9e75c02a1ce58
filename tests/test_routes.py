"""Column ranges on gs.Route: a rank's slice of a row-parallel weight, fused and plain."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import gemma_stream as gs
from gemma_stream import plan as plan_mod
from gemma_stream.formats import open_checkpoint
from gemma_stream.quant import quantize_int4


def _module(**buffers: torch.Tensor) -> nn.Module:
    m = nn.Module()
    for name, t in buffers.items():
        m.register_buffer(name, t)
    return m


@pytest.mark.parametrize("gap_bytes", [1 << 30, 0], ids=["coalesced", "per-row"])
@pytest.mark.parametrize("dst_dtype", [torch.float32, torch.bfloat16])
def test_column_block_is_the_slice(tmp_path, backend, monkeypatch, gap_bytes, dst_dtype):
    monkeypatch.setattr(plan_mod, "COALESCE_GAP_BYTES", gap_bytes)
    monkeypatch.setattr(plan_mod, "COALESCE_WASTE", float("inf"))   # "coalesced": whatever the gaps cost
    w = torch.randn(37, 64)
    path = tmp_path / "w.safetensors"
    save_file({"w": w}, str(path))
    for lo, hi in ((0, 16), (16, 48), (48, 64)):
        m = _module(w=torch.zeros(37, hi - lo, dtype=dst_dtype))
        report = gs.load_into(m, path, rename=gs.PartialRoutes(lambda n: gs.Route("w", src_cols=(lo, hi))),
                              backend=backend)
        assert torch.equal(m.w, w[:, lo:hi].to(dst_dtype))
        assert report.bytes_read == 37 * (hi - lo) * 4


def test_rows_and_columns_together_and_into_a_block_of_the_target(tmp_path, backend):
    w = torch.randn(10, 12)
    path = tmp_path / "w.safetensors"
    save_file({"w": w}, str(path))
    m = _module(t=torch.zeros(8, 9))
    route = gs.Route("t", src_rows=(2, 6), src_cols=(3, 8), dst_rows=(4, 8), dst_cols=(1, 6))
    report = gs.load_into(m, path, backend=backend, strict=False, rename=lambda n: route)
    assert any("would be dropped" in k for k in report.mismatched_keys)
    report = gs.load_into(m, path, backend=backend, strict=False, rename=gs.PartialRoutes(lambda n: route))
    assert report.mismatched_keys == [] and report.missing_keys == ["t"]
    want = torch.zeros(8, 9)
    want[4:8, 1:6] = w[2:6, 3:8]
    assert torch.equal(m.t, want)


def test_fused_column_shards_from_three_checkpoint_tensors(tmp_path, backend):
    # a rank's columns of q, k and v side by side in one local tensor, and its rows of a fused qkv
    q, k, v = torch.randn(6, 8), torch.randn(6, 8), torch.randn(6, 8)
    path = tmp_path / "qkv.safetensors"
    save_file({"q": q, "k": k, "v": v}, str(path))
    m = _module(qkv=torch.zeros(6, 12))
    slots = {"q": (0, 4), "k": (4, 8), "v": (8, 12)}
    gs.load_into(m, path, backend=backend,
                 rename=gs.PartialRoutes(lambda n: gs.Route("qkv", src_cols=(4, 8), dst_cols=slots[n])))
    assert torch.equal(m.qkv, torch.cat([q[:, 4:], k[:, 4:], v[:, 4:]], dim=1))
    rows = _module(qkv=torch.zeros(9, 8))
    spans = {"q": (0, 3), "k": (3, 6), "v": (6, 9)}
    gs.load_into(rows, path, backend=backend,
                 rename=gs.PartialRoutes(lambda n: gs.Route("qkv", src_rows=(3, 6), dst_rows=spans[n])))
    assert torch.equal(rows.qkv, torch.cat([q[3:], k[3:], v[3:]]))


def test_column_blocks_must_cover_the_target_and_not_overlap(tmp_path, backend):
    save_file({"a": torch.randn(4, 6), "b": torch.randn(4, 6)}, str(tmp_path / "w.safetensors"))
    path = tmp_path / "w.safetensors"
    m = _module(t=torch.zeros(4, 12))
    with pytest.raises(gs.MismatchError, match="overlap"):
        gs.load_into(m, path, backend=backend, rename=lambda n: gs.Route("t", dst_cols=(0, 6) if n == "a" else (5, 11)))
    with pytest.raises(gs.MismatchError, match="missing in checkpoint.*t"):
        gs.load_into(m, path, backend=backend, rename=lambda n: gs.Route("t", dst_cols=(0, 6)) if n == "a" else None)
    gs.load_into(m, path, backend=backend, rename=lambda n: gs.Route("t", dst_cols=(0, 6) if n == "a" else (6, 12)))


def test_split_by_columns_must_read_every_column(tmp_path, backend):
    w = torch.randn(4, 6)
    path = tmp_path / "w.safetensors"
    save_file({"w": w}, str(path))
    m = _module(x=torch.zeros(4, 2), y=torch.zeros(4, 3))
    with pytest.raises(gs.MismatchError, match=r"columns \[5, 6\)"):
        gs.load_into(m, path, backend=backend,
                     rename=lambda n: [gs.Route("x", src_cols=(0, 2)), gs.Route("y", src_cols=(2, 5))])
    m = _module(x=torch.zeros(4, 2), y=torch.zeros(4, 4))
    gs.load_into(m, path, backend=backend,
                 rename=lambda n: [gs.Route("x", src_cols=(0, 2)), gs.Route("y", src_cols=(2, 6))])
    assert torch.equal(torch.cat([m.x, m.y], 1), w)


def test_column_range_errors_name_the_tensor(tmp_path, backend):
    save_file({"b": torch.randn(6), "w": torch.randn(4, 6)}, str(tmp_path / "w.safetensors"))
    m = _module(b=torch.zeros(3), w=torch.zeros(4, 3))
    with pytest.raises(gs.MismatchError, match="'b'.*2 or more dims"):
        gs.load_into(m, tmp_path / "w.safetensors", backend=backend,
                     rename=lambda n: gs.Route(n, src_cols=(0, 3)))
    with pytest.raises(gs.MismatchError, match=r"'w'.*columns \[4, 8\)"):
        gs.load_into(m, tmp_path / "w.safetensors", backend=backend, strict=False,
                     rename=gs.PartialRoutes(lambda n: gs.Route(n, src_cols=(4, 8)) if n == "w" else None))


def test_strided_source_column_block(tmp_path, backend):
    base = torch.randn(12, 10)
    path = tmp_path / "t.pt"
    torch.save({"wt": base.t()}, str(path))  # a transposed view: strides (1, 10)
    m = _module(w=torch.zeros(10, 5))
    gs.load_into(m, path, backend=backend, rename=gs.PartialRoutes(lambda n: gs.Route("w", src_cols=(3, 8))))
    assert torch.equal(m.w, base.t()[:, 3:8])


def test_int4_column_blocks_aligned_to_groups_quantize_locally(tmp_path, backend):
    torch.manual_seed(0)
    w = torch.randn(8, 128, dtype=torch.bfloat16)
    path = tmp_path / "w.safetensors"
    save_file({"proj.weight": w}, str(path))
    q, s, z = quantize_int4(w, 32, torch.bfloat16)
    for lo, hi in ((0, 64), (64, 128)):
        model = nn.Module()
        model.proj = gs.QuantLinear(hi - lo, 8, bias=False, scheme="int4", group_size=32, scale_dtype=torch.bfloat16)
        gs.load_into(model, path, backend=backend, rename=gs.PartialRoutes(lambda n: gs.Route(n, src_cols=(lo, hi))))
        sd = model.proj.state_dict()
        assert torch.equal(sd["weight"], q[:, lo // 2:hi // 2])
        assert torch.equal(sd["weight_scale"], s[:, lo // 32:hi // 32])
        assert torch.equal(sd["weight_zero"], z[:, lo // 32:hi // 32])


def test_int4_unaligned_and_int8_column_blocks_are_clear_errors(tmp_path, backend):
    save_file({"proj.weight": torch.randn(8, 128)}, str(tmp_path / "w.safetensors"))
    model = nn.Module()
    model.proj = gs.QuantLinear(64, 8, bias=False, scheme="int4", group_size=32)
    with pytest.raises(gs.GemmaStreamError, match="not aligned to the group size 32"):
        gs.load_into(model, tmp_path / "w.safetensors", backend=backend,
                     rename=gs.PartialRoutes(lambda n: gs.Route(n, src_cols=(16, 80))))
    model.proj = gs.QuantLinear(64, 8, bias=False, scheme="int8")
    with pytest.raises(gs.GemmaStreamError, match="int8 quantization needs whole rows"):
        gs.load_into(model, tmp_path / "w.safetensors", backend=backend,
                     rename=gs.PartialRoutes(lambda n: gs.Route(n, src_cols=(0, 64))))


def test_rows_apart_read_only_the_block(tmp_path):
    w = torch.randn(16, 4096)
    save_file({"w": w}, str(tmp_path / "w.safetensors"))
    ckpt = open_checkpoint(tmp_path / "w.safetensors")
    dst = torch.zeros(16, 1024)
    plan = plan_mod.make_plan(ckpt, {"w": dst}, rename=lambda n: gs.Route("w", src_cols=(1024, 2048)),
                              check_splits=False)
    # a 12 KiB gap between rows: one strided job whose rows are read apart, each read only its 4 KiB
    (job,) = plan.jobs
    assert job.src_strides == (4096, 1) and job.block_rows == 1 and job.file_bytes == 16 * 4096
    assert job.file_ranges() == [(job.src_offset + i * 4096 * 4, 4096) for i in range(16)]
    # a 2 KiB gap (under a page) but 14% of the 14 KiB segments: still read apart
    small = plan_mod.make_plan(ckpt, {"w": torch.zeros(16, 3584)}, rename=lambda n: gs.Route("w", src_cols=(0, 3584)),
                               check_splits=False)
    assert [j.block_rows for j in small.jobs] == [1] and small.jobs[0].file_bytes == 16 * 3584 * 4
    # a 128-byte gap, 0.8% of the segments: rows read in blocks, gaps included
    tiny = plan_mod.make_plan(ckpt, {"w": torch.zeros(16, 4064)}, rename=lambda n: gs.Route("w", src_cols=(0, 4064)),
                              check_splits=False)
    assert len(tiny.jobs) == 1 and tiny.jobs[0].src_strides == (4096, 1) and tiny.jobs[0].block_rows == 0
    assert tiny.jobs[0].file_bytes == (15 * 4096 + 4064) * 4


def test_rows_apart_load_the_same_bytes_and_read_only_their_segments(tmp_path, backend):
    """A column block read apart (block_rows=1) fills the same values as one read gaps included, and the
    engine's bytes read are the segments only."""
    torch.manual_seed(3)
    w = torch.randn(300, 700)
    save_file({"w": w}, str(tmp_path / "w.safetensors"))
    for waste, apart in ((0.0, True), (float("inf"), False)):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(plan_mod, "COALESCE_WASTE", waste)
            model = torch.nn.Module()
            model.register_buffer("w", torch.zeros(300, 300, dtype=torch.bfloat16))
            report = gs.load_into(model, tmp_path / "w.safetensors", backend=backend, threads=2,
                                  rename=gs.PartialRoutes(lambda n: gs.Route(n, src_cols=(200, 500))))
        assert torch.equal(model.w, w[:, 200:500].bfloat16())
        assert report.bytes_read == 300 * 300 * 4 if apart else report.bytes_read >= 300 * 300 * 4


def test_coalesced_gaps_stay_within_one_percent_of_the_plan(tmp_path):
    # two column blocks whose 512-byte gaps cost 7.7 KB each, in a plan of 1 MB of targets: the
    # 10 KB budget (plan.COALESCE_WASTE) coalesces the first, the second's rows are read apart
    save_file({"a": torch.randn(16, 4096), "b": torch.randn(16, 4096), "c": torch.randn(125_000)},
              str(tmp_path / "w.safetensors"))
    ckpt = open_checkpoint(tmp_path / "w.safetensors")
    targets = {"a": torch.zeros(16, 3968), "b": torch.zeros(16, 3968), "c": torch.zeros(125_000)}
    plan = plan_mod.make_plan(ckpt, targets, check_splits=False,
                              rename=lambda n: gs.Route(n, src_cols=(0, 3968)) if n != "c" else n)
    jobs = {n: [j for j in plan.jobs if j.name == n] for n in targets}
    assert len(jobs["a"]) == 1 and jobs["a"][0].src_strides == (4096, 1) and jobs["a"][0].block_rows == 0
    assert len(jobs["b"]) == 1 and jobs["b"][0].block_rows == 1
    useful = sum(t.numel() * 4 for t in targets.values())
    from gemma_stream.distributed import file_bytes
    assert useful < sum(file_bytes(j) for j in plan.jobs) <= useful * (1 + plan_mod.COALESCE_WASTE)
