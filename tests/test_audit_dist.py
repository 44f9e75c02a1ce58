"""Issue 16 placements and clients beyond tests/test_distributed.py: biases and embeddings under
parallelize_module, empty shards (torch.chunk gives fewer chunks than ranks), HSDP and TP+FSDP2 on a
2-D mesh (``_StridedShard``), transformers' own Gemma under tensor parallelism, an engine's plain local
shards under read='once' (ranks that need different tensors); gloo on 127.0.0.1.

Rank-side code in audit_dist_worker.py; one spawned group per world size runs every scenario.
"""

from __future__ import annotations

import pytest

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch built without distributed", allow_module_level=True)


import audit_dist_worker  # noqa: E402
from test_distributed import _check, spawned_groups  # noqa: E402

SCENARIOS = {
    2: [("run_biases_embeddings", {}), ("run_hf_gemma_tp", {}), ("run_plain_local_once", {})],
    4: [("run_biases_embeddings", {}), ("run_hsdp", {}), ("run_tp_fsdp", {}), ("run_plain_local_once", {}),
        ("run_fsdp_small_dims", {})],
}


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    return spawned_groups(tmp_path_factory, audit_dist_worker.run_all, SCENARIOS, "audit")


@pytest.mark.parametrize("world", [2, 4])
def test_biases_embeddings_replicate_and_empty_shards(groups, world):
    # Colwise (Shard(0)) and Rowwise (Replicate()) biases, Colwise (Shard(1)) and Rowwise (Shard(0))
    # embeddings, distribute_tensor(Replicate()) on 1-D, a 3-row weight (rank 3 of 4 holds nothing),
    # built on meta and on cpu; bytes equal the shard; forward; a global shape mismatch
    _check(groups, world, "run_biases_embeddings")


def test_fsdp2_dim_smaller_than_the_world(groups):
    # a 3-row weight and bias over 4 ranks (the last shard empty), uneven 90/50 rows, forward
    _check(groups, 4, "run_fsdp_small_dims")


def test_hsdp_two_dimensional_fully_shard(groups):
    _check(groups, 4, "run_hsdp")


def test_tensor_parallel_then_fsdp2_on_a_two_dimensional_mesh(groups):
    # (_StridedShard(0), Shard(0)) placements; rank_reads over the 2-D mesh and its 1-D sub-mesh; read='once'
    _check(groups, 4, "run_tp_fsdp")


def test_transformers_gemma_tensor_parallel_equals_single_process(groups):
    pytest.importorskip("transformers")
    _check(groups, 2, "run_hf_gemma_tp")


@pytest.mark.parametrize("world", [2, 4])
def test_plain_local_shards_and_read_once_when_ranks_need_different_tensors(groups, world):
    # gs.Route rows/columns in gs.PartialRoutes, read='own' and 'once'; a pipeline stage per rank under
    # read='once' (the ranks' needed tensors differ: the broadcast pieces must still agree)
    _check(groups, world, "run_plain_local_once")
