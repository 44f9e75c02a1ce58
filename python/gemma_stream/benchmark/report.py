"""One table, the issue targets as met/missed lines, JSON and a bar chart, from one run's rows."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from ..cli_text import human_bytes
from ..config import meminfo
from .runner import CLEAN_OTHERS_CPU, Row, Workload

__all__ = ["MEASURABLE_MODEL_BYTES", "Target", "evaluate_targets", "format_table", "format_targets", "machine_info",
           "memory_measurable", "write_json", "write_plot"]

_GIB = 2**30
_SLACK = 64 << 20
#: below this model size, peak memory is not worth a ratio: the child's baseline (interpreter, torch,
#: allocator arenas) moves by a few MiB between runs, so a tiny model reads as 0.8x or 1.3x of itself
MEASURABLE_MODEL_BYTES = 256 << 20


def memory_measurable(model_bytes: int) -> bool:
    return model_bytes >= MEASURABLE_MODEL_BYTES


def memory_note(model_bytes: int) -> str:
    """What the table says instead of peak/model ratios when the model is too small to measure."""
    return (f"memory: the model is {human_bytes(model_bytes)}, too small to measure peak memory against (the "
            f"process's own baseline moves by a few MiB); peak/model is shown from "
            f"{human_bytes(MEASURABLE_MODEL_BYTES)}")

# reference rows the other rows are compared with: (loader id, column header, "of" = fraction, "vs" = speedup)
_BOUND_REFS = [("pread_2t", "of bound"), ("odirect_2t", "of O_DIRECT"), ("read_1t", "of read-1t")]
_SPEED_REFS = [("safetensors", "vs st"), ("transformers", "vs tf"), ("torch_load_mmap", "vs tl-mmap"),
               ("gs_plain", "vs bf16")]


def _by_id(rows: list[Row]) -> dict[str, Row]:
    return {r.loader: r for r in rows if r.status == "ok" and r.runs}


def _ratio(ref: Row | None, row: Row) -> float | None:
    if ref is None or not row.runs or not ref.seconds or not row.seconds:
        return None
    return ref.seconds / row.seconds


def format_table(workload: Workload, rows: list[Row], *, cold: bool, quantize: str | None = None) -> str:
    ok = _by_id(rows)
    refs = [(rid, head, "of") for rid, head in _BOUND_REFS if rid in ok]
    refs += [(rid, head, "vs") for rid, head in _SPEED_REFS
             if rid in ok and (rid != "torch_load_mmap" or workload.fmt == "ckpt")]
    repeated = any(len(r.runs) > 1 for r in rows)
    measurable = memory_measurable(workload.model_bytes)
    header = ["loader", "reads", *(["quiet"] if repeated else []), "s", *(["min s"] if repeated else []), "GB/s",
              "peak", "peak/model", "resident"]
    if quantize:
        header.append("SQNR dB")
    header += [head for _, head, _ in refs]
    lines = []
    for row in rows:
        if row.status != "ok" or not row.runs:
            lines.append([row.label, f"{row.status}: {row.message}"])
            continue
        d = row.as_dict(workload.data_bytes)
        reads = workload.fmt if row.reads == "primary" else row.reads
        cells = [row.label, reads, *([f"{d['quiet_runs']}/{len(row.runs)}"] if repeated else []),
                 f"{d['seconds']:.2f}", *([f"{d['min_seconds']:.2f}"] if repeated else []),
                 f"{d['gb_per_s']:.2f}",
                 human_bytes(d["peak_bytes"]), *([f"{d['peak_over_model']:.2f}x", row.resident] if measurable else ["-", "-"])]
        if quantize:
            sqnr = d.get("sqnr_db")
            cells.append(f"{sum(sqnr.values()) / len(sqnr):.1f}" if sqnr else "")
        for rid, _, how in refs:
            value = _ratio(ok[rid], row)
            cells.append("" if value is None or rid == row.loader else
                         (f"{value:.2f}" if how == "of" else f"{value:.2f}x"))
        lines.append(cells)
    widths = [max(len(header[i]), *(len(c[i]) for c in lines if len(c) == len(header))) for i in range(len(header))]
    mode = "cold (page cache evicted before each load)" if cold else "warm (file in the page cache)"
    out = [f"{workload.title}; model {human_bytes(workload.model_bytes)}, read {human_bytes(workload.data_bytes)}; "
           f"{mode}" + (f"; quantize {quantize}" if quantize else ""),
           "  ".join(h.rjust(w) if i > 1 else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    others = [r.get("others_cpu", 0.0) for row in rows for r in row.runs]
    if others and max(others) > CLEAN_OTHERS_CPU:
        out.insert(1, f"NOTE: other processes used up to {max(others):.0%} of the CPUs during a load (median "
                      f"{statistics.median(others):.0%}); s is the median over the quiet runs (others < "
                      f"{CLEAN_OTHERS_CPU:.0%}; 'quiet' counts them), or over all runs when none was quiet")
    for cells in lines:
        if len(cells) != len(header):
            out.append(f"{cells[0].ljust(widths[0])}  {cells[1]}")
            continue
        out.append("  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))))
    legend = {"of bound": "2-thread pread bound", "of O_DIRECT": "O_DIRECT 2-thread bound",
              "of read-1t": "1-thread sequential pread", "vs st": "safetensors load_model",
              "vs tf": "transformers from_pretrained", "vs tl-mmap": "torch.load(mmap) + load_state_dict",
              "vs bf16": "the unquantized gemma_stream load"}
    for row in rows:
        if row.status == "ok" and row.errors:
            out.append(f"NOTE: {row.label}: {row.message}")
    if not measurable:
        out.append(f"NOTE: {memory_note(workload.model_bytes)}")
    out.append("s: median seconds (min s: fastest run) until all weights are in memory (+touch: one read per page, the weights stay "
               "mapped); GB/s: checkpoint bytes / s; peak: VmHWM over the RSS before the load;")
    out.append("resident: anon or file-backed after the load (a/f: fractions of the model); 'of X' = X's s / this "
               "row's s (1.00 = as fast as X); 'vs X' = speedup over X; X: "
               + ", ".join(f"{h} = {legend[h]}" for _, h, _ in refs) + ".")
    return "\n".join(out)


@dataclass
class Target:
    issue: int
    text: str
    measured: str
    met: bool | None     # None: could not be evaluated (a row is missing)

    def line(self) -> str:
        flag = {True: "MET ", False: "MISS", None: "n/a "}[self.met]
        return f"  [{flag}] issue {self.issue}: {self.text}: {self.measured}"


def format_targets(targets: list[Target]) -> str:
    """The project's own issue targets as MET/MISS lines (``bench --targets``; not for users)."""
    return "\n".join(["targets:", *(t.line() for t in targets)]) if targets else ""


