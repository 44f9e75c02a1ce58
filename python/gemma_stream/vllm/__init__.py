"""vLLM integration: the ``gemma_stream`` load format.

Installed with ``pip install "gemma_stream[vllm]"``; vLLM finds it through the
``vllm.general_plugins`` entry point in every process, so no user code is needed::

    vllm serve checkpoint_dir/ --load-format gemma_stream
    LLM(model="checkpoint_dir/", load_format="gemma_stream")

Options go through vLLM's ``model_loader_extra_config`` (see
:data:`~gemma_stream.vllm.loader.OPTIONS`).  This module imports vLLM only when
``register()`` runs.
"""

from __future__ import annotations

__all__ = ["LOAD_FORMAT", "register"]

#: the name passed to ``--load-format`` / ``load_format=``
LOAD_FORMAT = "gemma_stream"


def register() -> None:
    """Register the ``gemma_stream`` load format with vLLM (the entry point; safe to call twice).

    >>> import gemma_stream.vllm
    >>> gemma_stream.vllm.register()   # vLLM does this itself through the entry point
    """
    from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER, register_model_loader

    from .loader import GemmaStreamLoader

    if _LOAD_FORMAT_TO_MODEL_LOADER.get(LOAD_FORMAT) is not GemmaStreamLoader:
        register_model_loader(LOAD_FORMAT)(GemmaStreamLoader)
