"""What a training checkpoint holds, and saving / resuming one.

``output_dir/checkpoint-<step>/``: ``model/`` (safetensors + tokenizer), ``optimizer.pt``,
``scheduler.pt``, for PPO ``critic/``, ``critic_optimizer.pt``, ``critic_scheduler.pt``, one
``rng_state_<rank>.pt`` per process, and ``trainer_state.json`` (step, config, KL coefficient, ...).
It is written into ``checkpoint-<step>.tmp`` by all processes and renamed by the main process once
``trainer_state.json`` (written last) is in place, so a crash mid-write never leaves a directory that
``"latest"`` would pick.
"""

import copy
import os
import shutil

from rlhf import checkpoint as ckpt
from rlhf.critic import ValueModel
from rlhf.models import quiet_progress_bars


def save_model(path: str, accelerator, model, tokenizer, merge_lora: bool = False) -> str:
    """Write the actor and tokenizer (safetensors) so that ``from_pretrained(path)`` loads them; a LoRA actor
    writes its adapter (``PeftModel.from_pretrained``), or with ``merge_lora`` the merged model. Other files
    already in ``path`` are left alone. A collective: every process calls it."""
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if merge_lora and hasattr(unwrapped, "merge_and_unload"):
            # Merge into a copy: merging and unmerging in place would not restore the weights bit for bit.
            unwrapped, state_dict = copy.deepcopy(unwrapped).merge_and_unload(), None
        with ckpt.staged_directory(path) as tmp:
            _save_weights(unwrapped, tmp, state_dict, tokenizer)
    accelerator.wait_for_everyone()
    return path


def _save_weights(unwrapped, directory: str, state_dict, tokenizer) -> None:
    if isinstance(unwrapped, ValueModel):
        with quiet_progress_bars():
            unwrapped.save_pretrained(directory, state_dict=state_dict)
    else:
        ckpt.save_pretrained_model(unwrapped, tokenizer, directory, state_dict)


def _prefix(directory: str) -> str:
    """File prefix of a trained model's optimizer and scheduler state: none for the actor (``model``)."""
    return "" if directory == "model" else f"{directory}_"


def save_checkpoint(output_dir: str, step: int, accelerator, trained: list, tokenizer, state: dict,
                    save_total_limit: int | None) -> str:
    """``output_dir/checkpoint-<step>``: every model in ``trained`` (``TrainedModel``) with its optimizer and
    scheduler, the RNG of every process, and ``state`` (JSON) written last."""
    path = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = f"{path}.tmp"
    accelerator.wait_for_everyone()
    state_dicts = [accelerator.get_state_dict(m.model) for m in trained]  # a collective under sharding
    if accelerator.is_main_process:
        for stale in (tmp, f"{path}.old"):
            shutil.rmtree(stale, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    ckpt.save_torch_state(ckpt.rng_state(), os.path.join(tmp, f"rng_state_{accelerator.process_index}.pt"))
    if accelerator.is_main_process:
        for m, state_dict in zip(trained, state_dicts):
            directory = os.path.join(tmp, m.directory)
            os.makedirs(directory, exist_ok=True)
            _save_weights(m.unwrapped, directory, state_dict, tokenizer if m.directory == "model" else None)
            ckpt.save_torch_state(m.optimizer.state_dict(), os.path.join(tmp, f"{_prefix(m.directory)}optimizer.pt"))
            ckpt.save_torch_state(m.scheduler.state_dict(), os.path.join(tmp, f"{_prefix(m.directory)}scheduler.pt"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ckpt.write_state(tmp, state)  # written last: marks the checkpoint complete
        if os.path.exists(path):
            os.rename(path, f"{path}.old")
        os.rename(tmp, path)
        shutil.rmtree(f"{path}.old", ignore_errors=True)
        ckpt.rotate_checkpoints(output_dir, save_total_limit)
    accelerator.wait_for_everyone()
    return path


def resolve_checkpoint(path: str, output_dir: str) -> str:
    """The checkpoint directory ``path`` names; ``"latest"``: the newest complete one in ``output_dir``."""
    if path == "latest":
        latest = ckpt.latest_checkpoint(output_dir)
        if latest is None:
            raise FileNotFoundError(f"resume_from_checkpoint='latest' but {output_dir!r} holds no complete checkpoint.")
        path = latest
    if not os.path.isfile(os.path.join(path, ckpt.STATE_FILE)):
        raise FileNotFoundError(f"{path!r} is not a complete checkpoint (no {ckpt.STATE_FILE}).")
    return path


def load_checkpoint(path: str, accelerator, trained: list) -> dict:
    """Restore the models, optimizers, schedulers and this process's RNG that ``save_checkpoint`` wrote in
    ``path``; returns the saved state."""
    state = ckpt.read_state(path)
    for m in trained:
        directory = os.path.join(path, m.directory)
        if isinstance(m.unwrapped, ValueModel):
            m.unwrapped.load_weights(directory)
        else:
            ckpt.load_model_weights(m.unwrapped, directory)
        m.optimizer.load_state_dict(ckpt.load_torch_state(os.path.join(path, f"{_prefix(m.directory)}optimizer.pt")))
        m.scheduler.load_state_dict(ckpt.load_torch_state(os.path.join(path, f"{_prefix(m.directory)}scheduler.pt")))
    ckpt.set_rng_state(ckpt.load_torch_state(os.path.join(path, f"rng_state_{accelerator.process_index}.pt")))
    return state


def check_resumable(state: dict, config: dict, model_source: str, trainer: str, num_processes: int) -> None:
    """A checkpoint only resumes under the settings that give its step the same meaning."""
    saved, current = dict(state["config"]), dict(config)
    for settings in (saved, current):  # None means "the whole rollout batch"
        settings["mini_batch_size"] = settings.get("mini_batch_size") or (
            settings["prompts_per_step"] * settings["num_generations"])
    fields = ("prompts_per_step", "num_generations", "mini_batch_size", "num_epochs", "seed")
    changed = [f"{f}: checkpoint {saved.get(f)!r}, now {current[f]!r}" for f in fields if saved.get(f) != current[f]]
    for key, now in (("model", model_source), ("trainer", trainer)):
        if state.get(key) != now:
            changed.append(f"{key}: checkpoint {state.get(key)!r}, now {now!r}")
    if state.get("num_processes") != num_processes:
        changed.append(f"number of processes: checkpoint {state.get('num_processes')}, now {num_processes}")
    if changed:
        raise ValueError("Cannot resume: the checkpoint was made with different settings (" + "; ".join(changed)
                         + "). Resume with the same values, or start a new run in another output_dir.")