def evaluate_targets(workload: Workload, rows: list[Row], *, cold: bool, quantize: str | None = None,
                     group_size: int = 128) -> list[Target]:
    ok = _by_id(rows)
    out: list[Target] = []

    requested = {r.loader: r for r in rows}

    def speed(issue: int, row_id: str, ref_id: str, factor: float, text: str) -> None:
        if row_id not in requested or ref_id not in requested:
            return   # the target compares with a loader this run was not asked for
        row, ref = ok.get(row_id), ok.get(ref_id)
        if row is None or ref is None:
            failed = requested[row_id] if row is None else requested[ref_id]
            out.append(Target(issue, text, f"{failed.loader}: {failed.status} {failed.message}"[:120], None))
            return
        value = _ratio(ref, row)
        best = ref.min_seconds / row.min_seconds
        out.append(Target(issue, text, f"{value:.2f}" + (f" (fastest runs: {best:.2f})" if len(row.runs) > 1 else ""),
                          value >= factor))

    for row_id in ("gs_native", "gs_python", "gs_hf"):
        row = ok.get(row_id)
        if row is None:
            continue
        budget = 1.03 * row.model_bytes + _SLACK
        what = "quantized model" if quantize else "model"
        text = f"{row.label} peak <= 1.03 x {what} + 64 MiB"
        if not memory_measurable(row.model_bytes):
            out.append(Target(4 if quantize else 2, text, f"not measured: {human_bytes(row.model_bytes)} model", None))
            continue
        out.append(Target(4 if quantize else 2, text,
                          f"{row.peak_bytes / _GIB:.2f} GiB vs {budget / _GIB:.2f} GiB "
                          f"({row.peak_bytes / row.model_bytes:.3f}x)", row.peak_bytes <= budget))
    if quantize:
        speed(4, "gs_native", "gs_plain", 1 / 1.5,
              "quantized load time <= 1.5 x the plain bf16 load (plain s / quantized s >= 0.67)")
        expected = 40.0 if quantize == "int8" else {32: 21.0, 64: 20.0, 128: 19.0, 256: 18.0}.get(group_size, 18.0)
        row = ok.get("gs_native")
        sqnr = row.last("sqnr_db") if row else None
        if sqnr:
            worst = min(sqnr.values())
            out.append(Target(4, f"SQNR >= {expected:.0f} dB on Gaussian weights (min over sampled tensors)",
                              f"{worst:.1f} dB", worst >= expected))
        for ref in ("twostep_torch", "twostep_torchao"):
            if ref in ok:
                speed(4, "gs_native", ref, 1.0, f"faster than {ok[ref].label}")
        return out
    if cold:
        speed(2, "gs_native", "read_1t", 0.9, "cold >= 0.9 x single-threaded sequential read")
        speed(7, "gs_native", "pread_2t", 0.95, "cold >= 0.95 x cold bound (2-thread pread)")
    else:
        speed(2, "gs_native", "safetensors", 2.0, "warm >= 2x faster than safetensors load_model")
        speed(7, "gs_native", "safetensors", 3.0, "warm >= 3x faster than safetensors load_model")
        speed(7, "gs_native", "transformers", 1.5, "warm >= 1.5x faster than transformers (all weights touched)")
        if workload.data_bytes == workload.model_bytes:   # with a dtype change the bound writes other bytes
            speed(7, "gs_native", "pread_2t", 0.9, "warm >= 0.9 x warm bound (2-thread pread)")
    if workload.fmt == "ckpt":
        speed(3, "gs_native", "torch_load_mmap", 1.0, "faster than gemma_pytorch's torch.load(mmap) + load_state_dict")
    if "gs_mmap" in ok:
        speed(7, "gs_mmap", "torch_load_mmap_assign", 1 / 1.2, "mode='mmap' within 1.2x of torch.load(mmap) + assign")
    if "gs_hf" in ok:
        speed(5, "gs_hf", "transformers", 1.0, "gemma_stream.hf.from_pretrained faster than transformers")
    if "gs_hf_mmap" in ok:   # transformers 5 maps same-dtype files: the like-for-like comparison
        speed(5, "gs_hf_mmap", "transformers", 1.0,
              "gemma_stream.hf.from_pretrained(mode='mmap') faster than transformers (all weights touched)")
    return out


