"""Two "nodes" on 127.0.0.1 through torchrun: the launch commands README.md gives, one rank per node.

Each node is its own torchrun agent (``--nnodes 2 --nproc-per-node 1``), joined
either by the static rendezvous (``--node-rank``, ``--master-addr``,
``--master-port``) or by c10d (``--rdzv-backend c10d --rdzv-endpoint``); each
node writes its own copy of the checkpoint, as separate machines would hold
one.  The rank-side checks are dist_worker.run_torchrun.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import gemma_stream as gs

if importlib.util.find_spec("torch.distributed.run") is None:
    pytest.skip("torchrun (torch.distributed.run) is missing", allow_module_level=True)

TESTS = Path(__file__).resolve().parent
TIMEOUT_SECONDS = 300


def _torchrun() -> list[str]:
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(rendezvous: str, node: int, port: int) -> list[str]:
    if rendezvous == "static":
        return ["--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port)]
    return ["--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"]


@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_torchrun_two_nodes_tensor_parallel_load(tmp_path, rendezvous):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(gs.__file__).resolve().parent.parent), str(TESTS),
                                           os.environ.get("PYTHONPATH", "")]))
    if os.path.exists("/sys/class/net/lo"):  # gloo's sockets on loopback, not the host's address
        env["GLOO_SOCKET_IFNAME"] = "lo"
    port = _free_port()
    nodes = []
    for node in (0, 1):
        cmd = [*_torchrun(), "--nnodes", "2", "--nproc-per-node", "1", *_launch(rendezvous, node, port),
               str(TESTS / "dist_worker.py"), str(tmp_path), "run_torchrun"]
        nodes.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in nodes:
            outputs.append(p.communicate(timeout=TIMEOUT_SECONDS)[0])
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank in (0, 1):
        result = tmp_path / "results" / f"run_torchrun.{rank}"
        outcome = result.read_text() if result.exists() else "no result"
        assert outcome == "ok", f"rank {rank}: {outcome}\n" + "\n".join(o[-3000:] for o in outputs)
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
