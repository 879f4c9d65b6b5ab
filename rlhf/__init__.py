"""rlhf: token-level policy-gradient RL (GRPO, PPO, REINFORCE) for Hugging Face causal LMs."""

from rlhf.configs import GRPOConfig, PPOConfig, ReinforceConfig, RLConfig
from rlhf.critic import ValueModel
from rlhf.trainer import GRPOTrainer, PPOTrainer, ReinforceTrainer, RLTrainer

__version__ = "0.1.0"

__all__ = [
    "GRPOConfig",
    "GRPOTrainer",
    "PPOConfig",
    "PPOTrainer",
    "RLConfig",
    "RLTrainer",
    "ReinforceConfig",
    "ReinforceTrainer",
    "ValueModel",
]
