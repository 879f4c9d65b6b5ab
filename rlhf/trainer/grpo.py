"""GRPO (Shao et al., 2024, DeepSeekMath) with the Dr. GRPO and DAPO variants.

How this differs from the paper's description, in brief:
- The KL to the reference sits in the loss (k3 by default), as in the paper, but is off unless
  ``kl_coef > 0``; with it off no reference model is loaded.
- Loss aggregation is a choice (``loss_agg``): the paper's per-sequence mean, DAPO's token mean
  (default, as in TRL), or Dr. GRPO's constant normaliser.
- With one epoch and one mini-batch the old log-probs are the current ones, detached: the update is
  exactly on-policy and its gradient is the plain policy gradient with group advantages.
"""

import torch

from rlhf.configs import GRPOConfig
from rlhf.core import grpo_advantages
from rlhf.rollout import Batch
from rlhf.trainer.base import RLTrainer


class GRPOTrainer(RLTrainer):
    """Group Relative Policy Optimization: no critic; each completion's advantage is its reward
    relative to the other completions of the same prompt."""

    config_class = GRPOConfig

    def compute_advantages(self, batch: Batch, rewards: torch.Tensor, metrics) -> None:
        args = self.args
        advantages = grpo_advantages(rewards, args.num_generations, args.scale_rewards)  # [B_global]
        metrics.add("advantages/mean", advantages.mean())
        metrics.add("advantages/std", advantages.std() if advantages.numel() > 1 else 0.0)
        batch["advantages"] = self.local_rows(advantages).float()
        if args.filter_zero_std_groups:
            # Groups whose completions all scored the same carry no signal; DAPO drops them so they
            # do not dilute the token-mean denominator.
            zero_std = rewards.view(-1, args.num_generations).std(dim=1) == 0
            keep = self.local_rows((~zero_std).repeat_interleave(args.num_generations))
            batch["loss_mask"] = batch["loss_mask"] * keep.unsqueeze(1)
