"""Pure-torch RL math: masked reductions, advantage estimators, losses, KL estimators, importance ratios and the
rollout correction, token selection, log-probs.

Everything here takes tensors and returns tensors (losses also return a dict of 0-d metric tensors).
Nothing here reads a config, calls ``.item()``, or imports anything beyond torch, so every function
can be tested against a slow reference loop on hand-made tensors.

Shapes: ``[B]`` per sequence, ``[B, T]`` per completion token; ``mask`` is 1 where a completion
token counts. Group ``g`` holds rows ``g*G .. g*G+G-1``.
"""

from rlhf.core.advantages import (
    REWARD_SCALES,
    RewardScale,
    discounted_returns,
    gae,
    gdpo_advantages,
    gdpo_rewards,
    grpo_advantages,
    reverse_kl_advantages,
    rloo_advantages,
    token_level_rewards,
)
from rlhf.core.importance import (
    IMPORTANCE_LEVELS,
    ROLLOUT_CORRECTIONS,
    ImportanceLevel,
    RolloutCorrection,
    log_importance_ratio,
    logprob_mismatch,
    rollout_correction,
)
from rlhf.core.logprobs import (
    entropy_from_logits,
    token_logprobs,
    token_logprobs_and_entropy,
)
from rlhf.core.losses import (
    KL_ESTIMATORS,
    LOSS_AGG_MODES,
    POLICY_LOSS_TYPES,
    KLEstimator,
    LossAgg,
    PolicyLossType,
    aggregate_loss,
    kl_penalty,
    policy_loss,
    value_loss,
)
from rlhf.core.masked import masked_mean, masked_sum, masked_var, masked_whiten
from rlhf.core.selection import top_fraction_mask

__all__ = [
    "IMPORTANCE_LEVELS",
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "POLICY_LOSS_TYPES",
    "REWARD_SCALES",
    "ROLLOUT_CORRECTIONS",
    "ImportanceLevel",
    "KLEstimator",
    "LossAgg",
    "PolicyLossType",
    "RewardScale",
    "RolloutCorrection",
    "aggregate_loss",
    "discounted_returns",
    "entropy_from_logits",
    "gae",
    "gdpo_advantages",
    "gdpo_rewards",
    "grpo_advantages",
    "kl_penalty",
    "log_importance_ratio",
    "logprob_mismatch",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "reverse_kl_advantages",
    "rloo_advantages",
    "rollout_correction",
    "token_level_rewards",
    "token_logprobs",
    "token_logprobs_and_entropy",
    "top_fraction_mask",
    "value_loss",
]
