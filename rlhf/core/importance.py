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

ImportanceLevel = Literal["token", "sequence", "sequence_token", "sequence_sum"]
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
    - ``sequence_sum`` (TRL's RLOO): log s_i = the sum over the row's valid tokens of (logp - old), the log of the
      sequence's likelihood ratio, at every token of the row; with seq-mean-token-mean the loss is PPO's clipped
      surrogate on whole sequences.

    A row without valid tokens gets 0. Masked positions hold values that the loss must mask out."""
    log_ratio = logprobs - old_logprobs
    if level == "token":
        return log_ratio
    if level not in IMPORTANCE_LEVELS:
        raise ValueError(f"importance sampling level must be one of {IMPORTANCE_LEVELS}, got {level!r}")
    if level == "sequence_sum":
        return masked_sum(log_ratio, mask, dim=-1).unsqueeze(-1).expand_as(log_ratio)
    sequence = masked_mean(log_ratio, mask, dim=-1).unsqueeze(-1)  # [B, 1]
    if level == "sequence":
        return sequence.expand_as(log_ratio)
    return sequence.detach() + (logprobs - logprobs.detach())  # the value is exactly the sequence ratio


def rollout_correction(old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor,
                       mode: RolloutCorrection, cap: float) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Correct for a sampler that differs from the trained policy (other precision, kernels, an external engine).
    Returns (per-token weights [B, T] or None, rows to keep [B] bool). Nothing here has a gradient.

    - ``token_truncate`` (truncated importance sampling, Yao et al. 2025): w_t = min(pi_old / pi_sampler, cap) at
      every valid token (0 elsewhere), multiplying the policy loss; every row is kept.
    - ``sequence_mask``: the sequence ratio rho_i = prod_t pi_old / pi_sampler over the row's valid tokens; rows
      with rho_i outside [1 / cap, cap] are dropped (from the loss and its counts); no weights.

    ``logprob_mismatch`` measures what each mode truncates or drops."""
    if cap <= 1:
        raise ValueError(f"rollout correction cap must be > 1, got {cap}")
    valid = mask.bool()
    with torch.no_grad():
        log_ratio = torch.where(valid, old_logprobs - sampler_logprobs, torch.zeros_like(old_logprobs))
        if mode == "token_truncate":
            weights = torch.where(valid, torch.exp(log_ratio.clamp(max=math.log(cap))), torch.zeros_like(log_ratio))
            return weights, torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device)
        if mode == "sequence_mask":
            return None, log_ratio.sum(dim=-1).abs() <= math.log(cap)
    raise ValueError(f"rollout correction must be one of {ROLLOUT_CORRECTIONS}, got {mode!r}")


def logprob_mismatch(logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor,
                     cap: float = 2.0) -> dict:
    """How far the sampler's log-probs are from the trainer's on the valid tokens, with d = log pi - log pi_sampler
    (0-d tensors, no gradient):

    - ``abs_log_ratio``: the mean of |d|; ``max_abs_log_ratio``: its maximum;
    - ``k3``: the mean of exp(d) - 1 - d, an estimate of KL(sampler || trainer): >= 0, and 0 only when they agree;
    - ``truncated_frac``: the fraction of valid tokens whose ratio exceeds ``cap`` (what ``token_truncate`` caps);
    - ``masked_frac``: the fraction of rows (with a valid token) whose sequence ratio exp(sum d) leaves
      [1 / cap, cap] (what ``sequence_mask`` drops)."""
    with torch.no_grad():
        valid = mask.bool()
        d = torch.where(valid, logprobs - sampler_logprobs, torch.zeros_like(logprobs))
        rows = valid.any(dim=-1)
        outside = (d.sum(dim=-1).abs() > math.log(cap)) & rows
        return {"abs_log_ratio": masked_mean(d.abs(), mask), "max_abs_log_ratio": d.abs().max(),
                "k3": masked_sum(torch.expm1(d.clamp(-20, 20)) - d, mask) / mask.sum().clamp(min=1),
                "truncated_frac": masked_mean((d > math.log(cap)).to(d.dtype), mask),
                "masked_frac": masked_mean(outside.to(d.dtype), rows)}
