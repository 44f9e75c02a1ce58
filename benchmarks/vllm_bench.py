"""vLLM model-load benchmark (front end of gemma_stream.vllm.bench); run it in the vllm venv of .ci/run.

    python benchmarks/vllm_bench.py                  # 0.97 GB Gemma shape, safetensors and .bin
    python benchmarks/vllm_bench.py --layers 18      # 2.28 GB
    python benchmarks/vllm_bench.py --reloads 7      # in one process: direct vs streaming vs vLLM alone
"""

import sys

from gemma_stream.vllm.bench import main

if __name__ == "__main__":
    sys.exit(main())
