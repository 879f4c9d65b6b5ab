"""Advantage estimators: group-normalised (GRPO; GDPO for several rewards), leave-one-out (RLOO), reward-to-go, GAE,
and the per-token reverse KL to a teacher (on-policy distillation)."""

from typing import Literal, get_args

import torch

RewardScale = Literal["group", "batch", "none"]
REWARD_SCALES = get_args(RewardScale)


def grpo_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale: RewardScale = "group",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Group-relative advantages, one per completion. ``rewards``: [B], B divisible by ``group_size``.

    A_i = (r_i - mean_g) / (std_g + eps) with the unbiased std of the group (``scale="group"``,
    DeepSeekMath); ``"batch"`` divides by the std of the whole batch instead (more robust when a
    group's rewards are nearly equal); ``"none"`` only subtracts the group mean (Dr. GRPO).
    A group of identical rewards, or of size 1, gets advantage 0 (never NaN).
    """
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards must be 1-D with a length divisible by group_size={group_size}, "
            f"got shape {tuple(rewards.shape)}"
        )
    grouped = rewards.view(-1, group_size)  # [num_groups, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "none":
        return centred.reshape(-1)
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred)
    elif scale == "batch":
        std = rewards.std() if rewards.numel() > 1 else torch.zeros((), dtype=rewards.dtype)
    else:
        raise ValueError(f"scale must be one of {REWARD_SCALES}, got {scale!r}")
    return (centred / (std + eps)).reshape(-1)


def _nan_std(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The unbiased std over the non-NaN entries (NaN where fewer than 2), keeping ``dim``."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~x.isnan()).sum(dim=dim, keepdim=True)
    squares = torch.nansum((x - mean).square(), dim=dim, keepdim=True)
    return torch.where(count > 1, squares / (count - 1).clamp(min=1), torch.nan).sqrt()


def gdpo_rewards(per_function: torch.Tensor, weights: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GDPO's group-decoupled reward (arXiv 2601.05242; TRL's ``multi_objective_aggregation="normalize_then_sum"``):
    each function's rewards normalised within the group first, then the weighted sum. [B]

    r_i = sum_k w_k * (r_ik - mean_g(r_k)) / (std_g(r_k) + eps), unbiased std. A NaN (the function returned None)
    is left out of its group's mean and std and of the sum, as in TRL; a function with fewer than 2 values in a
    group adds nothing there; a row where every function returned None is NaN (``gdpo_advantages`` gives it 0).
    Unlike summing first, a function with a small spread is not drowned by one with a large spread.
    ``per_function``: [B, F]; ``weights``: [F].
    """
    if per_function.dim() != 2 or per_function.shape[0] % group_size != 0:
        raise ValueError(f"per_function must be [B, F] with B divisible by group_size={group_size}, "
                         f"got shape {tuple(per_function.shape)}")
    grouped = per_function.view(-1, group_size, per_function.shape[1])  # [num_groups, G, F]
    normalised = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)) / (_nan_std(grouped, dim=1) + eps)
    total = torch.nansum(normalised.view_as(per_function) * weights.to(per_function), dim=1)
    return torch.where(per_function.isnan().all(dim=1), torch.nan, total)


def gdpo_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GDPO's second normalisation, over the whole batch: A_i = (r_i - mean) / (std + eps) of ``gdpo_rewards`` [B],
    its NaN rows (no function applied) left out of the statistics and given advantage 0."""
    advantages = (rewards - torch.nanmean(rewards)) / (_nan_std(rewards) + eps)
    return torch.nan_to_num(advantages, nan=0.0)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out: A_i = r_i - mean of the other G-1 rewards of its group.

    Equivalent to G/(G-1) * (r_i - mean_g) (Kool et al. 2019; Ahmadian et al. 2024).
    """
    if group_size < 2:
        raise ValueError(f"RLOO needs at least 2 completions per prompt, got group_size={group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards must be 1-D with a length divisible by group_size={group_size}, "
            f"got shape {tuple(rewards.shape)}"
        )
    grouped = rewards.view(-1, group_size)
    others_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others_mean).reshape(-1)


def token_level_rewards(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """Per-token rewards [B, T]: the sequence reward on the last valid token of each row (the first
    EOS, or the last token of a truncated completion), minus ``kl_coef * kl`` on every valid token.

    r_t = -kl_coef * kl_t + R * [t == last valid t]; masked positions are 0. A row with no valid
    token receives nothing.
    """
    valid = mask.bool()
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(valid, positions, torch.full_like(positions, -1)).amax(dim=1)  # [B], -1 if empty
    token_rewards = torch.zeros(mask.shape, dtype=rewards.dtype, device=rewards.device)
    if kl is not None and kl_coef != 0.0:
        token_rewards = torch.where(valid, -kl_coef * kl.to(rewards.dtype), token_rewards)
    rows = torch.nonzero(last >= 0).squeeze(1)
    token_rewards[rows, last[rows]] += rewards[rows]
    return token_rewards


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Reward-to-go G_t = sum_{k >= t} gamma^(k - t) r_k over the valid tokens of each row. [B, T].

    Masked positions neither receive a return (0 in the output) nor count as a discount step,
    so a row's returns do not depend on how much padding follows it.
    """
    valid = mask.bool()
    returns = torch.zeros_like(token_rewards)
    running = torch.zeros_like(token_rewards[:, 0])
    for t in reversed(range(token_rewards.shape[1])):
        running = torch.where(valid[:, t], token_rewards[:, t] + gamma * running, running)
        returns[:, t] = torch.where(valid[:, t], running, torch.zeros_like(running))
    return returns


def gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016). Returns (advantages, returns), [B, T].

    delta_t = r_t + gamma * V_{t+1} - V_t, with V after the last valid token = 0;
    A_t = delta_t + gamma * lam * A_{t+1}; returns_t = A_t + V_t.
    Masked positions are skipped (their values never enter) and are 0 in both outputs.
    lam = 1 gives discounted returns minus values; lam = 0 gives the one-step TD residual.
    """
    valid = mask.bool()
    zeros = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    next_value, next_advantage = zeros, zeros
    for t in reversed(range(values.shape[1])):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        next_value = torch.where(valid[:, t], values[:, t], next_value)
        next_advantage = torch.where(valid[:, t], advantage, next_advantage)
        advantages[:, t] = torch.where(valid[:, t], advantage, zeros)
    returns = torch.where(valid, advantages + values, torch.zeros_like(values))
    return advantages, returns


def reverse_kl_advantages(logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """On-policy distillation's dense signal (Agarwal et al. 2024; Lu & Thinking Machines 2025): per token
    A_t = log pi_teacher(y_t) - log pi_student(y_t) on the student's own samples, the negative of the single-sample
    estimate of the reverse KL(student || teacher) at that token; no discount (each token is judged where it
    stands). 0 at masked positions, and exactly 0 everywhere when the teacher is the student. [B, T]."""
    return torch.where(mask.bool(), teacher_logprobs - logprobs, torch.zeros_like(logprobs))
