"""Fingerprints of what a run is made from, stored in its checkpoints so that a resume can tell whether it got
the same model and the same data (``rlhf.trainer.checkpointing.resume_changes``).

Both are SHA-256 digests of content, not of names: a model moved to another path keeps its fingerprint;
the same path holding other weights, or a model object built differently, does not.
"""

import hashlib
import itertools
import json

import torch
from datasets import IterableDataset

_SAMPLES_PER_TENSOR = 4096


def model_fingerprint(model: torch.nn.Module) -> str:
    """Names, shapes and dtypes of every parameter and buffer, with up to 4096 evenly spaced values of each: a
    second to compute for billions of parameters, and different for any other initialisation or checkpoint."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
            flat = tensor.detach().reshape(-1)
            if flat.numel() == 0 or flat.is_meta:
                continue  # a parameter sharded away (ZeRO-3) or not materialised: its name and shape count
            step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
            digest.update(flat[::step][:_SAMPLES_PER_TENSOR].to("cpu", torch.float64).numpy().tobytes())
    return digest.hexdigest()


def dataset_fingerprint(dataset) -> str | None:
    """Every row of a ``datasets.Dataset``, in order (the prompt of step k depends on both); of a streamed
    ``IterableDataset``, its first 1024 rows (a stream cannot be read whole up front); None for None."""
    if dataset is None:
        return None
    if isinstance(dataset, IterableDataset):
        head = list(itertools.islice(dataset, 1024))
        digest = hashlib.sha256(f"stream:{len(head)}".encode())
        for row in head:
            digest.update(json.dumps(row, sort_keys=True, default=_stable).encode())
        return digest.hexdigest()
    digest = hashlib.sha256(f"{len(dataset)}:{sorted(dataset.column_names)}".encode())
    for batch in dataset.iter(batch_size=1024):
        digest.update(json.dumps(batch, sort_keys=True, default=_stable).encode())
    return digest.hexdigest()


def _stable(value):
    """A JSON-able stand-in for a value json cannot write, the same in every process and run (never an address)."""
    if hasattr(value, "tolist"):  # numpy arrays and scalars, tensors
        return value.tolist()
    if hasattr(value, "tobytes"):  # e.g. images
        return f"{type(value).__name__}:{hashlib.sha256(value.tobytes()).hexdigest()}"
    return f"{type(value).__name__}:{value}"
