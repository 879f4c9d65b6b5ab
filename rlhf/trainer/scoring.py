"""The no-grad passes over a rollout, each once per rollout batch and before any update: the sampling
policy's log-probs, the reference's, and the critic's values."""

import torch

from rlhf.critic import completion_values
from rlhf.forward import completion_logprobs
from rlhf.rollout import Rollout
from rlhf.trainer.update import StepPlan, no_grad_pass


def rollout_logprobs(model, rollout: Rollout, plan: StepPlan, temperature: float,
                     prefix_model=None) -> torch.Tensor:
    """Log-probs [B, T] of every completion token under ``model`` (at the sampling temperature)."""
    return no_grad_pass(lambda micro: completion_logprobs(
        model, micro.prompt_ids, micro.prompt_mask, micro.completion_ids, micro.completion_mask, temperature,
        group_size=plan.share_group, prefix_model=prefix_model)[0], rollout, plan)


def reference_logprobs(ref_model, policy_model, rollout: Rollout, plan: StepPlan, temperature: float,
                       accelerator) -> torch.Tensor:
    """Log-probs [B, T] under the reference: the frozen copy (moved to the device for this pass when it is
    offloaded), or, when there is no copy, the LoRA actor with its adapter disabled.

    The pass runs in Accelerate's autocast, as every pass of the actor does (its prepared forward carries
    it): with mixed precision, an identical reference then gives exactly the actor's log-probs, and the KL
    of identical models is exactly 0."""
    with accelerator.autocast():
        if ref_model is None:
            unwrapped = accelerator.unwrap_model(policy_model)
            with unwrapped.disable_adapter():
                return rollout_logprobs(policy_model, rollout, plan, temperature, prefix_model=unwrapped)
        device = accelerator.device
        offloaded = next(ref_model.parameters()).device != device
        if offloaded:
            ref_model.to(device)
        try:
            return rollout_logprobs(ref_model, rollout, plan, temperature, prefix_model=ref_model).float()
        finally:
            if offloaded:
                ref_model.to("cpu")


def rollout_values(critic, rollout: Rollout, plan: StepPlan, accelerator) -> torch.Tensor:
    """The critic's values [B, T] of the rollout, before any update."""
    critic.eval()
    unwrapped = accelerator.unwrap_model(critic)
    return no_grad_pass(lambda micro: completion_values(
        critic, micro.prompt_ids, micro.prompt_mask, micro.completion_ids, micro.completion_mask, plan.share_group,
        unwrapped), rollout, plan)
