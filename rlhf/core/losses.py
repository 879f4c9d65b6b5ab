"""Loss aggregation, KL estimators, the policy loss (PPO's clipped surrogate, CISPO or SAPO's soft gate) and the clipped
value loss."""

from typing import Literal, get_args

import torch

from rlhf.core.importance import ImportanceLevel, log_importance_ratio
from rlhf.core.masked import masked_mean, masked_sum

# The legal values, written once: configs annotate their fields with these types and validate against them.
LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
LOSS_AGG_MODES = get_args(LossAgg)
KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS = get_args(KLEstimator)
PolicyLossType = Literal["ppo", "cispo", "sapo"]
POLICY_LOSS_TYPES = get_args(PolicyLossType)


def aggregate_loss(
    loss: torch.Tensor,
    mask: torch.Tensor,
    mode: LossAgg,
    num_tokens: torch.Tensor | float | None = None,
    num_seqs: torch.Tensor | float | None = None,
    seq_len: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar.

    - ``token-mean``: sum(l * m) / sum(m)  (DAPO; every token weighs the same)
    - ``seq-mean-token-mean``: mean_i(sum_t l * m / sum_t m)  (the original GRPO)
    - ``seq-mean-token-sum``: mean_i(sum_t l * m)
    - ``seq-mean-token-sum-norm``: sum(l * m) / (B * T)  (Dr. GRPO; T a constant length budget)

    Rows whose mask is all zero contribute nothing and are not counted in B.
    When a batch is split into micro-batches (or processes), pass the *global* denominators so that
    the micro-batch losses add up to the loss of the whole batch: ``num_tokens`` (sum of the mask
    over the whole batch) for token-mean, ``num_seqs`` (rows with at least one token in the whole
    batch) for the seq-mean modes, and ``seq_len`` (T, default ``loss.shape[1]``) for the last mode.
    """
    if mode == "token-mean":
        denominator = mask.sum() if num_tokens is None else num_tokens
        return masked_sum(loss, mask) / torch.as_tensor(denominator, dtype=loss.dtype).clamp(min=1)
    row_tokens = mask.sum(dim=-1)  # [B]
    denominator = (row_tokens > 0).sum() if num_seqs is None else num_seqs
    denominator = torch.as_tensor(denominator, dtype=loss.dtype).clamp(min=1)
    if mode == "seq-mean-token-mean":
        return masked_mean(loss, mask, dim=-1).sum() / denominator
    if mode == "seq-mean-token-sum":
        return masked_sum(loss, mask) / denominator
    if mode == "seq-mean-token-sum-norm":
        horizon = loss.shape[-1] if seq_len is None else seq_len
        return masked_sum(loss, mask) / (denominator * horizon)
    raise ValueError(f"loss aggregation mode must be one of {LOSS_AGG_MODES}, got {mode!r}")


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy (Schulman, 2020).

    With d = logprobs - ref_logprobs: k1 = d (unbiased, can be negative), k2 = d^2 / 2,
    k3 = exp(-d) - 1 + d (unbiased, never negative, exactly 0 when the two agree).
    k3 is computed as expm1(-d) + d, which stays >= 0 in fp32 for tiny d where exp(-d) - 1 + d
    rounds below zero; d is clamped to [-20, 20] inside the exponential so one wild token cannot
    overflow it.
    """
    d = logprobs - ref_logprobs
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d.square()
    if estimator == "k3":
        return torch.expm1(-d.clamp(-20.0, 20.0)) + d
    raise ValueError(f"kl estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps_low: float,
    clip_eps_high: float,
    dual_clip: float | None = None,
    agg: LossAgg = "token-mean",
    level: ImportanceLevel = "token",
    loss_type: PolicyLossType = "ppo",
    weights: torch.Tensor | None = None,
    ratio_mask: torch.Tensor | None = None,
    sapo_temperatures: tuple[float, float] = (1.0, 1.05),
    **denominators,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy loss per token, aggregated with ``agg``. r = exp(log_importance_ratio(..., ``level``)): per token,
    or GSPO's sequence ratio (``rlhf.core.importance``).

    - ``loss_type="ppo"``: l = max(-A * r, -A * clip(r, 1 - eps_low, 1 + eps_high)). With dual clip c (Ye et al.
      2020) and A < 0: l = min(l, -c * A), which bounds the loss of a token whose ratio has run far above 1 while
      its advantage is negative. A clipped token gives no gradient.
    - ``loss_type="cispo"`` (MiniMax-M1, 2025): l = -sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * logprobs, REINFORCE
      with a clipped, stop-gradient importance weight: a clipped token still gives gradient, with its weight held at
      the bound.
    - ``loss_type="sapo"`` (Soft Adaptive Policy Optimization, arXiv 2511.20347; TRL's ``sapo``): no hard clip but a
      smooth gate, l = -A * (4 / tau) * sigmoid(tau * (r - 1)), tau = ``sapo_temperatures`` (tau_pos, tau_neg) for
      A > 0 / A <= 0. Its gradient is -A * sigmoid'(tau (r - 1)) * 4 * grad r: exactly PPO's at r = 1, fading
      smoothly as r leaves 1 (faster for the larger tau, so negative advantages are damped sooner). The clip
      metrics are 0 (nothing is clipped); ``clip_eps_*`` are not used.

    ``weights`` [B, T] (no gradient: the rollout correction's, the entropy selection's 0 / 1) multiply each token's
    loss; ``mask`` alone decides what the denominators count. ``ratio_mask`` [B, T]: the tokens a sequence ratio
    averages over, every valid token of the completion as in GSPO and TRL (default ``mask``); pass it when ``mask``
    keeps only some of a row's tokens. ``advantages`` is [B, T] or [B] (one per sequence, broadcast over its tokens).
    ``denominators`` (num_tokens, num_seqs, seq_len) are passed to :func:`aggregate_loss`. Log-probs outside both
    masks may be -inf or NaN (a pad token's): they never reach the loss, a metric or the gradient.

    Metrics (masked means over the valid tokens): ``clip_frac_low`` / ``clip_frac_high`` (tokens whose clip is
    active: for ppo r < 1 - eps_low with A < 0, r > 1 + eps_high with A > 0; for cispo any r beyond a bound),
    ``dual_clip_frac``, ``approx_kl`` (k3 of old vs new, per token), ``ratio_mean``, ``ratio_max``; and per sequence
    [B], ``clip_frac_low_rows`` / ``clip_frac_high_rows``.
    """
    if loss_type not in POLICY_LOSS_TYPES:
        raise ValueError(f"policy loss type must be one of {POLICY_LOSS_TYPES}, got {loss_type!r}")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    ratio_mask = mask if ratio_mask is None else ratio_mask
    # Zero the padding first: logp - sg(logp) of a -inf is NaN, and the backward's 0 x NaN would be NaN too.
    scored = mask.bool() | ratio_mask.bool()
    logprobs, old_logprobs = torch.where(scored, logprobs, 0.0), torch.where(scored, old_logprobs, 0.0)
    ratio = torch.exp(log_importance_ratio(logprobs, old_logprobs, ratio_mask, level).clamp(-20.0, 20.0))
    clipped_ratio = torch.clamp(ratio, 1 - clip_eps_low, 1 + clip_eps_high)
    dual_clipped = torch.zeros_like(ratio, dtype=torch.bool)
    if loss_type == "cispo":
        per_token = -clipped_ratio.detach() * advantages * logprobs
    elif loss_type == "sapo":
        tau_pos, tau_neg = sapo_temperatures
        tau = torch.full_like(advantages, tau_neg, dtype=ratio.dtype).masked_fill(advantages > 0, tau_pos)
        per_token = -advantages * torch.sigmoid(tau * (ratio - 1)) * 4 / tau
    else:
        per_token = torch.maximum(-advantages * ratio, -advantages * clipped_ratio)
        if dual_clip is not None:
            bound = -dual_clip * advantages
            dual_clipped = (advantages < 0) & (per_token > bound)
            per_token = torch.where(dual_clipped, bound.expand_as(per_token), per_token)
    if weights is not None:
        per_token = per_token * weights
    loss = aggregate_loss(per_token, mask, agg, **denominators)

    with torch.no_grad():
        low, high = ratio < 1 - clip_eps_low, ratio > 1 + clip_eps_high
        if loss_type == "ppo":
            low, high = low & (advantages < 0), high & (advantages > 0)
        elif loss_type == "sapo":  # a soft gate: no token is clipped
            low, high = torch.zeros_like(low), torch.zeros_like(high)
        log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)
        valid = mask.bool()
        metrics = {
            "clip_frac_low": masked_mean(low.to(ratio.dtype), mask),
            "clip_frac_high": masked_mean(high.to(ratio.dtype), mask),
            "dual_clip_frac": masked_mean(dual_clipped.to(ratio.dtype), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": torch.where(valid, ratio, torch.zeros_like(ratio)).max(),
            # per sequence [B] (0 for a row without valid tokens): TRL's clip_ratio/low_min and high_max
            "clip_frac_low_rows": masked_mean(low.to(ratio.dtype), mask, dim=-1),
            "clip_frac_high_rows": masked_mean(high.to(ratio.dtype), mask, dim=-1),
        }
    return loss, metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None,
    agg: LossAgg = "token-mean",
    **denominators,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2).

    ``clip_eps=None`` gives the plain 0.5 * (V - R)^2. Aggregated with ``agg`` (token mean by
    default). Metrics: ``value_clip_frac`` (tokens where the clipped term is the larger).
    """
    unclipped = (values - returns).square()
    if clip_eps is None:
        per_token = 0.5 * unclipped
        clip_active = torch.zeros_like(values, dtype=torch.bool)
    else:
        # clamp with tensor bounds returns V itself (bit for bit) whenever it is inside the range
        clipped_values = torch.clamp(values, old_values - clip_eps, old_values + clip_eps)
        clipped = (clipped_values - returns).square()
        per_token = 0.5 * torch.maximum(unclipped, clipped)
        clip_active = clipped > unclipped
    loss = aggregate_loss(per_token, mask, agg, **denominators)
    with torch.no_grad():
        metrics = {"value_clip_frac": masked_mean(clip_active.to(values.dtype), mask)}
    return loss, metrics
