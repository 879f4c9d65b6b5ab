"""What PPO and REINFORCE share: the sequence reward on the last completion token, a per-token KL
penalty to the reference in the reward (``kl_in="reward"``) or in the loss, and an optional adaptive
KL coefficient (Ziegler et al. 2019)."""

import torch

from rlhf.configs import TokenRewardConfig
from rlhf.core import kl_penalty, masked_sum, token_level_rewards
from rlhf.rollout import Batch
from rlhf.trainer.base import RLTrainer


class AdaptiveKLController:
    """kl_coef <- kl_coef * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon), after each step with
    n samples whose mean KL per sequence was KL."""

    def __init__(self, target: float, horizon: int):
        self.target = target
        self.horizon = horizon

    def update(self, kl_coef: float, kl: float, num_samples: int) -> float:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        return kl_coef * (1.0 + error * num_samples / self.horizon)


class TokenRewardTrainer(RLTrainer):
    """Base of PPO and REINFORCE: builds per-token rewards from sequence rewards."""

    config_class = TokenRewardConfig

    def init_algorithm(self, actor) -> None:
        args = self.args
        self.kl_controller = AdaptiveKLController(args.kl_target, args.kl_horizon) if args.kl_target else None

    @property
    def kl_in_reward(self) -> bool:
        return self.args.kl_in == "reward"

    @property
    def needs_old_logprobs(self) -> bool:
        # With a reference, the rollout's KL is measured from the rollout policy's log-probs.
        return not self.on_policy or self.has_reference

    def token_rewards(self, batch: Batch, sequence_rewards: torch.Tensor, metrics) -> torch.Tensor:
        """[B_local, T] rewards: this process's ``sequence_rewards`` (a [B_global] tensor) on the last valid
        token, minus ``kl_coef * KL`` per token when the KL sits in the reward."""
        mask = batch["completion_mask"]
        kl = None
        if self.has_reference:
            kl = kl_penalty(batch["old_logprobs"], batch["ref_logprobs"], self.args.kl_estimator)
            sequence_kl = masked_sum(kl, mask, dim=1)
            metrics.add("kl/sequence", sequence_kl.mean(), sequence_kl.numel())
            if self.kl_in_reward:
                metrics.add("kl", masked_sum(kl, mask) / mask.sum().clamp(min=1), mask.sum())
                metrics.add("kl/reward_penalty", -self.kl_coef * sequence_kl.mean(), sequence_kl.numel())
        local = self.local_rows(sequence_rewards).to(torch.float32)
        return token_level_rewards(local, mask, kl if self.kl_in_reward else None, self.kl_coef)

    def training_step(self) -> dict[str, float]:
        metrics = super().training_step()
        metrics["kl_coef"] = self.kl_coef
        if self.kl_controller is not None:
            self.kl_coef = self.kl_controller.update(self.kl_coef, metrics["kl/sequence"], self.args.rollout_batch_size)
        return metrics

    def log_token_advantages(self, advantages: torch.Tensor, mask: torch.Tensor, metrics) -> None:
        mean, var = self.global_mean_var(advantages, mask)
        metrics.add("advantages/mean", mean)
        metrics.add("advantages/std", var.sqrt())
