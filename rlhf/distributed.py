"""What generation needs under sharded training (DeepSpeed ZeRO-3, FSDP).

``generate`` runs on the unwrapped model. Under ZeRO-3 its parameters are gathered for the duration
of the rollout; under FSDP v1 the root module's parameters are summoned (nested units gather their own
in forward). In both cases every process must run the same number of forward passes, or the
collectives inside them hang: ``synced_gpus`` keeps a process that has finished generating stepping
until the last one is done.
"""

import gc
import os
from contextlib import contextmanager

import torch
from accelerate import Accelerator


def make_accelerator(**kwargs) -> Accelerator:
    """An Accelerator that also works for several processes on a machine without GPUs: `accelerate launch
    --multi_gpu` (or a MULTI_GPU config with use_cpu) starts the processes, and Accelerate then needs
    ``cpu=True`` to join them over gloo instead of falling back to one process each."""
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        return Accelerator(cpu=several and not torch.cuda.is_available(), **kwargs)
    except ValueError as error:  # Accelerate's state is set once per process
        if kwargs.get("mixed_precision") and "already been initialized" in str(error):
            raise ValueError(
                f"mixed_precision={kwargs['mixed_precision']!r} (TRL's bf16 / fp16): Accelerate was already set up in "
                "this process with another precision, which it cannot change; run this trainer in a new process, or "
                "leave mixed_precision unset (None) to keep the process's setting.") from error
        raise


def fill_deepspeed_config(config: dict, micro_batch: int, accumulation_steps: int,
                          max_grad_norm: float | None) -> dict:
    """Fill the DeepSpeed config values that Accelerate takes from a dataloader (the trainer has none): the
    per-process micro-batch, the micro-batches per optimizer step, and gradient clipping from ``max_grad_norm``.
    A value the user set must agree with the trainer's geometry, else DeepSpeed would step at other boundaries."""
    wanted = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": accumulation_steps,
              "gradient_clipping": max_grad_norm if max_grad_norm is not None else 0.0}
    for key, value in wanted.items():
        current = config.get(key, "auto")
        if current == "auto":
            config[key] = value
        elif key != "gradient_clipping" and current != value:
            raise ValueError(f"The DeepSpeed config sets {key}={current}, but the trainer's batch geometry needs "
                             f"{value} (from micro_batch_size / mini_batch_size and the number of processes); "
                             f'set it to "auto" or to {value}.')
    config.pop("train_batch_size", None)  # Accelerate derives it from the two above
    return config


def zero_stage(accelerator: Accelerator) -> int:
    plugin = accelerator.state.deepspeed_plugin
    return plugin.zero_stage if plugin is not None else 0


def fsdp_version(accelerator: Accelerator) -> int | None:
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return getattr(plugin, "fsdp_version", 1) if plugin is not None else None


def shards_parameters(accelerator: Accelerator) -> bool:
    """Whether each process holds only a shard of the parameters (DeepSpeed ZeRO-3 or FSDP)."""
    return zero_stage(accelerator) == 3 or fsdp_version(accelerator) is not None


def needs_synced_generation(accelerator: Accelerator) -> bool:
    """Whether generation must keep every process stepping until all are done."""
    return accelerator.num_processes > 1 and shards_parameters(accelerator)


@contextmanager
def model_for_generation(accelerator: Accelerator, model):
    """The unwrapped model with whole parameters for the duration of the block."""
    unwrapped = accelerator.unwrap_model(model)
    if zero_stage(accelerator) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            yield unwrapped
    elif fsdp_version(accelerator) == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, recurse=False, writeback=False):
            yield unwrapped
    else:
        yield unwrapped


@contextmanager
def without_autocast(model):
    """``model`` with its own forward for the block, not the autocast one Accelerate's mixed precision installs on the
    instance (``_original_forward`` is where Accelerate keeps it); unchanged when there is none."""
    patched, original = model.__dict__.get("forward"), model.__dict__.get("_original_forward")
    if patched is None or original is None:
        yield model
        return
    model.forward = original
    try:
        yield model
    finally:
        model.forward = patched


def shutdown(accelerator: Accelerator) -> None:
    """End a distributed run cleanly: wait for every process, release the DDP reducers, then destroy the
    process group. Without it a process that finishes first can abort at exit (gloo) while another is still
    writing. Call it last: the models' DDP wrappers cannot run a forward pass afterwards.

    Why the reducers go first: a DDP ``Reducer`` holds the process group from C++ and is freed with the GIL
    held. If it is the last holder, the gloo group's destructor joins its worker thread under the GIL while
    that thread may still need the GIL to free the tensors of the barrier it just finished: both wait
    forever. Freed while the world still holds the group, the reducer only drops a reference, and
    ``destroy_process_group`` then frees the group from Python, which releases the GIL first.
    """
    accelerator.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        release_reducers()
        torch.distributed.destroy_process_group()


def release_reducers() -> None:
    """Drop every DistributedDataParallel wrapper's C++ reducer (and the logger that shares it), whichever
    trainer or accelerator made it."""
    from torch.nn.parallel import DistributedDataParallel

    for obj in gc.get_objects():
        if isinstance(obj, DistributedDataParallel):
            for name in ("logger", "reducer"):
                obj.__dict__.pop(name, None)
