"""Warm native loads, one thread, median of 7: f32 -> bf16 conversion, int8 and int4 quantize-on-read
of one 4096x4096 f32 tensor (64 MiB). Compares two builds of the engine (issue 19: CPUID dispatch
against target_clones); run it once per build, alternating:

    PYTHONPATH=<checkout>/python python benchmarks/kernel_dispatch_timing.py
"""
import os
import statistics
import tempfile
import time

import torch
from safetensors.torch import save_file

import gemma_stream as gs
from gemma_stream.executors.native import quant_kernels

PATH = os.path.join(tempfile.gettempdir(), "gemma_stream_kernel_timing.safetensors")
ROWS = K = 4096
torch.manual_seed(0)
save_file({"w.weight": torch.randn(ROWS, K)}, PATH)


def model(dtype=torch.float32, quantize=None):
    with torch.device("meta"):
        m = torch.nn.ModuleDict({"w": torch.nn.Linear(K, ROWS, bias=False, dtype=dtype)})
    return gs.quantize_(m, quantize) if quantize else m


out = {}
for case, make in [("f32->bf16", lambda: model(torch.bfloat16)), ("int8", lambda: model(quantize="int8")),
                   ("int4", lambda: model(quantize="int4"))]:
    times = []
    for _ in range(7):
        m = make()
        start = time.perf_counter()
        gs.load_into(m, PATH, backend="native", threads=1)
        times.append(time.perf_counter() - start)
    out[case] = statistics.median(times)
print(quant_kernels(), {k: round(v, 4) for k, v in out.items()})
