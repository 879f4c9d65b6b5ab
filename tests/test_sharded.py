"""Sharded training on two CPU processes over gloo with FSDP2 (Accelerate's FSDP2 code; see sharded_worker.py),
against one unsharded process: the same rollout batch gives the same gradient (GRPO with a KL term; PPO's actor
and critic), generation works with sharded parameters, and a checkpoint written under sharding resumes to the
uninterrupted run's weights, bit for bit."""

import pytest
import torch
from helpers import gradient, make_trainer, relative_error
from launching import run_two_process_worker
from transformers import AutoModelForCausalLM

from rlhf.distributed import fill_deepspeed_config
from rlhf.extras.tiny import char_tokenizer, save_tiny
from rlhf.rollout import Rollout


def critic_gradient(trainer, batch):
    """The critic's gradient of the same loss (PPO): computed alongside the actor's by ``gradient``."""
    return torch.cat([p.grad.reshape(-1) for p in trainer.critic.parameters()])


def test_fsdp2_training_matches_one_process(tmp_path):
    sharding = "fsdp2"
    model_dir = save_tiny(str(tmp_path / "tiny"), hidden_size=32, num_layers=2, max_positions=64, seed=3)
    run_two_process_worker("sharded_worker.py", model_dir, str(tmp_path / "run"), timeout=600)
    out = torch.load(tmp_path / "run" / "result.pt", weights_only=True)
    assert out["world_size"] == 2 and out["sharding"] == sharding

    for algo, extra in (("grpo", {"kl_coef": 0.1}), ("ppo", {"kl_coef": 0.05})):
        batch = Rollout(**out[algo]["batch"])
        assert batch.size == 16 and batch.completion_mask.sum() > 0  # generated with sharded parameters
        single = make_trainer(tmp_path / f"single-{algo}", model=AutoModelForCausalLM.from_pretrained(model_dir),
                              algo=algo, tokenizer=char_tokenizer(), mini_batch_size=16, micro_batch_size=4, **extra)
        actor = gradient(single, batch)
        assert relative_error(out[algo]["grad"]["actor"], actor) < 1e-5, algo
        if algo == "ppo":
            assert relative_error(out[algo]["grad"]["critic"], critic_gradient(single, batch)) < 1e-5
    assert out["resumed_at"] == 1
    assert out["straight"].keys() == out["resumed"].keys()
    for name, tensor in out["straight"].items():
        assert torch.equal(tensor, out["resumed"][name]), name


def test_deepspeed_config_gets_the_trainers_geometry():
    """The trainer has no dataloader for Accelerate to read DeepSpeed's batch settings from: they come from the
    trainer's micro-batch and accumulation; a conflicting value is an error naming it."""
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "gradient_clipping": "auto", "train_batch_size": "auto", "zero_optimization": {"stage": 3}}
    filled = fill_deepspeed_config(config, micro_batch=8, accumulation_steps=4, max_grad_norm=0.5)
    assert filled["train_micro_batch_size_per_gpu"] == 8 and filled["gradient_accumulation_steps"] == 4
    assert filled["gradient_clipping"] == 0.5 and "train_batch_size" not in filled
    assert fill_deepspeed_config({}, 8, 4, None)["gradient_clipping"] == 0.0
    with pytest.raises(ValueError, match="gradient_accumulation_steps=2, but the trainer's batch geometry needs 4"):
        fill_deepspeed_config({"gradient_accumulation_steps": 2}, 8, 4, 1.0)
