"""What each algorithm adds to the shared step: its advantage estimator and whether it has a critic.

Every estimator has one signature: ``advantages(rewards, rollout, kl, reduce, metrics) -> (advantages,
returns)`` with ``rewards`` the sequence rewards of the *whole* rollout batch ([B_global], all processes,
in process order), ``kl`` the run's ``KLPenalty`` (token-level estimators let it shape their token
rewards), and ``reduce`` this process's view of the batch (``BatchReduce``). The loss terms are shared
(``rlhf.trainer.update``); the critic's value loss is added when ``has_critic``.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch

from rlhf.configs import GRPOConfig, PPOConfig, ReinforceConfig, RLConfig, RLOOConfig
from rlhf.core import (
    discounted_returns,
    gae,
    gdpo_advantages,
    grpo_advantages,
    masked_mean,
    masked_var,
    masked_whiten,
    rloo_advantages,
    token_level_rewards,
)


class BatchReduce:
    """This process's rows of batch-wide tensors, and statistics over every process's rows."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        several = accelerator.num_processes > 1
        self.all_reduce = (lambda t: accelerator.reduce(t, reduction="sum")) if several else None

    def local_rows(self, values: torch.Tensor) -> torch.Tensor:
        """This process's slice of a tensor gathered over processes in process order."""
        per_process = values.shape[0] // self.accelerator.num_processes
        start = self.accelerator.process_index * per_process
        return values[start:start + per_process].to(self.accelerator.device)

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Every process's rows of a [B, T] tensor in process order, right-padded with 0 to the widest T."""
        if self.accelerator.num_processes == 1:
            return values
        return self.accelerator.gather(self.accelerator.pad_across_processes(values, dim=1, pad_index=0))


def placed_rewards(rewards: torch.Tensor, rollout) -> torch.Tensor:
    """[B, T] per-token rewards of this process's rows: each sequence's reward ``rewards`` [B] on its last policy
    token. With an environment's per-turn rewards (multi-turn), those sit on their turns' last policy tokens and
    the rest of the sequence reward (which counts them once) on the last."""
    mask = rollout.policy_tokens
    if rollout.turn_rewards is None:
        return token_level_rewards(rewards, mask)
    turns = rollout.turn_rewards.to(rewards.dtype) * mask
    return token_level_rewards(rewards - turns.sum(dim=1), mask) + turns


def log_token_advantages(advantages: torch.Tensor, mask: torch.Tensor, reduce: BatchReduce, metrics) -> None:
    metrics.add("advantages/mean", masked_mean(advantages, mask, all_reduce=reduce.all_reduce))
    metrics.add("advantages/std", masked_var(advantages.double(), mask, all_reduce=reduce.all_reduce).sqrt())


@dataclass
class GRPO:
    """Group Relative Policy Optimization (Shao et al. 2024): each completion's advantage is its reward relative
    to the other completions of its prompt, one value for all its tokens. No critic. With ``decoupled`` (GDPO) the
    rewards come already normalised per function within each group (``rlhf.core.gdpo_rewards``) and are normalised
    once more over the batch."""

    group_size: int
    scale: str
    decoupled: bool = False
    has_critic: ClassVar[bool] = False

    def advantages(self, rewards, rollout, kl, reduce, metrics):
        if self.decoupled:
            advantages = gdpo_advantages(rewards)  # [B_global]
        else:
            advantages = grpo_advantages(rewards, self.group_size, self.scale)  # [B_global]
        metrics.add("advantages/mean", advantages.mean())
        metrics.add("advantages/std", advantages.std() if advantages.numel() > 1 else 0.0)
        return reduce.local_rows(advantages).float(), None


