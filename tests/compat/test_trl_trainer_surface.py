"""A TRL user's calls on the trainer object (transformers' Trainer surface, which TRL's GRPOTrainer inherits), each
written as in transformers' documentation with only the import changed: callbacks added and removed after
construction, the process-zero checks, ``log``, ``processing_class``, ``train()`` unpacked as a ``TrainOutput``, and
``push_to_hub`` (its upload replaced by a local copy: nothing reaches the network here)."""

import os
import shutil

import pytest
from datasets import Dataset
from transformers import PrinterCallback, TrainerCallback

from rlhf import GRPOConfig, GRPOTrainer  # was: from trl import GRPOConfig, GRPOTrainer
from rlhf.extras.tiny import save_tiny
from rlhf.metrics import read_metrics


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("tiny") / "model"), hidden_size=32, num_layers=2, num_heads=2)


def reward_len(completions, **kwargs):  # TRL's documented example reward
    return [-abs(20 - len(completion)) for completion in completions]


def trainer_for(tmp_path, model, **settings):
    args = GRPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=8, report_to="none", logging_steps=1, disable_tqdm=True, **settings)
    dataset = Dataset.from_list([{"prompt": f"Say {i}:"} for i in range(8)])
    return GRPOTrainer(model=model, reward_funcs=reward_len, args=args, train_dataset=dataset)


class StepCounter(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


class LogsExtra(TrainerCallback):
    """A callback that logs a value of its own through the trainer, as users of transformers' Trainer do."""

    trainer = None

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.log({"custom/value": float(state.global_step) * 10})


def test_callbacks_added_popped_and_removed_after_construction(tmp_path, model):
    trainer = trainer_for(tmp_path, model)
    counter = StepCounter()
    trainer.add_callback(counter)
    trainer.add_callback(PrinterCallback)  # a class is instantiated, as in transformers
    printer = trainer.pop_callback(PrinterCallback)
    assert isinstance(printer, PrinterCallback)
    assert trainer.pop_callback(PrinterCallback) is None  # none left of that class
    removed = StepCounter()
    trainer.add_callback(removed)
    trainer.remove_callback(removed)
    trainer.train()
    assert counter.steps == [1, 2] and removed.steps == []
    with pytest.raises(TypeError, match="none of the methods"):
        trainer.add_callback(object())


def test_train_unpacks_as_train_output_and_log_reaches_every_sink(tmp_path, model):
    trainer = trainer_for(tmp_path, model)
    logger = LogsExtra()
    logger.trainer = trainer
    trainer.add_callback(logger)
    assert trainer.is_world_process_zero() and trainer.is_local_process_zero()
    assert trainer.processing_class is trainer.tokenizer
    assert trainer.processing_class("Say 1:")["input_ids"]  # a working tokenizer

    global_step, training_loss, metrics = trainer.train()  # transformers' TrainOutput unpacks to these three
    assert global_step == 2 == trainer.state.global_step
    assert metrics["train_loss"] == training_loss and metrics["train_runtime"] > 0
    logged = [r for r in trainer.state.log_history if "custom/value" in r]
    assert [(r["step"], r["custom/value"]) for r in logged] == [(1, 10.0), (2, 20.0)]
    on_disk = [r for r in read_metrics(str(tmp_path / "metrics.jsonl")) if "custom/value" in r]
    assert [(r["step"], r["custom/value"]) for r in on_disk] == [(1, 10.0), (2, 20.0)]

    trainer.log({"after/value": 1.5})  # outside training: the history and on_log only
    assert trainer.state.log_history[-1]["after/value"] == 1.5 and trainer.state.log_history[-1]["step"] == 2


def test_push_to_hub_saves_then_uploads_the_model_without_checkpoints(tmp_path, model, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects
    from transformers import AutoModelForCausalLM

    hub = tmp_path / "hub"
    calls = {}

    def create_repo(repo_id, private=None, **kwargs):
        calls["repo_id"], calls["private"] = repo_id, private
        return huggingface_hub.RepoUrl(f"https://huggingface.co/someone/{repo_id}")  # the token's namespace

    def upload_folder(repo_id, folder_path, commit_message, ignore_patterns, **kwargs):
        """What the Hub would receive: huggingface_hub's own filter over the folder's files."""
        calls["message"], calls["uploaded_to"] = commit_message, repo_id
        files = [os.path.relpath(os.path.join(d, f), folder_path) for d, _, fs in os.walk(folder_path) for f in fs]
        for name in filter_repo_objects(files, ignore_patterns=ignore_patterns):
            os.makedirs(hub / os.path.dirname(name), exist_ok=True)
            shutil.copy(os.path.join(folder_path, name), hub / name)
        return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    trainer = trainer_for(tmp_path / "my-grpo-run", model, save_steps=1)
    trainer.train()
    assert (tmp_path / "my-grpo-run" / "checkpoint-1").is_dir()
    url = trainer.push_to_hub(commit_message="two steps")
    assert calls == {"repo_id": "my-grpo-run", "private": None, "message": "two steps",
                     "uploaded_to": "someone/my-grpo-run"}
    assert url.endswith("/commit/0")
    uploaded = sorted(os.listdir(hub))
    assert not any(name.startswith("checkpoint-") or name in ("run.json", "run.lock") for name in uploaded), uploaded
    assert "metrics.jsonl" in uploaded
    pushed = AutoModelForCausalLM.from_pretrained(str(hub))  # the trained weights, loadable from what was pushed
    trained = trainer.unwrapped_model.state_dict()
    assert all((pushed.state_dict()[k] == v).all() for k, v in trained.items())


def test_push_to_hub_offline_says_so(tmp_path, model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    trainer = trainer_for(tmp_path / "offline", model)
    trainer.train()
    with pytest.raises(Exception, match="(?i)offline"):
        trainer.push_to_hub()
    assert (tmp_path / "offline" / "model.safetensors").exists()  # saved before the upload failed


def test_push_to_hub_goes_where_the_config_says(tmp_path, model, monkeypatch):
    """TRL's hub_model_id and hub_private_repo decide the repository and its visibility, as in transformers."""
    import huggingface_hub

    created = {}

    def create_repo(repo_id, private=None, **kwargs):
        created.update(repo_id=repo_id, private=private)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda repo_id, **kwargs: f"{repo_id}@commit")
    trainer = trainer_for(tmp_path / "run", model, hub_model_id="myorg/my-grpo-model", hub_private_repo=True)
    trainer.train()
    assert trainer.push_to_hub() == "myorg/my-grpo-model@commit"
    assert created == {"repo_id": "myorg/my-grpo-model", "private": True}
    assert trainer.push_to_hub(repo_id="myorg/other", private=False) == "myorg/other@commit"  # arguments win
    assert created == {"repo_id": "myorg/other", "private": False}
