from rlhf.trainer.base import RLTrainer
from rlhf.trainer.grpo import GRPOTrainer

__all__ = ["GRPOTrainer", "RLTrainer"]
