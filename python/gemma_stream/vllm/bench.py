"""vLLM model-load benchmark: vLLM's default loader against gemma_stream's direct and streaming paths.

Each measurement is a fresh process running ``LLM(...)`` with the engine in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and reports

* ``load_s``: the loader's own ``load_weights`` (checkpoint -> vLLM parameters),
* ``llm_s``: the whole ``LLM()`` construction (model init, load, profiling, KV cache),
* ``cpu_s``: the CPU time of all the process's threads during that step (what a busy
  machine distorts least; the loader's own threads, vLLM's copy threads and page faults);
* ``peak_mib``: the process's peak RSS during ``load_weights`` above its RSS just before
  (``VmHWM`` reset through ``/proc/self/clear_refs``): the parameters written plus what
  the loader keeps mapped or loaded besides them;
* streaming only, the split of ``load_s``: ``read_wait_s``, the time vLLM's ``load_weights``
  waited for gemma_stream's next window, and ``load_weights_s``, the rest (vLLM's own work:
  its weight loaders copying each tensor into its parameter).

The checkpoint is a Gemma-shaped random model (bf16, vocabulary 32000, hidden 2048,
MQA with head_dim 256, MLP 8192), saved as safetensors and as a torch zip ``.bin``.
Run ``python benchmarks/vllm_bench.py --help`` (the vllm venv of .ci/run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

__all__ = ["main", "make_checkpoint"]

LOADERS = {
    "default": ("auto", {}),
    "direct": ("gemma_stream", {"path": "direct"}),
    "streaming": ("gemma_stream", {"path": "streaming"}),
    # vLLM's load_weights fed tensors already in memory (read, untimed, before it starts), into the
    # same freshly allocated parameters: the floor of any loader that goes through load_weights
    "floor": ("gemma_stream", {"path": "streaming"}),
}


def _config(layers: int) -> dict:
    return {"architectures": ["GemmaForCausalLM"], "model_type": "gemma", "vocab_size": 32000,
            "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": layers,
            "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256, "max_position_embeddings": 512,
            "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
            "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "torch_dtype": "bfloat16"}


def make_checkpoint(root: str, layers: int, fmt: str) -> str:
    """Write (once) a random Gemma-shaped checkpoint in ``fmt`` ("safetensors" | "bin"); returns its directory."""
    import torch

    directory = os.path.join(root, f"gemma-{layers}l-{fmt}")
    done = os.path.join(directory, ".complete")
    if os.path.exists(done):
        return directory
    os.makedirs(directory, exist_ok=True)
    cfg = _config(layers)
    h, inter, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "model.norm.weight": (h,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                       p + "mlp.down_proj.weight": (h, inter), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    generator = torch.Generator().manual_seed(0)
    state = {name: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
             for name, shape in shapes.items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(state, os.path.join(directory, "pytorch_model.bin"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    open(done, "w").close()
    return directory


def _floor(self, model, model_config, ckpt) -> None:
    """``GemmaStreamLoader._load_streaming`` for the "floor" loader: every tensor read into memory first,
    then only ``model.load_weights`` timed (``load_weights_s``; ``load_s`` includes the read)."""
    from ..stream import stream_checkpoint

    ready = [(name, tensor.clone()) for name, tensor in stream_checkpoint(ckpt)]
    start, cpu = time.perf_counter(), time.process_time()
    model.load_weights(iter(ready))
    self.last_split = {"read_wait_s": 0.0, "load_weights_s": time.perf_counter() - start,
                       "load_weights_cpu_s": time.process_time() - cpu}


def _child(model_dir: str, load_format: str, extra: dict, floor: bool = False) -> dict:
    """One LLM() in this process; returns the figures."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    from .loader import GemmaStreamLoader

    figures: dict = {}

    def status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def timed(load_weights):
        def wrapper(self, model, model_config):
            before = status("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            start, cpu = time.perf_counter(), time.process_time()
            load_weights(self, model, model_config)
            figures["load_s"] = time.perf_counter() - start
            figures["cpu_s"] = time.process_time() - cpu
            figures["peak_mib"] = (status("VmHWM") - before) / 2**20
            figures.update(getattr(self, "last_split", {}))
            figures["path"] = getattr(self, "last_path", "") or "default"
        return wrapper

    if floor:
        GemmaStreamLoader._load_streaming = _floor
    DefaultModelLoader.load_weights = timed(DefaultModelLoader.load_weights)
    GemmaStreamLoader.load_weights = timed(GemmaStreamLoader.load_weights)
    start = time.perf_counter()
    LLM(model=model_dir, load_format=load_format, model_loader_extra_config=extra, dtype="bfloat16",
        skip_tokenizer_init=True, enforce_eager=True, max_model_len=256, max_num_seqs=2, seed=0,
        gpu_memory_utilization=0.5)   # on CPU: the share of memory vLLM checks is free at start
    figures["llm_s"] = time.perf_counter() - start
    return figures


def _reloads(model_dir: str, rounds: int) -> dict:
    """In one process, after ``LLM()`` has loaded the model once (direct path): load it again
    ``rounds`` times each way, interleaved, into the same (already touched) parameters, timing
    ``direct``, ``streaming`` (mapped windows), ``streaming_copy`` (windows read into buffers) and
    ``vllm_only``: vLLM's ``load_weights`` fed tensors already in memory, the floor of any loader that
    goes through it.  Returns seconds per way, per round."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    from ..formats import open_checkpoint
    from ..stream import stream_checkpoint
    from .loader import GemmaStreamLoader

    times: dict[str, list[float]] = {}
    load_weights = GemmaStreamLoader.load_weights

    def reload(self, model, model_config):
        load_weights(self, model, model_config)
        ckpt = open_checkpoint(model_dir)
        for _ in range(rounds):
            for way in ("direct", "streaming", "streaming_copy", "vllm_only"):
                start = time.perf_counter()
                if way == "direct":
                    self._load_direct(model, ckpt)
                elif way == "vllm_only":
                    ready = [(name, tensor.clone()) for name, tensor in stream_checkpoint(ckpt)]
                    start = time.perf_counter()
                    model.load_weights(iter(ready))
                    del ready
                else:
                    model.load_weights(stream_checkpoint(ckpt, mode="mmap" if way == "streaming" else "copy"))
                times.setdefault(way, []).append(time.perf_counter() - start)

    GemmaStreamLoader.load_weights = reload
    LLM(model=model_dir, load_format="gemma_stream", model_loader_extra_config={"path": "direct"}, dtype="bfloat16",
        skip_tokenizer_init=True, enforce_eager=True, max_model_len=256, max_num_seqs=2, seed=0,
        gpu_memory_utilization=0.5)   # on CPU: the share of memory vLLM checks is free at start
    return times


def _run_child(model_dir: str, loader: str) -> dict:
    load_format, extra = LOADERS[loader]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    out = subprocess.run([sys.executable, "-m", "gemma_stream.vllm.bench", "--child", model_dir, load_format,
                          json.dumps(extra)] + (["--floor"] if loader == "floor" else []),
                         capture_output=True, text=True, env=env, timeout=1800)
    lines = [line for line in out.stdout.splitlines() if line.startswith("FIGURES ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{loader} on {model_dir} failed:\n{out.stderr[-4000:]}")
    return json.loads(lines[-1][len("FIGURES "):])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=7, help="decoder layers (7: 0.97 GB in bf16; 18: 2.28 GB, "
                        "Gemma 2B's depth with half its MLP and a 32000 vocabulary)")
    parser.add_argument("--formats", default="safetensors,bin")
    parser.add_argument("--loaders", default="default,direct,streaming",
                        help=f"comma-separated, of {', '.join(LOADERS)} (floor: vLLM's load_weights from memory)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; each loads with every loader once, in turn")
    parser.add_argument("--root", default="benchmarks/out/vllm", help="where the checkpoints are written (kept)")
    parser.add_argument("--json", default="benchmarks/out/vllm_bench.json")
    parser.add_argument("--reloads", type=int, default=0, metavar="N",
                        help="instead: per format, one process reloads the model N times each way (direct, "
                             "streaming mapped / copied, vLLM's load_weights from memory) and prints medians")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reloads:
        for fmt in args.formats.split(","):
            times = _reloads(make_checkpoint(args.root, args.layers, fmt), args.reloads)
            print(f"{fmt:12s} " + "   ".join(f"{way} {statistics.median(t):.3f} s" for way, t in times.items()) +
                  f"   (medians of {args.reloads})", flush=True)
            print("RELOADS " + json.dumps({"format": fmt, "layers": args.layers, "seconds": times}), flush=True)
        return 0
    if args.child:
        figures = _child(args.child[0], args.child[1], json.loads(args.child[2]), floor=args.floor)
        print("FIGURES " + json.dumps(figures), flush=True)
        return 0
    rows, ratio_rows = [], []
    for fmt in args.formats.split(","):
        model_dir = make_checkpoint(args.root, args.layers, fmt)
        size = sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir))
        loaders = args.loaders.split(",")
        # rounds outermost, each starting one loader further on: the loaders of one round share the machine's state
        by_loader: dict[str, list[dict]] = {loader: [] for loader in loaders}
        for r in range(args.repeat):
            for loader in loaders[r % len(loaders):] + loaders[:r % len(loaders)]:
                by_loader[loader].append(_run_child(model_dir, loader))
        for loader in loaders:
            runs = by_loader[loader]
            row = {"format": fmt, "loader": loader, "path": runs[0]["path"], "gb": size / 1e9, "runs": runs}
            for key in ("load_s", "cpu_s", "llm_s", "peak_mib", "read_wait_s", "load_weights_s", "load_weights_cpu_s"):
                if all(key in r for r in runs):
                    row[key] = statistics.median(r[key] for r in runs)
            rows.append(row)
            split = (f"   (waiting for reads {row['read_wait_s']:.2f} s, vLLM load_weights {row['load_weights_s']:.2f} s"
                     f", CPU {row['load_weights_cpu_s']:.2f} s)" if "read_wait_s" in row else "")
            print(f"{fmt:12s} {loader:10s} load {row['load_s']:6.2f} s (CPU {row['cpu_s']:5.2f} s)   "
                  f"LLM() {row['llm_s']:6.2f} s   "
                  f"peak +{row['peak_mib']:7.0f} MiB   ({row['gb']:.2f} GB, {len(runs)} run(s)){split}", flush=True)
        for slower, faster in (("streaming", "direct"), ("default", "direct")):
            if slower in by_loader and faster in by_loader:
                ratios = sorted(a["load_s"] / b["load_s"] for a, b in zip(by_loader[slower], by_loader[faster]))
                ratio_rows.append({"format": fmt, "ratio": f"{slower}/{faster}", "load_s": ratios})
                print(f"{fmt:12s} {slower}/{faster} load time, within rounds: {statistics.median(ratios):.2f}x "
                      f"({ratios[0]:.2f}-{ratios[-1]:.2f})", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"layers": args.layers, "rows": rows, "ratios": ratio_rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
