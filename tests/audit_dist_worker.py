"""Rank-side code of tests/test_audit_dist.py: the placements and clients issue 16 names that
tests/test_distributed.py does not reach (biases, embeddings, empty shards, HSDP and TP+FSDP2 on a
2-D mesh, transformers' own Gemma).

The process group, checkpoints and the tiny model are dist_worker's; ``run_all`` registers this
module's scenarios with ``dist_worker.run_all`` and runs them in one group.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

import dist_worker
import gemma_stream as gs
from dist_worker import TinyGemma, _local_slice, reference_state, write_checkpoints


def run_all(rank: int, world: int, port: int, workdir: str, scenarios: list[tuple[str, dict]]) -> None:
    """dist_worker.run_all over this module's scenarios (it looks them up by name in its own module)."""
    vars(dist_worker).update({name: globals()[name] for name, _ in scenarios})
    dist_worker.run_all(rank, world, port, workdir, scenarios)


def _reference_of(model: nn.Module, ref: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return ref["model.embed_tokens.weight" if name == "lm_head.weight" else name]


def _check_every_local(model: nn.Module, ref: dict[str, torch.Tensor], what: str, lookup=None) -> int:
    """Every DTensor's local shard equals the slice torch's placements give this rank, and its
    full_tensor() the reference, whatever the placements (_StridedShard included); returns the
    number of DTensors checked."""
    from torch.distributed.tensor import DTensor
    lookup = lookup or (lambda n: _reference_of(model, ref, n))
    count = 0
    for name, t in model.state_dict(keep_vars=True).items():
        want = lookup(name).to(t.dtype)
        if isinstance(t, DTensor):
            count += 1
            assert torch.equal(t.to_local(), _local_slice(t, want)), (what, name, t.placements, "local shard")
            assert torch.equal(t.full_tensor(), want), (what, name, t.placements, "full tensor")
        else:
            assert torch.equal(t, want), (what, name)
    return count


# ---------------------------------------------------------------- 1-D: biases, embeddings, empty shards

class Biased(nn.Module):
    """Colwise/Rowwise linears with biases (Shard(0) and Replicate() bias), a Colwise (Shard(1)) and a
    Rowwise (Shard(0)) embedding, and a 3-row output whose shards are empty on some ranks at world 4."""

    def __init__(self):
        super().__init__()
        self.emb_col = nn.Embedding(50, 64)
        self.emb_row = nn.Embedding(50, 64)
        self.up = nn.Linear(64, 90, bias=True)
        self.down = nn.Linear(90, 64, bias=True)
        self.tiny = nn.Linear(64, 3, bias=True)      # torch.chunk(3 rows, 4) gives 3 chunks: rank 3 holds none
        self.norm = nn.Parameter(torch.ones(64))

    def forward(self, ids):
        norm = self.norm.to_local() if hasattr(self.norm, "to_local") else self.norm   # Replicate(): all of it
        x = self.emb_col(ids) + self.emb_row(ids)
        x = self.down(torch.relu(self.up(x * norm)))
        return self.tiny(x)


def _biased_plan() -> dict:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    return {"emb_col": ColwiseParallel(output_layouts=Replicate()),
            "emb_row": RowwiseParallel(input_layouts=Replicate()),
            "up": ColwiseParallel(), "down": RowwiseParallel(),
            "tiny": ColwiseParallel(output_layouts=Replicate())}


def run_biases_embeddings(rank: int, world: int, workdir: str, opts: dict) -> None:
    """parallelize_module on linears with biases and on embeddings, plus distribute_tensor(Replicate())
    on a 1-D mesh: every local shard (empty ones included) is torch's slice; bytes are the shard's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor
    from torch.distributed.tensor.parallel import parallelize_module
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    ref = {k: torch.randn(v.shape) for k, v in Biased().state_dict().items()}
    os.makedirs(os.path.join(workdir, f"r{rank}"), exist_ok=True)
    paths = {"single": os.path.join(workdir, f"r{rank}", "b.safetensors"),
             "zip": os.path.join(workdir, f"r{rank}", "b.pt")}
    save_file(ref, paths["single"])
    torch.save(ref, paths["zip"])
    ids = torch.arange(10).reshape(2, 5)
    single = Biased()
    single.load_state_dict(ref)
    for fmt, path in paths.items():
        for backend in ("native", "python"):
            what = f"{fmt} {backend}"
            # built on meta (allocated per rank by the load), or for real and then overwritten in place
            with torch.device("meta" if backend == "native" else "cpu"):
                model = Biased()
            model = parallelize_module(model, mesh, _biased_plan())
            model.norm = nn.Parameter(distribute_tensor(model.norm, mesh, [Replicate()]))
            report = gs.load_into(model, path, backend=backend)
            assert _check_every_local(model, ref, what, lookup=ref.__getitem__) == 9, what
            if world == 4:
                assert model.tiny.weight.to_local().shape[0] == (0 if rank == 3 else 1), (what, rank)
            # the rank's own bytes: every local shard once, nothing more (f32 checkpoint, f32 model)
            own = sum(t.to_local().numel() * 4 for t in model.state_dict(keep_vars=True).values())
            assert report.bytes_read == own == report.shard_bytes, (what, report.bytes_read, own)
            assert report.missing_keys == [] and report.uninitialized == [], (what, report.uninitialized)
            if 90 % world == 0:  # uneven: RowwiseParallel's input hook takes local x world columns as the global shape
                with torch.no_grad():
                    assert torch.allclose(model(ids), single(ids), rtol=1e-5, atol=1e-5), what
    # a global shape that disagrees with the checkpoint is a MismatchError on every rank, before allocating
    with torch.device("meta"):
        model = Biased()
    model.up = nn.Linear(64, 91, device="meta")
    model.down = nn.Linear(91, 64, device="meta")
    model = parallelize_module(model, mesh, _biased_plan())
    try:
        gs.load_into(model, paths["single"])
    except gs.MismatchError as e:
        assert "up.weight" in str(e) and "91" in str(e), e
    else:
        raise AssertionError("a [91, 64] DTensor accepted a [90, 64] checkpoint tensor")
    assert all(p.is_meta for p in model.parameters())


def _read_once_totals(model: nn.Module, path: str, ref: dict[str, torch.Tensor], what: str) -> None:
    """read='once' on this model: the same shards, and the ranks together read each byte once."""
    report = gs.load_into(model, path, read="once")
    _check_every_local(model, ref, f"{what} read once")
    # each byte read by one rank; a rank receives only blocks of its own shard (never the checkpoint)
    assert 0 < report.bytes_received <= report.shard_bytes, (what, report.bytes_received, report.shard_bytes)
    counts = torch.tensor([report.bytes_read], dtype=torch.int64)
    dist.all_reduce(counts)
    total = sum(t.numel() * t.element_size() for t in ref.values())
    assert int(counts[0]) == total, (what, counts.tolist(), total)


# ---------------------------------------------------------------- 2-D meshes with FSDP2

def _local_bytes(model: nn.Module) -> int:
    """Bytes of this rank's f32 local shards (each tensor once)."""
    tensors = {id(t): t for t in model.state_dict(keep_vars=True).values()}.values()
    return sum(t.to_local().numel() * 4 for t in tensors)


def _forward_equals_single(model: nn.Module, single_path: str) -> None:
    single = TinyGemma()
    gs.load_into(single, single_path)
    ids = torch.arange(12).reshape(2, 6) % dist_worker.VOCAB
    with torch.no_grad():
        assert torch.allclose(model(ids), single(ids), rtol=1e-5, atol=1e-5)


def run_hsdp(rank: int, world: int, workdir: str, opts: dict) -> None:
    """FSDP2 fully_shard on a 2-D mesh (HSDP: (Replicate(), Shard(0))): shards, bytes and forward."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    ref = reference_state(torch.float32)
    paths = write_checkpoints(os.path.join(workdir, f"r{rank}"), torch.float32)
    for fmt in ("sharded", "zip"):
        for backend in ("native", "python"):
            model = _hsdp_model(mesh)
            report = gs.load_into(model, paths[fmt], backend=backend)
            assert _check_every_local(model, ref, f"hsdp {fmt} {backend}") > 0
            own = _local_bytes(model)
            assert report.bytes_read == own, (fmt, backend, report.bytes_read, own)
    _forward_equals_single(model, paths["single"])
    _read_once_totals(_hsdp_model(mesh), paths["sharded"], ref, "hsdp")


def _hsdp_model(mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard
    with torch.device("meta"):
        model = TinyGemma()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def run_tp_fsdp(rank: int, world: int, workdir: str, opts: dict) -> None:
    """The 2-D layout torchtitan uses: parallelize_module on the "tp" mesh dim, then FSDP2 fully_shard
    on "dp" (Colwise weights become (_StridedShard(0), Shard(0))): shards, bytes and forward."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    ref = reference_state(torch.float32)
    paths = write_checkpoints(os.path.join(workdir, f"r{rank}"), torch.float32)
    for fmt in ("single", "sharded", "zip"):
        for backend in ("native", "python"):
            model = _tp_fsdp_model(mesh)
            report = gs.load_into(model, paths[fmt], backend=backend)
            assert _check_every_local(model, ref, f"tp+fsdp {fmt} {backend}") > 0
            own = _local_bytes(model)
            assert own <= report.bytes_read <= own * 1.01, (fmt, backend, report.bytes_read, own)
    # the helper takes each tensor's coordinate on its own mesh (the norms' FSDP2 mesh is the 1-D "dp")
    reads = gs.distributed.rank_reads(model, paths["zip"])
    assert {r.rank for r in reads} == set(range(world))
    assert sum(r.nbytes for r in reads if r.rank == rank) == report.bytes_read
    _forward_equals_single(model, paths["single"])
    _read_once_totals(_tp_fsdp_model(mesh), paths["single"], ref, "tp+fsdp")
    # a strided placement that interleaves rows is no block of the checkpoint tensor: a clear error
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.placement_types import _StridedShard
    with torch.device("meta"):
        bad = nn.Linear(64, 8, bias=False)
    placements = [Shard(0), _StridedShard(0, split_factor=2)]
    bad.weight = nn.Parameter(DTensor.from_local(torch.empty(2, 64, device="meta"), mesh, placements,
                                                 run_check=False, shape=(8, 64), stride=(64, 1)))
    save_file({"weight": torch.zeros(8, 64)}, os.path.join(workdir, f"r{rank}", "bad.safetensors"))
    try:
        gs.load_into(bad, os.path.join(workdir, f"r{rank}", "bad.safetensors"))
    except gs.GemmaStreamError as e:
        assert "'weight'" in str(e) and "one block" in str(e), e
    else:
        raise AssertionError("interleaved rows accepted as one block")


def _tp_fsdp_model(mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    with torch.device("meta"):
        model = TinyGemma()
    plan = {k: ColwiseParallel() if v == "col" else RowwiseParallel() for k, v in dist_worker.TP_PLAN.items()}
    model = parallelize_module(model, mesh["tp"], plan)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh["dp"])
    return fully_shard(model, mesh=mesh["dp"])


# ---------------------------------------------------------------- transformers' Gemma

def _hf_gemma_config():
    import transformers
    return transformers.GemmaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    max_position_embeddings=64, hidden_activation="gelu_pytorch_tanh")


