"""The benchmark's child process: one loader, one load, one line of JSON.

Every loader runs in a fresh interpreter so that peak memory is its own.  The child imports what the
loader needs and builds the model on ``meta`` first, then takes the baseline: RSS now, and the peak
(VmHWM) reset to it through ``/proc/self/clear_refs``.  The timed part is the load itself (plus, for
loaders whose weights stay mapped from the file, one read per page: time to all weights touched).
Peak = VmHWM - baseline RSS; the resident kind compares RssAnon and RssFile after the load.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import time

import torch

from .bounds import Buffer
from .loaders import LOADERS, Context, Loader  # noqa: F401 - Loader: importable from here, as before
from .probes import cpu_seconds, proc_status, reset_peak

__all__ = ["LOADERS", "Loader", "child_main", "cpu_seconds", "proc_status", "reset_peak", "RESULT_PREFIX"]

RESULT_PREFIX = "GSBENCH_RESULT "


# ---------------------------------------------------------------- after the load

def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.nn.Module):
        return [t for t in (*obj.parameters(), *obj.buffers()) if not t.is_meta]
    if isinstance(obj, dict):   # a state dict (load_state_dict)
        return [t for t in obj.values() if isinstance(t, torch.Tensor)]
    return []


def _plain(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The plain tensors that hold the data, looking inside wrapper subclasses (torchao's quantized weights)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    out = []
    for t in tensors:
        if is_traceable_wrapper_subclass(t):
            names, _ = t.__tensor_flatten__()
            out += _plain([getattr(t, n) for n in names])
        else:
            out.append(t)
    return out


def _unique_storage_bytes(tensors: list[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in _plain(tensors):
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def _touch(obj) -> None:
    """Read one byte per 4 KiB page of every weight (they may still be only mapped)."""
    seen = set()
    for t in _plain(_tensors(obj)):
        # by the tensor's own bytes, not its storage: mapped weights may all view one storage (the file)
        if (t.data_ptr(), t.nbytes) in seen or t.numel() == 0:
            continue
        seen.add((t.data_ptr(), t.nbytes))
        flat = t.detach().reshape(-1).view(torch.uint8)
        int(flat[::4096].sum()) + int(flat[-1])


def _check(obj, names: list[str]) -> float | None:
    """A cheap fingerprint of a few tensors, so loaders that disagree about the values are caught."""
    if not names:
        return None
    if isinstance(obj, dict):
        state = obj
    elif isinstance(obj, torch.nn.Module):
        state = dict(obj.named_parameters())
        state.update(obj.named_buffers())
    else:
        return None
    total = 0.0
    for name in names:
        t = state.get(name)
        if t is None or not t.is_floating_point():
            return None
        flat = t.detach().reshape(-1)
        total += float(flat[:: max(1, flat.numel() // 4096)].double().sum())
    return total


def _sqnr(obj, ctx: Context) -> dict[str, float] | None:
    """SQNR (dB) of a few quantized weights against the checkpoint, from the contract layout."""
    if not ctx.spec.get("quantize") or not isinstance(obj, torch.nn.Module):
        return None
    import gemma_stream as gs

    names = ctx.spec.get("sqnr_names") or []
    modules = dict(obj.named_modules())
    out = {}
    reference = gs.load_state_dict(ctx.files["primary"], keys=names, dtype=torch.float32, progress=False,
                                   state_dict_key=ctx.spec.get("key"))
    for name in names:
        module = modules.get(name.rsplit(".", 1)[0])
        if module is None:
            continue
        state = module.state_dict()
        deq = _dequantize(state, ctx.spec["quantize"])
        if deq is None:
            continue
        w = reference[name]
        err = (w - deq).norm()
        out[name] = float(20 * math.log10(float(w.norm()) / float(err))) if err > 0 else float("inf")
    return out or None


def _dequantize(state: dict, scheme: str) -> torch.Tensor | None:
    """FORMATS.md dequantization from a module's state_dict (the contract layout)."""
    q = state.get("weight")
    if q is None:
        return None
    if type(q) is not torch.Tensor and hasattr(q, "dequantize"):   # torchao's tensor subclasses
        return q.dequantize().float()
    if scheme == "int8" and "weight_scaler" in state:
        return q.float() * state["weight_scaler"].float()[:, None]
    if scheme == "int4" and "weight_scale" in state:
        s, z = state["weight_scale"].float(), state["weight_zero"].float()
        n, half = q.shape
        values = torch.stack([q & 0xF, q >> 4], dim=2).reshape(n, half * 2).float()
        group = values.shape[1] // s.shape[1]
        return ((values.reshape(n, -1, group) - 8) * s[..., None] + z[..., None]).reshape(n, -1)
    return None


def child_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    os.environ.update(spec.get("env") or {})   # e.g. GEMMA_STREAM_CHUNK_MB: config() reads it at load time
    ctx = Context(spec)
    loader = LOADERS[spec["loader"]]
    run = loader.prepare(ctx)
    gc.collect()
    before = proc_status()
    reset = reset_peak()
    cpu0 = cpu_seconds()
    start = time.perf_counter()
    obj = run()
    if spec.get("touch", loader.touch):
        _touch(obj)
    seconds = time.perf_counter() - start
    cpu = cpu_seconds() - cpu0
    peak_hwm = proc_status()["VmHWM"]
    gc.collect()
    after = proc_status()
    result = {
        "loader": spec["loader"], "seconds": seconds, "cpu_seconds": cpu, "peak_bytes": peak_hwm - before["VmRSS"],
        "rss_before": before["VmRSS"], "hwm_reset": reset,
        "anon_bytes": after["RssAnon"] - before["RssAnon"], "file_bytes": after["RssFile"] - before["RssFile"],
        "shmem_bytes": after["RssShmem"] - before["RssShmem"],
        "model_bytes": obj.nbytes if isinstance(obj, Buffer) else _unique_storage_bytes(_tensors(obj)),
    }
    result.update(spec.get("_info", {}))
    if not spec.get("quantize") or not loader.quantizes:
        result["check"] = _check(obj, spec.get("check_names") or [])
    if loader.quantizes:
        result["sqnr_db"] = _sqnr(obj, ctx)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1]))

