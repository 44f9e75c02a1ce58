"""What a load does to a ``torch.nn.Module``: build it empty, find its destinations, swap tensors.

``load_into`` (api.py) plans on the model as built (often on ``meta``), then
asks this module to allocate what is still on ``meta`` and to swap tensors by
identity (copy-on-write views for ``mode="mmap"``), so ties stay ties and the
plan's jobs can be pointed at the new storage (``Plan.rebind``).

>>> with gs.init_empty():          # parameters on meta, buffers computed for real
...     model = MyModel()
>>> gs.load_into(model, "model.safetensors")
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import torch

from .plan import QuantTarget

__all__ = ["init_empty", "module_walk", "quant_targets", "MetaTensors", "meta_tensors", "materialize", "swap_tensors",
           "same_kind", "run_post_load_hooks", "int8_rows_target"]

_PATCH_LOCK = threading.RLock()


@contextlib.contextmanager
def init_empty() -> Iterator[None]:
    """Build a model with its parameters on ``meta`` and its buffers computed for real.

    Parameters (the weights a checkpoint holds) are moved to ``meta`` as each
    module registers them, so they cost no memory and their random init runs
    on ``meta`` (a no-op); buffers (rotary ``inv_freq``, Gemma's
    ``embed_scale``, gemma_pytorch's ``freqs_cis``) are created and computed
    by the module's own ``__init__`` on the real device, because no
    checkpoint holds the non-persistent ones.  A model built inside needs only
    ``gs.load_into``.  Ties made after registration (``tie_weights``) are kept:
    a parameter already on ``meta`` is registered as it is.  Dtypes follow the
    model's own choices, ``torch.set_default_dtype`` included.

    Like accelerate's ``init_empty_weights(include_buffers=False)`` it patches
    ``nn.Module.register_parameter`` for the duration: models built on other
    threads meanwhile are affected too.

    >>> with gs.init_empty():
    ...     model = transformers.AutoModelForCausalLM.from_config(config)
    >>> gs.load_into(model, "gemma-2b-hf/")
    """
    with _PATCH_LOCK:
        register = torch.nn.Module.register_parameter

        def register_on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
            if param is not None and not param.is_meta:
                attrs = dict(vars(param))
                param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
                vars(param).update(attrs)
            register(module, name, param)

        torch.nn.Module.register_parameter = register_on_meta
        try:
            yield
        finally:
            torch.nn.Module.register_parameter = register


def int8_rows_target(module: torch.nn.Module, prefix: str) -> QuantTarget | None:
    """gemma_pytorch's quantized ``Linear``/``Embedding`` (``quant=True``): an int8 ``weight`` [N, K]
    beside a floating ``weight_scaler`` [N].  That is our int8 contract layout, so a float
    checkpoint is quantized on read straight into it (the scale in the scaler's own dtype)."""
    scaler = module._parameters.get("weight_scaler")
    if scaler is None:
        scaler = module._buffers.get("weight_scaler")
        if scaler is None:   # every module of a float model: asked first
            return None
    weight = module._parameters.get("weight")
    if weight is None or weight.dtype != torch.int8 or weight.dim() != 2:
        return None
    if not scaler.is_floating_point() or tuple(scaler.shape) != (weight.shape[0],):
        return None
    p = f"{prefix}." if prefix else ""
    return QuantTarget("int8", (weight.shape[0], weight.shape[1]), weight, scaler, None, 0, (f"{p}weight_scaler",))


def _hook(module: torch.nn.Module, name: str, on_class: dict[type, bool]):
    """``module.<name>`` when its class or the instance defines it, else None, without
    ``nn.Module.__getattr__``'s failed lookup per module (a hook is never a parameter, buffer or
    submodule): a few microseconds per module on every load.  ``on_class``: whether each class
    has it, filled as the caller's walk meets classes (a failed ``hasattr`` is the costly part)."""
    kind = type(module)
    found = on_class.get(kind)
    if found is None:
        found = on_class[kind] = hasattr(kind, name)
    if found or name in module.__dict__:
        return getattr(module, name)
    return None


def module_walk(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``model.named_modules(remove_duplicate=False)`` as a list: one walk of a model serves every
    step of a load that visits its modules (a model of 2,000 modules costs ~1 ms per walk).  Pass
    it to the functions below only while the model's modules stay as they were walked."""
    return list(model.named_modules(remove_duplicate=False))


def _unique(walk: list[tuple[str, torch.nn.Module]]) -> Iterator[tuple[str, torch.nn.Module]]:
    """The walk as ``named_modules()`` gives it: each module once, at its first prefix."""
    seen: set[int] = set()
    for prefix, module in walk:
        if id(module) not in seen:
            seen.add(id(module))
            yield prefix, module


def quant_targets(model: torch.nn.Module, walk: list[tuple[str, torch.nn.Module]] | None = None
                  ) -> dict[str, QuantTarget]:
    """Quantized destinations by weight name: modules that describe theirs (``gs_quant_target()``,
    gemma_stream's QuantLinear/QuantEmbedding) and gemma_pytorch's int8 layers.  ``walk``:
    :func:`module_walk` of the model, when the caller holds it."""
    targets, on_class = {}, {}
    for prefix, module in (model.named_modules() if walk is None else _unique(walk)):
        describe = _hook(module, "gs_quant_target", on_class)
        target = describe(prefix) if describe is not None else int8_rows_target(module, prefix)
        if target is not None:
            targets[f"{prefix}.weight" if prefix else "weight"] = target
    return targets


class MetaTensors(dict):
    """:func:`meta_tensors`' answer: id -> (first name, tensor), and ``slots``, the (parameter or
    buffer dict, attribute, id) of every place one of them sits, so that :func:`materialize` puts
    the new tensors there without walking the model's modules again."""

    def __init__(self) -> None:
        super().__init__()
        self.slots: list[tuple[dict, str, int]] = []


def meta_tensors(model: torch.nn.Module, walk: list[tuple[str, torch.nn.Module]] | None = None) -> MetaTensors:
    """Every parameter and buffer (persistent or not) still on ``meta``: id -> (first name, tensor)."""
    out = MetaTensors()
    slots = out.slots
    for prefix, module in (module_walk(model) if walk is None else walk):
        for slot in (module._parameters, module._buffers):
            for attr, tensor in slot.items():
                if tensor is not None and tensor.is_meta:
                    key = id(tensor)
                    if key not in out:
                        out[key] = (f"{prefix}.{attr}" if prefix else attr, tensor)
                    slots.append((slot, attr, key))
    return out


def same_kind(old: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """``data`` as the same kind of tensor as ``old``: its Parameter class and ``requires_grad``."""
    if type(old) is torch.nn.Parameter and type(data) is torch.Tensor:
        # what Parameter(data) runs for a plain tensor, without its Python frame or the metaclass's
        # isinstance hook (benchmarks/NOTES.md 44)
        return torch.Tensor._make_subclass(torch.nn.Parameter, data, old.requires_grad)
    if not isinstance(old, torch.nn.Parameter):
        return data
    try:
        return type(old)(data, requires_grad=old.requires_grad)
    except TypeError:
        return torch.nn.Parameter(data, requires_grad=old.requires_grad)


def swap_tensors(model: torch.nn.Module, replacement: dict[int, torch.Tensor],
                 walk: list[tuple[str, torch.nn.Module]] | None = None) -> None:
    """Put ``replacement[id(old)]`` wherever ``old`` sits (every module, parameter and buffer slot)."""
    if not replacement:
        return
    for _, module in (module_walk(model) if walk is None else walk):
        for slot in (module._parameters, module._buffers):
            if slot:
                for attr, old in slot.items():   # values replaced, no key added: iterating stays valid
                    if id(old) in replacement:   # id(None) is never a key: None is alive, unlike a freed tensor
                        slot[attr] = replacement[id(old)]


def materialize(model: torch.nn.Module, device: torch.device,
                metas: dict[int, tuple[str, torch.Tensor]] | None = None,
                walk: list[tuple[str, torch.nn.Module]] | None = None) -> dict[int, torch.Tensor]:
    """Allocate (uninitialized) every tensor still on ``meta`` on ``device``, keeping ties,
    Parameter classes and layouts; returns ``id(meta tensor) -> its replacement`` for ``Plan.rebind``.
    ``metas``: :func:`meta_tensors` of the model, when the caller already holds it (keys taken
    out of it are not allocated); the model must not have changed since but for those."""
    if metas is None:
        metas = meta_tensors(model, walk)
    replacement = {key: same_kind(old, _empty(old, device)) for key, (_, old) in metas.items()}
    if isinstance(metas, MetaTensors):   # where each sits, found by the same walk (ties included)
        for slot, attr, key in metas.slots:
            new = replacement.get(key)
            if new is not None:   # a key the caller took out is left where it is
                slot[attr] = new
    else:
        swap_tensors(model, replacement, walk)
    return replacement


def _empty(meta: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Uninitialized memory for ``meta`` on ``device``, laid out as ``meta`` is (a transposed
    parameter stays transposed), so a job planned on any view of it writes the same elements."""
    if meta.is_contiguous():
        # size= by keyword: a torch.Size passed by position is parsed against empty()'s
        # named-dimension overload first (benchmarks/NOTES.md 44)
        return torch.empty(size=meta.shape, dtype=meta.dtype, device=device)
    return torch.empty_like(meta, device=device)   # dense layouts kept; an overlapping one made contiguous


def run_post_load_hooks(model: torch.nn.Module, threads: int,
                        walk: list[tuple[str, torch.nn.Module]] | None = None) -> None:
    """``gs_post_load()`` of every module that has one (the int4 repack for torch's CPU kernel),
    on the loader's thread count: the native repack releases the GIL, and each hook touches
    only its own module's tensors (QuantLinear locks a weight it shares)."""
    modules = model.modules() if walk is None else (module for _, module in _unique(walk))
    on_class: dict[type, bool] = {}
    hooks = [hook for module in modules if (hook := _hook(module, "gs_post_load", on_class)) is not None]
    workers = min(len(hooks), threads)
    if workers <= 1:
        for hook in hooks:
            hook()
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gemma_stream_post") as pool:
        for future in [pool.submit(hook) for hook in hooks]:
            future.result()
