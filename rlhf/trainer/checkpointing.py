"""What a training checkpoint holds, and saving / resuming one.

``output_dir/checkpoint-<step>/``: ``model/`` (safetensors + tokenizer), ``optimizer.pt``,
``scheduler.pt``, for PPO ``critic/``, ``critic_optimizer.pt``, ``critic_scheduler.pt``, with
``sync_ref_model`` ``reference/`` (the synced reference: no longer the initial model), one
``rng_state_<rank>.pt`` per process, ``trainer_state.json`` (step, run id, config, KL coefficient, what
the run was made from) and, written last, ``manifest.json`` (size and SHA-256 of every other file). It is
written into ``checkpoint-<step>.tmp`` by all processes and renamed by the main process once the
manifest is in place, so a crash mid-write never leaves a directory that ``"latest"`` would pick.

Resuming (``resume_changes``) compares the checkpoint with the new trainer field by field: settings that
give a step another meaning are refused, every other change is applied and logged. Optimizer and
scheduler hyper-parameters come from the new config, never silently from the checkpoint.
"""

import copy
import logging
import os
import shutil

import torch

from rlhf import checkpoint as ckpt
from rlhf import run_dir
from rlhf.critic import ValueModel
from rlhf.integrity import write_manifest
from rlhf.models import quiet_progress_bars

logger = logging.getLogger(__name__)

# Config fields that define what a step is (the prompt order, the batch, the optimizer steps per step): a
# checkpoint only resumes with the values it was made with. Every other field may change, and the change is
# applied from the resumed step on and logged.
REFUSED_CHANGES = ("seed", "prompts_per_step", "num_generations", "mini_batch_size", "num_epochs")
# What a run was made from, besides its config (``RLTrainer.identity``): a change is refused.
REFUSED_IDENTITY = ("trainer", "num_processes", "model_fingerprint", "train_dataset")
REFERENCE = "reference"  # the directory of a synced reference (sync_ref_model)


def save_model(path: str, accelerator, model, tokenizer, merge_lora: bool = False,
               last_checkpoint: str | None = None) -> str:
    """Write the actor and tokenizer (safetensors) so that ``from_pretrained(path)`` loads them; a LoRA actor
    writes its adapter (``PeftModel.from_pretrained``), or with ``merge_lora`` the merged model. Other files
    already in ``path`` are left alone; a full disk is a ``DiskFullError`` naming ``last_checkpoint``. A
    collective: every process calls it."""
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if merge_lora and hasattr(unwrapped, "merge_and_unload"):
            # Merge into a copy: merging and unmerging in place would not restore the weights bit for bit.
            unwrapped, state_dict = copy.deepcopy(unwrapped).merge_and_unload(), None
        with (ckpt.naming_a_full_disk(path, "free space or save to another path", lambda: last_checkpoint),
              ckpt.staged_directory(path) as tmp):
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
                    save_total_limit: int | None, reference=None) -> str:
    """``output_dir/checkpoint-<step>``: every model in ``trained`` (``TrainedModel``) with its optimizer and
    scheduler, ``reference`` (a synced reference model, or None), the RNG of every process, and ``state`` (JSON)
    written last."""
    path = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = f"{path}.tmp"
    accelerator.wait_for_everyone()
    state_dicts = [accelerator.get_state_dict(m.model) for m in trained]  # a collective under sharding

    def last_complete():
        return (run_dir.run_checkpoints(output_dir, state["run_id"]) or [None])[-1]

    with ckpt.naming_a_full_disk(path, "free space or change output_dir", last_complete,
                                 partial=tmp if accelerator.is_main_process else None):
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
                prefix = os.path.join(tmp, _prefix(m.directory))
                ckpt.save_torch_state(m.optimizer.state_dict(), f"{prefix}optimizer.pt")
                ckpt.save_torch_state(m.scheduler.state_dict(), f"{prefix}scheduler.pt")
            if reference is not None:  # every process holds the same full copy
                os.makedirs(os.path.join(tmp, REFERENCE), exist_ok=True)
                _save_weights(reference, os.path.join(tmp, REFERENCE), None, None)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            ckpt.write_state(tmp, state)
            # Written last: marks the checkpoint complete.
            write_manifest(tmp, {"run_id": state["run_id"], "step": step})
            if os.path.exists(path):
                os.rename(path, f"{path}.old")
            os.rename(tmp, path)
            shutil.rmtree(f"{path}.old", ignore_errors=True)
            run_dir.rotate_checkpoints(output_dir, save_total_limit, state["run_id"])
    accelerator.wait_for_everyone()
    return path


