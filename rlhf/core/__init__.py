"""Pure-torch RL math: masked reductions, advantage estimators, losses, KL estimators, log-probs.

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
    grpo_advantages,
    rloo_advantages,
    token_level_rewards,
)
from rlhf.core.logprobs import (
    entropy_from_logits,
    token_logprobs,
    token_logprobs_and_entropy,
)
from rlhf.core.losses import (
    KL_ESTIMATORS,
    LOSS_AGG_MODES,
    KLEstimator,
    LossAgg,
    aggregate_loss,
    kl_penalty,
    policy_loss,
    value_loss,
)
from rlhf.core.masked import masked_mean, masked_sum, masked_var, masked_whiten

__all__ = [
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "REWARD_SCALES",
    "KLEstimator",
    "LossAgg",
    "RewardScale",
    "aggregate_loss",
    "discounted_returns",
    "entropy_from_logits",
    "gae",
    "grpo_advantages",
    "kl_penalty",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "rloo_advantages",
    "token_level_rewards",
    "token_logprobs",
    "token_logprobs_and_entropy",
    "value_loss",
]
