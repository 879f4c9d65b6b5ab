"""Training learned reward models (Bradley-Terry, ``reward_models.trainer``) and built-in rule rewards
(``reward_models.rules``). Builds on ``rlhf``; scoring a reward model inside a trainer is ``rlhf.reward_model``."""

from rlhf.reward_model import RewardModelFunction, encode, load_reward_model, sequence_scores

__all__ = ["RewardModelFunction", "encode", "load_reward_model", "sequence_scores"]