def load_checkpoint(path: str, accelerator, trained: list, reference=None) -> dict:
    """Restore the models, optimizers, schedulers and this process's RNG that ``save_checkpoint`` wrote in
    ``path``, and into ``reference`` the synced reference when the checkpoint has one (else it stays the initial
    model, which is what an unsynced run's reference is); returns the saved state. The optimizers keep the
    hyper-parameters they were built with (the new config's), and the learning rate follows the new config's
    schedule from the saved position in it."""
    state = ckpt.read_state(path)
    for m in trained:
        directory = os.path.join(path, m.directory)
        if isinstance(m.unwrapped, ValueModel):
            m.unwrapped.load_weights(directory)
        else:
            ckpt.load_model_weights(m.unwrapped, directory)
        settings = [{k: v for k, v in group.items() if k != "params"} for group in m.optimizer.param_groups]
        base_lrs = list(m.scheduler.base_lrs)
        m.optimizer.load_state_dict(ckpt.load_torch_state(os.path.join(path, f"{_prefix(m.directory)}optimizer.pt")))
        m.scheduler.load_state_dict(ckpt.load_torch_state(os.path.join(path, f"{_prefix(m.directory)}scheduler.pt")))
        apply_hyperparameters(m.optimizer, m.scheduler, settings, base_lrs)
    if reference is not None and os.path.isdir(os.path.join(path, REFERENCE)):
        ckpt.load_model_weights(reference, os.path.join(path, REFERENCE))
    ckpt.set_rng_state(ckpt.load_torch_state(os.path.join(path, f"rng_state_{accelerator.process_index}.pt")))
    return state


def apply_hyperparameters(optimizer, scheduler, settings: list[dict], base_lrs: list[float]) -> None:
    """After loading an optimizer and a ``LambdaLR`` schedule from a checkpoint: put back the hyper-parameters
    of the freshly built ones (betas, eps, weight decay, peak learning rate) and set each group's learning rate
    to the new schedule at the loaded position, ``base_lr * lambda(last_epoch)``, as ``scheduler.step()`` would.
    Unchanged settings give back exactly the saved values."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise TypeError(f"apply_hyperparameters expects a LambdaLR schedule, got {type(scheduler).__name__}.")
    scheduler.base_lrs = base_lrs
    for group, fresh, base, factor in zip(optimizer.param_groups, settings, base_lrs, scheduler.lr_lambdas):
        group.update({k: v for k, v in fresh.items() if k not in ("lr", "initial_lr")})
        group["initial_lr"] = base
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def resume_changes(state: dict, identity: dict, config: dict) -> dict[str, tuple]:
    """How the new trainer differs from checkpoint ``state``: raises ValueError naming every refused difference
    (``REFUSED_CHANGES``, ``REFUSED_IDENTITY``); returns the others, {field: (checkpoint value, new value)},
    which the resumed run applies."""
    saved, current = dict(state["config"]), dict(config)
    for settings in (saved, current):  # None means "the whole rollout batch"
        if "prompts_per_step" in settings and "num_generations" in settings:
            settings["mini_batch_size"] = settings.get("mini_batch_size") or (
                settings["prompts_per_step"] * settings["num_generations"])
    refused, applied = [], {}
    for key in list(saved) + [k for k in current if k not in saved]:
        before, now = saved.get(key, "(no such field)"), current.get(key, "(no such field)")
        if key == "resume_from_checkpoint" or before == now:
            continue
        if key in REFUSED_CHANGES:
            refused.append(f"{key}: checkpoint {before!r}, now {now!r}")
        else:
            applied[key] = (before, now)
    if saved.get("sync_ref_model") and not current.get("sync_ref_model"):
        refused.append("sync_ref_model: checkpoint True, now False, but the run's reference is the synced one and "
                       "only sync_ref_model saves it; keep it True (a larger ref_model_sync_steps syncs less often)")
    for key in REFUSED_IDENTITY:
        if state.get(key) != identity.get(key):
            refused.append(_identity_change(key, state, identity, saved, current))
    if state.get("model") != identity.get("model"):
        applied["model path"] = (state.get("model"), identity.get("model"))  # the same weights, found elsewhere
    for key in ("eval_dataset", "reward_functions"):
        if state.get(key) != identity.get(key):
            applied[key] = (state.get(key), identity.get(key))
    if refused:
        raise ValueError("Cannot resume: the checkpoint was made with different settings (" + "; ".join(refused)
                         + "). Resume with the checkpoint's values, or start a new run with the new ones: another "
                         "output_dir, or overwrite_output_dir=True without resume_from_checkpoint.")
    return applied


def _identity_change(key: str, state: dict, identity: dict, saved: dict, current: dict) -> str:
    if key == "model_fingerprint":
        dtype = (f", dtype {saved.get('dtype')!r} -> {current.get('dtype')!r}"
                 if saved.get("dtype") != current.get("dtype") else "")
        paths = (f"checkpoint {state.get('model')!r}, now {identity.get('model')!r}"
                 if state.get("model") != identity.get("model") else f"both {identity.get('model') or 'objects'!r}")
        return (f"model: its weights differ from those the run started from ({paths}{dtype}); the initial model is "
                "also the reference and the LoRA base, so pass the model the run started from")
    if key == "train_dataset":
        return ("train_dataset: its rows differ from the run's (the prompt order of every step depends on them); "
                "pass the same dataset")
    if key == "num_processes":
        return f"number of processes: checkpoint {state.get(key)}, now {identity.get(key)}"
    return f"{key}: checkpoint {state.get(key)!r}, now {identity.get(key)!r}"


def describe_changes(changes: dict[str, tuple]) -> str:
    return "; ".join(f"{key}: {_short(before)} -> {_short(now)}" for key, (before, now) in changes.items())


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
