"""Learned reward models (Bradley-Terry training, scoring inside the trainers) and rule rewards."""

from reward_models.modeling import encode, load_reward_model, sequence_scores
from reward_models.scoring import RewardModelFunction

__all__ = ["RewardModelFunction", "encode", "load_reward_model", "sequence_scores"]
