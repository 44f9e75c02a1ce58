"""Rank-side code of tests/test_distributed.py: run in processes spawned by torch.multiprocessing.

Each entry point takes (rank, world, port, workdir, options), joins a gloo
group on 127.0.0.1 and asserts on its own shards; a failing rank fails the test
through mp.spawn.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import gemma_stream as gs
from gemma_stream import plan as plan_mod

HIDDEN, INTER, VOCAB, LAYERS = 64, 90, 50, 2   # 90 and 50: uneven shards over 4 ranks


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layernorm = nn.Module()
        self.input_layernorm.weight = nn.Parameter(torch.ones(HIDDEN))
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.self_attn, name, nn.Linear(HIDDEN, HIDDEN, bias=False))
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(HIDDEN, INTER, bias=False)
        self.mlp.up_proj = nn.Linear(HIDDEN, INTER, bias=False)
        self.mlp.down_proj = nn.Linear(INTER, HIDDEN, bias=False)

    def forward(self, x):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.input_layernorm.weight)
        a = self.self_attn
        x = x + a.o_proj(a.q_proj(h) * torch.sigmoid(a.k_proj(h)) + a.v_proj(h))
        m = self.mlp
        return x + m.down_proj(F.gelu(m.gate_proj(x), approximate="tanh") * m.up_proj(x))


class TinyGemma(nn.Module):
    """Gemma's names and shapes (tied embedding, q/k/v/o, gate/up/down), small."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.model.layers = nn.ModuleList(Layer() for _ in range(LAYERS))
        self.model.norm = nn.Module()
        self.model.norm.weight = nn.Parameter(torch.zeros(HIDDEN))
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, ids):
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(x * (1 + self.model.norm.weight))


