"""--load-format gemma_stream in vLLM: same greedy tokens and same weights as vLLM's own loader.

One child process runs every LLM (vLLM's engine in-process, one after the other) and
reports greedy token ids, a hash of every parameter taken before vLLM's post-load
processing, the gemma_stream path taken and the number of torch.load calls.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from tiny_models import save_tiny, vllm_installed

if not vllm_installed():
    pytest.skip("vLLM is not installed (tests/vllm/ runs in the vllm venv of .ci/run)", allow_module_level=True)

from vllm.config.load import LoadConfig  # noqa: E402

import gemma_stream as gs  # noqa: E402
from gemma_stream.vllm.loader import OPTIONS, GemmaStreamLoader  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

STREAM = {"path": "streaming", "window_mb": 1}   # a window smaller than the model: several reads in flight


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    models = {
        "gemma": save_tiny(str(root / "gemma"), "gemma"),
        "gemma_sharded": save_tiny(str(root / "gemma_sharded"), "gemma", shard_size="300KB"),
        "gemma_bin": save_tiny(str(root / "gemma_bin"), "gemma", fmt="bin"),
        "gemma2": save_tiny(str(root / "gemma2"), "gemma2"),
        "gemma3": save_tiny(str(root / "gemma3"), "gemma3", dtype=torch.bfloat16),
        # 390 is no multiple of 64: vLLM pads the embedding and the untied lm_head to 448 rows
        "llama": save_tiny(str(root / "llama"), "llama", vocab=390),
        "mistral": save_tiny(str(root / "mistral"), "mistral"),
        "qwen2": save_tiny(str(root / "qwen2"), "qwen2", fmt="bin"),
        "gpt2": save_tiny(str(root / "gpt2"), "gpt2"),
        "phi3": save_tiny(str(root / "phi3"), "phi3"),
        "mixtral": save_tiny(str(root / "mixtral"), "mixtral"),
        # for tensor parallelism 2: one k/v head (both ranks keep it), and 390 rows split 224 + 166
        # over the ranks' 224-row embedding shards (the second padded)
        "gemma_tp": save_tiny(str(root / "gemma_tp"), "gemma", vocab=390, num_key_value_heads=1),
    }
    assert len([f for f in os.listdir(models["gemma_sharded"]) if f.endswith(".safetensors")]) > 1
    specs = {
        "default": ("gemma", "auto", {}, "float32"),
        "dummy": ("gemma", "dummy", {}, "float32"),
        "auto": ("gemma", "gemma_stream", {}, "float32"),
        "streaming": ("gemma", "gemma_stream", STREAM, "float32"),
        "streaming_vllm_copies": ("gemma", "gemma_stream", STREAM | {"copies": "vllm"}, "float32"),
        "bf16_streaming": ("gemma", "gemma_stream", STREAM, "bfloat16"),
        "sharded_direct": ("gemma_sharded", "gemma_stream", {"path": "direct"}, "float32"),
        "bin_default": ("gemma_bin", "auto", {}, "float32"),
        "bin_direct": ("gemma_bin", "gemma_stream", {"path": "direct", "backend": "python"}, "float32"),
        "bin_streaming": ("gemma_bin", "gemma_stream", STREAM, "float32"),
        "bf16_default": ("gemma", "auto", {}, "bfloat16"),
        "bf16_direct": ("gemma", "gemma_stream", {"cache": "drop", "threads": 1}, "bfloat16"),
        "gemma2_default": ("gemma2", "auto", {}, "float32"),
        "gemma2_direct": ("gemma2", "gemma_stream", {}, "float32"),
        "gemma3_default": ("gemma3", "auto", {}, "bfloat16"),
        "gemma3_direct": ("gemma3", "gemma_stream", {}, "bfloat16"),
        "llama_default": ("llama", "auto", {}, "float32"),
        "llama_direct": ("llama", "gemma_stream", {}, "float32"),
        "llama_streaming": ("llama", "gemma_stream", STREAM, "float32"),
        "mistral_default": ("mistral", "auto", {}, "float32"),
        "mistral_direct": ("mistral", "gemma_stream", {}, "float32"),
        "qwen2_default": ("qwen2", "auto", {}, "float32"),
        "qwen2_direct": ("qwen2", "gemma_stream", {}, "float32"),
        "qwen2_streaming": ("qwen2", "gemma_stream", STREAM, "float32"),
        **{f"{arch}_{fmt}": (arch, fmt if fmt == "auto" else "gemma_stream", {}, "float32")
           for arch in ("gpt2", "phi3", "mixtral") for fmt in ("default", "gemma_stream")},
        "tp_reference": ("gemma_tp", "auto", {}, "float32"),
    }
    argv = [[models[m], fmt, extra, dtype] for m, fmt, extra, dtype in specs.values()]
    results, _ = _child(argv)
    return dict(zip(specs, results)) | {"models": models}


def _child(argv: list, **env_extra: str) -> tuple[list, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(gs.__file__)), HERE]),
               VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1", **env_extra)
    out = subprocess.run([sys.executable, os.path.join(HERE, "llm_child.py"), json.dumps(argv)],
                         capture_output=True, text=True, env=env, timeout=1200)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULTS ")]
    assert out.returncode == 0 and lines, out.stderr[-6000:]
    return json.loads(lines[-1][len("RESULTS "):]), out.stdout


def _same(runs, name, reference, path):
    got, want = runs[name], runs[reference]
    assert got["path"] == path, (name, got["path"], got["reason"])
    assert got["weights"] == want["weights"], name
    assert got["tokens"] == want["tokens"], name
    assert got["torch_load_calls"] == 0, name


def test_negative_control_dummy_weights_change_the_tokens(runs):
    assert runs["dummy"]["tokens"] != runs["default"]["tokens"]
    assert runs["dummy"]["weights"] != runs["default"]["weights"]
    assert len(set(runs["default"]["tokens"][0])) > 3     # the tiny model's greedy output is not degenerate


def test_auto_takes_the_direct_path_for_gemma(runs):
    _same(runs, "auto", "default", "direct")


def _engine_copied_everything(run, model_dir):
    """Every tensor of the checkpoint reached the parameters through a recorded copy done by the engine."""
    split = run["split"]
    tensors = len(gs.inspect(model_dir))
    assert split["copies_captured"] >= tensors and split["copies_ran"] == 0, split
    assert split["copies_flushes"] >= 1


def test_streaming_path(runs):
    _same(runs, "streaming", "default", "streaming")
    _engine_copied_everything(runs["streaming"], runs["models"]["gemma"])


def test_streaming_with_vllms_own_copies(runs):
    _same(runs, "streaming_vllm_copies", "default", "streaming")
    assert "copies_captured" not in runs["streaming_vllm_copies"]["split"]


@pytest.mark.parametrize("name, reference, model", [("bf16_streaming", "bf16_default", "gemma"),
                                                    ("llama_streaming", "llama_default", "llama"),
                                                    ("qwen2_streaming", "qwen2_default", "qwen2")])
def test_streaming_converts_pads_and_reads_bin(runs, name, reference, model):
    """f32 checkpoint into a bf16 model (the engine converts, bit for bit as torch's copy); Llama's padded
    vocabulary (vLLM zeroes the padding rows beside a pending copy); Qwen2's q/k/v biases from a .bin."""
    _same(runs, name, reference, "streaming")
    _engine_copied_everything(runs[name], runs["models"][model])


def test_sharded_safetensors(runs):
    _same(runs, "sharded_direct", "default", "direct")


def test_bin_is_read_without_torch_load(runs):
    assert runs["bin_default"]["torch_load_calls"] > 0          # the counter sees vLLM's own .bin loader
    assert runs["bin_default"]["weights"] == runs["default"]["weights"]
    _same(runs, "bin_direct", "bin_default", "direct")
    _same(runs, "bin_streaming", "bin_default", "streaming")


def test_dtype_conversion_on_read(runs):
    _same(runs, "bf16_direct", "bf16_default", "direct")
    assert runs["bf16_direct"]["weights"] != runs["auto"]["weights"]


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "llama", "mistral", "qwen2"])
def test_other_architectures_direct(runs, arch):
    _same(runs, f"{arch}_direct", f"{arch}_default", "direct")


