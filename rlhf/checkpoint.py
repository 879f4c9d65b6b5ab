"""Writing models and checkpoints so that a crash never leaves a directory that looks complete.

Everything is written into ``<path>.tmp`` and renamed to ``<path>`` at the end; a checkpoint's
``manifest.json`` (``rlhf.integrity``) is written last, and which checkpoint resumes is decided in
``rlhf.run_dir``. Weights are safetensors; optimizer, scheduler and RNG state are loaded with
``weights_only=True`` (no pickle).
"""

import errno
import json
import os
import random
import re
import shutil
import uuid
from contextlib import contextmanager

import numpy as np
import torch

from rlhf.integrity import CheckpointError

STATE_FILE = "trainer_state.json"
# A write refused for want of space: the disk is full, a quota is reached, or a file-size limit (ulimit -f).
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFullError(OSError):
    """Saving a checkpoint or a model ran out of space; the message names where, the fix and the last complete
    checkpoint."""


def out_of_space(error: BaseException | None) -> str | None:
    """Why ``error`` (or an error that caused it) is a write that ran out of space, else None. An OSError says so
    in its errno and safetensors as "(os error 28)"; torch says only that its write stopped short ("unexpected pos
    576 vs 534"), which a full disk is by far the likeliest cause of."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in NO_SPACE:
            return os.strerror(error.errno)
        code = re.search(r"\(os error (\d+)\)", str(error))
        if code and int(code.group(1)) in NO_SPACE:
            return os.strerror(int(code.group(1)))
        short = re.search(r"unexpected pos \d+ vs \d+|PytorchStreamWriter failed writing file[^\n]*", str(error))
        if isinstance(error, RuntimeError) and short:
            return f"torch's write stopped short: {short.group(0)}"
        error = error.__cause__ or error.__context__
    return None


@contextmanager
def naming_a_full_disk(path: str, advice: str, last_complete, partial: str | None = None):
    """Run a save; a write in it that runs out of space becomes a ``DiskFullError`` naming ``path``, ``advice``
    and ``last_complete()`` (the newest complete checkpoint), after removing ``partial`` (what the save left half
    written) to give the space back."""
    try:
        yield
    except Exception as error:
        reason = out_of_space(error)
        if reason is None:
            raise
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        last = last_complete()
        raise DiskFullError(f"no space left on {path} ({reason}): {advice}; the last complete checkpoint is "
                            f"{last if last else 'none (this run has written none)'}.") from error


@contextmanager
def staged_directory(path: str):
    """Yield a temporary sibling directory whose files land in ``path`` only if the block succeeds (if it fails,
    the directory is removed).

    A new ``path`` appears in one rename. An existing one keeps its other files (metrics, checkpoints):
    each staged file replaces its namesake with ``os.replace``, and weight files of an earlier save
    that this one did not write (stale shards) are removed.
    """
    tmp = f"{path.rstrip(os.sep)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    """``torch.load(weights_only=True)``; an unreadable file is an error naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many kinds for a damaged file
        raise CheckpointError(os.path.dirname(path), os.path.basename(path),
                              f"cannot be loaded ({type(error).__name__}: {str(error)[:200]})") from None


# What trainer_state.json must hold for a checkpoint to resume.
STATE_KEYS = {"step": int, "config": dict, "run_id": str, "kl_coef": (int, float), "trainer": str,
              "num_processes": int}


def read_state(checkpoint_dir: str) -> dict:
    """``trainer_state.json`` of a checkpoint, checked for the keys a resume needs; ``CheckpointError`` names
    the file and what is wrong."""
    path = os.path.join(checkpoint_dir, STATE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(checkpoint_dir, STATE_FILE, "missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(checkpoint_dir, STATE_FILE, f"unreadable ({error})") from None
    if not isinstance(state, dict):
        raise CheckpointError(checkpoint_dir, STATE_FILE, f"holds a {type(state).__name__}, not a mapping")
    for key, kind in STATE_KEYS.items():
        if key not in state:
            raise CheckpointError(checkpoint_dir, STATE_FILE, f"has no {key!r} (written by an older version?)")
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise CheckpointError(checkpoint_dir, STATE_FILE, f"{key}={state[key]!r} is not a {kind}")
    return state


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
    """Where a model's weights and tokenizer live: a checkpoint directory's ``model`` subdirectory, the converted
    directory of a ``.gguf`` file (rlhf/gguf.py), else ``path``."""
    from rlhf.gguf import is_gguf, resolve_model_source

    if is_gguf(path):
        return resolve_model_source(path)
    inner = os.path.join(path, "model")
    if os.path.isfile(os.path.join(path, STATE_FILE)) and os.path.isdir(inner):
        return inner
    return path
