"""Peak memory of quantize-on-read into a gemma_pytorch-shaped int8 model (issue 12; RESULTS.md).

Writes a float32 safetensors checkpoint for ``tests/gemma_pytorch_like.py``'s model (Gemma 1
layout, vocab 32768, hidden 1024, 4 layers), then loads it into the ``quant=True`` model built
inside ``gs.init_empty()`` in a fresh process per backend (the child of
``tests/test_gemma_pytorch.py``) and prints the peak RSS over the baseline::

    PYTHONPATH=python python benchmarks/gemma_pytorch_int8_peak.py
"""

import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import save_file

TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
sys.path.insert(0, TESTS)

import gemma_pytorch_like as gp  # noqa: E402
import test_gemma_pytorch  # noqa: E402

import gemma_stream as gs  # noqa: E402


def main() -> None:
    cfg = gp.Config(architecture=1, vocab_size=32768, hidden_size=1024, intermediate_size=2048, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=4, head_dim=128)
    with gs.init_empty():
        meta = gp.build(cfg)
    with tempfile.TemporaryDirectory() as workdir:
        path = os.path.join(workdir, "model.safetensors")
        save_file({name: torch.randn(t.shape) if t.dim() == 2 else torch.zeros(t.shape)
                   for name, t in meta.state_dict(keep_vars=True).items() if not t.is_complex()}, path)
        print(f"float32 checkpoint: {os.path.getsize(path) / 2**20:.1f} MiB")
        for backend in ("native", "python"):
            out = subprocess.run([sys.executable, "-c", test_gemma_pytorch.CHILD, path, backend, TESTS, "1"],
                                 capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{backend:7s} int8 model {result['model'] / 2**20:.1f} MiB, peak over baseline "
                  f"{result['peak'] / 2**20:.1f} MiB ({result['peak'] / result['model']:.3f}x)")


if __name__ == "__main__":
    main()
