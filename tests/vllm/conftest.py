"""tests/vllm/ runs only where vLLM imports (the second venv of .ci/run); elsewhere its tests skip."""

import os
import warnings

from tiny_models import vllm_installed

# no hub access at all and a small KV cache, for this process and the children it starts
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


if vllm_installed():
    with warnings.catch_warnings():
        # importing vLLM and torch.compile's modules warns (deprecations inside them), and the suite
        # turns warnings into errors: import them once here, quietly, so the tests find them imported
        warnings.simplefilter("ignore")
        import torch._inductor.compile_fx  # noqa: F401
        import vllm.config.load  # noqa: F401
        import vllm.model_executor.model_loader  # noqa: F401
        import vllm.plugins  # noqa: F401

        import gemma_stream.vllm.loader  # noqa: F401
