"""--load-format gemma_stream on an architecture the direct path does not know: the loader chooses
the streaming path by itself (no extra config), says why, and vLLM ends up with the default loader's
weights and greedy tokens; a .bin of it is read without torch.load."""

from __future__ import annotations

import os

import pytest
import torch
from tiny_models import vllm_installed, write_tokenizer

if not vllm_installed():
    pytest.skip("vLLM is not installed (tests/vllm/ runs in the vllm venv of .ci/run)", allow_module_level=True)

from test_vllm_loader import _child  # noqa: E402

VOCAB = 384


def _save_qwen3(directory: str, fmt: str) -> str:
    """A tiny random Qwen3 (q/k norms, untied head): a model class outside DIRECT_ARCHITECTURES."""
    import transformers
    from safetensors.torch import load_file

    config = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                                      bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    model.save_pretrained(directory)
    if fmt == "bin":
        path = os.path.join(directory, "model.safetensors")
        torch.save(load_file(path), os.path.join(directory, "pytorch_model.bin"))
        os.remove(path)
    write_tokenizer(directory, VOCAB)
    return directory


@pytest.fixture(scope="module")
def qwen3_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3")
    st, binary = _save_qwen3(str(root / "st"), "safetensors"), _save_qwen3(str(root / "bin"), "bin")
    specs = {"default": (st, "auto", {}), "auto": (st, "gemma_stream", {}), "bin_auto": (binary, "gemma_stream", {})}
    results, _ = _child([[model, fmt, extra, "float32"] for model, fmt, extra in specs.values()])
    return dict(zip(specs, results))


def test_unknown_architecture_streams_automatically(qwen3_runs):
    default = qwen3_runs["default"]
    assert len(set(default["tokens"][0])) > 3      # the tiny model's greedy output is not degenerate
    for name in ("auto", "bin_auto"):
        got = qwen3_runs[name]
        assert got["path"] == "streaming" and "Qwen3ForCausalLM" in got["reason"], (name, got["path"], got["reason"])
        assert got["weights"] == default["weights"], name
        assert got["tokens"] == default["tokens"], name
        assert got["torch_load_calls"] == 0, name
