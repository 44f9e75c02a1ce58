"""What the benchmark loads: a ``Workload`` (a synthetic Gemma shape written on first use, or a user's
checkpoint), the file sets it has and which one each loader reads."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from ..cli_text import human_bytes, human_count
from . import writers
from .loaders import LOADERS
from .shapes import GemmaShape, tensor_specs

__all__ = ["Workload", "synthetic_workload", "user_workload", "folder_of", "quantized_bytes", "log_progress"]

_FORMATS = ("safetensors", "sharded", "ckpt", "hf")
_HF_SAMPLE = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
              "model.layers.0.mlp.down_proj.weight", "model.norm.weight"]
_GP_SAMPLE = ["embedder.weight", "model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.down_proj.weight",
              "model.norm.weight"]


def log_progress(message: str) -> None:
    """A progress line of the benchmark (writing files, each load) on stderr."""
    print(message, file=sys.stderr, flush=True)


@dataclass
class Workload:
    """The checkpoint(s) of one benchmark and the model they fill."""

    title: str
    fmt: str                       # format of the primary file set
    model: dict                    # the child's model description
    model_dtype: str | None        # torch dtype name of the destination, None = as stored
    stored_dtype: str | None       # torch dtype name in the file (None: mixed)
    data_bytes: int                # tensor bytes in the checkpoint (what a loader reads)
    model_bytes: int               # bytes of the destination model (before quantization)
    file_sets: dict[str, dict] = field(default_factory=dict)   # kind -> {"path", "data", "ready"}
    check_names: list[str] = field(default_factory=list)
    key: str | None = None
    directory: str | None = None
    _make: dict = field(default_factory=dict)                  # kind -> writer callback

    def reads(self, loader_id: str) -> str | None:
        """The file set a loader reads here, or None when it cannot read this workload."""
        want = LOADERS[loader_id].reads
        if want == "primary":
            return "primary"
        if want == "ckpt":
            return "primary" if self.fmt == "ckpt" else ("ckpt" if "ckpt" in self._make else None)
        if want == "safetensors":
            if self.fmt in ("safetensors", "sharded", "hf"):
                return "primary"
            return "safetensors" if "safetensors" in self._make else None
        if want == "hf":   # a Hugging Face directory: config.json next to safetensors with HF names
            return "primary" if self.fmt != "ckpt" and self.model.get("naming") == "hf" else None
        return None

    def ensure(self, kind: str) -> dict:
        entry = self.file_sets.get(kind)
        if entry is None or not entry.get("ready"):
            entry = self._make[kind]()
            self.file_sets[kind] = entry
        return entry

    def all_files(self) -> list[str]:
        return [f for e in self.file_sets.values() if e.get("ready") for f in e["data"]]


def _itemsize(dtype: str) -> int:
    return torch.empty((), dtype=writers.DTYPES[dtype]).element_size()


def synthetic_workload(shape: GemmaShape, dtype: str, fmt: str, workdir: str, model_dtype: str | None = None,
                       naming: str | None = None, durable: bool = True) -> Workload:
    """A Gemma-shaped checkpoint under ``workdir`` (written on first use, reused when complete).

    ``durable=False`` skips the fsync: quicker, but the pages cannot be evicted for cold runs.
    """
    if fmt not in _FORMATS:
        raise ValueError(f"format must be one of {_FORMATS}, not {fmt!r}")
    naming = naming or ("gemma_pytorch" if fmt == "ckpt" else "hf")
    if fmt == "hf" and naming != "hf":
        raise ValueError("an HF directory holds Hugging Face names")
    torch_dtype = writers.DTYPES[dtype]
    folder = os.path.join(workdir, f"{shape.name}-{dtype}-{naming}")
    os.makedirs(folder, exist_ok=True)
    manifest_path = os.path.join(folder, "manifest.json")
    shape_key = shape.as_dict()

    def manifest() -> dict:
        try:
            with open(manifest_path) as f:
                found = json.load(f)
            return found if found.get("shape") == shape_key else {"shape": shape_key}
        except (OSError, ValueError):
            return {"shape": shape_key}

    def record(kind: str, entry: dict) -> dict:
        found = manifest()
        found[kind] = entry
        with open(manifest_path, "w") as f:
            json.dump(found, f, indent=2)
        return entry

    def make(kind: str):
        def write() -> dict:
            cached = manifest().get(kind)
            if cached and all(os.path.exists(p) for p in cached["data"]):
                return dict(cached, ready=True)
            started = time.perf_counter()
            if kind == "ckpt":
                path = os.path.join(folder, "model.ckpt")
                log_progress(f"writing {path} ...")
                writers.write_ckpt(path, shape, torch_dtype, naming, durable=durable)
                data = [path]
            elif kind == "safetensors":
                sub = os.path.join(folder, "single")
                os.makedirs(sub, exist_ok=True)
                path = os.path.join(sub, "model.safetensors")
                log_progress(f"writing {path} ...")
                writers.write_safetensors(path, shape, torch_dtype, naming, durable=durable)
                if naming == "hf":
                    writers.write_config(sub, shape, torch_dtype)
                data = [path]
            else:   # sharded / hf: the layout save_pretrained writes
                path = os.path.join(folder, "sharded")
                os.makedirs(path, exist_ok=True)
                log_progress(f"writing {path}/ ...")
                data = writers.write_sharded(path, shape, torch_dtype, naming, durable=durable)
                if naming == "hf":
                    writers.write_config(path, shape, torch_dtype)
            log_progress(f"  {human_bytes(sum(os.path.getsize(p) for p in data))} in {time.perf_counter() - started:.0f} s")
            return record(kind, {"path": path, "data": data, "ready": True})
        return write

    primary_kind = {"safetensors": "safetensors", "sharded": "sharded", "hf": "sharded", "ckpt": "ckpt"}[fmt]
    makers = {"primary": make(primary_kind), "ckpt": make("ckpt"), "safetensors": make("safetensors")}
    if primary_kind == "sharded":
        makers["sharded"] = makers["primary"]
    itemsize = _itemsize(dtype)
    out_itemsize = _itemsize(model_dtype) if model_dtype else itemsize
    title = (f"Gemma-{shape.name} shape ({human_count(shape.params())} params), {dtype} {fmt}"
             + (f" -> {model_dtype} model" if model_dtype and model_dtype != dtype else ""))
    return Workload(
        title=title, fmt=fmt,
        model={"kind": "gemma", "shape": shape_key, "naming": naming},
        model_dtype=str(writers.DTYPES[model_dtype or dtype]).replace("torch.", ""),
        stored_dtype=str(torch_dtype).replace("torch.", ""),
        data_bytes=shape.params() * itemsize, model_bytes=shape.params() * out_itemsize,
        check_names=_HF_SAMPLE if naming == "hf" else _GP_SAMPLE, directory=folder, _make=makers,
    )


def user_workload(path: str, key: str | None = None, model_dtype: str | None = None) -> Workload:
    """A checkpoint the user already has; the model is rebuilt from its tensor list."""
    import gemma_stream as gs

    infos = gs.inspect(path, state_dict_key=key)
    data = sorted({i.file for i in infos})
    first = data[0]
    fmt = "ckpt" if not first.endswith(".safetensors") else ("sharded" if len(data) > 1 else "safetensors")
    out_dtype = writers.DTYPES[model_dtype] if model_dtype else None
    tensors = [(i.name, list(i.shape), str(i.dtype).replace("torch.", "")) for i in infos]
    model_bytes = sum(math.prod(i.shape) * (torch.empty((), dtype=out_dtype).element_size()
                                            if out_dtype is not None and i.dtype.is_floating_point
                                            else i.dtype.itemsize) for i in infos)
    floats = [i.name for i in infos if i.dtype.is_floating_point and len(i.shape) >= 1]
    hf_ready = fmt != "ckpt" and os.path.exists(os.path.join(folder_of(str(path)), "config.json"))
    workload = Workload(
        title=f"{path} ({len(infos)} tensors, {sum(i.nbytes for i in infos) / 2**30:.2f} GiB, {fmt})", fmt=fmt,
        model={"kind": "records", "tensors": tensors, "naming": "hf" if hf_ready else "user"},
        model_dtype=str(out_dtype).replace("torch.", "") if out_dtype is not None else None,
        stored_dtype=None,
        data_bytes=sum(i.nbytes for i in infos), model_bytes=model_bytes, check_names=floats[:3], key=key,
    )
    workload.file_sets["primary"] = {"path": str(path), "data": data, "ready": True}
    return workload



def folder_of(path: str) -> str:
    """The directory of a checkpoint path (itself when it is one)."""
    return path if os.path.isdir(path) else os.path.dirname(path)


def quantized_bytes(workload: Workload, quantize: str | None, group_size: int) -> int | None:
    """Bytes of the model after quantize_ (every Linear/Embedding weight), for the shape we know."""
    if not quantize or workload.model.get("kind") != "gemma":
        return None
    shape = GemmaShape(**workload.model["shape"])
    itemsize = workload.model_bytes // max(shape.params(), 1)
    total = 0
    for _, dims in tensor_specs(shape, workload.model["naming"]):
        if len(dims) != 2:
            total += math.prod(dims) * itemsize
        elif quantize == "int8":
            total += dims[0] * dims[1] + dims[0] * 4
        else:
            total += dims[0] * dims[1] // 2 + 2 * dims[0] * (dims[1] // group_size) * 2
    return total
