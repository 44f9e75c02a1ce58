"""tests/vllm/ runs only where vLLM imports (the second venv of .ci/run); elsewhere it is skipped."""

import os
import warnings

import pytest

# no hub access at all and a small KV cache, for this process and the children it starts
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

with warnings.catch_warnings():
    # importing vLLM and torch.compile's modules warns (deprecations inside them), and the suite turns
    # warnings into errors: import them once here, quietly, so the tests see them already imported
    warnings.simplefilter("ignore")
    pytest.importorskip("vllm", reason="vLLM is not installed (tests/vllm/ runs in the vllm venv of .ci/run)")
    import torch._inductor.compile_fx  # noqa: F401
    import vllm.config.load  # noqa: F401
    import vllm.model_executor.model_loader  # noqa: F401
    import vllm.plugins  # noqa: F401

    import gemma_stream.vllm.loader  # noqa: F401
