"""Issue 16's plan-level shards for plain local tensors: a route that reads part of a checkpoint
tensor without gs.PartialRoutes is refused, and the refusal names the way to say it is deliberate."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import gemma_stream as gs


def test_partial_route_refusal_names_partial_routes(tmp_path, backend):
    w = torch.randn(8, 6)
    save_file({"w": w}, str(tmp_path / "w.safetensors"))
    m = nn.Module()
    m.register_buffer("w", torch.zeros(8, 3))
    route = lambda n: gs.Route("w", src_cols=(3, 6))   # noqa: E731  one rank's columns
    with pytest.raises(gs.MismatchError, match=r"columns \[0, 3\).*gs\.PartialRoutes"):
        gs.load_into(m, tmp_path / "w.safetensors", rename=route, backend=backend)
    assert not m.w.any()
    gs.load_into(m, tmp_path / "w.safetensors", rename=gs.PartialRoutes(route), backend=backend)
    assert torch.equal(m.w, w[:, 3:])