def run_hf_gemma_tp(rank: int, world: int, workdir: str, opts: dict) -> None:
    """transformers' GemmaForCausalLM built with gs.init_empty, parallelized with the model's own
    base_model_tp_plan names (q/k/v/gate/up Colwise, o/down Rowwise): every shard is the slice of a
    single-process load, for bf16 and f32->bf16, and the logits equal the single-process model's."""
    import transformers
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    mesh = init_device_mesh("cpu", (world,))
    config = _hf_gemma_config()
    path = os.path.join(workdir, f"r{rank}", "hf")
    if rank == 0:
        torch.manual_seed(0)
        saved = transformers.GemmaForCausalLM(config)
        with torch.no_grad():
            for p in saved.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        saved.save_pretrained(path)
    dist.barrier()
    path = os.path.join(workdir, "r0", "hf")
    plan = {}
    for i in range(config.num_hidden_layers):
        plan.update({f"model.layers.{i}.self_attn.{p}": ColwiseParallel() for p in ("q_proj", "k_proj", "v_proj")})
        plan.update({f"model.layers.{i}.mlp.{p}": ColwiseParallel() for p in ("gate_proj", "up_proj")})
        plan[f"model.layers.{i}.self_attn.o_proj"] = RowwiseParallel()
        plan[f"model.layers.{i}.mlp.down_proj"] = RowwiseParallel()
    ids = torch.arange(16).reshape(2, 8) * 7 % config.vocab_size
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        config.dtype = dtype
        with gs.init_empty():
            single = transformers.GemmaForCausalLM(config)
        gs.load_into(single, path)
        ref = single.state_dict()
        for backend in ("native", "python"):
            with gs.init_empty():
                model = transformers.GemmaForCausalLM(config)
            model = parallelize_module(model, mesh, plan)
            report = gs.load_into(model, path, backend=backend)
            assert report.uninitialized == [] and report.missing_keys == [], report
            assert _check_every_local(model, ref, f"hf {dtype} {backend}", lookup=ref.__getitem__) == \
                7 * config.num_hidden_layers
        with torch.no_grad():
            got, want = model(ids).logits.float(), single(ids).logits.float()
        assert torch.allclose(got, want, rtol=tol, atol=tol), (dtype, (got - want).abs().max())