@pytest.mark.parametrize("arch", ["gpt2", "phi3", "mixtral"])
def test_architectures_the_direct_path_does_not_know_stream(runs, arch):
    """path="auto" streams them; what vLLM copies from the streamed tensors the engine does: Phi-3's
    fused q/k/v and gate/up as row blocks of the checkpoint tensors, Mixtral's experts into their
    slices of the fused expert parameters. GPT-2's Conv1D weights vLLM transposes first: those
    copies stay torch's."""
    run = runs[f"{arch}_gemma_stream"]
    _same(runs, f"{arch}_gemma_stream", f"{arch}_default", "streaming")
    assert "not one the direct path knows" in run["reason"]
    split = run["split"]
    if arch == "gpt2":
        assert split["copies_captured"] > 0 and split["copies_ran"] > 0, split
    else:
        _engine_copied_everything(run, runs["models"][arch])


def test_tensor_parallel_2_each_worker_reads_its_slices(runs):
    """TP=2 on vLLM's CPU backend (one core per worker): the plugin loads in each spawned worker through
    the entry point; the direct path reads each worker's slices only (LoadReport's bytes in its log
    line), the streaming path's recorded copies are each worker's rows and columns; the greedy tokens of both equal the TP=1 default
    loader's (float32; the engine is deterministic, so equal once is equal always on this machine)."""
    cores = sorted(os.sched_getaffinity(0))[:2]
    if len(cores) < 2:
        pytest.skip("tensor parallelism 2 needs two cores")
    model = runs["models"]["gemma_tp"]
    (direct, streaming), stdout = _child([[model, "gemma_stream", {}, "float32", 2],
                                          [model, "gemma_stream", STREAM, "float32", 2]],
                                         VLLM_CPU_OMP_THREADS_BIND=f"{cores[0]}|{cores[1]}")
    assert direct["tokens"] == runs["tp_reference"]["tokens"]
    assert streaming["tokens"] == runs["tp_reference"]["tokens"]
    assert stdout.count("gemma_stream: streaming split") == 2
    # each rank's copies of its rows and columns of the streamed tensors were the engine's
    captured = re.findall(r"\((\d+) of its copies, .*?; (\d+) left to torch\)", stdout)
    assert len(captured) == 2 and all(int(n) > 0 and int(left) == 0 for n, left in captured), stdout[-3000:]
    read = sorted((int(rank), int(nbytes)) for nbytes, rank in
                  re.findall(r"gemma_stream: direct path, (\d+) bytes .* tensor parallel rank (\d) of 2", stdout))
    assert [rank for rank, _ in read] == [0, 1], stdout[-3000:]
    # what each rank must read: its half of every sharded weight (its 224 or 166 vocabulary rows of the
    # embedding), the k/v heads whole (one head, kept by both ranks), the norms whole
    ckpt = {info.name: info for info in gs.inspect(model)}
    replicated = sum(i.nbytes for n, i in ckpt.items() if "norm" in n or "k_proj" in n or "v_proj" in n)
    embed = ckpt["model.embed_tokens.weight"]
    row = embed.nbytes // embed.shape[0]
    halved = sum(i.nbytes for n, i in ckpt.items() if "layers" in n and "norm" not in n and "k_proj" not in n
                 and "v_proj" not in n) // 2
    assert halved > replicated
    assert read == [(0, halved + replicated + 224 * row), (1, halved + replicated + 166 * row)]
    assert sum(nbytes for _, nbytes in read) < 2 * sum(i.nbytes for i in ckpt.values())


def test_plugin_registers_the_load_format():
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.plugins import load_general_plugins

    load_general_plugins()   # through the installed entry point, as every vLLM process does
    loader = get_model_loader(LoadConfig(load_format="gemma_stream"))
    assert isinstance(loader, GemmaStreamLoader)


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(gs.GemmaStreamError) as info:
        GemmaStreamLoader(LoadConfig(load_format="gemma_stream", model_loader_extra_config={"windw_mb": 4}))
    message = str(info.value)
    assert "'windw_mb'" in message and all(key in message for key in OPTIONS)


@pytest.mark.parametrize("extra, match", [({"path": "fast"}, "path='fast'"), ({"threads": 0}, "threads=0"),
                                          ({"cache": "never"}, "cache='never'"),
                                          ({"window_mb": True}, "window_mb=True"),
                                          ({"copies": "torch"}, "copies='torch'")])
def test_bad_option_values(extra, match):
    with pytest.raises(gs.GemmaStreamError, match=match):
        GemmaStreamLoader(LoadConfig(load_format="gemma_stream", model_loader_extra_config=extra))
