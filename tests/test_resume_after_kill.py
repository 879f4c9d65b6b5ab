"""A run killed with SIGKILL and resumed from its latest checkpoint ends with exactly the parameters of a
run that was never interrupted (CPU, fixed seeds)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import make_trainer
from safetensors.torch import load_file

from rlhf.dir_lock import DirectoryLocked
from rlhf.extras.tiny import save_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))


def command(recipe, model_dir, output_dir, *extra):
    return [sys.executable, os.path.join(ROOT, "recipes", f"{recipe}.py"), "--model_name_or_path", model_dir,
            "--dataset_name", "rlhf.extras.addition:train_split", "--reward_funcs", "recipe_rewards:slow_digit_reward",
            "--output_dir", output_dir, "--max_steps", "8", "--save_steps", "1", "--save_total_limit", "2",
            "--prompts_per_step", "4", "--num_generations", "4", "--mini_batch_size", "8", "--micro_batch_size", "4",
            "--num_epochs", "2", "--max_new_tokens", "4", "--max_prompt_length", "16", "--learning_rate", "1e-3",
            "--kl_coef", "0.05", "--disable_tqdm", "true", "--seed", "3", *extra]


def run(args, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": TESTS + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **kwargs)


def finish(process):
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    return output


def weights(directory):
    return {name: tensor for f in sorted(os.listdir(directory)) if f.endswith(".safetensors")
            for name, tensor in load_file(os.path.join(directory, f)).items()}


@pytest.mark.parametrize("recipe", ["grpo", "ppo"])
def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, recipe):
    model_dir = save_tiny(str(tmp_path / "tiny"), hidden_size=32, num_layers=2, max_positions=64)
    straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
    reference = run(command(recipe, model_dir, straight))

    victim = run(command(recipe, model_dir, broken))
    # While it trains, it owns the directory: another run there fails at once, naming it.
    lock = os.path.join(broken, "run.lock")
    deadline = time.time() + 120
    while f'"pid": {victim.pid},' not in (open(lock).read() if os.path.exists(lock) else "") and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(DirectoryLocked, match=rf"in use by another run \(pid {victim.pid} on host"):
        make_trainer(broken)
    marker = os.path.join(broken, "checkpoint-2", "trainer_state.json")
    while not os.path.exists(marker) and victim.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not os.path.exists(os.path.join(broken, "model"))

    output = finish(run(command(recipe, model_dir, broken, "--resume_from_checkpoint", "latest")))
    assert "Resumed from" in output and f"Taking over the stale lock {lock}" in output
    with open(os.path.join(broken, "metrics.jsonl")) as f:  # steps logged after the checkpoint were set aside
        assert [json.loads(line)["step"] for line in f] == list(range(1, 9))
    finish(reference)
    parts = ["model", "critic"] if recipe == "ppo" else ["model"]
    for part in parts:
        expected, resumed = weights(os.path.join(straight, part)), weights(os.path.join(broken, part))
        assert expected.keys() == resumed.keys()
        for name in expected:
            assert torch.equal(expected[name], resumed[name]), f"{part}/{name}"
