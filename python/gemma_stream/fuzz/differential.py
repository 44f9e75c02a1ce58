"""One fuzz case, differentially: the reference reader against ``load_state_dict`` on each backend."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["CATEGORIES", "run_case"]

CATEGORIES = ("both_reject", "both_accept_equal", "ours_only_accept", "ours_only_reject", "wrong_data", "leaked",
              "crash", "hang", "backends_disagree", "generator_error")


def _flat(obj: Any, prefix: str = "", depth: int = 0) -> dict:
    import torch
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, torch.Tensor):
                out[f"{prefix}{k}"] = v
            elif isinstance(v, dict) and depth < 8:
                out.update(_flat(v, f"{prefix}{k}.", depth + 1))
    return out


def _reference(fmt: str, path: str) -> dict:
    if fmt == "safetensors":
        from safetensors.torch import load_file
        return load_file(path)
    import torch
    obj = torch.load(path, weights_only=True, map_location="cpu")
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("model_state_dict", "state_dict", "model"):
            if isinstance(obj.get(key), dict):
                return _flat(obj[key])
    return _flat(obj)


def _same(a: Any, b: Any) -> str | None:
    """None when two tensor dicts are equal (dtype, shape, bytes; bools by value), else why not."""
    import torch
    if set(a) != set(b):
        return f"names differ: {sorted(set(a) ^ set(b))[:3]}"
    for name in a:
        x, y = a[name], b[name]
        if x.dtype != y.dtype or tuple(x.shape) != tuple(y.shape):
            return f"{name}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}"
        if x.numel() == 0:
            continue
        if x.dtype == torch.bool:
            x, y = x.contiguous().view(torch.uint8) != 0, y.contiguous().view(torch.uint8) != 0
        elif x.element_size() > 0:
            x = x.contiguous().reshape(-1).view(torch.uint8)
            y = y.contiguous().reshape(-1).view(torch.uint8)
        if not torch.equal(x, y):
            return f"{name}: bytes differ"
    return None


def short_reason(e: BaseException) -> str:
    text = str(e).split("\n")[0]
    text = re.sub(r"^.*?(\.safetensors|\.pt)(: data\.pkl)?: ", "", text)
    text = re.sub(r"'[^']*'", "'…'", text)
    text = re.sub(r"\d+", "N", text)
    return f"{type(e).__name__}: {text[:90]}"


def run_case(fmt: str, data: bytes, path: str, backends: tuple[str, ...]) -> dict:
    """Write ``data`` to ``path``, read it with the reference and with each backend; the verdict per backend."""
    import gemma_stream as gs
    with open(path, "wb") as f:
        f.write(data)
    ref_error = None
    try:
        reference = _reference(fmt, path)
    except Exception as e:  # noqa: BLE001 - any refusal of the reference is a refusal
        reference, ref_error = None, short_reason(e)
    verdicts, loaded = {}, {}
    for backend in backends:
        try:
            ours = gs.load_state_dict(path, backend=backend)
        except gs.GemmaStreamError as e:
            verdicts[backend] = ("both_reject", "") if ref_error else ("ours_only_reject", short_reason(e))
            continue
        except Exception as e:  # noqa: BLE001 - exactly what the fuzzer looks for
            verdicts[backend] = ("leaked", short_reason(e))
            continue
        loaded[backend] = ours
        if ref_error:
            verdicts[backend] = ("ours_only_accept", ref_error)
            continue
        why = _same(reference, ours)
        verdicts[backend] = ("both_accept_equal", "") if why is None else ("wrong_data", why)
    if len(loaded) == 2:
        first, second = loaded.values()
        why = _same(first, second)
        if why is not None:
            verdicts["agreement"] = ("backends_disagree", why)
    return verdicts

