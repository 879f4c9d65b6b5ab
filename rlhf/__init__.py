"""rlhf: token-level policy-gradient RL (GRPO, PPO, REINFORCE) for Hugging Face causal LMs."""

from rlhf.configs import GRPOConfig, RLConfig
from rlhf.trainer import GRPOTrainer, RLTrainer

__version__ = "0.1.0"

__all__ = ["GRPOConfig", "GRPOTrainer", "RLConfig", "RLTrainer"]
