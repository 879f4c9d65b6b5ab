"""Resume loads exactly what it should, or says why not: changed settings are refused or applied (and logged),
corrupt checkpoints are named and skipped, and no checkpoint comes from a step whose update was skipped."""

import json
import os
import shutil

import pytest
import torch
from helpers import PROMPTS, make_trainer
from test_reliability import poison_advantages

from rlhf.extras.tiny import tiny_model
from rlhf.integrity import CheckpointError, sha256
from rlhf.run_dir import RunDirectoryError, resolve_checkpoint
from rlhf.trainer import NonFiniteError, WeightsBlownUpError

FAST = dict(max_new_tokens=4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A GRPO run of 2 steps at learning rate 1e-3 with a checkpoint after each (built once; tests copy it)."""
    directory = tmp_path_factory.mktemp("trained")
    make_trainer(directory, max_steps=2, save_steps=1, **FAST).train()
    return directory


def copy_of(trained, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(trained, target, ignore=shutil.ignore_patterns("run.lock"))
    return target


def one_step_change(trainer) -> torch.Tensor:
    before = torch.cat([p.detach().reshape(-1).clone() for p in trainer.model.parameters()])
    trainer.training_step()
    return torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()]) - before


# ---------------------------------------------------------------- changed settings

def test_a_new_learning_rate_is_what_the_optimizer_uses(trained, tmp_path, caplog):
    """Both resumes start from the same checkpoint: the same rollout, gradients and Adam moments. AdamW's step is
    linear in the learning rate (decoupled weight decay included), so at 1e-5 it is exactly 1/100 of the step at
    the checkpoint's 1e-3. Restoring the checkpoint's learning rate (the old behaviour) would make them equal."""
    kept = make_trainer(copy_of(trained, tmp_path / "a"), max_steps=3, resume_from_checkpoint="latest", **FAST)
    big = one_step_change(kept)
    lowered = make_trainer(copy_of(trained, tmp_path / "b"), max_steps=3, resume_from_checkpoint="latest",
                           **{**FAST, "learning_rate": 1e-5})
    assert "changed settings, applied from step 2 on: " in caplog.text and "learning_rate: 0.001 -> 1e-05" in caplog.text
    assert lowered.optimizer.param_groups[0]["lr"] == 1e-5 and lowered.scheduler.base_lrs == [1e-5]
    small = one_step_change(lowered)
    assert big.abs().max() > 1e-4
    assert (small * 100 - big).norm() / big.norm() < 1e-3


def test_a_new_schedule_and_optimizer_settings_apply_from_the_saved_position(trained, tmp_path):
    trainer = make_trainer(copy_of(trained, tmp_path), max_steps=4, resume_from_checkpoint="latest", learning_rate=1e-4,
                           lr_scheduler_type="linear", warmup_steps=1, weight_decay=0.1, adam_beta2=0.99, **FAST)
    # transformers' linear schedule written out: lr * max(0, (T - t) / (T - W)) after W warm-up steps; t = 2 here.
    group = trainer.optimizer.param_groups[0]
    assert group["lr"] == 1e-4 * (4 - 2) / (4 - 1)
    assert group["weight_decay"] == 0.1 and tuple(group["betas"]) == (0.9, 0.99)
    assert len(trainer.optimizer.state) > 0  # the moments themselves come from the checkpoint
    trainer.training_step()  # one optimizer step at that rate, then the schedule moves on
    assert trainer.scheduler.get_last_lr()[0] == trainer.optimizer.param_groups[0]["lr"] == 1e-4 * (4 - 3) / (4 - 1)


@pytest.mark.parametrize("before, after", [(0.05, 0.2), (0.05, 0.0), (0.0, 0.05)])
def test_a_changed_kl_coef_is_applied_including_to_and_from_zero(tmp_path, caplog, before, after):
    make_trainer(tmp_path, algo="reinforce", max_steps=1, save_steps=1, kl_coef=before, **FAST).train()
    trainer = make_trainer(tmp_path, algo="reinforce", max_steps=2, resume_from_checkpoint="latest", kl_coef=after,
                           **FAST)
    assert f"kl_coef: {before!r} -> {after!r}" in caplog.text
    assert trainer.kl_coef == after and trainer.plan.kl_in == ("reward" if after else None)
    assert (trainer.ref_model is None) == (after == 0)  # no reference to pay for a coefficient of 0
    metrics = trainer.training_step()
    assert metrics.get("kl_coef") == (after or None) and ("kl/reward_penalty" in metrics) == (after > 0)


def test_changed_sampling_settings_are_applied_and_logged(trained, tmp_path, caplog):
    trainer = make_trainer(copy_of(trained, tmp_path), max_steps=3, resume_from_checkpoint="latest",
                           max_new_tokens=2, temperature=0.7)
    assert "max_new_tokens: 4 -> 2" in caplog.text and "temperature: 1.0 -> 0.7" in caplog.text
    assert trainer.sampling.max_new_tokens == 2 and trainer.sampling.temperature == 0.7
    rollout, _ = trainer.make_rollout(2)
    assert rollout.completion_ids.shape[1] <= 2


def test_another_model_or_dataset_is_refused_naming_it(trained, tmp_path, caplog):
    directory = copy_of(trained, tmp_path)
    with pytest.raises(ValueError, match=r"Cannot resume.*model: its weights differ from those the run started from "
                                         r"\(both 'objects'\).*pass the model the run started from"):
        make_trainer(directory, model=tiny_model("llama", hidden_size=32, num_layers=2, num_heads=2, seed=99),
                     resume_from_checkpoint="latest", **FAST)
    from datasets import Dataset

    edited = [dict(row) for row in PROMPTS]
    edited[7]["prompt"] = "9+9="
    from rlhf import GRPOConfig, GRPOTrainer
    from rlhf.extras.tiny import char_tokenizer

    args = GRPOConfig(output_dir=str(directory), max_steps=3, prompts_per_step=4, num_generations=4, max_new_tokens=4,
                      micro_batch_size=16, learning_rate=1e-3, disable_tqdm=True, seed=0, write_report=False,
                      resume_from_checkpoint="latest")
    model = tiny_model("llama", hidden_size=32, num_layers=2, num_heads=2, seed=0)
    with pytest.raises(ValueError, match=r"train_dataset: its rows differ from the run's"):
        GRPOTrainer(model, [lambda prompts, completions, **kw: [0.0] * len(completions)], args=args,
                    train_dataset=Dataset.from_list(edited), processing_class=char_tokenizer())
    # An eval dataset may change: applied and logged.
    make_trainer(directory, resume_from_checkpoint="latest", trainer_kwargs={"eval_dataset": PROMPTS[:3]}, **FAST)
    assert "eval_dataset: None -> '" in caplog.text


# ---------------------------------------------------------------- corrupt checkpoints

def rewrite_manifest(checkpoint):
    """Make the manifest agree with the files again, as a buggy writer would have: verification then passes and
    the deeper checks (the state's keys, the loaders) must name the file."""
    path = checkpoint / "manifest.json"
    manifest = json.loads(path.read_text())
    for name in manifest["files"]:
        manifest["files"][name] = {"bytes": os.path.getsize(checkpoint / name), "sha256": sha256(checkpoint / name)}
    path.write_text(json.dumps(manifest))


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def drop_key(path):
    state = json.loads(path.read_text())
    del state["kl_coef"]
    path.write_text(json.dumps(state))
    rewrite_manifest(path.parent)


def empty_list(path):
    path.write_text("[]")
    rewrite_manifest(path.parent)


CORRUPTIONS = {
    "truncated optimizer": ("optimizer.pt", truncate, r"optimizer.pt: \d+ bytes, the manifest says \d+ \(truncated\)"),
    "truncated weights": ("model/model.safetensors", truncate, r"model/model.safetensors: \d+ bytes.*truncated"),
    "truncated state": ("trainer_state.json", truncate, r"trainer_state.json: \d+ bytes.*truncated"),
    "altered rng": ("rng_state_0.pt", flip_a_byte, r"rng_state_0.pt: its SHA-256 differs from the manifest's"),
    "state is []": ("trainer_state.json", empty_list, r"trainer_state.json: holds a list, not a mapping"),
    "state lacks a key": ("trainer_state.json", drop_key, r"trainer_state.json: has no 'kl_coef'"),
    "no manifest": ("manifest.json", os.remove, r"manifest.json: missing"),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_latest_skips_a_corrupt_checkpoint_naming_it_and_an_explicit_path_is_an_error(trained, tmp_path, caplog, case):
    directory = copy_of(trained, tmp_path)
    name, damage, reason = CORRUPTIONS[case]
    damage(directory / "checkpoint-2" / name)
    assert resolve_checkpoint("latest", str(directory)) == str(directory / "checkpoint-1")
    assert f"Skipping {directory / 'checkpoint-2'}: " in caplog.text
    assert any(__import__("re").search(reason, r.getMessage()) for r in caplog.records)
    with pytest.raises(CheckpointError, match=rf"checkpoint {directory / 'checkpoint-2'} is not usable: {reason}"):
        resolve_checkpoint(str(directory / "checkpoint-2"), str(directory))


def test_the_trainer_resumes_from_the_newest_checkpoint_that_verifies(trained, tmp_path, caplog):
    directory = copy_of(trained, tmp_path)
    truncate(directory / "checkpoint-2" / "optimizer.pt")
    trainer = make_trainer(directory, max_steps=2, resume_from_checkpoint="latest", **FAST)
    assert trainer.step == 1 and "Resuming from" in caplog.text and "checkpoint-1, the newest" in caplog.text
    assert not os.path.exists(directory / "checkpoint-2")  # the damaged one is set aside, not picked next time
    with pytest.raises(CheckpointError, match=r"checkpoint-1 is not usable"):
        truncate(directory / "checkpoint-1" / "model" / "model.safetensors")
        make_trainer(directory, max_steps=2, resume_from_checkpoint=str(directory / "checkpoint-1"), **FAST)
    with pytest.raises(RunDirectoryError, match=r"holds no checkpoint that verifies \(.*checkpoint-1: model/model"):
        make_trainer(directory, max_steps=2, resume_from_checkpoint="latest", **FAST)


def test_a_file_that_verifies_but_does_not_load_is_named(trained, tmp_path):
    directory = copy_of(trained, tmp_path)
    (directory / "checkpoint-2" / "optimizer.pt").write_bytes(b"not a torch file")
    rewrite_manifest(directory / "checkpoint-2")
    with pytest.raises(CheckpointError, match=r"checkpoint-2 is not usable: optimizer.pt: cannot be loaded"):
        make_trainer(directory, max_steps=3, resume_from_checkpoint="latest", **FAST)


# ---------------------------------------------------------------- non-finite updates and checkpoints

def test_no_checkpoint_is_written_from_a_skipped_step_and_the_error_names_the_last_good_one(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=5, save_steps=1, max_nonfinite_updates=2, **FAST)
    poison_advantages(trainer, {1, 2})
    with pytest.raises(NonFiniteError, match=rf"the last good one is {tmp_path / 'checkpoint-1'}\."):
        trainer.train()
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("checkpoint")) == ["checkpoint-1"]


def test_a_run_that_recovers_skips_only_the_checkpoint_of_the_bad_step(tmp_path, caplog):
    trainer = make_trainer(tmp_path, max_steps=3, save_steps=1, max_nonfinite_updates=3, **FAST)
    poison_advantages(trainer, {1})
    trainer.train()
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("checkpoint")) == ["checkpoint-1", "checkpoint-3"]
    assert "Step 2: an update was skipped as non-finite; no checkpoint is written" in caplog.text


def blow_up_learning_rate(trainer, learning_rate=1e30):
    """A learning rate that no config accepts (validation stops at 1), set on the built optimizer and schedule: the
    next update moves every weight by about 1e30, which stays finite."""
    for group in trainer.optimizer.param_groups:
        group["lr"] = learning_rate
    trainer.scheduler.base_lrs = [learning_rate] * len(trainer.optimizer.param_groups)


def test_an_update_that_blows_the_weights_up_stops_the_run_before_they_are_saved(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=3, save_steps=1, **FAST)
    blow_up_learning_rate(trainer)
    with pytest.raises(WeightsBlownUpError, match=r"step 1: an optimizer step blew up the actor's weights: their norm "
                                                  r"went from [0-9.]+ to .* in one update.*lower learning_rate.*this "
                                                  r"run has written no checkpoint"):
        trainer.train()
    assert not [p for p in os.listdir(tmp_path) if p.startswith("checkpoint")]


def test_a_checkpoint_with_blown_up_weights_is_never_called_the_last_good_one(tmp_path):
    """Weights blown up outside an update (here by a callback, so the update guard never sees it) are saved as
    checkpoint-2; the NonFiniteError that follows names checkpoint-1, whose weights are healthy."""
    class Inflate:
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    for parameter in model.parameters():
                        parameter.mul_(1e30)

    trainer = make_trainer(tmp_path, max_steps=6, save_steps=1, max_nonfinite_updates=2,
                           trainer_kwargs={"callbacks": [Inflate()]}, **FAST)
    poison_advantages(trainer, {2, 3})
    with pytest.raises(NonFiniteError, match=rf"the last good one is {tmp_path / 'checkpoint-1'}\."):
        trainer.train()
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("checkpoint")) == ["checkpoint-1", "checkpoint-2"]