# ---------------------------------------------------------------- plain local tensors (an engine's own layers)

def run_plain_local_once(rank: int, world: int, workdir: str, opts: dict) -> None:
    """An engine's own column/row-parallel layers as plain local tensors (gs.Route column/row ranges
    inside gs.PartialRoutes): read='own' and read='once' give each rank its slices; read='once' reads
    each byte once over the world group, also when the ranks need different tensors (rank r only the
    layers r, r + world, ...: a pipeline stage)."""
    ref = reference_state(torch.float32)
    paths = write_checkpoints(os.path.join(workdir, f"r{rank}"), torch.float32)
    cols = {}   # row-parallel (o/down): this rank's columns; everything else: this rank's rows
    local = {}
    for name, t in ref.items():
        dim = 1 if name.endswith(("o_proj.weight", "down_proj.weight")) else 0
        chunks = torch.chunk(torch.arange(t.shape[dim]), world)
        span = (int(chunks[rank][0]), int(chunks[rank][-1]) + 1) if rank < len(chunks) else (0, 0)
        cols[name] = (dim, span)
        local[name] = t.narrow(dim, span[0], span[1] - span[0])

    def route(name):
        dim, span = cols[name]
        return gs.Route(name, **({"src_cols": span} if dim else {"src_rows": span}))

    total = sum(t.numel() * t.element_size() for t in ref.values())
    for read in ("own", "once"):
        for fmt in ("single", "zip"):
            model = nn.Module()
            for name, t in local.items():
                model.register_buffer(name.replace(".", "_"), torch.zeros_like(t))
            report = gs.load_into(model, paths[fmt], read=read,
                                  rename=gs.PartialRoutes(lambda n: gs.Route(n.replace(".", "_"), **_spans(route(n)))))
            for name, t in local.items():
                assert torch.equal(getattr(model, name.replace(".", "_")), t), (read, fmt, name)
            counts = torch.tensor([report.bytes_read], dtype=torch.int64)
            dist.all_reduce(counts)
            if read == "once":
                assert int(counts[0]) == total, (fmt, int(counts[0]), total)
    # a pipeline stage: rank r needs only its layers; read='once' must still agree on what is sent
    mine = {n: t for n, t in ref.items() if not n.startswith("model.layers.") or int(n.split(".")[2]) % world == rank}
    for read in ("own", "once"):
        model = nn.Module()
        for name, t in mine.items():
            model.register_buffer(name.replace(".", "_"), torch.zeros_like(t))
        report = gs.load_into(model, paths["single"], read=read, strict=False,
                              rename=lambda n: n.replace(".", "_") if n in mine else None)
        for name, t in mine.items():
            assert torch.equal(getattr(model, name.replace(".", "_")), t), (read, "pipeline", name)
        if read == "once":   # every tensor is some rank's: the ranks together read each byte once
            counts = torch.tensor([report.bytes_read], dtype=torch.int64)
            dist.all_reduce(counts)
            assert int(counts[0]) == total, ("pipeline", int(counts[0]), total)


