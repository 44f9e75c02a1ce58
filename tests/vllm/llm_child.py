"""Run one vLLM LLM in this process and print what the tests compare, as one JSON line.

    python llm_child.py '[[MODEL_DIR, LOAD_FORMAT, EXTRA_CONFIG, DTYPE(, TENSOR_PARALLEL)], ...]'

Prints "RESULTS " and a JSON list, one entry per run: {"tokens": greedy token ids per prompt, "weights": sha256 of every parameter
after the loader ran and before vLLM's post-load processing, "path": the gemma_stream
path taken (or null), "split": the streaming path's timings and copy counts}.  The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
so the hooks below see the model; with tensor parallelism the model lives in vLLM's
worker processes and only the tokens come back.
"""

import hashlib
import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.model_executor.model_loader import base_loader  # noqa: E402

PROMPTS = [[2, 17, 33, 5, 91], [2, 200, 7], [2, 64, 64, 64, 11, 12, 13]]
seen: dict = {"weights": None, "path": None, "reason": None, "split": None, "torch_load_calls": 0}
post_load = base_loader.process_weights_after_loading
torch_load = torch.load


def counting_torch_load(*args, **kwargs):
    seen["torch_load_calls"] += 1
    return torch_load(*args, **kwargs)


torch.load = counting_torch_load   # vLLM's .bin iterator calls torch.load; gemma_stream must not


def hash_then_process(model, model_config, target_device):
    digest = {}
    for name, param in sorted(model.named_parameters()):
        data = param.detach().contiguous().view(torch.uint8) if param.numel() else param.detach()
        digest[name] = hashlib.sha256(data.numpy().tobytes()).hexdigest()[:16] + f":{param.dtype}"
    seen["weights"] = digest
    return post_load(model, model_config, target_device)


base_loader.process_weights_after_loading = hash_then_process


def run(model_dir: str, load_format: str, extra: dict, dtype: str, tensor_parallel: int = 1) -> dict:
    seen.update(weights=None, path=None, reason=None, split=None, torch_load_calls=0)
    llm = LLM(model=model_dir, load_format=load_format, model_loader_extra_config=extra, dtype=dtype,
              enforce_eager=True, max_model_len=64, max_num_seqs=4, seed=0, gpu_memory_utilization=0.5,
              tensor_parallel_size=tensor_parallel)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                           SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    del llm
    return {"tokens": tokens, **seen}


def main() -> None:
    from gemma_stream.vllm.loader import GemmaStreamLoader

    load = GemmaStreamLoader.load_weights

    def recording(self, model, model_config):
        load(self, model, model_config)
        seen["path"], seen["reason"], seen["split"] = self.last_path, self.last_reason, self.last_split

    GemmaStreamLoader.load_weights = recording
    runs = json.loads(sys.argv[1])     # [[model_dir, load_format, extra, dtype], ...]
    results = [run(*spec) for spec in runs]
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
