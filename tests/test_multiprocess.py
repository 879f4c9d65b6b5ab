"""Two CPU processes under `accelerate launch` (gloo) against one process on the same rollout batch."""

import json
import os

import torch
from helpers import gradient, make_trainer, relative_error, varied_reward
from launching import ROOT, free_port, run_launch, run_two_process_worker, two_process_command
from multiproc_worker import EVAL_PROMPTS, EVAL_SETTINGS

from rlhf.rollout import Rollout


def test_two_processes_match_one(tmp_path):
    run_two_process_worker("multiproc_worker.py", str(tmp_path))
    out = torch.load(tmp_path / "result.pt", weights_only=True)
    assert out["world_size"] == 2  # `accelerate launch --cpu` would silently have run one

    # Same prompt on both processes, different samples: each process has its own seed.
    first, second = out["completions"]
    assert len(first) == len(second) == 8 and first != second

    batch = Rollout(**out["batch"])
    # Rewards and group advantages were computed over both processes: the reduced metric is the mean over
    # all 16 completions, and each group of 4 (kept on one process) has advantages summing to 0.
    # Greedy evaluation with the prompts dealt to two processes (4 and 3) equals the one-process evaluation.
    single = make_trainer(tmp_path / "eval_single", **EVAL_SETTINGS).evaluate(EVAL_PROMPTS, step=0)
    assert out["evaluation"] == single and 0 < single["eval/accuracy"] < 1
    trainer = make_trainer(tmp_path / "single", mini_batch_size=16, micro_batch_size=4, kl_coef=0.1)
    lengths = batch.completion_mask.sum(dim=1).tolist()
    texts = trainer.tokenizer.batch_decode([r[:n] for r, n in zip(batch.completion_ids.tolist(), lengths)],
                                           skip_special_tokens=True)
    assert abs(out["reward_mean"] - sum(varied_reward(None, texts)) / 16) < 1e-9
    assert batch.advantages.view(4, 4).sum(dim=1).abs().max() < 1e-5

    # One update's gradient: two processes with global loss normalisation == one process on the same batch.
    assert relative_error(out["grad"], gradient(trainer, batch)) < 1e-5


def test_the_grpo_recipe_trains_and_saves_on_two_processes(tmp_path):
    """The whole recipe on two processes: training, metrics from the main process only, then save_model
    (a collective after training)."""
    from rlhf.extras.tiny import save_tiny

    model_dir = save_tiny(str(tmp_path / "tiny"), hidden_size=32, num_layers=2, max_positions=64)
    out = tmp_path / "run"
    command = two_process_command(
        os.path.join(ROOT, "recipes", "grpo.py"), "--config",
        os.path.join(ROOT, "recipes", "configs", "demo_grpo.yaml"), "--model_name_or_path", model_dir,
        "--output_dir", str(out), "--max_steps", "2", "--prompts_per_step", "4", "--num_generations", "4",
        "--mini_batch_size", "none", "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "1", "--disable_tqdm", "true")
    result = run_launch(command, {**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2, 2]  # written once, not once per process
    assert (out / "model" / "model.safetensors").exists()
    assert sorted(os.listdir(out / "checkpoint-2")) == ["manifest.json", "model", "optimizer.pt", "rng_state_0.pt",
                                                         "rng_state_1.pt", "scheduler.pt", "trainer_state.json"]

    # Run-directory decisions are the main process's, broadcast: a new run over these checkpoints fails on both
    # processes (no hang in a collective), and a resume continues on both.
    port = command.index("--main_process_port") + 1
    command[port] = free_port()
    refused = run_launch(command, {**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300, cwd=ROOT)
    assert refused.returncode != 0 and refused.stderr.count("holds 1 checkpoint(s) of another run") == 2, \
        refused.stderr[-3000:]
    command[port] = free_port()
    resumed = run_launch(command + ["--max_steps", "3", "--save_steps", "1", "--resume_from_checkpoint", "latest"],
                         {**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stdout and (out / "checkpoint-3" / "manifest.json").exists()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 2, 3, 3]
