"""DTensor destinations on torch.distributed: gloo on CPU, ranks spawned on 127.0.0.1.

The rank-side checks live in dist_worker.py.  Starting ranks costs far more
than the loads (torch imports on every rank), so one spawned group per world
size runs every scenario, and each test below asserts its scenario's outcome
on every rank.
"""

from __future__ import annotations

import os
import socket

import pytest

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch built without distributed", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402

import dist_worker  # noqa: E402

SCENARIOS = {
    2: [("run_tp", {}), ("run_fsdp", {}), ("run_forward", {}), ("run_read_once", {"backend": "native"}),
        ("run_errors", {}), ("run_fused", {}), ("run_quant", {})],
    4: [("run_tp", {}), ("run_fsdp", {}), ("run_read_once", {"backend": "python"}), ("run_2d", {}), ("run_fused", {}),
        ("run_quant", {})],
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawned_groups(tmp_path_factory, run_all, scenarios: dict, prefix: str):
    """world size -> (results dir, the error mp.spawn raised or None); ``run_all`` spawned on
    ``scenarios[world]`` on first use."""
    done = {}

    def run(world: int):
        if world not in done:
            workdir = tmp_path_factory.mktemp(f"{prefix}{world}")
            error = None
            try:
                mp.spawn(run_all, args=(world, _free_port(), str(workdir), scenarios[world]), nprocs=world, join=True)
            except Exception as e:  # reported by the scenarios' tests
                error = e
            done[world] = (workdir / "results", error)
        return done[world]
    return run


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    return spawned_groups(tmp_path_factory, dist_worker.run_all, SCENARIOS, "world")


def _check(groups, world: int, scenario: str) -> None:
    results, error = groups(world)
    for rank in range(world):
        path = results / f"{scenario}.{rank}"
        outcome = path.read_text() if path.exists() else f"not run (an earlier scenario failed: {error})"
        assert outcome == "ok", f"rank {rank} of {world}: {outcome}"


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_shards_equal_single_process_slices(groups, world):
    # Colwise/Rowwise, safetensors single + sharded + torch zip, both backends, bf16 and f32->bf16, bytes per rank
    _check(groups, world, "run_tp")


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_meta_model_shards_bytes_and_forward(groups, world):
    _check(groups, world, "run_fsdp")


def test_tensor_parallel_forward_equals_single_process(groups):
    _check(groups, 2, "run_forward")


@pytest.mark.parametrize("world", [2, 4])
def test_read_once_reads_each_byte_once(groups, world):
    _check(groups, world, "run_read_once")


@pytest.mark.parametrize("world", [2, 4])
def test_fused_projections_shard_from_their_checkpoint_tensors(groups, world):
    _check(groups, world, "run_fused")


def test_two_dimensional_mesh_and_rank_reads(groups):
    _check(groups, 4, "run_2d")


@pytest.mark.parametrize("world", [2, 4])
def test_quantize_on_read_shards_equal_single_process_quantized_slices(groups, world):
    # int8 (Shard(1): the all-reduced row absmax) and int4 (aligned at world 2, a clear error at world 4),
    # both backends, bf16 and f32 checkpoints, all formats; the quantized TP forward; a NaN row on every rank
    _check(groups, world, "run_quant")


def test_mismatch_and_unsupported_options_on_sharded_models(groups):
    _check(groups, 2, "run_errors")


def test_plain_models_do_not_import_torch_distributed_tensor(tmp_path):
    # the DTensor check must not cost every single-process load an import
    import subprocess
    import sys
    path = str(tmp_path / "w.safetensors")
    code = ("import sys, torch, gemma_stream as gs\n"
            "from safetensors.torch import save_file\n"
            f"save_file({{'w': torch.ones(2)}}, {path!r})\n"
            "m = torch.nn.Module(); m.register_buffer('w', torch.zeros(2))\n"
            f"gs.load_into(m, {path!r})\n"
            "print('torch.distributed.tensor' in sys.modules)\n")
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False"
