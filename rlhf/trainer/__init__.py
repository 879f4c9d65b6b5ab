from rlhf.trainer.base import RLTrainer
from rlhf.trainer.grpo import GRPOTrainer
from rlhf.trainer.ppo import PPOTrainer
from rlhf.trainer.reinforce import ReinforceTrainer

__all__ = ["GRPOTrainer", "PPOTrainer", "RLTrainer", "ReinforceTrainer"]
