"""The loaders the benchmark compares: what each imports and builds first, and the load it times.

A ``Loader``'s ``prepare(ctx)`` runs in the child before the baseline (imports, the model on meta) and
returns the timed load; ``LOADERS`` names them all, the bounds (``bounds.py``) included.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .bounds import memcpy_bound, mmap_copy_bound, pread_bound

__all__ = ["Context", "Loader", "LOADERS"]


# ---------------------------------------------------------------- what a child is told

@dataclass
class Context:
    spec: dict

    @property
    def files(self) -> dict:
        return self.spec["files"]

    def model_dtype(self) -> torch.dtype | None:
        name = self.spec.get("model_dtype")
        return getattr(torch, name) if name else None

    def meta_model(self) -> torch.nn.Module:
        """The model every user-built loader fills, constructed on meta (no memory)."""
        model = self.spec["model"]
        with torch.device("meta"):
            if model["kind"] == "mix":
                from .mixes import mix_specs
                from .shapes import module_from_specs
                dtype = self.model_dtype() or torch.bfloat16
                return module_from_specs([(n, s, dtype) for n, s in mix_specs(model["mix"], model["nbytes"])])
            if model["kind"] == "gemma":
                from .shapes import GemmaShape, GemmaShaped
                return GemmaShaped(GemmaShape(**model["shape"]), self.model_dtype(), model["naming"])
            from .shapes import module_from_specs
            dtype = self.model_dtype()
            specs = [(name, tuple(shape), dtype if dtype is not None and getattr(torch, dt).is_floating_point
                      else getattr(torch, dt)) for name, shape, dt in model["tensors"]]
            return module_from_specs(specs)


@dataclass(frozen=True)
class Loader:
    label: str
    reads: str            # which file set it reads: primary | ckpt | safetensors | hf
    prepare: Callable[[Context], Callable[[], Any]]   # imports + meta model; returns the timed load
    touch: bool = False   # weights may stay file-backed: read one byte per page inside the timing
    kind: str = "loader"  # loader | bound
    doubles_memory: bool = False   # holds a full second copy at its peak (refused when RAM is short)
    quantizes: bool = False        # honours --quantize


# ---------------------------------------------------------------- loaders

def _gs(backend: str, quantize: bool = True, mode: str | None = None, cache: str | None = None,
        prefetch: str | None = None):
    def prepare(ctx: Context):
        if prefetch:   # mode="mmap" read-ahead: config() reads it at load time
            os.environ["GEMMA_STREAM_PREFETCH"] = prefetch
        import gemma_stream as gs
        model = ctx.meta_model()
        kwargs: dict = {"backend": backend, "threads": ctx.spec.get("threads"), "progress": False}
        if quantize and ctx.spec.get("quantize"):
            kwargs.update(quantize=ctx.spec["quantize"], group_size=ctx.spec.get("group_size", 128))
        if mode:
            kwargs["mode"] = mode
        if cache:
            kwargs["cache"] = cache
        if ctx.spec.get("key"):
            kwargs["state_dict_key"] = ctx.spec["key"]

        def run():
            report = gs.load_into(model, ctx.files["primary"], **kwargs)
            # the executor's own seconds: the rest of the load is planning and allocation
            ctx.spec["_info"] = {"backend": report.backend, "bytes_read": report.bytes_read,
                                 "executor_seconds": report.seconds, "cache": report.cache,
                                 "prefetch": report.prefetch is not None}
            return model
        return run
    return prepare


def _gs_options(ctx: Context):
    """gemma_stream with the options the spec names (``engine_probe``'s cases): ``spec["options"]`` holds
    backend, mode, cache and api ("load_into" or "load_state_dict")."""
    import gemma_stream as gs

    options = ctx.spec.get("options") or {}
    kwargs: dict = {"backend": options.get("backend", "native"), "threads": ctx.spec.get("threads"),
                    "progress": False}
    kwargs.update({k: options[k] for k in ("mode", "cache") if options.get(k)})
    if ctx.spec.get("key"):
        kwargs["state_dict_key"] = ctx.spec["key"]
    if options.get("api") == "load_state_dict":
        dtype = ctx.model_dtype()
        return lambda: gs.load_state_dict(ctx.files["primary"], dtype=dtype, **kwargs)
    model = ctx.meta_model()

    def run():
        report = gs.load_into(model, ctx.files["primary"], **kwargs)
        ctx.spec["_info"] = {"backend": report.backend, "bytes_read": report.bytes_read,
                             "executor_seconds": report.seconds, "cache": report.cache}
        return model
    return run


def _import_transformers_gemma() -> None:
    """transformers imports its model classes lazily: do it before the baseline, for both HF loaders."""
    import transformers
    import transformers.models.gemma.modeling_gemma  # noqa: F401

    transformers.logging.set_verbosity_error()


def _gs_hf(mode: str = "copy"):
    def prepare(ctx: Context):
        from gemma_stream import hf

        _import_transformers_gemma()
        kwargs: dict = {"dtype": ctx.model_dtype(), "progress": False, "threads": ctx.spec.get("threads"),
                        "mode": mode}
        if ctx.spec.get("quantize"):
            kwargs.update(quantize=ctx.spec["quantize"], group_size=ctx.spec.get("group_size", 128))
        return lambda: hf.from_pretrained(ctx.files["hf"], **kwargs)
    return prepare


def _transformers(ctx: Context):
    import transformers
    from transformers import AutoModelForCausalLM

    _import_transformers_gemma()
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_arg = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return lambda: AutoModelForCausalLM.from_pretrained(ctx.files["hf"], **{dtype_arg: ctx.model_dtype()})


def _state_dict_of(obj, key: str | None):
    if key:
        return obj[key]
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for name in ("model_state_dict", "state_dict", "model"):
            if isinstance(obj.get(name), dict):
                return obj[name]
    return obj


def _torch_load(use_mmap: bool, assign: bool):
    def prepare(ctx: Context):
        model = ctx.meta_model()
        path, key = ctx.files["ckpt"], ctx.spec.get("key")

        def run():
            if not assign:
                model.to_empty(device="cpu")   # what gemma_pytorch does: the model exists, then the file is read
            state = _state_dict_of(torch.load(path, mmap=use_mmap, weights_only=True, map_location="cpu"), key)
            model.load_state_dict(state, assign=assign)
            return model
        return run
    return prepare


def _safetensors_into(model: torch.nn.Module, files: list[str]) -> torch.nn.Module:
    from safetensors.torch import load_file, load_model

    model.to_empty(device="cpu")
    if len(files) == 1:
        load_model(model, files[0], strict=True)
        return model
    seen: set[str] = set()
    for path in files:   # sharded: one shard's state dict at a time, as transformers did before v4.45
        state = load_file(path)
        model.load_state_dict(state, strict=False)
        seen.update(state)
        del state
    missing = set(model.state_dict()) - seen
    if missing:
        raise RuntimeError(f"safetensors shards miss {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    return model


def _safetensors(ctx: Context):
    import safetensors.torch  # noqa: F401  (import before the baseline)

    model = ctx.meta_model()
    return lambda: _safetensors_into(model, ctx.files["safetensors"])


def _quantize_torch(model: torch.nn.Module, scheme: str, group_size: int) -> torch.nn.Module:
    """Step two of the two-step path: FORMATS.md formulas with torch ops, 64 MiB row blocks at a time."""
    from gemma_stream.quant import quantize_int4, quantize_int8

    for module in list(model.modules()):
        if not isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            continue
        w = module.weight.detach()
        n, k = w.shape
        rows = max(1, (64 << 20) // (k * 4))
        if scheme == "int8":
            outs = [torch.empty(n, k, dtype=torch.int8), torch.empty(n, dtype=torch.float32)]
            names = ["weight", "weight_scaler"]
        else:
            outs = [torch.empty(n, k // 2, dtype=torch.uint8), torch.empty(n, k // group_size, dtype=torch.bfloat16),
                    torch.empty(n, k // group_size, dtype=torch.bfloat16)]
            names = ["weight", "weight_scale", "weight_zero"]
        for start in range(0, n, rows):
            block = w[start:start + rows]
            parts = quantize_int8(block) if scheme == "int8" else quantize_int4(block, group_size)
            for out, part in zip(outs, parts):
                out[start:start + rows] = part
        del module._parameters["weight"], w
        for name, out in zip(names, outs):
            module.register_buffer(name, out)
    return model


def _twostep_torch(ctx: Context):
    import safetensors.torch  # noqa: F401

    model = ctx.meta_model()
    scheme, group = ctx.spec["quantize"], ctx.spec.get("group_size", 128)
    return lambda: _quantize_torch(_safetensors_into(model, ctx.files["safetensors"]), scheme, group)


def _twostep_torchao(ctx: Context):
    import torchao.quantization as tq

    model = ctx.meta_model()
    scheme, group = ctx.spec["quantize"], ctx.spec.get("group_size", 128)
    if scheme == "int8":
        config = tq.Int8WeightOnlyConfig() if hasattr(tq, "Int8WeightOnlyConfig") else tq.int8_weight_only()
    else:
        config = (tq.Int4WeightOnlyConfig(group_size=group) if hasattr(tq, "Int4WeightOnlyConfig")
                  else tq.int4_weight_only(group_size=group))

    def run():
        _safetensors_into(model, ctx.files["safetensors"])
        tq.quantize_(model, config)
        return model
    return run


LOADERS: dict[str, Loader] = {
    "gs_native": Loader("gemma_stream load_into (native)", "primary", _gs("native"), quantizes=True),
    "gs_python": Loader("gemma_stream load_into (python)", "primary", _gs("python"), quantizes=True),
    "gs_native_drop": Loader("gemma_stream native, cache='drop'", "primary", _gs("native", cache="drop"),
                             quantizes=True),
    "gs_native_keep": Loader("gemma_stream native, cache='keep'", "primary", _gs("native", cache="keep"),
                             quantizes=True),
    "gs_native_ra_off": Loader("gemma_stream native, read-ahead off", "primary", _gs("native", prefetch="off"),
                               quantizes=True),
    "gs_mmap": Loader("gemma_stream mode='mmap' (+touch)", "primary", _gs("native", mode="mmap"), touch=True),
    "gs_mmap_ra_on": Loader("gemma_stream mode='mmap', read-ahead on (+touch)", "primary",
                            _gs("native", mode="mmap", prefetch="on"), touch=True),
    "gs_mmap_ra_off": Loader("gemma_stream mode='mmap', read-ahead off (+touch)", "primary",
                             _gs("native", mode="mmap", prefetch="off"), touch=True),
    "gs_options": Loader("gemma_stream with the spec's options", "primary", _gs_options),
    "gs_plain": Loader("gemma_stream native, not quantized", "primary", _gs("native", quantize=False)),
    "gs_hf": Loader("gemma_stream.hf.from_pretrained", "hf", _gs_hf(), quantizes=True),
    "gs_hf_mmap": Loader("gemma_stream.hf.from_pretrained(mode='mmap') (+touch)", "hf", _gs_hf("mmap"), touch=True),
    "torch_load": Loader("torch.load + load_state_dict", "ckpt", _torch_load(False, False), doubles_memory=True),
    "torch_load_mmap": Loader("torch.load(mmap) + load_state_dict", "ckpt", _torch_load(True, False),
                              doubles_memory=True),
    "torch_load_mmap_assign": Loader("torch.load(mmap) + meta + assign (+touch)", "ckpt", _torch_load(True, True),
                                     touch=True),
    "safetensors": Loader("safetensors load_model", "safetensors", _safetensors, doubles_memory=True),
    "transformers": Loader("transformers from_pretrained (+touch)", "hf", _transformers, touch=True,
                           doubles_memory=True),
    "twostep_torch": Loader("safetensors load_model + torch quantize", "safetensors", _twostep_torch,
                            doubles_memory=True, quantizes=True),
    "twostep_torchao": Loader("safetensors load_model + torchao quantize_", "safetensors", _twostep_torchao,
                              doubles_memory=True, quantizes=True),
    "read_1t": Loader("bound: pread, 1 thread", "primary", pread_bound(1), kind="bound"),
    "memcpy_1t": Loader("bound: mmap + memcpy, 1 thread", "primary", memcpy_bound, kind="bound"),
    "pread_2t": Loader("bound: pread, 2 threads", "primary", pread_bound(2), kind="bound"),
    "pread_2t_thp": Loader("bound: pread, 2 threads, huge pages", "primary", pread_bound(2, huge_pages=True),
                           kind="bound"),
    "pread_2t_4k": Loader("bound: pread, 2 threads, 4 KiB pages", "primary", pread_bound(2, huge_pages=False),
                          kind="bound"),
    "mmap_copy_2t": Loader("bound: mmap + torch copy_ (2 threads)", "primary", mmap_copy_bound, kind="bound"),
    "odirect_2t": Loader("bound: O_DIRECT pread, 2 threads", "primary", pread_bound(2, direct=True), kind="bound"),
}

