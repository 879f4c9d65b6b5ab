"""The recipe, end to end, the way users start it: `accelerate launch recipes/grpo.py ...` in a subprocess."""

import json
import os
import subprocess
import sys

import torch
from launching import run_launch
from transformers import AutoModelForCausalLM

from rlhf.extras.tiny import save_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(script: str, *args: str, num_processes: int = 1) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               os.path.join(ROOT, "recipes", script), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    result = run_launch(command, env, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_grpo_recipe_learns_through_accelerate_launch(tmp_path):
    model_dir = save_tiny(str(tmp_path / "tiny"), hidden_size=64, num_layers=2, max_positions=64)
    out = tmp_path / "run"
    launch("grpo.py", "--config", os.path.join(ROOT, "recipes", "configs", "demo_grpo.yaml"),
           "--model_name_or_path", model_dir, "--reward_funcs", "rlhf.extras.addition:digit_match_reward",
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
    assert_trained_model_saved(str(out / "model"), model_dir)


def assert_trained_model_saved(saved: str, initial: str, changed: bool = True) -> None:
    """``saved`` holds a whole model of ``initial``'s architecture (every tensor, finite), and with ``changed`` one
    whose weights training moved (a run whose rewards were all equal may legitimately not move them)."""
    trained, start = (AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (saved, initial))
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in start.items()}
    assert all(torch.isfinite(v).all() for v in trained.values())
    assert not changed or any(not torch.equal(trained[k], start[k]) for k in start)


def test_ppo_and_reinforce_recipes_run_through_accelerate_launch(tmp_path):
    from rlhf import ValueModel

    model_dir = save_tiny(str(tmp_path / "tiny"), hidden_size=32, num_layers=2, max_positions=64)
    common = ["--model_name_or_path", model_dir, "--eval_dataset_name", "none", "--max_steps", "3",
              "--prompts_per_step", "4", "--num_generations", "4", "--mini_batch_size", "8", "--micro_batch_size", "8",
              "--logging_steps", "1", "--disable_tqdm", "true", "--kl_coef", "0.05"]
    for recipe, extra in (("ppo", ["--critic_warmup_steps", "1"]), ("reinforce", ["--baseline", "reinforce++"])):
        out = tmp_path / recipe
        launch(f"{recipe}.py", "--config", os.path.join(ROOT, "recipes", "configs", f"demo_{recipe}.yaml"), *common,
               *extra, "--output_dir", str(out))
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2, 3]
        assert all(r["kl_coef"] == 0.05 and "kl/sequence" in r for r in records)
        assert_trained_model_saved(str(out / "model"), model_dir, changed=False)  # 3 steps of a random model
    assert "critic/explained_variance" not in records[0]  # the last run, reinforce, has no critic
    critic_records = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss/value", "critic/value_clip_frac", "critic/explained_variance", "critic/returns_mean",
                "critic/values_mean", "policy/approx_kl", "kl"):
        assert key in critic_records[-1], key
    assert "grad_norm" not in critic_records[0] and "grad_norm" in critic_records[1]  # critic warm-up step
    critic = ValueModel.from_pretrained(str(tmp_path / "ppo" / "critic"))
    values = critic(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 3, dtype=torch.long)).values
    assert values.shape == (1, 3) and torch.isfinite(values).all()


def test_rlhf_chain_reward_model_then_ppo_through_accelerate_launch(tmp_path):
    from rlhf.extras.synthetic import prepare

    paths = prepare(str(tmp_path / "chain"), warm_start_steps=5)
    rm_out = tmp_path / "rm"
    result = launch("train_reward_model.py", "--config", os.path.join(ROOT, "recipes", "configs",
                    "reward_model_synthetic.yaml"), "--model_name_or_path", paths["base"], "--output_dir", str(rm_out),
                    "--num_epochs", "0.1", "--disable_tqdm", "true")
    assert "held-out pairwise accuracy" in result.stdout
    records = [json.loads(line) for line in (rm_out / "metrics.jsonl").read_text().splitlines()]
    assert "eval/accuracy" in records[-1] and "loss" in records[0]
    reward_model = str(rm_out / "model")
    ppo_out = tmp_path / "ppo"
    launch("ppo.py", "--config", os.path.join(ROOT, "recipes", "configs", "ppo_synthetic_rm.yaml"),
           "--model_name_or_path", paths["policy"], "--reward_funcs", reward_model,
           "rlhf.extras.synthetic:gold_reward", "--value_model_name_or_path", reward_model,
           "--output_dir", str(ppo_out), "--max_steps", "2", "--eval_steps", "2", "--prompts_per_step", "4",
           "--mini_batch_size", "8", "--micro_batch_size", "8", "--max_new_tokens", "16", "--disable_tqdm", "true")
    records = [json.loads(line) for line in (ppo_out / "metrics.jsonl").read_text().splitlines()]
    name = "reward/reward_model:model/mean"
    assert name in records[1] and "reward/gold_reward/mean" in records[1], records[1].keys()
    assert records[-1]["step"] == 2 and "eval/reward/gold_reward/mean" in records[-1]
