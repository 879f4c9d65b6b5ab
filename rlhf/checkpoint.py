"""Writing models and checkpoints so that a crash never leaves a directory that looks complete.

Everything is written into ``<path>.tmp`` and renamed to ``<path>`` at the end; ``latest_checkpoint``
only considers directories named ``checkpoint-<step>`` that hold ``trainer_state.json``, which is
written last. Weights are safetensors; optimizer, scheduler and RNG state are loaded with
``weights_only=True`` (no pickle).
"""

import json
import os
import random
import re
import shutil
import uuid
from contextlib import contextmanager

import numpy as np
import torch

STATE_FILE = "trainer_state.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


@contextmanager
def staged_directory(path: str):
    """Yield a temporary sibling directory whose files land in ``path`` only if the block succeeds.

    A new ``path`` appears in one rename. An existing one keeps its other files (metrics, checkpoints):
    each staged file replaces its namesake with ``os.replace``, and weight files of an earlier save
    that this one did not write (stale shards) are removed.
    """
    tmp = f"{path.rstrip(os.sep)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    yield tmp
    if not os.path.exists(path):
        os.rename(tmp, path)
        return
    written = set(os.listdir(tmp))
    for name in written:
        os.replace(os.path.join(tmp, name), os.path.join(path, name))
    for name in os.listdir(path):
        if name not in written and (name.endswith(".safetensors") or name.endswith(".safetensors.index.json")):
            os.remove(os.path.join(path, name))
    shutil.rmtree(tmp, ignore_errors=True)


def save_pretrained_model(model, tokenizer, directory: str, state_dict=None) -> None:
    """save_pretrained in safetensors (with the tokenizer) into an existing directory, without transformers' progress
    bar (it would break a training run's bar)."""
    from rlhf.models import quiet_progress_bars

    with quiet_progress_bars():
        model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def load_model_weights(model, directory: str) -> None:
    """Load the weights ``save_pretrained`` wrote in ``directory`` into ``model``: a PEFT adapter, or
    ``model*.safetensors``, of which every parameter must be loaded except those tied to one that is
    (an lm_head sharing the embedding matrix)."""
    from safetensors.torch import load_file

    if os.path.exists(os.path.join(directory, "adapter_config.json")):  # a PEFT adapter
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(os.path.join(directory, "adapter_model.safetensors")))
        if result.unexpected_keys:
            raise ValueError(f"adapter weights in {directory} do not match the model: {result.unexpected_keys}")
        return
    weights = {}
    for name in sorted(os.listdir(directory)):
        if name.startswith("model") and name.endswith(".safetensors"):
            weights.update(load_file(os.path.join(directory, name)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    state = model.state_dict()
    loaded_storage = {state[k].data_ptr() for k in weights if k in state}
    untied = [k for k in missing if state[k].data_ptr() not in loaded_storage]
    if untied or unexpected:
        raise ValueError(f"checkpoint weights in {directory} do not match the model: missing {untied}, "
                         f"unexpected {unexpected}.")


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": _numpy_state_to_lists(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state_to_lists(state):
    kind, keys, pos, has_gauss, cached = state
    return (kind, keys.tolist(), int(pos), int(has_gauss), float(cached))


def save_torch_state(obj, path: str) -> None:
    torch.save(obj, path)


def load_torch_state(path: str):
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_steps(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    steps = checkpoint_steps(output_dir)
    return steps[-1][1] if steps else None


def rotate_checkpoints(output_dir: str, keep: int | None) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    if keep is None:
        return
    for _, path in checkpoint_steps(output_dir)[:-keep] if keep > 0 else checkpoint_steps(output_dir):
        shutil.rmtree(path, ignore_errors=True)


def read_state(checkpoint_dir: str) -> dict:
    with open(os.path.join(checkpoint_dir, STATE_FILE)) as f:
        return json.load(f)


def write_state(checkpoint_dir: str, state: dict) -> None:
    with open(os.path.join(checkpoint_dir, STATE_FILE), "w") as f:
        json.dump(state, f, indent=2)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to a uniquely named temporary file next to ``path``, flushed to disk, then rename it over
    ``path``: readers see the old file or the new one, never half of one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def model_source(path: str) -> str:
    """Where a model's weights and tokenizer live: a checkpoint directory's ``model`` subdirectory, else ``path``."""
    inner = os.path.join(path, "model")
    if os.path.isfile(os.path.join(path, STATE_FILE)) and os.path.isdir(inner):
        return inner
    return path
