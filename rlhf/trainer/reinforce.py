"""REINFORCE with a choice of baseline (Williams, 1992), RLOO (Ahmadian et al., 2024) and
REINFORCE++ (Hu, 2025).

- Token rewards: the sequence reward on the last completion token, minus ``kl_coef * KL`` per token
  when ``kl_in="reward"``. The advantage of token t is its discounted reward-to-go G_t.
- ``baseline``: "none" keeps G_t; "mean" first subtracts the batch-mean reward from each sequence
  reward; "rloo" subtracts the mean reward of the prompt's other completions; "reinforce++" whitens
  G_t over every valid token of the rollout batch (all processes).
- ``num_epochs=1`` is the plain policy gradient (ratio exactly 1); more epochs reuse the batch with
  clipped importance ratios, as GRPO does.
"""

import torch

from rlhf.configs import ReinforceConfig
from rlhf.core import discounted_returns, rloo_advantages
from rlhf.rollout import Batch
from rlhf.trainer.token_rewards import TokenRewardTrainer


class ReinforceTrainer(TokenRewardTrainer):
    config_class = ReinforceConfig

    def compute_advantages(self, batch: Batch, rewards: torch.Tensor, metrics) -> None:
        args = self.args
        if args.baseline == "mean":
            rewards = rewards - rewards.mean()
        elif args.baseline == "rloo":
            rewards = rloo_advantages(rewards, args.num_generations)
        mask = batch["completion_mask"]
        returns = discounted_returns(self.token_rewards(batch, rewards, metrics), mask, args.gamma)
        if args.baseline == "reinforce++":
            returns = self.global_whiten(returns, mask)
        self.log_token_advantages(returns, mask, metrics)
        batch["advantages"] = returns