def _spans(route: gs.Route) -> dict:
    return {k: v for k, v in (("src_rows", route.src_rows), ("src_cols", route.src_cols)) if v is not None}


def run_fsdp_small_dims(rank: int, world: int, workdir: str, opts: dict) -> None:
    """FSDP2 fully_shard where a dim-0 size is below the world size (a 3-row weight and its bias: the last
    rank's shard is empty) and uneven (90, 50 rows): shards, bytes and forward."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    ref = {k: torch.randn(v.shape) for k, v in Biased().state_dict().items()}
    path = os.path.join(workdir, f"r{rank}", "b.safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(ref, path)
    for backend in ("native", "python"):
        with torch.device("meta"):
            model = Biased()
        fully_shard(model.tiny, mesh=mesh)
        fully_shard(model, mesh=mesh)
        report = gs.load_into(model, path, backend=backend)
        assert _check_every_local(model, ref, f"fsdp small {backend}", lookup=ref.__getitem__) == 9
        own = sum(t.to_local().numel() * 4 for t in model.state_dict(keep_vars=True).values())
        assert report.bytes_read == own, (backend, report.bytes_read, own)
    single = Biased()
    single.load_state_dict(ref)
    ids = torch.arange(10).reshape(2, 5)
    with torch.no_grad():
        assert torch.allclose(model(ids), single(ids), rtol=1e-5, atol=1e-5)
