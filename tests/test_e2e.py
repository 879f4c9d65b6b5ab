"""The recipe, end to end, the way users start it: `accelerate launch recipes/grpo.py ...` in a subprocess."""

import json
import os
import subprocess
import sys

from transformers import AutoModelForCausalLM

from rlhf.tiny import save_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(script: str, *args: str, num_processes: int = 1) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               os.path.join(ROOT, "recipes", script), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_grpo_recipe_learns_through_accelerate_launch(tmp_path):
    model_dir = save_tiny(str(tmp_path / "tiny"), hidden_size=64, num_layers=2, max_positions=64)
    out = tmp_path / "run"
    launch("grpo.py", "--config", os.path.join(ROOT, "recipes", "configs", "demo_grpo.yaml"),
           "--model_name_or_path", model_dir, "--reward_funcs", "rlhf.tasks.addition:digit_match_reward",
           "--eval_dataset_name", "none", "--output_dir", str(out), "--max_steps", "30", "--prompts_per_step", "8",
           "--num_generations", "8", "--mini_batch_size", "none", "--micro_batch_size", "32", "--max_new_tokens", "4",
           "--learning_rate", "3e-3", "--logging_steps", "1", "--disable_tqdm", "true")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    for key in ("reward/mean", "reward/digit_match_reward/mean", "advantages/std", "entropy", "clip/low_frac",
                "completions/mean_length", "completions/truncated_frac", "grad_norm", "learning_rate",
                "time/generate", "time/score", "time/reference", "time/update", "tokens_per_second"):
        assert key in records[0], key
    rewards = [r["reward/mean"] for r in records]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.2, rewards
    assert AutoModelForCausalLM.from_pretrained(str(out / "model")) is not None
