"""``GemmaStreamLoader``: vLLM's ``BaseModelLoader`` for ``--load-format gemma_stream``.

Two paths, chosen per model:

* **direct**: the model's own parameters are the destinations of one plan
  (fused q/k/v and gate/up as row ranges, see :mod:`.direct`) and the engine
  copies the checkpoint straight into them, converting dtypes on the way;
  With tensor parallelism each worker reads only its own slices.
* **streaming**: ``model.load_weights(stream)`` with the tensors read ahead by
  :func:`gemma_stream.iter_tensors` as views of the mapped file (every other
  architecture, quantized checkpoints vLLM processes itself).  The copies
  vLLM's weight loaders make from those tensors into its parameters (whole
  tensors, or rows and columns of them, into parameters or their rows) are
  recorded and done by the engine from the file at the end
  (:mod:`gemma_stream.capture`); everything else vLLM does runs as it would.

``.bin`` / ``.pt`` checkpoints are read by gemma_stream's pickle-free torch
zip reader on both paths; nothing is unpickled and ``torch.load`` never runs.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
from torch import nn
from vllm.config import ModelConfig
from vllm.config.load import LoadConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from ..api import _execute, _resolve_cache
from ..capture import CopyCapture
from ..errors import GemmaStreamError
from ..formats import open_checkpoint
from ..plan import CACHE_POLICIES
from ..stream import DEFAULT_WINDOW_BYTES, stream_checkpoint
from .direct import NotDirect, plan_direct

__all__ = ["GemmaStreamLoader", "LoaderOptions", "OPTIONS"]

logger = init_logger(f"vllm.{__name__}")   # under "vllm", so vLLM's log handlers show it

#: ``model_loader_extra_config`` keys and what they take
OPTIONS = {
    "path": "'auto' (direct where the architecture is known, else streaming), 'direct' or 'streaming'",
    "cache": "'auto', 'keep' or 'drop': the page-cache policy, as in gs.load_into",
    "threads": "engine threads (default: one per usable core, at most 8)",
    "backend": "'auto', 'native' or 'python'",
    "window_mb": f"streaming path: MiB of tensors read ahead (default {DEFAULT_WINDOW_BYTES >> 20})",
    "copies": "streaming path: 'engine' (vLLM's copies of the streamed tensors are recorded and done by "
              "gemma_stream's engine straight from the file, the default) or 'vllm' (vLLM copies each tensor)",
}
_PATHS = ("auto", "direct", "streaming")
#: the files vLLM's own loader fetches from the hub for a model's weights
_WEIGHT_PATTERNS = ["*.safetensors", "*.bin", "*.pt", "*.index.json"]


@dataclass(frozen=True)
class LoaderOptions:
    path: str = "auto"
    cache: str = "auto"
    threads: int | None = None
    backend: str = "auto"
    window_mb: int = DEFAULT_WINDOW_BYTES >> 20
    copies: str = "engine"

    @classmethod
    def parse(cls, extra: object) -> "LoaderOptions":
        """Validate ``model_loader_extra_config``; unknown keys are rejected with the valid ones listed."""
        if extra is None:
            extra = {}
        if not isinstance(extra, dict):
            raise GemmaStreamError(f"gemma_stream: model_loader_extra_config must be a dict, not "
                                   f"{type(extra).__name__}")
        unknown = sorted(set(extra) - set(OPTIONS))
        if unknown:
            valid = "; ".join(f"{k}: {v}" for k, v in OPTIONS.items())
            raise GemmaStreamError(f"gemma_stream: unknown model_loader_extra_config key(s) "
                                   f"{', '.join(map(repr, unknown))}; valid keys are {valid}")
        options = cls(**extra)
        choices = {"path": _PATHS, "cache": CACHE_POLICIES, "backend": ("auto", "native", "python"),
                   "copies": ("engine", "vllm")}
        for key, allowed in choices.items():
            if getattr(options, key) not in allowed:
                raise GemmaStreamError(f"gemma_stream: {key}={getattr(options, key)!r}; expected one of "
                                       f"{', '.join(allowed)}")
        for key in ("threads", "window_mb"):
            value = getattr(options, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise GemmaStreamError(f"gemma_stream: {key}={value!r}; expected a positive integer")
        return options


class GemmaStreamLoader(BaseModelLoader):
    """vLLM model loader backed by gemma_stream (``load_format="gemma_stream"``)."""

    def __init__(self, load_config: LoadConfig):
        super().__init__(load_config)
        self.options = LoaderOptions.parse(load_config.model_loader_extra_config)
        #: what the last ``load_weights`` did: "direct" or "streaming", and why when it streamed
        self.last_path = ""
        self.last_reason = ""
        #: direct: the bytes this worker read (with tensor parallelism, its slices and the replicated tensors)
        self.last_bytes_read = 0
        #: streaming: seconds waiting for reads ("read_wait_s") and in vLLM's load_weights otherwise
        self.last_split: dict[str, float] = {}

    def _checkpoint_dir(self, model_config: ModelConfig) -> str:
        if os.path.isdir(model_config.model):
            return model_config.model
        from vllm.model_executor.model_loader.weight_utils import download_weights_from_hf

        return download_weights_from_hf(model_config.model, self.load_config.download_dir, _WEIGHT_PATTERNS,
                                        model_config.revision, ignore_patterns=self.load_config.ignore_patterns)

    def download_model(self, model_config: ModelConfig) -> None:
        self._checkpoint_dir(model_config)

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        start = time.perf_counter()
        ckpt = open_checkpoint(self._checkpoint_dir(model_config))
        if self.options.path != "streaming":
            try:
                nbytes, rank, size = self._load_direct(model, ckpt)
                self.last_path, self.last_reason, self.last_bytes_read = "direct", "", nbytes
                logger.info("gemma_stream: direct path, %d bytes (%.2f GB) from %d file(s) in %.2f s, tensor "
                            "parallel rank %d of %d", nbytes, nbytes / 1e9, len(ckpt.files),
                            time.perf_counter() - start, rank, size)
                return
            except NotDirect as why:
                if self.options.path == "direct":
                    raise GemmaStreamError(f"gemma_stream: path='direct' cannot load this model: {why}") from None
                self.last_reason = str(why)
                logger.info("gemma_stream: streaming into model.load_weights (%s)", why)
        self._load_streaming(model, model_config, ckpt)
        self.last_path = "streaming"
        logger.info("gemma_stream: streaming path, %d file(s) in %.2f s", len(ckpt.files),
                    time.perf_counter() - start)

    def _run(self, plan, ckpt=None):
        """Execute ``plan`` with this loader's options (the direct plan, or the streaming path's
        recorded copies); returns what ran.  With ``ckpt`` (the direct path) ``cache="auto"`` decides
        as ``gs.load_into`` does: a large cold checkpoint is dropped behind the load unless other
        ranks of the process group may read it; the streaming path keeps it, as ``iter_tensors``."""
        cache = self.options.cache
        resolved = _resolve_cache(plan, cache, ckpt=ckpt)
        done, _, _, _ = _execute(plan, threads=self.options.threads, backend=self.options.backend, progress=None,
                                 cache=cache, desc="gemma_stream load", resolved=resolved)
        return done

    def _load_direct(self, model: nn.Module, ckpt) -> tuple[int, int, int]:
        """Bytes read, tensor parallel rank and size."""
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        size, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        plan, padding, _ = plan_direct(model, ckpt, tp_size=size)
        done = self._run(plan, ckpt)
        with torch.no_grad():
            for rows in padding:
                rows.zero_()
        return done.bytes_read, rank, size

    def _load_streaming(self, model: nn.Module, model_config: ModelConfig, ckpt) -> None:
        # vLLM's weight loaders copy every tensor into its parameter: hand them views of the mapped file
        # (no copy of ours) unless the pages are to be dropped, which copies through the engine.  With
        # copies="engine" those copies are recorded and the engine reads the file straight into their
        # destinations (gemma_stream.capture), so the views are not faulted in ahead
        mode = "copy" if self.options.cache == "drop" else "mmap"
        capture = None
        on_cpu = all(p.device.type == "cpu" for p in model.parameters())   # the engine writes CPU memory
        if mode == "mmap" and self.options.copies == "engine" and on_cpu:
            capture = CopyCapture(ckpt, self._run)
        stream = stream_checkpoint(ckpt, window_bytes=self.options.window_mb << 20, threads=self.options.threads,
                                   backend=self.options.backend, cache=self.options.cache, mode=mode,
                                   prefault=True if capture is None else capture.reads_ahead)
        start, cpu = time.perf_counter(), time.process_time()
        if capture is None:
            loaded = model.load_weights(stream)
        else:
            with capture:
                loaded = model.load_weights(capture.watch(stream))
            capture.flush()
        # the split of the streaming time: waiting for gemma_stream's reads, and vLLM's load_weights
        # (and the CPU time of the whole process meanwhile: vLLM's copies, its page faults, our reads)
        self.last_split = {"read_wait_s": stream.waited_seconds,
                           "load_weights_s": time.perf_counter() - start - stream.waited_seconds,
                           "load_weights_cpu_s": time.process_time() - cpu}
        if capture is not None:
            self.last_split.update({f"copies_{k}": v for k, v in capture.stats.items()})
        logger.info("gemma_stream: streaming split: %.2f s waiting for reads, %.2f s in vLLM's load_weights%s",
                    self.last_split["read_wait_s"], self.last_split["load_weights_s"],
                    "" if capture is None else f" ({capture.stats['captured']} of its copies, "
                    f"{capture.stats['captured_bytes'] / 1e9:.2f} GB, done by the engine in "
                    f"{capture.stats['flushes']} plan(s); {capture.stats['ran']} left to torch)")
        if model_config.quantization is None and loaded is not None:
            # the check vLLM's default loader makes for unquantized models
            absent = sorted({name for name, _ in model.named_parameters()} - set(loaded))
            if absent:
                raise GemmaStreamError(f"gemma_stream: {len(ckpt.files)} checkpoint file(s) left these parameters "
                                       f"uninitialized: {', '.join(absent[:20])}")
