"""The no-grad passes over a rollout, each once per rollout batch and before any update: the sampling
policy's log-probs (and entropies), the reference's, a distillation teacher's, and the critic's values."""

import torch

from rlhf.critic import completion_values
from rlhf.forward import completion_logprobs
from rlhf.rollout import Rollout
from rlhf.trainer.plan import StepPlan, length_order


def rollout_logprobs(model, rollout: Rollout, plan: StepPlan, temperature: float, prefix_model=None,
                     with_entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs [B, T] of every completion token under ``model`` (at the sampling temperature); with
    ``with_entropy``, (log-probs, entropies), both from the one pass."""
    def score(micro):
        logprobs, entropy = completion_logprobs(
            model, micro.prompt_ids, micro.prompt_mask, micro.completion_ids, micro.completion_mask, temperature,
            with_entropy=with_entropy, group_size=plan.share_group, prefix_model=prefix_model)
        return torch.stack([logprobs, entropy], dim=1) if with_entropy else logprobs  # [b, 2, t] or [b, t]

    scores = no_grad_pass(score, rollout, plan)
    return tuple(scores.unbind(1)) if with_entropy else scores


def reference_logprobs(ref_model, policy_model, rollout: Rollout, plan: StepPlan, temperature: float,
                       accelerator) -> torch.Tensor:
    """Log-probs [B, T] under the reference: the frozen copy (``frozen_logprobs``), or, when there is no copy, the
    LoRA actor with its adapter disabled, in Accelerate's autocast."""
    if ref_model is not None:
        return frozen_logprobs(ref_model, rollout, plan, temperature, accelerator)
    with accelerator.autocast():
        unwrapped = accelerator.unwrap_model(policy_model)
        with unwrapped.disable_adapter():
            return rollout_logprobs(policy_model, rollout, plan, temperature, prefix_model=unwrapped)


def frozen_logprobs(model, rollout: Rollout, plan: StepPlan, temperature: float, accelerator) -> torch.Tensor:
    """Log-probs [B, T] under a frozen model (the reference, or a distillation teacher), moved to the device for
    this pass when it is offloaded.

    The pass runs in Accelerate's autocast, as every pass of the actor does (its prepared forward carries
    it): with mixed precision, an identical model then gives exactly the actor's log-probs, so the KL of
    identical models, and the distillation signal of a teacher identical to the student, are exactly 0."""
    device = accelerator.device
    offloaded = next(model.parameters()).device != device
    if offloaded:
        model.to(device)
    try:
        with accelerator.autocast():
            return rollout_logprobs(model, rollout, plan, temperature, prefix_model=model).float()
    finally:
        if offloaded:
            model.to("cpu")


def rollout_values(critic, rollout: Rollout, plan: StepPlan, accelerator) -> torch.Tensor:
    """The critic's values [B, T] of the rollout, before any update."""
    critic.eval()
    unwrapped = accelerator.unwrap_model(critic)
    return no_grad_pass(lambda micro: completion_values(
        critic, micro.prompt_ids, micro.prompt_mask, micro.completion_ids, micro.completion_mask, plan.share_group,
        unwrapped), rollout, plan)


@torch.no_grad()
def no_grad_pass(score, rollout: Rollout, plan: StepPlan) -> torch.Tensor:
    """``score(micro)`` -> [b, t] (or [b, ..., t]) for every micro-batch of ``rollout`` (by length, trimmed),
    reassembled to [B, T] (or [B, ..., T]) in the rollout's row order."""
    order = length_order(rollout, plan.share_group)
    ordered = rollout.rows(order)
    pieces = [score(ordered.rows(slice(start, start + plan.inference_batch)).trimmed())
              for start in range(0, rollout.size, plan.inference_batch)]
    width = rollout.completion_ids.shape[1]
    scores = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[-1])) for p in pieces])
    return scores[torch.argsort(order)]