@dataclass
class Reinforce:
    """REINFORCE (Williams 1992) with a baseline: the advantage of token t is its discounted reward-to-go, from
    the sequence reward on the last token (minus the KL per token with ``kl_in="reward"``).

    none: the reward as it is; mean: minus the batch mean; rloo: minus the mean of the prompt's other
    completions (Ahmadian et al. 2024); reinforce++: reward-to-go whitened over every valid token of the
    batch (Hu 2025); reinforce++-baseline: the prompt's group mean subtracted from each reward first, then
    REINFORCE++'s whitening over the whole batch (all processes) (Hu et al. 2025, OpenRLHF's
    ``reinforce_baseline``)."""

    baseline: str
    gamma: float
    group_size: int
    has_critic: ClassVar[bool] = False

    def advantages(self, rewards, rollout, kl, reduce, metrics):
        if self.baseline == "mean":
            rewards = rewards - rewards.mean()
        elif self.baseline == "rloo":
            rewards = rloo_advantages(rewards, self.group_size)
        elif self.baseline == "reinforce++-baseline":
            rewards = grpo_advantages(rewards, self.group_size, scale="none")  # r - mean of the prompt's group
        mask = rollout.policy_tokens  # environment tokens neither get rewards nor count as a discount step
        token_rewards = kl.in_reward(placed_rewards(reduce.local_rows(rewards).float(), rollout), rollout, metrics)
        returns = discounted_returns(token_rewards, mask, self.gamma)
        if self.baseline in ("reinforce++", "reinforce++-baseline"):
            returns = masked_whiten(returns, mask, all_reduce=reduce.all_reduce)
        log_token_advantages(returns, mask, reduce, metrics)
        return returns, None


@dataclass
class PPO:
    """PPO with a critic (Schulman et al. 2017; Ouyang et al. 2022): GAE over the completion tokens with the
    critic's values of the rollout; returns = advantages + values, taken before the advantages are whitened."""

    gamma: float
    lam: float
    whiten: bool
    has_critic: ClassVar[bool] = True

    def advantages(self, rewards, rollout, kl, reduce, metrics):
        mask, values = rollout.policy_tokens, rollout.old_values  # GAE runs over the policy's tokens only
        token_rewards = kl.in_reward(placed_rewards(reduce.local_rows(rewards).float(), rollout), rollout, metrics)
        advantages, returns = gae(token_rewards, values, mask, self.gamma, self.lam)
        metrics.add("critic/returns_mean", masked_mean(returns, mask, all_reduce=reduce.all_reduce))
        metrics.add("critic/values_mean", masked_mean(values, mask, all_reduce=reduce.all_reduce))
        residual = masked_var(returns - values, mask, all_reduce=reduce.all_reduce)
        spread = masked_var(returns, mask, all_reduce=reduce.all_reduce)
        metrics.add("critic/explained_variance", 1 - residual.double() / spread.double().clamp(min=1e-12))
        if self.whiten:
            advantages = masked_whiten(advantages, mask, all_reduce=reduce.all_reduce)
        log_token_advantages(advantages, mask, reduce, metrics)
        return advantages, returns


@dataclass
class RLOO:
    """TRL's RLOO (``RLOOConfig``): the sequence reward, clipped to ``clip_range``, minus the KL penalty summed over
    the sequence's tokens, then the leave-one-out baseline (the mean of the same over the prompt's other completions);
    whitened over the batch with ``normalize``. One advantage per sequence, for all its tokens."""

    group_size: int
    clip_range: list[float] | None
    normalize: bool
    has_critic: ClassVar[bool] = False

    def advantages(self, rewards, rollout, kl, reduce, metrics):
        if self.clip_range is not None:
            rewards = rewards.clamp(*self.clip_range)
        mask = rollout.policy_tokens  # -kl_coef x KL per token (0 without a KL term), summed per sequence
        penalty = kl.in_reward(torch.zeros(mask.shape, dtype=torch.float32, device=mask.device), rollout, metrics)
        rewards = rewards + reduce.gather(penalty).sum(dim=1).to(rewards.device, rewards.dtype)
        advantages = rloo_advantages(rewards, self.group_size)  # [B_global]
        if self.normalize:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-4)
        metrics.add("advantages/mean", advantages.mean())
        metrics.add("advantages/std", advantages.std())
        return reduce.local_rows(advantages).float(), None


def algorithm_for(args: RLConfig):
    """The estimator a config asks for."""
    if isinstance(args, GRPOConfig):
        return GRPO(args.num_generations, args.scale_rewards, args.multi_objective_aggregation == "normalize_then_sum")
    if isinstance(args, PPOConfig):
        return PPO(args.gamma, args.gae_lambda, args.whiten_advantages)
    if isinstance(args, RLOOConfig):
        return RLOO(args.num_generations, args.reward_clip_range, args.normalize_advantages)
    if isinstance(args, ReinforceConfig):
        return Reinforce(args.baseline, args.gamma, args.num_generations)
    raise TypeError(f"no algorithm for {type(args).__name__}")
