"""GPU runs (marked `gpu`, skipped without CUDA; `make test-gpu`): bf16 single-GPU runs of every recipe,
and DeepSpeed ZeRO-2 / ZeRO-3 single-process runs when deepspeed is installed."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from rlhf.extras.tiny import save_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def launch(accelerate_config: str, recipe: str, *args: str) -> None:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               os.path.join(ROOT, "recipes", "accelerate", accelerate_config), "--num_processes", "1",
               os.path.join(ROOT, "recipes", recipe), *args]
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def common_args(tmp_path, recipe: str) -> list[str]:
    model = save_tiny(str(tmp_path / "tiny"), hidden_size=64, num_layers=2, max_positions=64)
    return ["--config", os.path.join(ROOT, "recipes", "configs", f"demo_{recipe}.yaml"), "--model_name_or_path",
            model, "--eval_dataset_name", "none", "--max_steps", "3", "--prompts_per_step", "8", "--num_generations",
            "4", "--mini_batch_size", "16", "--micro_batch_size", "8", "--dtype", "bfloat16", "--kl_coef", "0.05",
            "--disable_tqdm", "true", "--output_dir", str(tmp_path / "run")]


def finite_records(tmp_path) -> list[dict]:
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(isinstance(v, float) and v == v for r in records for v in r.values() if not isinstance(v, int))
    return records


@pytest.mark.parametrize("recipe", ["grpo", "ppo", "reinforce"])
def test_bf16_single_gpu_recipe(tmp_path, recipe):
    launch("single_gpu.yaml", f"{recipe}.py", *common_args(tmp_path, recipe))
    finite_records(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
@pytest.mark.parametrize("stage", ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_deepspeed_single_process(tmp_path, stage):
    launch(stage, "grpo.py", *common_args(tmp_path, "grpo"))
    finite_records(tmp_path)
