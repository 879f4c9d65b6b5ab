"""Importance ratios: per token or per sequence (GSPO), and the rollout correction for a sampler that is not
exactly the trained policy (truncated importance weights, sequence masking).

Two ratios meet in an update, with three policies: the sampler that generated the tokens (``sampler_logprobs``,
recorded during generation), the trainer's own scoring of the rollout before any update (``old_logprobs``), and
the policy being updated (``logprobs``, with gradient). The PPO / GSPO / CISPO ratio is pi / pi_old; the rollout
correction reweights by pi_old / pi_sampler, which is 1 when the sampler is the trainer.
"""

import math
from typing import Literal, get_args

import torch

from rlhf.core.masked import masked_mean, masked_sum

ImportanceLevel = Literal["token", "sequence", "sequence_token"]
IMPORTANCE_LEVELS = get_args(ImportanceLevel)
RolloutCorrection = Literal["token_truncate", "sequence_mask"]
ROLLOUT_CORRECTIONS = get_args(RolloutCorrection)


def log_importance_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor,
                         level: ImportanceLevel = "token") -> torch.Tensor:
    """log r [B, T], the log importance ratio of the current policy to the old one at every token.

    - ``token``: log r_t = logp_t - old_t (PPO, GRPO).
    - ``sequence`` (GSPO, Zheng et al. 2025): log s_i = mean over the row's valid tokens of (logp - old), the same
      value at every token of the row; its gradient is the mean of the row's grad logp_t.
    - ``sequence_token`` (GSPO-token): the value of ``sequence`` with a per-token gradient path,
      log r_t = sg(log s_i) + logp_t - sg(logp_t), so that d r_t = s_i * d logp_t and per-token advantages can
      weigh each token. With one advantage per sequence its gradient is ``sequence``'s.

    A row without valid tokens gets 0. Masked positions hold values that the loss must mask out."""
    log_ratio = logprobs - old_logprobs
    if level == "token":
        return log_ratio
    if level not in IMPORTANCE_LEVELS:
        raise ValueError(f"importance sampling level must be one of {IMPORTANCE_LEVELS}, got {level!r}")
    sequence = masked_mean(log_ratio, mask, dim=-1).unsqueeze(-1)  # [B, 1]
    if level == "sequence":
        return sequence.expand_as(log_ratio)
    return sequence.detach() + (logprobs - logprobs.detach())  # the value is exactly the sequence ratio


def rollout_correction(old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor,
                       mode: RolloutCorrection, cap: float) -> tuple[torch.Tensor | None, torch.Tensor, dict]:
    """Correct for a sampler that differs from the trained policy (other precision, kernels, an external engine).
    Returns (per-token weights [B, T] or None, rows to keep [B] bool, metrics). Nothing here has a gradient.

    - ``token_truncate`` (truncated importance sampling, Yao et al. 2025): w_t = min(pi_old / pi_sampler, cap) at
      every valid token (0 elsewhere), multiplying the policy loss; every row is kept.
    - ``sequence_mask``: the sequence ratio rho_i = prod_t pi_old / pi_sampler over the row's valid tokens; rows
      with rho_i outside [1 / cap, cap] are dropped (from the loss and its counts); no weights.

    Metrics: ``truncated_frac`` (valid tokens whose ratio exceeded ``cap``) or ``masked_frac`` (rows dropped,
    among rows with a valid token)."""
    if cap <= 1:
        raise ValueError(f"rollout correction cap must be > 1, got {cap}")
    valid = mask.bool()
    with torch.no_grad():
        log_ratio = torch.where(valid, old_logprobs - sampler_logprobs, torch.zeros_like(old_logprobs))
        if mode == "token_truncate":
            ratio = torch.exp(log_ratio.clamp(max=math.log(cap)))
            weights = torch.where(valid, ratio, torch.zeros_like(ratio))
            truncated = (log_ratio > math.log(cap)) & valid
            return weights, torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device), {
                "truncated_frac": masked_mean(truncated.to(old_logprobs.dtype), mask)}
        if mode == "sequence_mask":
            sequence = log_ratio.sum(dim=-1)  # log rho_i [B]
            keep = sequence.abs() <= math.log(cap)
            rows = valid.any(dim=-1)
            dropped = (~keep & rows).to(old_logprobs.dtype)
            return None, keep, {"masked_frac": masked_mean(dropped, rows)}
    raise ValueError(f"rollout correction must be one of {ROLLOUT_CORRECTIONS}, got {mode!r}")


def logprob_mismatch(logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor) -> dict:
    """How far the sampler's log-probs are from the trainer's on the valid tokens: ``abs_log_ratio`` (the mean of
    |log pi - log pi_sampler|), ``max_abs_log_ratio``, and ``k3`` (the mean KL(sampler || trainer) estimate
    exp(d) - 1 - d with d = log pi - log pi_sampler, >= 0, 0 only when they agree). [], no gradient."""
    with torch.no_grad():
        d = torch.where(mask.bool(), logprobs - sampler_logprobs, torch.zeros_like(logprobs))
        return {"abs_log_ratio": masked_mean(d.abs(), mask), "max_abs_log_ratio": d.abs().max(),
                "k3": masked_sum(torch.expm1(d.clamp(-20, 20)) - d, mask) / mask.sum().clamp(min=1)}
