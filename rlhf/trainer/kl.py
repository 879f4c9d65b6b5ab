"""Where the KL to the reference enters, decided in one place: ``KLPenalty``.

- ``kl_in="reward"`` (the PPO and REINFORCE default, as in InstructGPT): before advantages are computed,
  every completion token's reward is reduced by ``kl_coef * KL`` at that token, the KL of the sampling
  policy to the reference (no gradient). GAE and reward-to-go then carry it.
- ``kl_in="loss"`` (the GRPO default, as in DeepSeekMath): the loss adds ``kl_coef * KL`` of the current
  policy to the reference, aggregated like the policy loss, with gradient.
- ``kl_in=None`` or ``kl_coef=0``: no KL, and no reference model is loaded.

``kl_target`` makes ``kl_coef`` adaptive (Ziegler et al. 2019) in either place.
"""

import torch

from rlhf.core import aggregate_loss, kl_penalty, masked_mean, masked_sum


class AdaptiveKLController:
    """kl_coef <- kl_coef * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon), after each step with
    n samples whose mean KL per sequence was KL."""

    def __init__(self, target: float, horizon: int):
        self.target = target
        self.horizon = horizon

    def update(self, kl_coef: float, kl: float, num_samples: int) -> float:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        return kl_coef * (1.0 + error * num_samples / self.horizon)


def kl_placement(kl_in: str | None, kl_coef: float) -> str | None:
    """"reward", "loss", or None when there is no KL term."""
    return kl_in if kl_coef > 0 else None


class KLPenalty:
    """The KL term of one run: its placement, its (possibly adaptive) coefficient and its estimator."""

    def __init__(self, placement: str | None, coef: float, estimator: str, target: float | None = None,
                 horizon: int = 10000):
        self.placement = placement
        self.coef = coef
        self.estimator = estimator
        self.controller = AdaptiveKLController(target, horizon) if target else None

    def in_reward(self, token_rewards: torch.Tensor, rollout, metrics) -> torch.Tensor:
        """``token_rewards`` [B, T] minus ``coef * KL`` per valid token when the KL sits in the reward (else
        unchanged). Logs the rollout's KL per sequence whenever it is measured."""
        if rollout.ref_logprobs is None or rollout.old_logprobs is None:
            return token_rewards
        mask = rollout.policy_tokens
        kl = kl_penalty(rollout.old_logprobs, rollout.ref_logprobs, self.estimator)  # [B, T], no gradient
        sequence_kl = masked_sum(kl, mask, dim=1)
        metrics.add("kl/sequence", sequence_kl.mean(), sequence_kl.numel())
        if self.placement != "reward":
            return token_rewards
        metrics.add("kl", masked_sum(kl, mask) / mask.sum().clamp(min=1), mask.sum())
        metrics.add("kl/reward_penalty", -self.coef * sequence_kl.mean(), sequence_kl.numel())
        return token_rewards - self.coef * torch.where(mask.bool(), kl.to(token_rewards.dtype), 0.0)

    def in_loss(self, logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None, mask: torch.Tensor, agg: str,
                denominators: dict) -> tuple[torch.Tensor | float, dict]:
        """(``coef * aggregate(KL)`` with gradient, and its metric) when the KL sits in the loss; (0, {}) otherwise."""
        if self.placement != "loss":
            return 0.0, {}
        kl = kl_penalty(logprobs, ref_logprobs, self.estimator)
        return self.coef * aggregate_loss(kl, mask, agg, **denominators), {"kl": masked_mean(kl.detach(), mask)}

    def update_coef(self, kl_per_sequence: float | None, num_samples: int) -> None:
        """After a step: move an adaptive coefficient towards its target."""
        if self.controller is not None and kl_per_sequence is not None:
            self.coef = self.controller.update(self.coef, kl_per_sequence, num_samples)
