"""What a step adds per token once the rollout is scored, each a call from ``RLTrainer.make_rollout``:

- the mismatch between the sampler and the trained policy, logged on every step (the rollout correction itself is
  ``rlhf.core.rollout_correction``);
- the tokens that train when only the highest-entropy ones do (``top_entropy_quantile``);
- on-policy distillation's dense signal from a teacher (``teacher_model``).

Each returns tensors; the caller puts them in the rollout.
"""

import torch

from rlhf.core import logprob_mismatch, masked_mean, reverse_kl_advantages, top_fraction_mask


def log_mismatch(logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor, cap: float,
                 metrics) -> None:
    """The sampler's log-probs against the trainer's on the valid tokens, and what the rollout correction at ``cap``
    truncates (tokens) or masks (sequences), whether or not it is on (``rlhf.core.logprob_mismatch``)."""
    stats = logprob_mismatch(logprobs, sampler_logprobs, mask, cap)
    tokens, rows = mask.sum(), mask.bool().any(dim=1).sum()
    for name in ("abs_log_ratio", "k3", "truncated_frac"):
        metrics.add(f"rollout/{name}", stats[name], tokens)
    metrics.add("rollout/masked_frac", stats["masked_frac"], rows)
    metrics.add_max("rollout/max_abs_log_ratio", stats["max_abs_log_ratio"])


def high_entropy_tokens(entropy: torch.Tensor, mask: torch.Tensor, fraction: float, normalization: str, reduce,
                        metrics) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(loss mask, selected tokens or None), both [B, T], for this process's tokens among the ``fraction`` of highest
    entropy in the whole batch: the selection runs on the batch gathered from every process (the same on each), so
    it does not depend on how the batch is split. ``normalization`` (``top_entropy_normalization``): "completion"
    keeps ``mask`` and returns the selection, which weighs the policy loss; "selected" takes the others out of the
    mask, and so out of every loss term and count. Logs the fraction kept and the lowest entropy kept (global)."""
    entropies, masks = reduce.gather(entropy), reduce.gather(mask)
    selected = top_fraction_mask(entropies, masks, fraction)
    metrics.add("entropy/selected_frac", selected.sum() / masks.sum().clamp(min=1))
    if selected.any():
        metrics.add("entropy/selection_threshold", entropies[selected.bool()].min())
    selected = reduce.local_rows(selected)[:, :mask.shape[1]]
    return (mask * selected, None) if normalization == "selected" else (mask, selected)


def teacher_advantages(advantages: torch.Tensor, old_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
                       mask: torch.Tensor, coef: float, reduce, metrics) -> torch.Tensor:
    """The algorithm's advantages ([B] or [B, T]) plus ``coef`` times the teacher's per-token signal
    (``rlhf.core.reverse_kl_advantages``), [B, T]. Logs the per-token reverse KL of the sampling policy to the
    teacher."""
    signal = reverse_kl_advantages(old_logprobs, teacher_logprobs, mask)
    metrics.add("distill/reverse_kl", -masked_mean(signal, mask, all_reduce=reduce.all_reduce))
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    return advantages + coef * signal
