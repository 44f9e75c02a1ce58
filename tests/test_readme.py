"""Every Python block of README.md runs as written, in order, against a tiny real checkpoint.

The README's examples name ``gemma-2b-hf/`` (a transformers ``save_pretrained``
directory) and ``model.safetensors``: this test writes a tiny Gemma of that
layout under those names in a scratch directory and executes the blocks there,
sharing one namespace as a reader following the page top to bottom would.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks() -> list[tuple[int, str]]:
    """(first line number, code) of each fenced ```python block."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    return [(text[:m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M)]


@pytest.fixture
def readme_files(tmp_path, monkeypatch):
    config = transformers.GemmaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "gemma-2b-hf")
    os.link(tmp_path / "gemma-2b-hf" / "model.safetensors", tmp_path / "model.safetensors")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_has_python_examples():
    assert len(python_blocks()) >= 2


def test_readme_python_blocks_run_as_written(readme_files, capsys):
    namespace: dict = {"__name__": "readme"}
    for line, code in python_blocks():
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as e:  # noqa: BLE001 - name the block that broke
            raise AssertionError(f"README.md block at line {line} failed: {type(e).__name__}: {e}") from e
    assert "GB/s" in capsys.readouterr().out
