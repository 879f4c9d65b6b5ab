"""Failures: bad input reported at construction (naming the field), guards at run time, checkpoints
that a crash cannot make look valid."""

import os
import subprocess
import sys
import time

import pytest
import torch
from helpers import PROMPTS, make_trainer, varied_reward

from rlhf import GRPOConfig, GRPOTrainer
from rlhf.run_dir import latest_checkpoint
from rlhf.rewards import RewardError
from rlhf.extras.tiny import char_tokenizer, tiny_model
from rlhf.trainer import NonFiniteError


def build(tmp_path, dataset=PROMPTS, rewards=(varied_reward,), tokenizer=None, **overrides):
    settings = dict(output_dir=str(tmp_path), max_steps=1, prompts_per_step=4, num_generations=4, max_new_tokens=4,
                    micro_batch_size=16, disable_tqdm=True, max_prompt_length=16)
    settings.update(overrides)
    return GRPOTrainer(tiny_model("llama", hidden_size=32, num_layers=1, num_heads=2), list(rewards),
                       args=GRPOConfig(**settings), train_dataset=dataset,
                       processing_class=tokenizer or char_tokenizer())


# ---------------------------------------------------------------- bad input, before any training

def test_dataset_without_prompt_column(tmp_path):
    with pytest.raises(ValueError, match=r"train_dataset has no 'prompt' column \(columns: \['question'\]\); rename"):
        build(tmp_path, dataset=[{"question": "1+1="}])


def test_reward_function_needing_a_missing_column(tmp_path):
    def needs_answer(prompts, completions, answer, **kwargs):
        return [0.0] * len(completions)

    with pytest.raises(ValueError, match=r"'needs_answer' needs the dataset column\(s\) \['answer'\]"):
        build(tmp_path, dataset=[{"prompt": "1+1="}] * 4, rewards=(needs_answer,))


def test_reward_weights_must_match_the_functions(tmp_path):
    with pytest.raises(ValueError, match=r"reward_weights has 2 entries but there are 1 reward functions"):
        build(tmp_path, reward_weights=[1.0, 2.0])


def test_overlong_prompts_are_an_error_or_truncated_with_a_warning(tmp_path, caplog):
    dataset = PROMPTS + [{"prompt": "1+" * 20 + "1=", "answer": "21"}]
    with pytest.raises(ValueError, match=rf"1 prompt\(s\) of train_dataset are longer than max_prompt_length=16: "
                                         rf"#{len(PROMPTS)} \(43 tokens\).*truncate_prompts=True"):
        build(tmp_path, dataset=dataset)
    build(tmp_path, dataset=dataset, truncate_prompts=True)
    assert "their beginnings will be cut" in caplog.text


def test_chat_prompts_need_a_chat_template(tmp_path):
    tokenizer = char_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat messages but the tokenizer has no chat template"):
        build(tmp_path, dataset=[{"prompt": [{"role": "user", "content": "1+1="}]}] * 4, tokenizer=tokenizer)


def test_tokenizer_without_pad_token_uses_eos_and_says_so(tmp_path, caplog):
    tokenizer = char_tokenizer()
    tokenizer.pad_token = None
    trainer = build(tmp_path, tokenizer=tokenizer)
    assert trainer.tokenizer.pad_token_id == trainer.tokenizer.eos_token_id and "no pad token" in caplog.text
    tokenizer = char_tokenizer()
    tokenizer.pad_token, tokenizer.eos_token = None, None
    with pytest.raises(ValueError, match="neither a pad token nor an EOS token"):
        build(tmp_path, tokenizer=tokenizer)


def test_resuming_with_other_settings_names_the_fields(tmp_path):
    make_trainer(tmp_path, max_steps=1, save_steps=1).train()
    with pytest.raises(ValueError, match=r"num_generations: checkpoint 4, now 2; mini_batch_size: checkpoint 16, "
                                         r"now 8"):
        make_trainer(tmp_path, max_steps=2, num_generations=2, micro_batch_size=8, resume_from_checkpoint="latest")
    with pytest.raises(ValueError, match=r"trainer: checkpoint 'GRPOTrainer', now 'ReinforceTrainer'"):
        make_trainer(tmp_path, algo="reinforce", max_steps=2, resume_from_checkpoint="latest")


# ---------------------------------------------------------------- checkpoints

def test_an_incomplete_checkpoint_is_never_latest(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2, save_steps=1)
    trainer.train()
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint-2")
    os.makedirs(tmp_path / "checkpoint-3.tmp" / "model")  # a crash mid-write
    os.makedirs(tmp_path / "checkpoint-4")  # a directory without trainer_state.json
    (tmp_path / "checkpoint-4" / "optimizer.pt").write_bytes(b"")
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint-2")
    (tmp_path / "checkpoint-2" / "trainer_state.json").unlink()
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint-1")