def machine_info() -> dict:
    import gemma_stream as gs

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        cpu = platform.processor()  # no /proc (macOS, Windows)
    mem = meminfo("MemTotal") or 0
    commit = ""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=os.path.dirname(os.path.abspath(gs.__file__))).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    native_built = None
    try:
        from gemma_stream import _native
        native_built = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(os.path.getmtime(_native.__file__)))
    except (ImportError, OSError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "native_built_utc": native_built, "mem_total_gib": round(mem / _GIB, 1), "kernel": platform.release(),
            "python": platform.python_version(), "torch": torch.__version__, "gemma_stream": gs.__version__,
            "native": gs.native_available(), "git": commit}


def write_json(path: str, document: dict) -> None:
    with open(path, "w") as f:
        json.dump(document, f, indent=2, default=str)
        f.write("\n")


def write_plot(path: str, workload: Workload, rows: list[Row], *, title: str) -> bool:
    """Bar chart of seconds and peak memory per loader; False (with a message) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install matplotlib (or gemma_stream[plot])", file=sys.stderr)
        return False
    done = [r for r in rows if r.status == "ok" and r.runs]
    labels = [r.label for r in done]
    colors = ["#1f77b4" if r.loader.startswith("gs") else ("#7f7f7f" if r.kind == "bound" else "#ff7f0e")
              for r in done]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 0.45 * len(done) + 1.8), sharey=True)
    y = range(len(done))
    left.barh(y, [r.seconds for r in done], color=colors)
    left.set_xlabel("seconds to all weights in memory (median of quiet runs)")
    for i, r in enumerate(done):
        left.text(r.seconds, i, f" {r.seconds:.2f}", va="center", fontsize=8)
    right.barh(y, [r.peak_bytes / _GIB for r in done], color=colors)
    right.axvline(workload.model_bytes / _GIB, color="k", linestyle="--", linewidth=1)
    right.text(workload.model_bytes / _GIB, -0.8, " model size", fontsize=8)
    right.set_xlabel("peak RSS over the RSS before the load, GiB (mapped file pages count)")
    for i, r in enumerate(done):
        kind = "" if r.resident == "anon" else f" ({r.resident})"
        right.text(r.peak_bytes / _GIB, i, f" {r.peak_bytes / r.model_bytes:.2f}x{kind}", va="center", fontsize=8)
    left.set_yticks(list(y))
    left.set_yticklabels(labels, fontsize=8)
    left.invert_yaxis()
    from matplotlib.patches import Patch
    left.legend(handles=[Patch(color="#1f77b4", label="gemma_stream"), Patch(color="#ff7f0e", label="other loaders"),
                          Patch(color="#7f7f7f", label="bounds: the same bytes, no parsing")],
                 loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
