"""Peak memory stays near the model's own size: checked in a fresh subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import gemma_stream as gs

CHILD = textwrap.dedent("""
    import json, sys, torch
    from torch import nn
    import gemma_stream as gs

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    path, backend, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
    quantize = sys.argv[4] if len(sys.argv) > 4 else None
    with torch.device("meta"):
        model = nn.Module()
        model.embed = nn.Embedding(16384, 2048, dtype=dtype)   # one big tensor: chunking must bound it
        model.layers = nn.ModuleList(nn.Linear(2048, 2048, bias=False, dtype=dtype) for _ in range(8))
    base = status("VmRSS")
    # VmHWM can only be reset by writing to clear_refs; do it so the baseline is the RSS now
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    gs.load_into(model, path, backend=backend, quantize=quantize)
    peak, anon = status("VmHWM") - base, status("RssAnon")
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(json.dumps({"peak": peak, "model": model_bytes, "anon": anon}))
""")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("mem") / "m.safetensors"
    sd = {"embed.weight": torch.randn(16384, 2048, dtype=torch.float32)}
    sd.update({f"layers.{i}.weight": torch.randn(2048, 2048) for i in range(8)})
    save_file(sd, str(path))
    return str(path)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_peak_rss_is_about_model_size(checkpoint, backend, dtype):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(gs.__file__)))
    out = subprocess.run([sys.executable, "-c", CHILD, checkpoint, backend, dtype], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # generous: 1.10x model + 96 MiB (the benchmark holds the 1.03x + 64 MiB target)
    assert result["peak"] <= 1.10 * result["model"] + (96 << 20), result


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantize_on_read_peak_is_about_quantized_size(checkpoint, backend, scheme):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(gs.__file__)))
    out = subprocess.run([sys.executable, "-c", CHILD, checkpoint, backend, "bfloat16", scheme],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # the f32 checkpoint is 4-8x the quantized model: holding it (or a bf16 copy) would blow this bound
    assert result["peak"] <= 1.10 * result["model"] + (96 << 20), result