def test_save_total_limit_keeps_the_newest(tmp_path):
    make_trainer(tmp_path, max_steps=4, save_steps=1, save_total_limit=2).train()
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("checkpoint")) == ["checkpoint-3", "checkpoint-4"]


def test_a_full_disk_is_named_with_the_last_complete_checkpoint(tmp_path):
    """A file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored) fails writes past it as a full disk does; torch's own
    error for that is "unexpected pos 576 vs 534". In a real process, checkpoint-2 (its first file, the RNG state, is
    14 kB) and then the final model are saved under a 4 kB limit: each names the directory, the fix and the last
    complete checkpoint, and the half-written checkpoint is gone, so "latest" still finds checkpoint-1."""
    code = (f"import resource, signal, sys\nsys.path.insert(0, {os.path.dirname(__file__)!r})\n"
            "from helpers import make_trainer\n"
            f"trainer = make_trainer({str(tmp_path)!r}, max_steps=1, save_steps=1, max_new_tokens=4)\n"
            "trainer.train()\n"
            "trainer.run_step()\n"
            "trainer.step += 1\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
            f"for save in (trainer.save_checkpoint, lambda: trainer.save_model({str(tmp_path / 'final')!r})):\n"
            "    try:\n        save()\n    except Exception as error:\n"
            "        print(f'{type(error).__name__}: {error}')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint, final = result.stdout.strip().splitlines()[-2:]
    last = f"the last complete checkpoint is {tmp_path / 'checkpoint-1'}."
    assert checkpoint.startswith(f"DiskFullError: no space left on {tmp_path / 'checkpoint-2'} (") and (
        "free space or change output_dir; " + last) in checkpoint, checkpoint
    assert final.startswith(f"DiskFullError: no space left on {tmp_path / 'final'} (") and (
        "free space or save to another path; " + last) in final, final
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-1")
    assert [p for p in sorted(os.listdir(tmp_path)) if p.startswith(("checkpoint", "final"))] == ["checkpoint-1"]


def test_checkpoint_state_loads_without_pickle(tmp_path):
    make_trainer(tmp_path, max_steps=1, save_steps=1).train()
    for name in ("optimizer.pt", "scheduler.pt", "rng_state_0.pt"):
        torch.load(tmp_path / "checkpoint-1" / name, weights_only=True)
    assert os.path.exists(tmp_path / "checkpoint-1" / "model" / "model.safetensors")


# ---------------------------------------------------------------- guards at run time

def poison_advantages(trainer, steps: set[int]):
    """Make the advantages NaN at the given steps (a numerical failure after validation)."""
    original = trainer.algorithm.advantages

    def compute(rewards, batch, *args):
        advantages, returns = original(rewards, batch, *args)
        if trainer.step in steps:
            advantages = torch.full_like(advantages, float("nan"))
        return advantages, returns

    trainer.algorithm.advantages = compute


def test_a_nonfinite_update_is_skipped_and_counted(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=3)
    poison_advantages(trainer, {1})
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.step = 1
    metrics = trainer.training_step()
    assert metrics["guard/skipped_updates"] == 1.0 and "grad_norm" not in metrics
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert all(p.grad is None for p in trainer.model.parameters())
    trainer.step = 2
    assert trainer.training_step()["guard/skipped_updates"] == 0.0 and trainer.consecutive_skips == 0


def test_consecutive_nonfinite_updates_stop_the_run_and_save_the_batch(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=5, max_nonfinite_updates=2, num_epochs=1)
    poison_advantages(trainer, {1, 2})
    with pytest.raises(NonFiniteError, match="2 updates in a row had a non-finite loss or gradient"):
        trainer.train()
    saved = torch.load(tmp_path / "nonfinite-step2-rank0.pt", weights_only=True)
    assert saved["tensors"]["advantages"].isnan().all() and len(saved["completions"]) == 16


def test_a_slow_reward_function_is_named_with_its_sample(tmp_path):
    def sluggish(prompts, completions, **kwargs):
        if any(p == PROMPTS[0]["prompt"] for p in prompts):
            time.sleep(5)
        return [0.0] * len(completions)

    trainer = make_trainer(tmp_path, reward=sluggish, reward_timeout=0.5)
    trainer.sampler.indices = lambda step, round_index=0: [1, 0, 2, 3]  # the slow prompt is the second of this step
    with pytest.raises(RewardError, match=r"'sluggish' took longer than reward_timeout=0.5 s on a batch of 16 "
                                          r"completions; sample 4 \(of 4 slow: \[4, 5, 6, 7\]\)"):
        trainer.training_step()