def reference_state(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    sd = {k: torch.randn(v.shape) * 0.1 for k, v in TinyGemma().state_dict().items() if k != "lm_head.weight"}
    return {k: v.to(dtype) for k, v in sd.items()}


def write_checkpoints(workdir: str, dtype: torch.dtype) -> dict[str, str]:
    """single safetensors, two-file sharded safetensors with an index, and a torch zip."""
    import json
    sd = reference_state(dtype)
    tag = str(dtype).split(".")[-1]
    os.makedirs(workdir, exist_ok=True)
    paths = {"single": os.path.join(workdir, f"{tag}.safetensors"), "zip": os.path.join(workdir, f"{tag}.pt")}
    save_file(sd, paths["single"])
    torch.save(sd, paths["zip"])
    shard_dir = os.path.join(workdir, f"{tag}_sharded")
    os.makedirs(shard_dir, exist_ok=True)
    names = sorted(sd)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: sd[n] for n in part}, os.path.join(shard_dir, fname))
        weight_map.update({n: fname for n in part})
    with open(os.path.join(shard_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    paths["sharded"] = shard_dir
    return paths


TP_PLAN = {}
for _i in range(LAYERS):
    TP_PLAN.update({f"model.layers.{_i}.self_attn.{p}": "col" for p in ("q_proj", "k_proj", "v_proj")})
    TP_PLAN.update({f"model.layers.{_i}.mlp.{p}": "col" for p in ("gate_proj", "up_proj")})
    TP_PLAN[f"model.layers.{_i}.self_attn.o_proj"] = "row"
    TP_PLAN[f"model.layers.{_i}.mlp.down_proj"] = "row"


def run_all(rank: int, world: int, port: int, workdir: str, scenarios: list[tuple[str, dict]]) -> None:
    """One process group for a list of scenarios; each rank writes "ok" or its traceback per scenario.

    The first failure ends the run (mp.spawn then stops the other ranks, which
    may be waiting in a collective); the scenarios after it are left unrun.
    """
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    _run_scenarios(workdir, scenarios)


def _run_scenarios(workdir: str, scenarios: list[tuple[str, dict]], backend: str | None = "gloo") -> None:
    """Join the group the environment describes (env://: MASTER_ADDR/PORT, RANK, WORLD_SIZE) and run.
    ``backend=None``: torch's default, "cpu:gloo,cuda:nccl" (``get_backend`` then says "undefined")."""
    import datetime
    import traceback
    if os.path.exists("/sys/class/net/lo"):  # gloo's own sockets on loopback too, not the host's address
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    results = os.path.join(workdir, "results")
    os.makedirs(results, exist_ok=True)
    for name, opts in scenarios:
        try:
            globals()[name](rank, world, os.path.join(workdir, name), opts)
        except BaseException:
            with open(os.path.join(results, f"{name}.{rank}"), "w") as f:
                f.write(traceback.format_exc())
            raise
        with open(os.path.join(results, f"{name}.{rank}"), "w") as f:
            f.write("ok")
    dist.barrier()  # no rank closes its sockets while another still talks to it
    dist.destroy_process_group()


def run_torchrun(rank: int, world: int, workdir: str, opts: dict) -> None:
    """Under torchrun, one rank per node: a TP load (read "own" and "once") of the sharded safetensors
    checkpoint that this node wrote for itself; shards against the single-process load, bytes per rank."""
    from torch.distributed.device_mesh import init_device_mesh
    assert os.environ["LOCAL_WORLD_SIZE"] == "1" and int(os.environ["GROUP_RANK"]) == rank, dict(os.environ)
    mesh = init_device_mesh("cpu", (world,))
    paths = write_checkpoints(os.path.join(workdir, f"node{os.environ['GROUP_RANK']}"), torch.float32)
    ref = reference_state(torch.float32)
    total = sum(t.numel() * t.element_size() for t in ref.values())
    with torch.device("meta"):
        single = TinyGemma().to(torch.bfloat16)
    gs.load_into(single, paths["sharded"])
    want = {k: v for k, v in single.state_dict().items() if k != "lm_head.weight"}
    for read in ("own", "once"):
        model = tp_model(mesh, torch.bfloat16)
        report = gs.load_into(model, paths["sharded"], read=read)
        check_shards(model, want, torch.bfloat16, f"torchrun read={read}")
        ideal = ideal_bytes(model, torch.float32)
        assert report.rank == rank and report.world_size == world and report.read == read, report
        if read == "own":
            assert report.bytes_read == ideal and report.bytes_received == 0, (report.bytes_read, ideal)
            reads = gs.distributed.rank_reads(model, paths["sharded"], ranks=[rank])
            assert sum(r.nbytes for r in reads) == report.bytes_read
        else:
            counts = torch.tensor([report.bytes_read], dtype=torch.int64)
            dist.all_reduce(counts)
            assert total <= int(counts[0]) <= total * (1 + plan_mod.COALESCE_WASTE), (int(counts[0]), total)
            assert ideal - report.bytes_read <= report.bytes_received <= ideal, (report.bytes_received, ideal)
    # int8 on read: the Rowwise blocks all-reduce their rows' absmax over the two nodes
    with torch.device("meta"):
        single = TinyGemma().to(torch.bfloat16)
    gs.load_into(single, paths["sharded"], quantize="int8")
    model = tp_model(mesh, torch.bfloat16)
    gs.load_into(model, paths["sharded"], quantize="int8")
    want = _quant_tensors(single)
    for name, t in _quant_tensors(model).items():
        assert torch.equal(t.full_tensor() if hasattr(t, "full_tensor") else t, want[name]), ("torchrun int8", name)


def tp_model(mesh, dtype: torch.dtype) -> nn.Module:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    with torch.device("meta"):
        model = TinyGemma().to(dtype)
    plan = {k: ColwiseParallel() if v == "col" else RowwiseParallel() for k, v in TP_PLAN.items()}
    return parallelize_module(model, mesh, plan)


def fsdp_model(mesh, dtype: torch.dtype) -> nn.Module:
    from torch.distributed.fsdp import fully_shard
    with torch.device("meta"):
        model = TinyGemma().to(dtype)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def check_shards(model: nn.Module, ref: dict[str, torch.Tensor], dtype: torch.dtype, what: str) -> None:
    """Every local shard equals torch.chunk of the reference, and full_tensor() the reference, bit for bit."""
    from torch.distributed.tensor import DTensor, Shard
    rank, world = dist.get_rank(), dist.get_world_size()
    for name, t in model.state_dict(keep_vars=True).items():
        want = ref["model.embed_tokens.weight" if name == "lm_head.weight" else name].to(dtype)
        if isinstance(t, DTensor):
            local = t.to_local()
            (p,) = t.placements
            if isinstance(p, Shard):
                chunks = torch.chunk(want, world, dim=p.dim)
                expected = chunks[rank] if rank < len(chunks) else want.narrow(p.dim, 0, 0)
                assert local.shape == expected.shape, (what, name, local.shape, expected.shape)
                assert torch.equal(local, expected), (what, name, "local shard")
            assert torch.equal(t.full_tensor(), want), (what, name, "full tensor")
        else:
            assert torch.equal(t, want), (what, name)


def ideal_bytes(model: nn.Module, ckpt_dtype: torch.dtype) -> int:
    """This rank's shard bytes in the checkpoint's dtype, replicated tensors in full, ties once."""
    from torch.distributed.tensor import DTensor
    seen, total = set(), 0
    for t in model.state_dict(keep_vars=True).values():
        if id(t) in seen:
            continue
        seen.add(id(t))
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * torch.empty(0, dtype=ckpt_dtype).element_size()
    return total


def run_tp(rank: int, world: int, workdir: str, opts: dict) -> None:
    """Colwise/Rowwise TP over all formats, both backends, bf16 and f32->bf16; bytes per rank."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    for ckpt_dtype in (torch.bfloat16, torch.float32):
        paths = write_checkpoints(os.path.join(workdir, f"r{rank}"), ckpt_dtype)
        ref = reference_state(ckpt_dtype)
        for fmt, path in paths.items():
            for backend in ("native", "python"):
                what = f"{fmt} {ckpt_dtype} {backend}"
                model = tp_model(mesh, torch.bfloat16)
                report = gs.load_into(model, path, backend=backend)
                check_shards(model, ref, torch.bfloat16, what)
                assert report.backend == backend and report.rank == rank and report.bytes_received == 0, what
                assert report.uninitialized == [] and report.missing_keys == [], (what, report.uninitialized)
                ideal = ideal_bytes(model, ckpt_dtype)
                # column blocks coalesce rows only while the gaps stay within 1% (plan.COALESCE_WASTE)
                assert ideal <= report.bytes_read <= ideal * 1.01, (what, report.bytes_read, ideal)
    # coalesced whatever the gaps cost (strided jobs): the same shards, the gaps counted as read
    paths = write_checkpoints(os.path.join(workdir, f"r{rank}"), torch.float32)
    model = tp_model(mesh, torch.bfloat16)
    saved, plan_mod.COALESCE_WASTE = plan_mod.COALESCE_WASTE, float("inf")
    try:
        report = gs.load_into(model, paths["single"])
    finally:
        plan_mod.COALESCE_WASTE = saved
    assert report.bytes_read > ideal_bytes(model, torch.float32), (report.bytes_read, ideal_bytes(model, torch.float32))
    check_shards(model, reference_state(torch.float32), torch.bfloat16, "coalesced")


def run_fsdp(rank: int, world: int, workdir: str, opts: dict) -> None:
    """FSDP2 fully_shard of a meta model: shards, bytes, and a forward equal to the single-process one."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    paths = write_checkpoints(os.path.join(workdir, f"r{rank}"), torch.float32)
    ref = reference_state(torch.float32)
    for fmt in ("single", "zip"):
        for backend in ("native", "python"):
            model = fsdp_model(mesh, torch.float32)
            report = gs.load_into(model, paths[fmt], backend=backend)
            check_shards(model, ref, torch.float32, f"fsdp {fmt} {backend}")
            assert report.bytes_read == ideal_bytes(model, torch.float32), (fmt, backend, report.bytes_read)
    single = TinyGemma()
    gs.load_into(single, paths["single"])
    ids = torch.arange(12).reshape(2, 6) % VOCAB
    with torch.no_grad():
        assert torch.allclose(model(ids), single(ids), rtol=1e-5, atol=1e-5)


def run_forward(rank: int, world: int, workdir: str, opts: dict) -> None:
    """The TP model's forward equals the single-process model's (f32; bf16 within bf16 tolerance)."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    ids = torch.arange(12).reshape(2, 6) % VOCAB
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        paths = write_checkpoints(os.path.join(workdir, f"r{rank}"), dtype)
        model = tp_model(mesh, dtype)
        gs.load_into(model, paths["single"])
        single = TinyGemma().to(dtype)
        gs.load_into(single, paths["single"])
        with torch.no_grad():
            got, want = model(ids).float(), single(ids).float()
        assert torch.allclose(got, want, rtol=tol, atol=tol), (dtype, (got - want).abs().max())


def run_read_once(rank: int, world: int, workdir: str, opts: dict) -> None:
    """read='once': same shards as per-rank reads, and the ranks together read each byte once."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    import gemma_stream.distributed_once as gso
    saved, gso.ONCE_BATCH_BYTES = gso.ONCE_BATCH_BYTES, 8 << 10   # several batches and row pieces at this size
    try:
        _read_once_matrix(rank, world, workdir, opts, mesh)
    finally:
        gso.ONCE_BATCH_BYTES = saved


def _read_once_matrix(rank: int, world: int, workdir: str, opts: dict, mesh) -> None:
    for ckpt_dtype in (torch.bfloat16, torch.float32):
        paths = write_checkpoints(os.path.join(workdir, f"r{rank}"), ckpt_dtype)
        ref = reference_state(ckpt_dtype)
        total = sum(t.numel() * t.element_size() for t in ref.values())
        for fmt in ("single", "sharded", "zip"):
            for build in (tp_model, fsdp_model):
                model = build(mesh, torch.bfloat16)
                report = gs.load_into(model, paths[fmt], read="once", backend=opts.get("backend", "auto"))
                check_shards(model, ref, torch.bfloat16, f"once {fmt} {build.__name__}")
                counts = torch.tensor([report.bytes_read], dtype=torch.int64)
                dist.all_reduce(counts)
                # each byte once; a column block's rows may be read with their gaps within plan.COALESCE_WASTE
                assert total <= int(counts[0]) <= total * (1 + plan_mod.COALESCE_WASTE), (fmt, int(counts[0]), total)
                # a rank receives what it needs and did not read itself: its shard, not the checkpoint
                ideal = ideal_bytes(model, ckpt_dtype)
                assert ideal - report.bytes_read <= report.bytes_received <= ideal < total, \
                    (fmt, build.__name__, report.bytes_received, report.bytes_read, ideal, total)


def run_2d(rank: int, world: int, workdir: str, opts: dict) -> None:
    for backend, read in (("native", "own"), ("python", "own"), ("native", "once")):
        _run_2d(rank, world, workdir, backend, read)


def _run_2d(rank: int, world: int, workdir: str, backend: str, read: str) -> None:
    """A 2-D mesh: distribute_tensor placements (Shard(0), Shard(1)), (Replicate(), Shard(0)) on meta params
    (read-once: blocks that two ranks both need, and blocks of rows and columns)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (2, world // 2))
    ref = reference_state(torch.float32)
    paths = write_checkpoints(os.path.join(workdir, f"r{rank}"), torch.float32)
    with torch.device("meta"):
        model = TinyGemma()
    for name, param in list(model.named_parameters()):
        placements = (Shard(0), Shard(1)) if param.dim() == 2 else (Replicate(), Shard(0))
        module = model.get_submodule(name.rsplit(".", 1)[0])
        setattr(module, name.rsplit(".", 1)[1], nn.Parameter(distribute_tensor(param, mesh, placements)))
    model.lm_head.weight = model.model.embed_tokens.weight
    report = gs.load_into(model, paths["sharded"], backend=backend, read=read)
    for name, t in model.state_dict(keep_vars=True).items():
        want = ref["model.embed_tokens.weight" if name == "lm_head.weight" else name]
        assert torch.equal(t.full_tensor(), want), name
        rows, cols = torch.chunk(want, 2, 0), None
        r = rows[mesh.get_coordinate()[0]] if want.dim() == 2 else want
        if want.dim() == 2:
            cols = torch.chunk(r, world // 2, 1)
            assert torch.equal(t.to_local(), cols[mesh.get_coordinate()[1]]), name
        else:
            assert torch.equal(t.to_local(), torch.chunk(want, world // 2, 0)[mesh.get_coordinate()[1]]), name
    if read == "once":
        assert report.bytes_received <= ideal_bytes(model, torch.float32), report.bytes_received
        return
    assert report.bytes_read >= ideal_bytes(model, torch.float32)
    # the helper lists every rank's reads; this rank's own agree with its report
    reads = gs.distributed.rank_reads(model, paths["sharded"])
    assert {r.rank for r in reads} == set(range(world))
    assert sum(r.nbytes for r in reads if r.rank == rank) == report.bytes_read


def run_errors(rank: int, world: int, workdir: str, opts: dict) -> None:
    """Mismatches are found on the global shapes before anything is allocated; unsupported options are named."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    paths = write_checkpoints(os.path.join(workdir, f"r{rank}"), torch.float32)
    model = tp_model(mesh, torch.float32)
    try:
        gs.load_into(model, paths["single"], rename=lambda n: None if "down_proj" in n else n)
    except gs.MismatchError as e:
        assert "down_proj" in str(e), e
    else:
        raise AssertionError("missing down_proj not reported")
    assert all(p.is_meta for p in model.parameters())
    # strict=False loads what matches and reports the rest, on every rank
    report = gs.load_into(model, paths["single"], strict=False, rename=lambda n: None if "down_proj" in n else n)
    assert sorted(report.missing_keys) == [f"model.layers.{i}.mlp.down_proj.weight" for i in range(LAYERS)]
    assert sorted(report.uninitialized) == sorted(report.missing_keys), report.uninitialized
    ref = reference_state(torch.float32)
    for name, t in model.state_dict().items():
        if "down_proj" not in name:
            assert torch.equal(t.full_tensor() if hasattr(t, "full_tensor") else t,
                               ref["model.embed_tokens.weight" if name == "lm_head.weight" else name]), name
    model = tp_model(mesh, torch.float32)
    for kwargs, match in (({"quantize": "int8", "read": "once"}, "read='once'"), ({"mode": "mmap"}, "mmap"),
                          ({"read": "twice"}, "read must be")):
        try:
            gs.load_into(model, paths["single"], **kwargs)
        except (gs.GemmaStreamError, ValueError) as e:
            assert match in str(e), (kwargs, e)
        else:
            raise AssertionError(f"{kwargs} accepted")
    try:
        gs.load_into(fsdp_model(mesh, torch.float32), paths["single"], quantize="int8")
    except gs.GemmaStreamError as e:
        assert "FSDP2" in str(e), e
    else:
        raise AssertionError("quantize= on an FSDP2 model accepted")



def run_fused(rank: int, world: int, workdir: str, opts: dict) -> None:
    """A fused qkv and gate_up DTensor (Shard(0) and Shard(1)): each rank's block comes from three (two)
    checkpoint tensors through row routes; bf16 and f32->bf16."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    ref = reference_state(torch.float32)
    paths = write_checkpoints(os.path.join(workdir, f"r{rank}"), torch.float32)
    p = "model.layers.0"
    parts = {"qkv": [f"{p}.self_attn.{n}_proj.weight" for n in "qkv"],
             "gate_up": [f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight"]}
    rows, where = {}, {}
    for fused, names in parts.items():
        lo = 0
        for n in names:
            where[n] = (fused, (lo, lo + ref[n].shape[0]))
            lo += ref[n].shape[0]
        rows[fused] = lo
    for placement in (Shard(0), Shard(1)):
        for backend in ("native", "python"):
            with torch.device("meta"):
                model = nn.Module()
                for fused, n_rows in rows.items():
                    model.register_parameter(fused, nn.Parameter(distribute_tensor(
                        torch.empty(n_rows, HIDDEN, dtype=torch.bfloat16), mesh, [placement])))
            report = gs.load_into(model, paths["single"], backend=backend,
                                  rename=lambda n: gs.Route(where[n][0], dst_rows=where[n][1]) if n in where else None)
            for fused, names in parts.items():
                want = torch.cat([ref[n] for n in names]).to(torch.bfloat16)
                local = getattr(model, fused).to_local()
                assert torch.equal(local, torch.chunk(want, world, placement.dim)[rank]), (fused, placement)
            assert report.bytes_read >= sum(getattr(model, f).to_local().numel() * 4 for f in rows)


def _quant_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The quantized layers' tensors in the contract layout (int8 weight + weight_scaler; int4 weight +
    weight_scale + weight_zero), by state-dict name."""
    keys = ("weight_scaler", "weight_scale", "weight_zero")
    sd = model.state_dict()
    return {k: v for k, v in sd.items() if k.endswith(keys) or (k.endswith(".weight") and
                                                                  k[:-len("weight")] + keys[0] in sd or
                                                                  k[:-len("weight")] + keys[1] in sd)}


def run_quant(rank: int, world: int, workdir: str, opts: dict) -> None:
    """quantize= on a TP model: every quantized tensor's local slice equals the single-process quantized
    tensor's slice, bit for bit (int8 Shard(1): the all-reduced row absmax); int4 needs aligned blocks."""
    import gemma_stream.distributed_quant as gsq
    saved, gsq.QUANTIZE_CHUNK_BYTES = gsq.QUANTIZE_CHUNK_BYTES, 1000  # int8 column blocks in blocks of 2-3 rows
    try:
        _run_quant(rank, world, workdir, opts)
    finally:
        gsq.QUANTIZE_CHUNK_BYTES = saved


def _run_quant(rank: int, world: int, workdir: str, opts: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    mesh = init_device_mesh("cpu", (world,))
    group_size = 32
    for ckpt_dtype in (torch.bfloat16, torch.float32):
        paths = write_checkpoints(os.path.join(workdir, f"r{rank}"), ckpt_dtype)
        for scheme in ("int8", "int4"):
            with torch.device("meta"):
                single = TinyGemma().to(torch.bfloat16)
            gs.load_into(single, paths["single"], quantize=scheme, group_size=group_size)
            want = _quant_tensors(single)
            for fmt in (("single", "zip") if ckpt_dtype == torch.float32 else ("sharded",)):
                for backend in ("native", "python"):
                    what = f"{scheme} {fmt} {ckpt_dtype} {backend}"
                    model = tp_model(mesh, torch.bfloat16)
                    if scheme == "int4" and (HIDDEN // world) % group_size:
                        try:
                            gs.load_into(model, paths[fmt], quantize=scheme, group_size=group_size, backend=backend)
                        except gs.GemmaStreamError as e:
                            assert "group size" in str(e) and "o_proj" in str(e), (what, e)
                        else:
                            raise AssertionError(f"{what}: unaligned int4 column blocks accepted")
                        continue
                    report = gs.load_into(model, paths[fmt], quantize=scheme, group_size=group_size,
                                          backend=backend)
                    assert report.missing_keys == [] and report.uninitialized == [], (what, report.missing_keys)
                    got = _quant_tensors(model)
                    assert set(got) == set(want), (what, sorted(set(got) ^ set(want)))
                    sharded = 0
                    for name, t in got.items():
                        if isinstance(t, DTensor):
                            sharded += 1
                            assert torch.equal(t.full_tensor(), want[name]), (what, name)
                            assert torch.equal(t.to_local(), _local_slice(t, want[name])), (what, name)
                        else:
                            assert torch.equal(t, want[name]), (what, name)
                    assert sharded >= 4 * LAYERS, (what, sharded)
                    reads = gs.distributed.rank_reads(model, paths[fmt], ranks=[rank])
                    assert sum(r.nbytes for r in reads) == report.bytes_read, (what, report.bytes_read)
    # a tied embedding and LM head split by columns (Shard(1)): one int8 block, its rows' absmax all-reduced
    from torch.distributed.tensor import Shard, distribute_tensor
    with torch.device("meta"):
        single = TinyGemma().to(torch.bfloat16)
    gs.load_into(single, paths["single"], quantize="int8")
    want = _quant_tensors(single)
    model = tp_model(mesh, torch.bfloat16)
    tied = nn.Parameter(distribute_tensor(model.model.embed_tokens.weight, mesh, [Shard(1)]))
    model.model.embed_tokens.weight = model.lm_head.weight = tied
    gs.load_into(model, paths["single"], quantize="int8")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    got = _quant_tensors(model)
    for name in ("model.embed_tokens.weight", "model.embed_tokens.weight_scaler", "lm_head.weight"):
        assert torch.equal(got[name].full_tensor(), want[name]), ("tied", name)
    # the quantized TP model runs: its forward equals the single-process quantized model's (f32 activations)
    paths = write_checkpoints(os.path.join(workdir, f"r{rank}"), torch.float32)
    with torch.device("meta"):
        single = TinyGemma()
    gs.load_into(single, paths["single"], quantize="int8")
    model = tp_model(mesh, torch.float32)
    gs.load_into(model, paths["single"], quantize="int8")
    ids = torch.arange(12).reshape(2, 6) % VOCAB
    if INTER % world == 0:  # uneven: RowwiseParallel's input hook takes local x world columns as the global shape
        with torch.no_grad():
            got, want_out = model(ids), single(ids)
        assert torch.allclose(got, want_out, rtol=1e-5, atol=1e-5), (got - want_out).abs().max()
    # a NaN in one rank's columns of a row: every rank raises, naming the tensor and the row
    sd = reference_state(torch.float32)
    bad = "model.layers.1.self_attn.o_proj.weight"
    sd[bad][3, HIDDEN - 1] = float("nan")
    path = os.path.join(workdir, f"r{rank}", "nan.safetensors")
    save_file(sd, path)
    try:
        gs.load_into(tp_model(mesh, torch.float32), path, quantize="int8")
    except gs.CheckpointError as e:
        assert e.tensor == bad and e.row == 3 and "NaN" in str(e), e
    else:
        raise AssertionError("a NaN row was quantized")


def _local_slice(t, full: torch.Tensor) -> torch.Tensor:
    """This rank's slice of ``full`` under ``t``'s placements (torch's chunk rule)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    out = full
    for d, (n, o) in enumerate(zip(shape, offset)):
        out = out.narrow(d, o, n)
    return out


if __name__ == "__main__":  # torchrun ... dist_worker.py WORKDIR SCENARIO...
    import sys
    _run_scenarios(sys.argv[1], [(name, {}) for name in sys.argv[2:]], backend=None)  # as init_device_mesh does
    # every scenario passed and the group is destroyed: leave without the interpreter's teardown, where
    # torch's own c10d threads (not gemma_stream's: its engine joins its threads) once aborted a rank
    # with "terminate called without an active exception" after it had written "ok" (CI, 2026-12-01)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
