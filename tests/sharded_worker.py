"""Run by test_sharded.py under `accelerate launch` with two CPU processes (gloo) whose parameters are sharded with
FSDP2, through Accelerate's own FSDP2 preparation.

Accelerate picks FSDP only for GPU processes (CPU processes always get DDP, whatever the config says), so this
worker sets the FSDP2 plugin on the Accelerator right after creating it: from there, ``prepare``, ``backward``,
``get_state_dict`` and unwrapping are Accelerate's FSDP2 code paths, as on GPUs.

Writes, from the main process, what the test compares with one unsharded process: the world size and sharding
mode, one rollout batch gathered from both processes and the full gradient of one update on it (GRPO with a KL
term, and PPO's actor and critic), and the final weights of a run that saved a checkpoint under sharding,
was rebuilt and resumed, next to those of an uninterrupted run.
"""

import sys

import torch
from helpers import make_trainer
from multiproc_worker import gathered
from safetensors.torch import load_file

import rlhf.trainer.build as build_module
from rlhf.distributed import fsdp_version, make_accelerator, shutdown, zero_stage
from rlhf.metrics import StepMetrics
from rlhf.trainer.update import accumulate_gradients


def full_gradient(trainer, model) -> torch.Tensor:
    """The whole gradient of ``model``'s parameters, gathered from the shards, in parameter order."""
    pieces = []
    for param in model.parameters():
        if zero_stage(trainer.accelerator) == 3:
            from deepspeed.utils import safe_get_full_grad

            grad = safe_get_full_grad(param)
        else:
            grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        pieces.append(grad.detach().reshape(-1).cpu())
    return torch.cat(pieces)


def one_update_gradient(trainer, batch) -> dict:
    for model in trainer.trained_models:
        model.model.train()
    accumulate_gradients(trainer.actor, trainer.critic_model, batch, trainer.args, trainer.plan, trainer.kl,
                         trainer.accelerator, StepMetrics())
    out = {"actor": full_gradient(trainer, trainer.model)}
    if trainer.critic is not None:
        out["critic"] = full_gradient(trainer, trainer.critic)
    return out


def fsdp2_accelerator(**kwargs):
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils import DistributedType

    accelerator = make_accelerator(**kwargs)
    if accelerator.distributed_type != DistributedType.FSDP:
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", state_dict_type="FULL_STATE_DICT",
            reshard_after_forward=True, cpu_ram_efficient_loading=False)
    return accelerator


def main(model_dir: str, out_dir: str) -> None:
    build_module.make_accelerator = fsdp2_accelerator  # where the trainer builds its accelerator
    from rlhf.extras.tiny import char_tokenizer
    from transformers import AutoModelForCausalLM

    load = lambda: AutoModelForCausalLM.from_pretrained(model_dir)  # noqa: E731
    common = dict(tokenizer=char_tokenizer(), mini_batch_size=16, micro_batch_size=4)
    result = {}
    for algo, extra in (("grpo", {"kl_coef": 0.1}), ("ppo", {"kl_coef": 0.05})):
        trainer = make_trainer(f"{out_dir}/{algo}", model=load(), algo=algo, **common, **extra)
        batch, _ = trainer.make_rollout(0)
        result[algo] = {"batch": gathered(trainer, batch), "grad": one_update_gradient(trainer, batch)}
    accelerator = trainer.accelerator
    result["world_size"] = accelerator.num_processes
    result["sharding"] = "fsdp2" if fsdp_version(accelerator) == 2 else f"zero{zero_stage(accelerator)}"

    # A checkpoint written under sharding resumes to the uninterrupted run's weights, bit for bit.
    run = dict(model=None, max_steps=3, save_steps=1, num_epochs=2, **common)
    straight = make_trainer(f"{out_dir}/straight", **{**run, "model": load()})
    straight.train()
    straight.save_model(f"{out_dir}/straight/model")
    first = make_trainer(f"{out_dir}/resumed", **{**run, "model": load(), "max_steps": 1})
    first.train()
    resumed = make_trainer(f"{out_dir}/resumed", **{**run, "model": load(), "resume_from_checkpoint": "latest"})
    result["resumed_at"] = resumed.step
    resumed.train()
    resumed.save_model(f"{out_dir}/resumed/model")
    if accelerator.is_main_process:
        result["straight"] = load_file(f"{out_dir}/straight/model/model.safetensors")
        result["resumed"] = load_file(f"{out_dir}/resumed/model/model.safetensors")
        torch.save(result, f"{out_dir}/result.pt")
    shutdown(accelerator)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
